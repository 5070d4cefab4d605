"""Latent cards in the report: drawn from the auto-interp records, escaped, shaded by activation."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from darkmatter.interp import DetectionCounts, FuzzCounts, summarize, summarize_fuzz
from darkmatter.interp.autointerp import AutoInterpResult
from darkmatter.interp.export import LatentRecord, LatentsFile, Score, Window, write_latent_records
from darkmatter.report import cards
from darkmatter.report.build import write_report
from darkmatter.results import write_result
from darkmatter.study.steps.autointerp import AutoInterpStepResult


class Spans(HTMLParser):
    """Every element's tag, attributes and own text, in document order."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.items: list[dict[str, Any]] = []
        self._stack: list[dict[str, Any]] = []
        self.feed(source)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        item = {"tag": tag, "attrs": dict(attrs), "text": ""}
        self.items.append(item)
        self._stack.append(item)

    def handle_endtag(self, tag: str) -> None:
        while self._stack and self._stack.pop()["tag"] != tag:
            pass

    def handle_data(self, data: str) -> None:
        if self._stack:
            self._stack[-1]["text"] += data

    def tokens(self) -> list[dict[str, Any]]:
        return [i for i in self.items if "t" in i["attrs"].get("class", "").split()]

    def with_class(self, name: str) -> list[dict[str, Any]]:
        return [i for i in self.items if name in (i["attrs"].get("class") or "").split()]


def _score(pos: tuple[int, int] = (7, 10), neg: tuple[int, int] = (3, 4)) -> Score:
    counts = DetectionCounts(negative_correct=neg[0], negative_total=neg[1])
    counts.decile_correct[9], counts.decile_total[9] = pos
    return Score.detection(summarize([counts]))


def _window(tokens: list[str], acts: list[float], context: int = 0) -> Window:
    return Window(
        context=context,
        start=2,
        token_ids=list(range(len(tokens))),
        tokens=tokens,
        activations=acts,
        max_activation=max(acts),
    )


def _record(latent: int, explanation: str = "dog names", windows: list[Window] | None = None) -> LatentRecord:
    fuzz = FuzzCounts(true_correct=4, true_total=5, random_correct=2, random_total=5)
    return LatentRecord(
        latent=latent,
        explanation=explanation,
        explanation_parsed=True,
        n_active_tokens=40,
        n_active_windows=12,
        detection=_score(),
        fuzzing=Score.fuzzing(summarize_fuzz([fuzz])),
        n_judge_calls=5,
        top_windows=windows or [_window([" the", " dog", " ran"], [0.0, 2.0, 0.5])],
    )


def _file(latents: list[LatentRecord], sae: str = "w32", component: str = "linear") -> LatentsFile:
    return LatentsFile(
        meta={"sae": sae, "component": component},
        judge={"kind": "endpoint", "model": "judge-model", "weak": False},
        settings={},
        detection=_score(),
        fuzzing=None,
        latents=latents,
        skipped={},
    )


def _step_result(components: tuple[str, ...] = ("linear",), sae_itself: bool = False) -> AutoInterpStepResult:
    scored = AutoInterpResult(judge={}, weak_judge=False, settings={}, latents=[], summary=summarize([]))
    return AutoInterpStepResult(
        experiment="autointerp",
        sae="w32",
        components={c: scored for c in components},
        latents={c: [] for c in components},
        sae_scores=scored if sae_itself else None,
    )


def test_shading_grows_with_the_activation_and_skips_inactive_tokens() -> None:
    values = (-1.0, 0.0, 0.001, 0.2, 1.0, 1.99, 2.0, 5.0)
    assert [cards.level(a, 2.0) for a in values] == [0, 0, 1, 1, 5, 10, 10, 10]
    assert cards.level(1.0, 0.0) == 0 and cards.level(float("nan"), 2.0) == 0
    steps = [cards.level(a / 100, 1.0) for a in range(101)]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == cards.LEVELS
    # each step is a visibly stronger background than the one below it
    found = re.findall(r"\.s(\d+)\{background:rgba\([\d,]+,([\d.]+)\)\}", cards.CARD_CSS)
    assert [int(n) for n, _ in found] == list(range(1, cards.LEVELS + 1))
    alphas = [float(a) for _, a in found]
    assert alphas == sorted(set(alphas)) and alphas[0] > 0 and alphas[-1] == 1


def test_a_window_escapes_its_tokens_and_marks_the_maximum() -> None:
    tokens = ["<script>", " a&b", ' "q"', "\n", "", "'"]
    acts = [0.0, 1.0, 4.0, 2.0, 0.0, 0.3]
    html = cards.window_html(_window(tokens, acts), top=8.0)
    assert "<script>" not in html and "&lt;script&gt;" in html
    spans = Spans(html).tokens()
    assert [s["text"] for s in spans] == ["<script>", " a&b", ' "q"', "↵", "∅", "'"]
    assert [s["attrs"]["title"] for s in spans] == [
        f"{t!r}: {a:.4g}" for t, a in zip(tokens, acts, strict=True)
    ]
    classes = [s["attrs"]["class"].split() for s in spans]
    assert classes[0] == ["t"] and classes[4] == ["t", "c"]  # inactive: no shading
    assert "s2" in classes[1] and "s5" in classes[2] and "s3" in classes[3] and "s1" in classes[5]
    assert [i for i, c in enumerate(classes) if "mx" in c] == [2]  # only the window's maximum
    assert "c" in classes[3]  # a line break is drawn as a muted symbol


def test_a_card_says_when_there_is_no_explanation() -> None:
    unparsed = _record(3, explanation="").model_copy(update={"explanation_parsed": False})
    html = cards.card_html(unparsed, "linear", "linear error")
    assert "not explained: the judge's reply could not be parsed" in html and "“" not in html
    empty = _record(3, explanation="  ")
    assert "not explained: the judge's explanation was empty" in cards.card_html(empty, "linear", "x")
    assert "not explained: no judge was asked" in cards.card_html(unparsed, "linear", "x", judge_kind="none")
    quoted = cards.card_html(_record(3, explanation='<b>"tags"</b> & co'), "linear", "x")
    assert "“&lt;b&gt;&quot;tags&quot;&lt;/b&gt; &amp; co”" in quoted
    no_fuzz = _record(3).model_copy(update={"fuzzing": None})
    assert "fuzzing off" in cards.card_html(no_fuzz, "linear", "x")


def test_a_card_shows_the_scores_with_intervals_and_caps_its_windows() -> None:
    windows = [_window([f" w{i}", " x"], [float(10 - i), 0.0], context=i) for i in range(8)]
    rec = _record(7, windows=windows)
    page = Spans(cards.card_html(rec, "nonlinear", "nonlinear error"))
    (card,) = page.with_class("card")
    assert card["attrs"]["id"] == "latent-nonlinear-7"
    assert len(page.with_class("win")) == cards.WINDOWS_PER_CARD
    assert f"{cards.WINDOWS_PER_CARD} of 8 top windows shown" in " ".join(i["text"] for i in page.items)
    d = rec.detection
    intervals = [i["text"] for i in page.with_class("ci")]
    assert intervals[0] == f"[{d.ci_low:.2f}, {d.ci_high:.2f}]" and len(intervals) == 2
    # the shading is relative to the card's top window: the first window's peak is the strongest
    shaded = [s for s in page.tokens() if "mx" in s["attrs"]["class"]]
    assert "s10" in shaded[0]["attrs"]["class"] and "s7" in shaded[3]["attrs"]["class"]


def _study_run(run_dir: Path, records: dict[str, LatentsFile], sae_itself: bool = False) -> None:
    write_result(run_dir, _step_result(tuple(c for c in records if c != "sae"), sae_itself))
    for component, file in records.items():
        write_latent_records(run_dir / "interp" / f"latents-{component}.json", file)


def test_the_cards_come_from_the_records(tmp_path: Path) -> None:
    linear = _file([_record(1, "capitalised names"), _record(5, "closing quotes")])
    own = _file([_record(9, "sentence ends")], component="sae")
    _study_run(tmp_path, {"linear": linear, "sae": own}, sae_itself=True)
    page = Spans(write_report(tmp_path).read_text())
    blocks = {b["attrs"]["data-component"]: b for b in page.with_class("cards")}
    assert set(blocks) == {"linear", "sae"}
    assert [c["attrs"]["id"] for c in page.with_class("card")] == [
        "latent-linear-1",
        "latent-linear-5",
        "latent-sae-9",
    ]
    explanations = [e["text"] for e in page.with_class("ex")]
    assert explanations == ["“capitalised names”", "“closing quotes”", "“sentence ends”"]

    # edit the record on disk: the rebuilt report follows it
    data = json.loads((tmp_path / "interp" / "latents-linear.json").read_text())
    data["latents"][0]["explanation"] = "edited <explanation>"
    data["latents"][0]["top_windows"][0]["tokens"][1] = " cat"
    data["latents"][0]["top_windows"][0].update(activations=[3.0, 0.0, 1.5], max_activation=3.0)
    (tmp_path / "interp" / "latents-linear.json").write_text(json.dumps(data))
    page = Spans(write_report(tmp_path).read_text())
    assert page.with_class("ex")[0]["text"] == "“edited <explanation>”"
    toks = page.tokens()[:3]  # the first card's first window
    assert [t["text"] for t in toks] == [" the", " cat", " ran"]
    assert "mx" in toks[0]["attrs"]["class"] and "s5" in toks[2]["attrs"]["class"]


def test_many_latents_are_capped_and_folded(tmp_path: Path) -> None:
    many = _file([_record(i) for i in range(cards.CARDS_PER_COMPONENT + 6)])
    html = cards.component_cards(many, "linear", "Latent cards", "linear error", "interp/latents-linear.json")
    page = Spans(html)
    assert len(page.with_class("card")) == cards.CARDS_PER_COMPONENT
    assert len([i for i in page.items if i["tag"] == "details"]) == 1
    assert html.index("<details>") > html.index(f'id="latent-linear-{cards.OPEN_CARDS - 1}"')
    assert html.index(f'id="latent-linear-{cards.OPEN_CARDS}"') > html.index("<details>")
    assert f"{cards.CARDS_PER_COMPONENT - cards.OPEN_CARDS} more latents" in html
    assert (
        f"{cards.CARDS_PER_COMPONENT + 6} scored latents, the first {cards.CARDS_PER_COMPONENT} shown" in html
    )
    assert "<details>" not in cards.component_cards(_file([_record(1)]), "linear", "t", "w", "s")


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (None, "interp/latents-linear.json is missing"),
        ("{not json", "interp/latents-linear.json is unreadable (ValidationError)"),
        (_file([_record(1)], sae="another").model_dump_json(), "holds latents of another, not w32"),
    ],
)
def test_missing_or_foreign_records_give_a_note_not_cards(
    tmp_path: Path, content: str | None, why: str
) -> None:
    write_result(tmp_path, _step_result())
    if content is not None:
        (tmp_path / "interp").mkdir()
        (tmp_path / "interp" / "latents-linear.json").write_text(content)
    html = cards.latent_cards(_step_result(), tmp_path)
    assert why in html and 'class="card"' not in html
