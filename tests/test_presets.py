"""Paper presets resolve to the published SAE ids, run end to end on tiny local stand-ins in the same
layouts (Gemma Scope ``params.npz`` folders, Llama Scope ``hyperparams.json`` folders, a JSONL corpus),
and fail offline with one clear error."""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from darkmatter.cli import main
from darkmatter.config import StudyConfig, resolve_config
from darkmatter.errors import ConfigError, TextError
from darkmatter.lm.loading import load_tokenizer
from darkmatter.text import TextConfig, make_contexts

from conftest import tiny_model, tiny_tokenizer

PAPER_PRESETS = ("paper-gemma-2-2b", "paper-gemma-2-9b", "llama-scope-8b")
G9 = "google/gemma-scope-9b-pt-"
EXPECTED_9B = [
    f"{G9}res:layer_20/width_16k/average_l0_58",
    f"{G9}res:layer_20/width_32k/average_l0_57",
    f"{G9}res:layer_20/width_65k/average_l0_55",
    f"{G9}res:layer_20/width_131k/average_l0_62",
    f"{G9}res:layer_20/width_262k/average_l0_64",
    f"{G9}res:layer_20/width_524k/average_l0_48",
    f"{G9}res:layer_20/width_1m/average_l0_57",
    f"{G9}res:layer_19/width_16k/average_l0_67",
    f"{G9}mlp:layer_20/width_16k/average_l0_41",
    f"{G9}res:layer_20/width_16k/average_l0_68",
]
# The published Gemma Scope residual grids at the presets' layers: width -> nominal L0s.
GRID_9B_L20 = {
    "16k": [11, 20, 36, 57, 58, 68, 138, 310, 393, 408, 427],
    "32k": [11, 55, 57, 334, 344, 357],
    "65k": [11, 54, 55, 292, 298, 309],
    "131k": [10, 11, 12, 19, 34, 51, 53, 54, 62, 114, 221, 269, 276, 288],
    "262k": [10, 11, 13, 49, 50, 64, 249, 259, 276],
    "524k": [10, 24, 46, 48, 78, 229, 241, 298],
    "1m": [11, 19, 34, 57, 101, 193],
}
GRID_2B_L12 = {
    "16k": [22, 41, 82, 176, 445],
    "32k": [12, 22, 40, 76, 155, 360],
    "65k": [21, 38, 72, 141, 297],
    "131k": [12, 20, 36, 67, 129, 264],
    "262k": [11, 21, 36, 67, 121, 243],
    "524k": [22, 29, 46, 65, 115, 227],
    "1m": [19, 26, 58, 73, 107, 207],
}
WORDS = ("the quick brown fox jumps over a lazy dog", "while seven wizards quietly hex jovial bankers")


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _show(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["config", "show", *args]) == 0
    return json.loads(capsys.readouterr().out)


# --------------------------------------------------------------------------- stand-ins


def _save_model(path: Path, arch: str, n_layers: int) -> Path:
    tiny_model(arch, n_layers=n_layers).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gemma_2b_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Gemma 2 with 13 layers, deep enough for the 2B preset's layer 12."""
    return _save_model(tmp_path_factory.mktemp("gemma-2-2b"), "gemma2", 13)


@pytest.fixture(scope="module")
def gemma_9b_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Gemma 2 with 21 layers, deep enough for the 9B preset's layer 20."""
    return _save_model(tmp_path_factory.mktemp("gemma-2-9b"), "gemma2", 21)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_model(tmp_path_factory.mktemp("llama-3.1"), "llama", 16)


@pytest.fixture(scope="module")
def pile_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pile-like JSONL: one ``{"text": ..., "meta": ...}`` document per line, each over 64 characters."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("pile") / "00.jsonl"
    rows = [
        {
            "text": " ".join(rng.choice(" ".join(WORDS).split(" "), size=30)),
            "meta": {"pile_set_name": "stand-in"},
        }
        for _ in range(30)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _unit_rows(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, d, generator=g)
    return w / w.norm(dim=1, keepdim=True)


def write_gemma_scope(folder: Path, d_in: int, d_sae: int, seed: int, live: int = 24) -> None:
    """A Gemma Scope ``params.npz``; only the first ``live`` latents can fire (keeps L0 and pursuit small)."""
    g = torch.Generator().manual_seed(seed)
    w_dec = _unit_rows(d_sae, d_in, g)
    threshold = torch.full((d_sae,), 1e6)
    threshold[:live] = 0.0
    folder.mkdir(parents=True)
    np.savez(
        folder / "params.npz",
        W_enc=w_dec.T.contiguous().numpy(),
        W_dec=w_dec.numpy(),
        b_enc=np.zeros(d_sae, np.float32),
        b_dec=(0.1 * torch.randn(d_in, generator=g)).numpy(),
        threshold=threshold.numpy(),
    )


def write_gemma_scope_2(folder: Path, d_in: int, d_sae: int, hook: str, seed: int, live: int = 24) -> None:
    """A Gemma Scope 2 folder: ``params.safetensors`` (lowercase names) and ``config.json``."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    w_dec = _unit_rows(d_sae, d_in, g)
    threshold = torch.full((d_sae,), 1e6)
    threshold[:live] = 0.0
    folder.mkdir(parents=True)
    tensors = {
        "w_enc": w_dec.T.contiguous(),
        "w_dec": w_dec,
        "b_enc": torch.zeros(d_sae),
        "b_dec": 0.1 * torch.randn(d_in, generator=g),
        "threshold": threshold,
    }
    save_file(tensors, str(folder / "params.safetensors"))
    config = {
        "architecture": "jump_relu",
        "hf_hook_point_in": hook,
        "width": d_sae,
        "model_name": "gemma-v3-1b",
    }
    (folder / "config.json").write_text(json.dumps(config))


def write_llama_scope(folder: Path, d_model: int, d_sae: int, hook: str, seed: int, live: int = 24) -> None:
    """A Llama Scope v1 folder (dataset-wise norms, scalar JumpReLU threshold); ``live`` latents can fire."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    bias = torch.full((d_sae,), -1e6)
    bias[:live] = 0.0
    tensors = {
        "encoder.weight": _unit_rows(d_sae, d_model, g),
        "encoder.bias": bias,
        "decoder.weight": _unit_rows(d_sae, d_model, g).T.contiguous(),
        "decoder.bias": 0.1 * torch.randn(d_model, generator=g),
    }
    (folder / "checkpoints").mkdir(parents=True)
    save_file(tensors, str(folder / "checkpoints" / "final.safetensors"))
    hp = {
        "d_model": d_model,
        "d_sae": d_sae,
        "expansion_factor": d_sae // d_model,
        "hook_point_in": hook,
        "hook_point_out": hook,
        "use_decoder_bias": True,
        "apply_decoder_bias_to_pre_encoder": False,
        "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": 8.0, "out": 8.0},
        "sparsity_include_decoder_norm": True,
        "act_fn": "jumprelu",
        "jump_relu_threshold": 0.0,
        "top_k": 50,
    }
    (folder / "hyperparams.json").write_text(json.dumps(hp))


def _tiny_overrides(model_dir: Path, text: Path, layer: int) -> list[str]:
    """Shrink a paper preset to seconds on CPU; the SAE family stays the preset's own."""
    return [
        f"model.name={model_dir}",
        "model.device=cpu",
        "model.dtype=fp32",
        f"text.source={text}",
        "text.ctx_len=48",
        "text.n_contexts=12",
        "text.skip_positions=4",
        "harvest.batch_size=4",
        "harvest.shard_contexts=8",
        f"layer_sweep.layers=[0,{layer}]",
        "layer_sweep.n_contexts=4",
        "layer_sweep.d_sae=16",
        "layer_sweep.k=2",
        "layer_sweep.train.batch_size=64",
        "layer_sweep.train.epochs=1",
        "layer_sweep.train.device=cpu",
        "synthetic.n_tokens=200",
        "pursuit.n_contexts=2",
        "downstream_ce.n_contexts=2",
        "earlier_layers.mlp_hidden=16",
        "earlier_layers.mlp_epochs=1",
        "error_saes.d_sae=64",
        "error_saes.k=4",
        "error_saes.train.batch_size=64",
        "error_saes.train.epochs=1",
        "error_saes.train.device=cpu",
        "error_saes.interp.enabled=false",
    ]


def _result(out: Path, name: str) -> dict[str, Any]:
    return json.loads((out / "results" / f"{name}.json").read_text())


def _check_run(out: Path, width_sweep: list[str], target: str, regressors: set[str]) -> dict[str, Any]:
    """The report and the key results exist; the roles of the external family are the intended ones."""
    assert (out / "report.html").is_file()
    for name in ("harvest", "family", "engine", "per_token", "pursuit"):
        assert _result(out, name)["experiment"] == name
    assert _result(out, "engine")["width_sweep"] == width_sweep
    assert [r["name"] for r in _result(out, "pursuit")["saes"]] == width_sweep
    assert set(_result(out, "downstream_ce")["saes"]) == set(width_sweep)
    earlier = _result(out, "earlier_layers")
    assert earlier["target"] == target
    assert earlier["predictors"] is not None, earlier["notes"]
    assert regressors <= set(earlier["predictors"]["regressors"])
    assert _result(out, "layer_sweep")["layers"][-1] > 0
    return {r["name"]: r for r in _result(out, "family")["saes"]}


# --------------------------------------------------------------------------- config


def test_presets_resolve_to_the_published_saes(capsys: pytest.CaptureFixture[str]) -> None:
    shown = {p: _show(capsys, "--preset", p) for p in PAPER_PRESETS}
    nine = shown["paper-gemma-2-9b"]
    assert [e["path"] for e in nine["family"]["external"]][:10] == EXPECTED_9B
    assert nine["model"]["name"] == "google/gemma-2-9b" and nine["layer"] == 20
    assert nine["synthetic"]["sae"] == "L20-res-16k-l0_68"
    two = {e["name"]: e for e in shown["paper-gemma-2-2b"]["family"]["external"]}
    widths = ("16k", "32k", "65k", "131k", "262k", "524k", "1m")
    l0s = [two[f"L12-res-{w}"]["path"].rsplit("average_l0_", 1)[1] for w in widths]
    assert l0s == ["41", "76", "72", "67", "67", "65", "58"]
    assert list(two)[7:10] == ["L11-res-16k", "L12-mlp-16k", "L12-res-16k-l0_82"]
    assert two["L12-mlp-16k"] == {
        "name": "L12-mlp-16k",
        "path": "google/gemma-scope-2b-pt-mlp:layer_12/width_16k/average_l0_44",
        "format": "gemma_scope",
        "hookpoint": None,
        "site": "blocks.12.hook_mlp_out",
    }
    llama = shown["llama-scope-8b"]
    assert llama["model"]["name"] == "meta-llama/Llama-3.1-8B"
    assert {e["name"]: e["path"] for e in llama["family"]["external"]} == {
        "L15-res-32k": "fnlp/Llama3_1-8B-Base-LXR-8x:Llama3_1-8B-Base-L15R-8x",
        "L15-res-128k": "fnlp/Llama3_1-8B-Base-LXR-32x:Llama3_1-8B-Base-L15R-32x",
        "L14-res-32k": "fnlp/Llama3_1-8B-Base-LXR-8x:Llama3_1-8B-Base-L14R-8x",
        "L15-mlp-32k": "fnlp/Llama3_1-8B-Base-LXM-8x:Llama3_1-8B-Base-L15M-8x",
        "L15-attn-32k": "fnlp/Llama3_1-8B-Base-LXA-8x:Llama3_1-8B-Base-L15A-8x",
    }
    for cfg in shown.values():
        assert cfg["text"]["source"] == "hf:monology/pile-uncopyrighted"
        assert (cfg["text"]["ctx_len"], cfg["text"]["n_contexts"], cfg["text"]["skip_positions"]) == (
            1024,
            300,
            200,
        )
        assert cfg["text"]["packing"] == "truncate" and cfg["model"]["device"] == "cuda"
        assert cfg["model"]["online"] is False


def _grid(preset: str, model: str, layer: int) -> tuple[list[tuple[str, int]], list[str]]:
    """(width, nominal L0) of the preset's main-site SAEs, in list order, and their names."""
    ext = [e for e in resolve_config(preset).family.external if e.site == f"blocks.{layer}.hook_resid_post"]
    prefix = f"google/gemma-scope-{model}-pt-res:layer_{layer}/width_"
    assert all(e.path.startswith(prefix) and e.format == "gemma_scope" for e in ext)
    cells = [e.path.removeprefix(prefix).split("/average_l0_") for e in ext]
    return [(w, int(n)) for w, n in cells], [e.name for e in ext]


@pytest.mark.parametrize(
    ("preset", "model", "layer", "published"),
    [("paper-gemma-2-9b", "9b", 20, GRID_9B_L20), ("paper-gemma-2-2b", "2b", 12, GRID_2B_L12)],
)
def test_paper_presets_list_the_whole_published_grid(
    preset: str, model: str, layer: int, published: dict[str, list[int]]
) -> None:
    """Every published residual SAE at the main layer, once; the L0 ~ 60 width sweep first per width."""
    cells, names = _grid(preset, model, layer)
    want = [(w, n) for w, l0s in published.items() for n in l0s]
    assert len(cells) == len(set(cells)) == len(want) == (60 if model == "9b" else 40)
    assert sorted(cells) == sorted(want)
    first: dict[str, int] = {}
    for w, n in cells:
        first.setdefault(w, n)
    assert first == {w: min(l0s, key=lambda n: abs(n - 60)) for w, l0s in published.items()}
    assert names[:7] == [f"L{layer}-res-{w}" for w in published]
    extra = {f"L{layer}-res-{w}-l0_{n}" for w, n in cells[7:]}
    assert set(names[7:]) == extra and len(set(names)) == len(names)
    cfg = resolve_config(preset)
    others = [e.name for e in cfg.family.external if e.site != cfg.main_site]
    assert others == ([f"L{layer - 1}-res-16k", f"L{layer}-mlp-16k"])


G3 = "google/gemma-scope-2-1b-pt:"
G3_WIDTHS = ("16k", "65k", "262k", "1m")


def test_gemma_scope_2_preset_lists_the_published_layer_13_grid() -> None:
    """Gemma 3 1B layer 13: the 4 widths x 3 sparsities Gemma Scope 2 publishes, l0_medium first per width,
    then the two earlier-layer predictors; the paper presets' text and the Fig 8 setting at d_model 1152."""
    cfg = resolve_config("gemma-scope-2-1b")
    assert (cfg.model.name, cfg.layer, cfg.model.device) == ("google/gemma-3-1b-pt", 13, "cuda")
    ext = cfg.family.external
    assert {e.format for e in ext} == {"gemma_scope_2"} and all(e.path.startswith(G3) for e in ext)
    main_site = [e for e in ext if e.site == cfg.main_site]
    cells = [e.path.removeprefix(G3 + "resid_post/layer_13_width_").split("_l0_") for e in main_site]
    assert sorted(map(tuple, cells)) == sorted((w, s) for w in G3_WIDTHS for s in ("small", "medium", "big"))
    assert [e.name for e in main_site[:4]] == [f"L13-res-{w}" for w in G3_WIDTHS]
    assert [c[1] for c in cells[:4]] == ["medium"] * 4
    assert {e.name for e in main_site[4:]} == {
        f"L13-res-{w}-l0_{s}" for w in G3_WIDTHS for s in ("small", "big")
    }
    others = {e.name: (e.path.removeprefix(G3), e.site) for e in ext if e.site != cfg.main_site}
    assert others == {
        "L12-res-16k": ("resid_post_all/layer_12_width_16k_l0_small", "blocks.12.hook_resid_post"),
        "L13-mlp-16k": ("mlp_out/layer_13_width_16k_l0_medium", "blocks.13.hook_mlp_out"),
    }
    assert cfg.synthetic.sae == cfg.error_saes.sae == "L13-res-16k"
    assert (cfg.error_saes.d_sae, cfg.error_saes.k) == (16 * 1152, 32)
    assert (cfg.text.source, cfg.text.ctx_len, cfg.text.n_contexts, cfg.text.skip_positions) == (
        "hf:monology/pile-uncopyrighted",
        1024,
        300,
        200,
    )
    local = resolve_config("gemma-scope-2-1b", overrides=["family.external_root=/data"])
    assert (
        local.family.external[0].path == "/data/gemma-scope-2-1b-pt/resid_post/layer_13_width_16k_l0_medium"
    )


def test_local_copies_replace_hub_ids(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _show(
        capsys,
        "--preset",
        "paper-gemma-2-9b",
        *_sets(
            [
                "family.external_root=/data/saes",
                "family.external_paths.L20-mlp-16k=/elsewhere/mlp",
                'family.external_only=["L20-res-16k","L20-mlp-16k"]',
            ]
        ),
    )
    assert [(e["name"], e["path"]) for e in cfg["family"]["external"]] == [
        ("L20-res-16k", "/data/saes/gemma-scope-9b-pt-res/layer_20/width_16k/average_l0_58"),
        ("L20-mlp-16k", "/elsewhere/mlp"),
    ]
    again = StudyConfig.model_validate(cfg)  # re-validating a resolved config changes nothing
    assert [e.path for e in again.family.external] == [e["path"] for e in cfg["family"]["external"]]
    with pytest.raises(ConfigError, match=r"external_only names \['L20-res-2m'\]"):
        resolve_config("paper-gemma-2-9b", overrides=['family.external_only=["L20-res-2m"]'])
    with pytest.raises(ConfigError, match="external_paths names"):
        resolve_config("llama-scope-8b", overrides=["family.external_paths.L9-res-32k=/x"])


def test_offline_without_local_copies_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DARKMATTER_ONLINE", raising=False)
    cfg = resolve_config("paper-gemma-2-9b")
    with pytest.raises(ConfigError) as err:
        cfg.require_local()
    msg = str(err.value)
    for needed in (
        "'google/gemma-2-9b'",
        "hf:monology/pile-uncopyrighted",
        "62 of family.external",
        "--online",
    ):
        assert needed in msg
    assert "family.external_root=DIR" in msg and "\n" not in msg
    cfg.model.online = True
    cfg.require_local()  # online: nothing to complain about
    local = resolve_config("paper-gemma-2-9b", overrides=[f"model.name={tmp_path}"])
    assert "model.name" not in "; ".join(local.missing_locally())

    # model.device=cpu: what a GPU machine sees first is the missing model, not the device
    code = main(
        [
            "run",
            "--preset",
            "paper-gemma-2-9b",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
            "--set",
            "model.device=cpu",
        ]
    )
    out_err = capsys.readouterr().err
    assert code == 2 and out_err.count("\n") == 1 and "Traceback" not in out_err
    assert (
        out_err.startswith("darkmatter: error:") and "google/gemma-2-9b" in out_err and "--online" in out_err
    )
    assert not (tmp_path / "o" / "results" / "harvest.json").exists()


# --------------------------------------------------------------------------- text sources


def test_jsonl_folder_and_compressed_jsonl_match_one_file(tmp_path: Path, pile_jsonl: Path) -> None:
    tok = tiny_tokenizer()
    lines = pile_jsonl.read_text().splitlines(keepends=True)
    folder = tmp_path / "pile"
    folder.mkdir()
    (folder / "00.jsonl").write_text("".join(lines[:10]))
    with gzip.open(folder / "01.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(lines[10:]))
    base = TextConfig(source=str(pile_jsonl), ctx_len=40, n_contexts=20, skip_positions=0, packing="truncate")
    want = make_contexts(base, tok, tok.bos_token_id)
    got = make_contexts(base.model_copy(update={"source": str(folder)}), tok, tok.bos_token_id)
    assert np.array_equal(want.tokens, got.tokens) and list(got.doc_index) == list(range(20))
    first = json.loads(lines[0])["text"]
    assert tok.decode(got.tokens[0, 1:].tolist()) == first[:39]
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(TextError, match=r"bad\.jsonl\.gz cannot be read as UTF-8 JSONL text"):
        make_contexts(base.model_copy(update={"source": str(bad)}), tok, 0)
    # a folder holding plain text is read as before: its JSONL files are not mixed in
    (folder / "a.txt").write_text("xyz " * 40)
    plain = make_contexts(base.model_copy(update={"source": str(folder), "n_contexts": 1}), tok, 0)
    assert tok.decode(plain.tokens[0, 1:].tolist()) == ("xyz " * 40)[:39]


def test_hf_source_offline_points_to_online_or_a_local_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DARKMATTER_ONLINE", raising=False)
    cfg = TextConfig(source="hf:monology/pile-uncopyrighted")
    with pytest.raises(TextError, match=r"--online.*local copy \(a \.jsonl file"):
        make_contexts(cfg, tiny_tokenizer(), 0)


# --------------------------------------------------------------------------- end to end on stand-ins


@pytest.mark.slow
def test_paper_gemma_2_2b_runs_on_local_stand_ins(
    tmp_path: Path, gemma_2b_dir: Path, pile_jsonl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DARKMATTER_ONLINE", raising=False)
    root = tmp_path / "saes"
    folders = {
        "L12-res-16k": ("gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_41", 16384),
        "L12-res-32k": ("gemma-scope-2b-pt-res/layer_12/width_32k/average_l0_76", 32768),
        "L11-res-16k": ("gemma-scope-2b-pt-res/layer_11/width_16k/average_l0_41", 16384),
        "L12-mlp-16k": ("gemma-scope-2b-pt-mlp/layer_12/width_16k/average_l0_44", 16384),
        "L12-res-16k-l0_82": ("gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82", 16384),
    }
    for seed, (sub, width) in enumerate(folders.values()):
        write_gemma_scope(root / sub, 64, width, seed)
    out = tmp_path / "out"
    sets = [
        *_tiny_overrides(gemma_2b_dir, pile_jsonl, 12),
        f"family.external_root={root}",
        f"family.external_only={json.dumps(list(folders))}",
    ]
    assert main(["run", "--preset", "paper-gemma-2-2b", "--out", str(out), "--quiet", *_sets(sets)]) == 0
    saes = _check_run(out, ["L12-res-16k", "L12-res-32k"], "L12-res-16k", {"L11-res-16k", "L12-mlp-16k"})
    assert {n: (r["path"], r["d_sae"]) for n, r in saes.items()} == {
        n: (str(root / sub), width) for n, (sub, width) in folders.items()
    }
    assert {r["source"] for r in saes.values()} == {"gemma_scope"}
    assert saes["L12-mlp-16k"]["site"] == "blocks.12.hook_mlp_out" and 0 < saes["L12-res-16k"]["l0"] <= 24
    assert _result(out, "synthetic")["sae_name"] == "L12-res-16k-l0_82"
    assert _result(out, "error_saes")["sae_name"] == "L12-res-16k-l0_82"
    harvest = _result(out, "harvest")
    assert harvest["config"]["text"]["source"] == str(pile_jsonl) and harvest["config"]["text"]["seed"] == 42
    assert harvest["config"]["model"]["name"] == str(gemma_2b_dir)


@pytest.mark.slow
def test_paper_gemma_2_9b_runs_on_local_stand_ins(
    tmp_path: Path, gemma_9b_dir: Path, pile_jsonl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DARKMATTER_ONLINE", raising=False)
    root = tmp_path / "saes"
    folders = {
        "L20-res-16k": root / "gemma-scope-9b-pt-res/layer_20/width_16k/average_l0_58",
        "L20-res-32k": tmp_path / "moved" / "width_32k",  # via external_paths: no repo name, site from config
        "L19-res-16k": root / "gemma-scope-9b-pt-res/layer_19/width_16k/average_l0_67",
        "L20-mlp-16k": root / "gemma-scope-9b-pt-mlp/layer_20/width_16k/average_l0_41",
        "L20-res-16k-l0_68": root / "gemma-scope-9b-pt-res/layer_20/width_16k/average_l0_68",
    }
    for seed, (name, folder) in enumerate(folders.items()):
        write_gemma_scope(folder, 64, 32768 if "32k" in name else 16384, seed + 10)
    out = tmp_path / "out"
    sets = [
        *_tiny_overrides(gemma_9b_dir, pile_jsonl, 20),
        f"family.external_root={root}",
        f"family.external_paths.L20-res-32k={folders['L20-res-32k']}",
        f"family.external_only={json.dumps(list(folders))}",
    ]
    assert main(["run", "--preset", "paper-gemma-2-9b", "--out", str(out), "--quiet", *_sets(sets)]) == 0
    saes = _check_run(out, ["L20-res-16k", "L20-res-32k"], "L20-res-16k", {"L19-res-16k", "L20-mlp-16k"})
    assert {n: r["path"] for n, r in saes.items()} == {n: str(f) for n, f in folders.items()}
    assert saes["L20-res-32k"]["site"] == "blocks.20.hook_resid_post"
    assert _result(out, "synthetic")["sae_name"] == "L20-res-16k-l0_68"
    sites = set(_result(out, "harvest")["store"]["sites"])
    assert sites == {"blocks.20.hook_resid_post", "blocks.19.hook_resid_post", "blocks.20.hook_mlp_out"}
    # a rerun reuses the family and reloads it as configured (the moved SAE keeps its configured site)
    assert (
        main(
            [
                "run",
                "--preset",
                "paper-gemma-2-9b",
                "--out",
                str(out),
                "--quiet",
                *_sets(sets),
                "--set",
                "pursuit.n_contexts=3",
            ]
        )
        == 0
    )
    pursuit = _result(out, "pursuit")
    assert pursuit["n_contexts"] == 3 and [r["name"] for r in pursuit["saes"]] == [
        "L20-res-16k",
        "L20-res-32k",
    ]


@pytest.mark.slow
def test_an_sae_of_another_model_is_refused(
    tmp_path: Path, gemma_2b_dir: Path, pile_jsonl: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "saes"
    write_gemma_scope(root / "gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_41", 32, 16384, 0)
    sets = [
        *_tiny_overrides(gemma_2b_dir, pile_jsonl, 12),
        f"family.external_root={root}",
        'family.external_only=["L12-res-16k"]',
    ]
    code = main(
        ["run", "--preset", "paper-gemma-2-2b", "--out", str(tmp_path / "o"), "--quiet", *_sets(sets)]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "'L12-res-16k'" in err and "width 32" in err and "width 64" in err and "another model" in err


@pytest.mark.slow
def test_llama_scope_8b_runs_on_local_stand_ins(
    tmp_path: Path, llama_dir: Path, pile_jsonl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DARKMATTER_ONLINE", raising=False)
    root = tmp_path / "saes"
    specs = {
        "L15-res-32k": ("LXR-8x", "L15R-8x", "blocks.15.hook_resid_post", 512),
        "L15-res-128k": ("LXR-32x", "L15R-32x", "blocks.15.hook_resid_post", 2048),
        "L14-res-32k": ("LXR-8x", "L14R-8x", "blocks.14.hook_resid_post", 512),
        "L15-mlp-32k": ("LXM-8x", "L15M-8x", "blocks.15.hook_mlp_out", 512),
        "L15-attn-32k": ("LXA-8x", "L15A-8x", "blocks.15.hook_attn_out", 512),
    }
    folders = {
        n: root / f"Llama3_1-8B-Base-{repo}" / f"Llama3_1-8B-Base-{sub}"
        for n, (repo, sub, _, _) in specs.items()
    }
    for seed, (name, (_, _, hook, width)) in enumerate(specs.items()):
        write_llama_scope(folders[name], 64, width, hook, seed + 20)
    out = tmp_path / "out"
    sets = [*_tiny_overrides(llama_dir, pile_jsonl, 15), f"family.external_root={root}"]
    assert main(["run", "--preset", "llama-scope-8b", "--out", str(out), "--quiet", *_sets(sets)]) == 0
    saes = _check_run(
        out, ["L15-res-32k", "L15-res-128k"], "L15-res-32k", {"L14-res-32k", "L15-mlp-32k", "L15-attn-32k"}
    )
    assert {n: (r["path"], r["site"], r["d_sae"]) for n, r in saes.items()} == {
        n: (str(folders[n]), hook, width) for n, (_, _, hook, width) in specs.items()
    }
    assert {r["source"] for r in saes.values()} == {"llama_scope"}
    assert _result(out, "engine")["power_law"] is None  # two widths: no fit
    assert _result(out, "synthetic")["sae_name"] == "L15-res-32k"


@pytest.mark.slow
def test_gemma_scope_2_1b_runs_on_local_stand_ins(
    tmp_path: Path, pile_jsonl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tiny Gemma 3 (14 layers) and Gemma Scope 2 folders in the hub's layout."""
    monkeypatch.delenv("DARKMATTER_ONLINE", raising=False)
    model_dir = _save_model(tmp_path / "gemma-3-1b", "gemma3_text", 14)
    root = tmp_path / "saes"
    folders = {
        "L13-res-16k": ("resid_post/layer_13_width_16k_l0_medium", "model.layers.13.output", 16384),
        "L13-res-65k": ("resid_post/layer_13_width_65k_l0_medium", "model.layers.13.output", 65536),
        "L12-res-16k": ("resid_post_all/layer_12_width_16k_l0_small", "model.layers.12.output", 16384),
        "L13-mlp-16k": ("mlp_out/layer_13_width_16k_l0_medium", "blocks.13.hook_mlp_out", 16384),
    }
    for seed, (sub, hook, width) in enumerate(folders.values()):
        write_gemma_scope_2(root / "gemma-scope-2-1b-pt" / sub, 64, width, hook, seed + 30)
    out = tmp_path / "out"
    sets = [
        *_tiny_overrides(model_dir, pile_jsonl, 13),
        f"family.external_root={root}",
        f"family.external_only={json.dumps(list(folders))}",
    ]
    assert main(["run", "--preset", "gemma-scope-2-1b", "--out", str(out), "--quiet", *_sets(sets)]) == 0
    saes = _check_run(out, ["L13-res-16k", "L13-res-65k"], "L13-res-16k", {"L12-res-16k", "L13-mlp-16k"})
    assert {n: (r["path"], r["d_sae"]) for n, r in saes.items()} == {
        n: (str(root / "gemma-scope-2-1b-pt" / sub), width) for n, (sub, _, width) in folders.items()
    }
    assert {r["source"] for r in saes.values()} == {"gemma_scope_2"}
    assert saes["L13-mlp-16k"]["site"] == "blocks.13.hook_mlp_out" and 0 < saes["L13-res-16k"]["l0"] <= 24
    assert _result(out, "synthetic")["sae_name"] == _result(out, "error_saes")["sae_name"] == "L13-res-16k"
    assert _result(out, "harvest")["store"]["model"] == str(model_dir)


def test_preset_files_name_the_hub_paths_their_builders_give() -> None:
    from darkmatter.sae.formats import gemma_scope, llama_scope

    for preset in PAPER_PRESETS:
        for ext in resolve_config(preset).family.external:
            if ext.format == "gemma_scope":
                model = "9b" if "9b" in ext.path else "2b"
                site = ext.path.split("-pt-")[1].split(":")[0]
                layer, width, l0 = (
                    ext.path.split("layer_")[1].split("/")[0],
                    ext.path.split("width_")[1].split("/")[0],
                    ext.path.rsplit("average_l0_", 1)[1],
                )
                assert ext.path == gemma_scope.hub_path(model, site, int(layer), width, int(l0))
                assert ext.site == f"blocks.{layer}.hook_{'resid_post' if site == 'res' else 'mlp_out'}"
            else:
                site = {"R": "res", "M": "mlp", "A": "attn"}[ext.path.split("-LX")[1][0]]
                layer = int(ext.path.split(":Llama3_1-8B-Base-L")[1].split(ext.path.split("-LX")[1][0])[0])
                expansion = ext.path.rsplit("-", 1)[1]
                assert ext.path == llama_scope.hub_path(site, layer, expansion)


def test_every_preset_file_validates_and_names_itself() -> None:
    from darkmatter.config import preset_names

    names = preset_names()
    assert {"demo", "tiny", *PAPER_PRESETS} <= set(names)
    for name in names:
        assert resolve_config(name).preset == name


def test_smollm2_full_is_the_converged_study_it_says() -> None:
    """Widths spanning 32x, five k values, a million distinct tokens; the offline line in its header works."""
    cfg = resolve_config("smollm2-full")
    fam = cfg.family
    assert cfg.model.name == "embedded" and max(fam.widths) / min(fam.widths) >= 32
    assert len({fam.k, *fam.ks}) >= 4 and fam.width_for_ks in fam.widths
    assert cfg.text.n_contexts * (cfg.text.ctx_len - cfg.text.skip_positions) >= 1_000_000
    assert {s.d_sae for s in fam.specs(cfg.layer)} >= set(fam.widths)
    header = (resources.files("darkmatter.config") / "presets" / "smollm2-full.toml").read_text()
    sets = [w.split()[0] for w in header.split("--set ")[1:] if w.startswith("text.") and "PILE" not in w]
    offline_cfg = resolve_config("smollm2-full", overrides=sets)
    assert offline_cfg.text.source == "austen" and offline_cfg.text.packing == "chunk"
    tokenizer, bos = load_tokenizer("embedded")
    contexts = make_contexts(offline_cfg.text, tokenizer, bos)
    assert contexts.tokens.shape == (offline_cfg.text.n_contexts, offline_cfg.text.ctx_len)
