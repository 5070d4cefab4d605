"""Every SAE darkmatter writes opens in the real SAELens with its names, architecture and function.

SAELens runs in a side environment (it pins its own model stack): ``DARKMATTER_SAELENS_PYTHON``, else
``<repo>/.venv-saelens/bin/python``. Without one the test is skipped, unless ``DARKMATTER_REQUIRE_SAELENS=1``
(CI), which makes a missing side environment a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from darkmatter.sae import SAE, load_sae, save_sae
from darkmatter.sae.cli import app
from darkmatter.sae.train import FamilyTrainer, SAESpec, TrainConfig
from darkmatter.stats import Split
from synthetic import sparse_features, synthetic_store

from sae_helpers import D_IN, inputs, write_gemma_scope, write_openai, write_saelens, write_sparsify

REPO = Path(__file__).resolve().parent.parent
SIDE_SCRIPT = Path(__file__).resolve().parent / "saelens_side.py"
RTOL = 1e-5
SITE = "blocks.0.hook_resid_post"

pytestmark = pytest.mark.slow


def side_python() -> Path:
    """The side interpreter with sae-lens; skips (or fails, when required) if there is none."""
    configured = os.environ.get("DARKMATTER_SAELENS_PYTHON")
    path = Path(configured) if configured else REPO / ".venv-saelens" / "bin" / "python"
    if path.is_file():
        return path
    message = f"no SAELens side environment at {path} (set DARKMATTER_SAELENS_PYTHON or create .venv-saelens)"
    if os.environ.get("DARKMATTER_REQUIRE_SAELENS") == "1":
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Case:
    """One SAE as darkmatter wrote it, the SAE it must compute like, and what SAELens must read."""

    folder: Path
    ours: SAE
    x: torch.Tensor  # [n, d_in]
    architecture: str
    model_name: str
    hook_name: str


def _trained(root: Path) -> dict[str, Case]:
    """TopK, BatchTopK and JumpReLU SAEs trained and saved as the family step does."""
    store = synthetic_store(root / "store", sparse_features(d=16, n_features=48, active=3), n_contexts=24)
    specs = [
        SAESpec(name="topk", site=SITE, d_sae=32, k=4, kind="topk"),
        SAESpec(name="batchtopk", site=SITE, d_sae=32, k=4, kind="batchtopk"),
        SAESpec(name="jumprelu", site=SITE, d_sae=32, k=4, kind="jumprelu"),
    ]
    cfg = TrainConfig(epochs=2, batch_size=128, lr=2e-3, dead_tokens=500, checkpoint_every=1000, aux_k=8)
    trainer = FamilyTrainer(store, specs, cfg, root / "train", split=Split(seed=0, fraction=0.8))
    acts = next(iter(store.iter_batches([SITE], batch_tokens=48))).acts[SITE]
    x = acts + 0.1 * torch.randn(acts.shape, generator=torch.Generator().manual_seed(1))
    expected = {"topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}
    cases = {}
    for spec, sae in zip(specs, trainer.train(), strict=True):
        folder = save_sae(sae, root / "saes" / spec.name)
        cases[f"trained-{spec.name}"] = Case(folder, sae, x, expected[spec.name], "synthetic", SITE)
    return cases


def _convert(src: Path, dst: Path, *extra: str) -> Path:
    result = CliRunner().invoke(app, ["convert", str(src), str(dst), *extra])
    assert result.exit_code == 0, result.output
    return dst


def _converted(root: Path) -> dict[str, Case]:
    """SAEs of other formats converted with ``darkmatter sae convert``."""
    x = inputs(48, D_IN)
    gemma = root / "gemma-scope-2b-pt-res" / "layer_3" / "average_l0_5"
    write_gemma_scope(gemma / "params.npz")
    write_sparsify(root / "run" / "layers.3")
    write_openai(root / "openai" / "resid_post_mlp" / "3.pt", activation="ReLU")
    write_saelens(root / "legacy", v6=False, normalize="layer_norm", finetuning_scaling_factor=True)
    site = "blocks.3.hook_resid_post"
    sources: dict[str, tuple[Path, str, str, tuple[str, ...]]] = {
        "gemma-scope-npz": (gemma, "jumprelu", "google/gemma-2-2b", ()),
        # sparsify's files do not name the model: the converter is told it
        "sparsify": (root / "run" / "layers.3", "topk", "tiny-model", ("--model", "tiny-model")),
        "openai-relu": (root / "openai" / "resid_post_mlp" / "3.pt", "standard", "gpt2", ()),
        "saelens-pre6-layer-norm": (root / "legacy", "standard", "tiny-model", ()),
    }
    cases = {}
    for name, (src, arch, model, args) in sources.items():
        folder = _convert(src, root / "out" / name, *args)
        cases[name] = Case(folder, load_sae(src), x, arch, model, site)
    return cases


@pytest.fixture(scope="module")
def interop(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Case], dict[str, Any]]:
    python = side_python()
    root = tmp_path_factory.mktemp("saelens")
    cases = {**_trained(root / "trained"), **_converted(root / "converted")}
    request = {
        "cases": [{"name": n, "folder": str(c.folder), "x": c.x.double().tolist()} for n, c in cases.items()]
    }
    (root / "in.json").write_text(json.dumps(request), encoding="utf-8")
    run = subprocess.run(
        [str(python), str(SIDE_SCRIPT), str(root / "in.json"), str(root / "out.json")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, f"SAELens could not load our SAEs:\n{run.stderr[-4000:]}"
    return cases, json.loads((root / "out.json").read_text(encoding="utf-8"))


CASES = [
    "trained-topk",
    "trained-batchtopk",
    "trained-jumprelu",
    "gemma-scope-npz",
    "sparsify",
    "openai-relu",
    "saelens-pre6-layer-norm",
]


def _relative(theirs: list[Any], ours: torch.Tensor) -> float:
    got = torch.tensor(theirs, dtype=torch.float64)
    want = ours.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


@pytest.mark.parametrize("name", CASES)
def test_saelens_reads_names_architecture_and_function(interop, name: str) -> None:
    cases, out = interop
    case, theirs = cases[name], out["cases"][name]
    assert theirs["hook_name"] == case.hook_name
    assert theirs["model_name"] == case.model_name
    assert theirs["architecture"] == case.architecture
    assert (theirs["d_in"], theirs["d_sae"]) == (case.ours.cfg.d_in, case.ours.cfg.d_sae)
    if case.architecture == "topk":
        assert theirs["k"] == case.ours.cfg.k
    with torch.no_grad():
        codes = case.ours.encode(case.x)
        recon = case.ours(case.x)
    assert int((codes != 0).sum()) > 0  # the comparison means something: latents fire
    assert _relative(theirs["codes"], codes) <= RTOL
    assert _relative(theirs["recon"], recon) <= RTOL


def test_saelens_side_environment_is_pinned(interop) -> None:
    _, out = interop
    assert out["sae_lens_version"].split(".")[0] == "6"
