"""Corpora become fixed-length contexts deterministically; bad sources give clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

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
    with pytest.raises(TextError, match="skip_positions"):
        make_contexts(TextConfig(source=str(short), ctx_len=8, skip_positions=8), tok, 0)
