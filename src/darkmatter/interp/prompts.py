"""Explanation and detection prompts (chat messages) and robust parsers of the judge's replies.

The explanation prompt shows the top examples with the tokens above ``HIGHLIGHT_FRACTION`` of the
example's max activation marked ``<<...>>`` (the paper's 0.6), one-shot, and asks for one line
``[EXPLANATION]: ...``. The detection prompt shows unmarked examples and asks for a list of 0/1; the
fuzzing prompt shows examples with marked tokens (the latent's or random ones) and asks the same way
whether each marking matches the explanation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

Message = dict[str, str]
PROMPT_VERSION = 1
HIGHLIGHT_FRACTION = 0.6
MAX_EXPLANATION_CHARS = 300

EXPLAIN_SYSTEM = (
    "You are a meticulous AI researcher investigating one feature of a language model. You will see short "
    "text examples in which the feature is active. In each example, the tokens where the feature is most "
    "active are marked <<like this>>. Find what the marked tokens have in common, taking the surrounding "
    "text into account. Your explanation is a short phrase, not a sentence about the examples. Reply with "
    "a single line of the form\n[EXPLANATION]: <your explanation>"
)
EXPLAIN_SHOT = (
    "Example 1: and he was <<over the moon>> to hear the news\n"
    "Example 2: we'll be <<laughing all the way>> to the bank\n"
    "Example 3: the party was <<great>> and everyone stayed late",
    "[EXPLANATION]: expressions of happiness or excitement",
)
DETECT_SYSTEM = (
    "You are an intelligent and meticulous linguistics researcher. You will be given an explanation of a "
    'feature of text, such as "male pronouns" or "text with negative sentiment", followed by numbered text '
    "examples. Decide for each example whether the feature is present in it. Reply with a Python list of "
    "0s and 1s, one per example in order (1 = present, 0 = absent), and nothing else."
)
DETECT_SHOT = (
    "Feature explanation: words related to animals\n\n"
    "Example 1: the dog barked at the mailman\n\n"
    "Example 2: stock prices fell sharply today\n\n"
    "Example 3: a flock of birds flew south\n\n"
    "Answer with a list of 3 values.",
    "[1, 0, 1]",
)
FUZZ_SYSTEM = (
    "You are an intelligent and meticulous linguistics researcher. You will be given an explanation of a "
    "feature of text, followed by numbered text examples in which some tokens are marked <<like this>>. In "
    "some examples the marked tokens are the ones the explanation describes; in others they were chosen at "
    "random. Decide for each example whether its marked tokens match the explanation. Reply with a Python "
    "list of 0s and 1s, one per example in order (1 = correctly marked, 0 = randomly marked), and nothing "
    "else."
)
FUZZ_SHOT = (
    "Feature explanation: words related to animals\n\n"
    "Example 1: the <<dog>> barked at the mailman\n\n"
    "Example 2: the dog barked <<at>> the mailman\n\n"
    "Example 3: a flock of <<birds>> flew south\n\n"
    "Answer with a list of 3 values.",
    "[1, 0, 1]",
)


def _clean(s: str) -> str:
    return s.replace("\r", "").replace("\n", "\\n")


def render(tokens: Sequence[str], acts: Sequence[float] | None = None) -> str:
    """Join token strings; with ``acts``, mark runs above ``HIGHLIGHT_FRACTION`` of the max as ``<<...>>``."""
    if acts is None:
        return _clean("".join(tokens))
    return render_marked(tokens, highlight_mask(acts))


def highlight_mask(acts: Sequence[float]) -> list[bool]:
    """The tokens ``render`` marks: those above ``HIGHLIGHT_FRACTION`` of the window's (positive) max."""
    top = max(acts, default=0.0)
    return [top > 0 and a > HIGHLIGHT_FRACTION * top for a in acts]


def render_marked(tokens: Sequence[str], marked: Sequence[bool]) -> str:
    """Join token strings, marking runs of ``marked`` tokens as ``<<...>>`` (leading spaces stay outside)."""
    out: list[str] = []
    inside = False
    for tok, hot in zip(tokens, marked, strict=True):
        text = _clean(tok)
        if hot and not inside:
            stripped = text.lstrip()
            out.append(text[: len(text) - len(stripped)] + "<<")
            text, inside = stripped, True
        elif inside and not hot:
            out.append(">>")
            inside = False
        out.append(text)
    if inside:
        out.append(">>")
    return "".join(out)


def explanation_messages(examples: Sequence[tuple[Sequence[str], Sequence[float]]]) -> list[Message]:
    """Chat messages asking for an explanation of ``(token strings, activations)`` examples."""
    body = "\n".join(f"Example {i}: {render(t, a)}" for i, (t, a) in enumerate(examples, 1))
    return [
        {"role": "system", "content": EXPLAIN_SYSTEM},
        {"role": "user", "content": EXPLAIN_SHOT[0]},
        {"role": "assistant", "content": EXPLAIN_SHOT[1]},
        {"role": "user", "content": body},
    ]


def detection_messages(explanation: str, examples: Sequence[Sequence[str]]) -> list[Message]:
    """Chat messages asking which of the (unmarked) examples show the explained feature."""
    body = "\n\n".join(f"Example {i}: {render(t)}" for i, t in enumerate(examples, 1))
    user = f"Feature explanation: {explanation}\n\n{body}\n\nAnswer with a list of {len(examples)} values."
    return [
        {"role": "system", "content": DETECT_SYSTEM},
        {"role": "user", "content": DETECT_SHOT[0]},
        {"role": "assistant", "content": DETECT_SHOT[1]},
        {"role": "user", "content": user},
    ]


def fuzzing_messages(
    explanation: str, examples: Sequence[tuple[Sequence[str], Sequence[bool]]]
) -> list[Message]:
    """Chat messages asking, per example with ``marked`` tokens, whether the marking fits the explanation."""
    body = "\n\n".join(f"Example {i}: {render_marked(t, m)}" for i, (t, m) in enumerate(examples, 1))
    user = f"Feature explanation: {explanation}\n\n{body}\n\nAnswer with a list of {len(examples)} values."
    return [
        {"role": "system", "content": FUZZ_SYSTEM},
        {"role": "user", "content": FUZZ_SHOT[0]},
        {"role": "assistant", "content": FUZZ_SHOT[1]},
        {"role": "user", "content": user},
    ]


_EXPLANATION_TAG = re.compile(r"\[?\s*explanation\s*\]?\s*:", re.IGNORECASE)


def parse_explanation(text: str) -> str | None:
    """The text after ``[EXPLANATION]:`` (or else the first non-empty line), one line; None if empty."""
    m = _EXPLANATION_TAG.search(text)
    rest = text[m.end() :] if m else text
    line = next((ln for ln in rest.splitlines() if ln.strip()), "")
    line = line.strip().strip("\"'`*").strip()
    return line[:MAX_EXPLANATION_CHARS] or None


_WORDS = {"1": 1, "0": 0, "true": 1, "false": 0, "yes": 1, "no": 0}
_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
_DIGITS = re.compile(r"[01](?:[\s,;]*[01])*")
_NUMBERING = re.compile(r"^(?:example\s*)?\d+\s*(?:[:.)\-]\s*|\s+(?=[a-z]))", re.IGNORECASE)
_LINE_ANSWER = re.compile(r"^(yes|no|true|false|1|0)(?:$|[\s]*[,.;:!)]|\s*-)", re.IGNORECASE)


def parse_detection(text: str, n: int) -> list[int] | None:
    """``n`` answers of 0/1 from a reply, or None (a parse failure) when absent or of the wrong length.

    Accepted: a Python/JSON list (``[1, 0]``, ``["1","0"]``, ``[true, false]``), a bare run of digits
    separated by spaces, commas or nothing (``1 0``, ``1,0``, ``10``), or one yes/no/1/0 answer per line,
    optionally numbered (``1: yes``, ``Example 2. no``). A 0/1 list of the wrong length is a failure.
    """
    for m in _BRACKETS.finditer(text):
        items = [i.strip().strip("\"'").strip().lower() for i in m.group(1).split(",")]
        if items and all(i in _WORDS for i in items):
            return [_WORDS[i] for i in items] if len(items) == n else None
    bare = text.strip().strip("`").strip()
    if _DIGITS.fullmatch(bare):
        digits = [int(c) for c in bare if c in "01"]
        return digits if len(digits) == n else None
    answers: list[int] = []
    for line in text.splitlines():
        raw = line.strip().strip("*`\"'").strip()
        s = _NUMBERING.sub("", raw).strip().strip("*`\"'").strip() or raw
        m2 = _LINE_ANSWER.match(s)
        if m2 is None:
            continue
        answers.append(_WORDS[m2.group(1).lower()])
    return answers if len(answers) == n else None
