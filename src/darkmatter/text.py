"""Corpora to fixed-length token contexts.

Sources: ``austen`` (five public-domain novels shipped with the package), a ``.txt`` file or a folder of
them (each file is one document), a ``.jsonl`` file (one document per line, text under ``text_field``;
``.jsonl.gz`` and ``.jsonl.zst`` are read as they are), a folder of such files when it holds no ``.txt`` or
``.md`` files (files in sorted path order), or ``hf:NAME[:CONFIG]`` for a Hugging Face data set (streamed;
online only; needs the ``datasets`` extra). A local JSONL copy of a data set stands in for its ``hf:`` name.

How documents become contexts:
- Each document is tokenized without special tokens. With a BOS token (``bos``), every context starts
  with it and holds ``ctx_len - 1`` document tokens; otherwise ``ctx_len`` document tokens.
- ``packing="chunk"``: a document is cut into consecutive non-overlapping windows; a tail shorter than a
  window is dropped. ``n_contexts`` windows are drawn from all windows by a seeded permutation.
- ``packing="truncate"`` (the paper's choice): one context per document, its first window; documents
  shorter than a window are skipped. Documents are taken in (seeded, shuffled) order.
Contexts never mix documents, so no context contains a document boundary.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from darkmatter.errors import TextError
from darkmatter.hashing import sha256_hex

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
TEXT_SUFFIXES = frozenset({".txt", ".md"})
AUSTEN_FILES = (
    "emma.txt.gz",
    "mansfieldpark.txt.gz",
    "northangerabbey.txt.gz",
    "prideprejudice.txt.gz",
    "sensesensibility.txt.gz",
)


class TextConfig(BaseModel):
    """Where text comes from and how it is cut into contexts."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        "austen",
        min_length=1,
        description="'austen', a .txt file or folder, a .jsonl file or folder, or hf:NAME",
    )
    ctx_len: int = Field(256, ge=2, description="Tokens per context, BOS included.")
    n_contexts: int = Field(128, ge=1, description="Number of contexts to draw.")
    skip_positions: int = Field(
        16, ge=0, description="Positions at the start of each context left out of analyses (paper: 200)."
    )
    packing: Literal["chunk", "truncate"] = Field("chunk", description="How documents become contexts.")
    bos: Literal["auto", "always", "never"] = Field("auto", description="Prepend the model's BOS token.")
    seed: int = Field(0, description="Seed for the choice and order of contexts.")
    text_field: str = Field("text", description="Field holding the text in JSONL or HF data sets.")
    hf_split: str = Field("train", description="Split of a HF data set.")
    shuffle_buffer: int = Field(10_000, ge=1, description="Streaming shuffle buffer for HF data sets.")

    @model_validator(mode="after")
    def _positions_left(self) -> TextConfig:
        if self.skip_positions >= self.ctx_len:
            raise ValueError(
                f"skip_positions ({self.skip_positions}) must be below ctx_len ({self.ctx_len}): no position "
                "of a context would be analysed"
            )
        return self


@dataclass
class Contexts:
    """Token contexts ``tokens [n_contexts, ctx_len]`` (int32) and where each came from."""

    tokens: np.ndarray
    doc_index: np.ndarray  # [n_contexts] index of the source document
    has_bos: bool

    @property
    def fingerprint(self) -> str:
        return sha256_hex(np.ascontiguousarray(self.tokens, dtype=np.int32).tobytes())[:16]


def austen_documents(novel: str | None = None) -> Iterator[str]:
    """The five Austen novels shipped as package data, or one of them (``emma``, ``northangerabbey``, ...)."""
    base = resources.files("darkmatter") / "data" / "austen"
    names: tuple[str, ...] = AUSTEN_FILES
    if novel is not None:
        names = tuple(n for n in AUSTEN_FILES if n.removesuffix(".txt.gz") == novel)
        if not names:
            known = ", ".join(f"austen:{n.removesuffix('.txt.gz')}" for n in AUSTEN_FILES)
            raise TextError(f"Unknown Austen novel {novel!r}; use 'austen' (all five) or one of {known}.")
    for name in names:
        yield gzip.decompress((base / name).read_bytes()).decode("utf-8")


def _open_text(path: Path) -> IO[str]:
    """A UTF-8 text stream of a plain, gzip (``.gz``) or zstandard (``.zst``) file."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".zst"):
        try:
            import zstandard  # type: ignore[import-not-found]
        except ImportError as exc:
            raise TextError(
                f"{path} is zstandard-compressed; install the 'zstandard' package or decompress it first."
            ) from exc
        raw = zstandard.ZstdDecompressor().stream_reader(
            path.open("rb"), read_across_frames=True, closefd=True
        )
        return io.TextIOWrapper(raw, encoding="utf-8")
    return path.open(encoding="utf-8")


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TextError(f"{path}:{lineno} is not valid JSON ({exc.msg}).") from exc
                if not isinstance(row, dict) or not isinstance(row.get(field), str):
                    raise TextError(f"{path}:{lineno} has no string field {field!r}; set text.text_field.")
                yield row[field]
    except (OSError, EOFError, UnicodeDecodeError) as exc:  # truncated or corrupt file, not UTF-8
        raise TextError(f"{path} cannot be read as UTF-8 JSONL text: {exc}.") from exc


def _hf_documents(spec: str, cfg: TextConfig) -> Iterator[str]:
    from darkmatter.lm.loading import network_allowed

    if not network_allowed():
        raise TextError(
            f"Text source {spec!r} is streamed from the Hugging Face hub and needs the network: pass "
            "--online (or set DARKMATTER_ONLINE=1), or set text.source to a local copy (a .jsonl file or "
            'folder with one {"text": ...} per line).'
        )
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as exc:
        raise TextError(
            "HF data sets need the 'datasets' package: pip install 'sae-darkmatter[datasets]'."
        ) from exc
    name, _, config = spec.removeprefix("hf:").partition(":")
    ds = datasets.load_dataset(name, config or None, split=cfg.hf_split, streaming=True)
    ds = ds.shuffle(seed=cfg.seed, buffer_size=cfg.shuffle_buffer)
    for row in ds:
        yield row[cfg.text_field]


def documents(cfg: TextConfig) -> Iterator[str]:
    """Iterate over the documents of a text source."""
    src = cfg.source
    if src == "austen" or src.startswith("austen:"):
        yield from austen_documents(src.partition(":")[2] or None)
        return
    if src.startswith("hf:"):
        yield from _hf_documents(src, cfg)
        return
    path = Path(src).expanduser()
    if not path.exists():
        raise TextError(f"Text source {src!r} does not exist. Use 'austen', a .txt/.jsonl path, or hf:NAME.")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        if files:
            for p in files:
                yield _read_plain_text(p)
            return
        jsonl = sorted(p for p in path.rglob("*") if p.name.endswith(JSONL_SUFFIXES) and p.is_file())
        if not jsonl:
            raise TextError(f"Folder {path} holds no .txt, .md or {'/'.join(JSONL_SUFFIXES)} files.")
        for p in jsonl:
            yield from _jsonl_documents(p, cfg.text_field)
    elif path.name.endswith(JSONL_SUFFIXES):
        yield from _jsonl_documents(path, cfg.text_field)
    else:
        yield _read_plain_text(path)


def _read_plain_text(path: Path) -> str:
    """A text file as a string: UTF-8, no NUL bytes (a binary file is refused, never read as text)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TextError(f"Text file {path} cannot be read: {exc}.") from exc
    if b"\x00" in data:
        raise TextError(f"{path} holds NUL bytes: it is a binary file, not text. Point text.source at text.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TextError(
            f"{path} is not UTF-8 text (invalid byte at offset {exc.start}); convert it to UTF-8 first."
        ) from exc


def _bos_id(tokenizer: Any, bos_token_id: int | None, mode: str) -> int | None:
    if mode == "never":
        return None
    if bos_token_id is None and mode == "always":
        raise TextError("text.bos is 'always' but the tokenizer defines no BOS token; use 'auto' or 'never'.")
    return bos_token_id


_TOKENIZED: dict[tuple[Any, ...], list[np.ndarray | None]] = {}
"""Token ids of whole local sources, per source and tokenizer: a study tokenizes its text once."""


def _source_key(cfg: TextConfig, tokenizer: Any) -> tuple[Any, ...] | None:
    """What identifies a source's token ids; None for sources that are streamed (never cached)."""
    if cfg.source.startswith("hf:"):
        return None
    files: tuple[tuple[str, int, int], ...] = ()
    if not cfg.source.startswith("austen"):
        path = Path(cfg.source).expanduser()
        found = sorted(path.rglob("*")) if path.is_dir() else [path]
        files = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in found if f.is_file())
    vocab = (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer))
    return (cfg.source, cfg.text_field, files, vocab)


def _tokenized_documents(cfg: TextConfig, tokenizer: Any) -> Iterator[tuple[int, np.ndarray | None]]:
    """(document index, token ids, or None for a blank document), from memory when tokenized before."""
    key = _source_key(cfg, tokenizer)
    if key is not None and key in _TOKENIZED:
        yield from enumerate(_TOKENIZED[key])
        return
    seen: list[np.ndarray | None] = []
    for doc_i, text in enumerate(documents(cfg)):
        ids = None
        if text.strip():
            ids = np.asarray(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], np.int32)
        seen.append(ids)
        yield doc_i, ids
    if key is not None:  # only a source read to its end is kept
        _TOKENIZED.clear()
        _TOKENIZED[key] = seen


def make_contexts(cfg: TextConfig, tokenizer: Any, bos_token_id: int | None) -> Contexts:
    """Tokenize a source into ``cfg.n_contexts`` contexts of ``cfg.ctx_len`` tokens (see module doc)."""
    bos = _bos_id(tokenizer, bos_token_id, cfg.bos)
    width = cfg.ctx_len - (1 if bos is not None else 0)
    if cfg.skip_positions >= cfg.ctx_len:
        raise TextError(f"skip_positions ({cfg.skip_positions}) must be below ctx_len ({cfg.ctx_len}).")
    windows: list[np.ndarray] = []
    owners: list[int] = []
    n_docs = 0
    total_tokens = 0
    for doc_i, ids in _tokenized_documents(cfg, tokenizer):
        n_docs += 1
        if ids is None:
            continue
        total_tokens += len(ids)
        if cfg.packing == "truncate":
            if len(ids) >= width:
                windows.append(ids[:width])
                owners.append(doc_i)
                if len(windows) >= cfg.n_contexts:
                    break
        else:
            for start in range(0, len(ids) - width + 1, width):
                windows.append(ids[start : start + width])
                owners.append(doc_i)
    if total_tokens == 0:
        raise TextError(f"Text source {cfg.source!r} is empty ({n_docs} documents, no tokens).")
    if len(windows) < cfg.n_contexts:
        raise TextError(
            f"Text source {cfg.source!r} gives only {len(windows)} contexts of {cfg.ctx_len} tokens "
            f"({total_tokens} tokens in {n_docs} documents, packing={cfg.packing!r}); {cfg.n_contexts} were "
            "requested. Provide more text or lower text.n_contexts or text.ctx_len."
        )
    if cfg.packing == "chunk":
        order = np.random.default_rng(cfg.seed).permutation(len(windows))[: cfg.n_contexts]
    else:
        order = np.arange(cfg.n_contexts)
    body = np.stack([windows[i] for i in order])
    if bos is not None:
        body = np.concatenate([np.full((len(order), 1), bos, dtype=np.int32), body], axis=1)
    return Contexts(
        tokens=body.astype(np.int32),
        doc_index=np.asarray([owners[i] for i in order]),
        has_bos=bos is not None,
    )


def held_out_contexts(cfg: TextConfig, tokenizer: Any, bos_token_id: int | None, n: int) -> np.ndarray:
    """``n`` contexts that the study never harvested: the same seeded order continued past ``n_contexts``.

    Used for the downstream splices, so no CE number is measured on tokens an SAE or probe was fitted on.
    """
    more = cfg.model_copy(update={"n_contexts": cfg.n_contexts + n})
    return make_contexts(more, tokenizer, bos_token_id).tokens[cfg.n_contexts :]
