"""The Gemma 2 9B preset's whole layer-20 grid, end to end offline on stand-ins in the real folder layout.

A tiny random Gemma 2 (21 layers, width 16) and all 62 SAEs of the preset as Gemma Scope ``params.npz``
folders, each under its hub path (``gemma-scope-9b-pt-res/layer_20/width_16k/average_l0_58/`` and so on).
The stand-ins are 512 times narrower than the folder names say (16k -> 32 latents ... 1m -> 2048), so the
loader's check that the tensors match the folder's width is switched off for them; widths keep their order.
The number of latents that can fire follows the folder's L0, so the measured L0s scatter over the grid.
Every override only makes the study small.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from darkmatter.cli import main
from darkmatter.config import resolve_config
from darkmatter.errors import SAEFormatError
from darkmatter.report import figures as fg
from darkmatter.sae.formats import gemma_scope, load_sae
from darkmatter.sae.formats.gemma_scope import width_from_label

from conftest import tiny_config, tiny_tokenizer

D_MODEL = 16
SHRINK = 512  # stand-in latents = published width / SHRINK
PRESET = "paper-gemma-2-9b"
MAIN_SITE = "blocks.20.hook_resid_post"
MAP_METRICS = ("FVU", "vector R²", "norm R²", "FVU_nonlinear")


def write_standin(folder: Path, d_in: int, d_sae: int, live: int, seed: int) -> None:
    """A Gemma Scope ``params.npz`` of ``d_sae`` latents of which only the first ``live`` can fire."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((d_sae, d_in)).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    threshold = np.full(d_sae, 1e6, np.float32)
    threshold[:live] = 0.0
    folder.mkdir(parents=True)
    np.savez(
        folder / "params.npz",
        W_enc=atoms.T.copy(),
        W_dec=atoms * min(1.0, 2 * d_in / live),
        b_enc=np.zeros(d_sae, np.float32),
        b_dec=(0.1 * rng.standard_normal(d_in)).astype(np.float32),
        threshold=threshold,
    )


def write_family(root: Path) -> dict[str, tuple[int, int]]:
    """Every SAE of the preset under ``root`` in the hub's layout; name -> (width, nominal L0)."""
    cells: dict[str, tuple[int, int]] = {}
    for seed, ext in enumerate(resolve_config(PRESET).family.external):
        sub = ext.path.replace("google/", "").replace(":", "/")
        width = width_from_label(sub.split("width_")[1].split("/")[0]) // SHRINK
        nominal = int(sub.rsplit("average_l0_", 1)[1])
        write_standin(root / sub, D_MODEL, width, live=min(nominal // 4 + 2, width), seed=seed)
        cells[ext.name] = (width, nominal)
    return cells


def small_study(model_dir: Path, root: Path) -> list[str]:
    """Overrides that shrink the preset to seconds on CPU; the SAE family stays the preset's own."""
    sets = [
        f"model.name={model_dir}",
        "model.device=cpu",
        "model.dtype=fp32",
        f"family.external_root={root}",
        "text.source=austen",
        "text.packing=chunk",
        "text.ctx_len=40",
        "text.n_contexts=8",
        "text.skip_positions=4",
        "harvest.batch_size=4",
        "harvest.shard_contexts=4",
        "engine.interval_blocks=0",
        "layer_sweep.layers=[0,20]",
        "layer_sweep.n_contexts=2",
        "layer_sweep.d_sae=16",
        "layer_sweep.k=2",
        "layer_sweep.train.batch_size=16",
        "layer_sweep.train.epochs=1",
        "layer_sweep.train.device=cpu",
        "synthetic.n_tokens=100",
        "pursuit.n_contexts=1",
        "downstream_ce.n_contexts=1",
        "earlier_layers.mlp_hidden=8",
        "earlier_layers.mlp_epochs=1",
        "error_saes.d_sae=32",
        "error_saes.k=2",
        "error_saes.train.batch_size=16",
        "error_saes.train.epochs=1",
        "error_saes.train.device=cpu",
        "error_saes.interp.enabled=false",
        'report.formats=["png"]',
        "report.dpi=60",
    ]
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Gemma 2, deep enough for layer 20, with a character tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gemma-2-9b")
    AutoModelForCausalLM.from_config(tiny_config("gemma2", n_layers=21, d=D_MODEL)).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _result(out: Path, name: str) -> dict[str, Any]:
    return json.loads((out / "results" / f"{name}.json").read_text())


@pytest.mark.slow
def test_paper_9b_measures_and_maps_the_whole_layer_20_grid(
    tmp_path: Path, gemma_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DARKMATTER_ONLINE", raising=False)
    root = tmp_path / "saes"
    cells = write_family(root)
    first = root / "gemma-scope-9b-pt-res/layer_20/width_16k/average_l0_58"
    with pytest.raises(SAEFormatError, match="width_16k"):  # as written, the loader sees they are narrower
        load_sae(first)
    monkeypatch.setattr(gemma_scope, "_check_width", lambda *_: None)
    assert load_sae(first).cfg.d_sae == 2**14 // SHRINK
    grid = {n: c for n, c in cells.items() if n.startswith("L20-res-")}
    assert len(cells) == 62 and len(grid) == 60
    maps: list[dict[str, Any]] = []
    original = fg.plot_error_prediction_maps

    def spy(widths: Any, l0s: Any, **kwargs: Any) -> Any:
        maps.append({"widths": list(widths), "l0s": list(l0s), **kwargs})
        return original(widths, l0s, **kwargs)

    monkeypatch.setattr(fg, "plot_error_prediction_maps", spy)
    out = tmp_path / "out"
    args = [
        "run",
        "--preset",
        PRESET,
        "--out",
        str(out),
        "--quiet",
        *small_study(gemma_dir, root),
    ]
    assert main(args) == 0

    family = {s["name"]: s for s in _result(out, "family")["saes"]}
    assert family["L20-res-131k-l0_269"]["path"] == str(
        root / "gemma-scope-9b-pt-res/layer_20/width_131k/average_l0_269"
    )
    assert {s["source"] for s in family.values()} == {"gemma_scope"}
    engine = _result(out, "engine")
    measured = {s["name"]: s for s in engine["saes"]}
    assert set(measured) == set(cells)
    main_site = {n for n, s in measured.items() if s["site"] == MAIN_SITE}
    assert main_site == set(grid)
    assert {n: measured[n]["d_sae"] for n in grid} == {n: w for n, (w, _) in grid.items()}
    assert engine["width_sweep"] == [
        f"L20-res-{w}" for w in ("16k", "32k", "65k", "131k", "262k", "524k", "1m")
    ]
    for n in grid:
        s = measured[n]
        assert s["l0"] > 0 and all(
            np.isfinite(s[k]) for k in ("fvu", "vector_r2", "norm_r2", "fvu_nonlinear")
        )
    l0s = [measured[n]["l0"] for n in grid]
    assert max(l0s) > 4 * min(l0s)  # the L0s scatter over the grid

    # Fig 2: the four maps over every main-site SAE
    (drawn,) = maps
    assert len(drawn["widths"]) == 60 and sorted(drawn["widths"]) == sorted(w for w, _ in grid.values())
    assert len(set(zip(drawn["widths"], drawn["l0s"], strict=True))) == 60
    figure = out / "figures" / "error_prediction_maps.png"
    assert figure.is_file() and figure.stat().st_size > 5_000
    html = (out / "report.html").read_text()
    assert "Fig 2 maps four quantities over SAE width × L0 for the 60 SAEs at the main site" in html
    assert all(m in html for m in MAP_METRICS)
    assert 'alt="error prediction maps"' in html
