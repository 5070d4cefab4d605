"""Corpora become fixed-length contexts deterministically; bad sources give clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from darkmatter.errors import TextError
from darkmatter.text import TextConfig, austen_documents, make_contexts

from conftest import tiny_tokenizer


def test_chunk_contexts_shape_bos_and_determinism(corpus_file: Path) -> None:
    tok = tiny_tokenizer()
    cfg = TextConfig(source=str(corpus_file), ctx_len=32, n_contexts=10, skip_positions=2, seed=3)
    a = make_contexts(cfg, tok, tok.bos_token_id)
    b = make_contexts(cfg, tok, tok.bos_token_id)
    assert a.tokens.shape == (10, 32) and a.has_bos
    assert (a.tokens[:, 0] == tok.bos_token_id).all()
    assert np.array_equal(a.tokens, b.tokens)
    c = make_contexts(cfg.model_copy(update={"seed": 4}), tok, tok.bos_token_id)
    assert not np.array_equal(a.tokens, c.tokens)
    # every context is a contiguous window of the document's tokens
    doc = tok(corpus_file.read_text(), add_special_tokens=False)["input_ids"]
    text = ",".join(map(str, doc))
    for row in a.tokens:
        assert ",".join(map(str, row[1:])) in text


def test_no_bos_and_truncate(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    lines = [{"text": "abcdefghij" * (i + 1)} for i in range(6)]
    p = tmp_path / "docs.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in lines))
    cfg = TextConfig(
        source=str(p), ctx_len=25, n_contexts=4, skip_positions=0, packing="truncate", bos="never"
    )
    ctx = make_contexts(cfg, tok, tok.bos_token_id)
    assert not ctx.has_bos
    assert list(ctx.doc_index) == [2, 3, 4, 5]  # documents shorter than 25 tokens are skipped
    assert tok.decode(ctx.tokens[0].tolist()) == ("abcdefghij" * 3)[:25]


def test_austen_is_shipped() -> None:
    docs = list(austen_documents())
    assert len(docs) == 5
    assert docs[0].startswith("EMMA") and sum(len(d) for d in docs) > 3_000_000


def test_errors(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(TextError, match="empty"):
        make_contexts(TextConfig(source=str(empty)), tok, 0)
    short = tmp_path / "short.txt"
    short.write_text("hello world " * 5)
    with pytest.raises(TextError, match="gives only 1 contexts"):
        make_contexts(TextConfig(source=str(short), ctx_len=32, n_contexts=5, skip_positions=0), tok, 0)
    with pytest.raises(TextError, match="does not exist"):
        make_contexts(TextConfig(source=str(tmp_path / "nope.txt")), tok, 0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(TextError, match=r"bad.jsonl:2"):
        make_contexts(TextConfig(source=str(bad)), tok, 0)
    with pytest.raises(ValidationError, match="skip_positions"):  # refused when the config is read
        TextConfig(source=str(short), ctx_len=8, skip_positions=8)


def test_binary_and_non_utf8_text_is_refused(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"abc\x00\x01\x02" * 100)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait ".encode("latin-1") * 50)
    for path, message in ((binary, "binary file"), (latin, "not UTF-8 text")):
        with pytest.raises(TextError, match=message):
            make_contexts(TextConfig(source=str(path), ctx_len=8, n_contexts=2, skip_positions=0), tok, 0)


def test_one_austen_novel_and_an_unknown_one() -> None:
    (northanger,) = list(austen_documents("northangerabbey"))
    assert "Catherine Morland" in northanger
    assert len(list(austen_documents())) == 5
    with pytest.raises(TextError, match="austen:emma"):
        list(austen_documents("persuasion"))


def test_a_source_is_tokenized_once_per_process(corpus_file: Path) -> None:
    tok = tiny_tokenizer()
    calls = []

    class Counting:
        name_or_path = "counting"

        def __len__(self) -> int:
            return len(tok)

        def __call__(self, text: str, **kw: object) -> object:
            calls.append(len(text))
            return tok(text, **kw)

    cfg = TextConfig(source=str(corpus_file), ctx_len=32, n_contexts=10, skip_positions=2)
    first = make_contexts(cfg, Counting(), tok.bos_token_id)
    again = make_contexts(cfg, Counting(), tok.bos_token_id)
    more = make_contexts(cfg.model_copy(update={"n_contexts": 12}), Counting(), tok.bos_token_id)
    assert len(calls) == 1  # three calls, one tokenization
    assert np.array_equal(first.tokens, again.tokens) and more.tokens.shape == (12, 32)
    corpus_file.write_text(corpus_file.read_text() + " more words")  # a changed file is read again
    make_contexts(cfg, Counting(), tok.bos_token_id)
    assert len(calls) == 2
