"""Convergence: the criterion on validation-FVU curves, the trainer's validation set and points, resume."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from darkmatter.report.sections import family_section
from darkmatter.sae.convergence import convergence, window, window_steps
from darkmatter.sae.train import FamilyTrainer, SAESpec, TrainConfig, TrainingPoint
from darkmatter.sae.validation import load_validation, validation_contexts
from darkmatter.stats import Split
from darkmatter.study.family_saes import FamilyResult, SAERecord
from darkmatter.study.steps import family as family_step
from synthetic import sparse_features, synthetic_store

SITE = "blocks.0.hook_resid_post"
SPLIT = Split(seed=0, fraction=0.8)


def _points(curve: dict[int, float | None]) -> list[dict[str, float | None]]:
    return [
        {"step": float(s), "fvu": 0.5, "l0": 2.0, "aux": 0.0, "dead_fraction": 0.0, "val_fvu": v}
        for s, v in curve.items()
    ]


def _cfg(**kw: object) -> TrainConfig:
    base = {"epochs": 3, "batch_size": 128, "lr": 2e-3, "dead_tokens": 1000, "checkpoint_every": 7}
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("conv") / "store"
    gen = sparse_features(d=12, n_features=24, active=2)
    return synthetic_store(path, gen, n_contexts=96, ctx_len=32, shard_contexts=4)


# -- the criterion ------------------------------------------------------------------------------------


def test_criterion_on_hand_made_curves() -> None:
    # 100 steps (indices 0..99), no decay: the window runs from 75 steps done (index 74) to the end.
    flat = convergence(_points({24: 0.30, 49: 0.201, 74: 0.2005, 99: 0.200}), tol=0.01, decay_fraction=0)
    assert flat is not None and flat.converged and flat.change == pytest.approx(0.0025)
    falling = convergence(_points({24: 0.30, 49: 0.25, 74: 0.22, 99: 0.20}), tol=0.01, decay_fraction=0)
    assert falling is not None and not falling.converged and falling.change == pytest.approx(0.1)
    rising = convergence(_points({49: 0.20, 74: 0.20, 99: 0.21}), tol=0.01, decay_fraction=0)
    assert rising is not None and not rising.converged and rising.change == pytest.approx(-0.01 / 0.21)
    # no point at the mark: interpolated linearly between steps done 50 and 100 (FVU 0.3 -> 0.2)
    interp = convergence(_points({49: 0.30, 99: 0.20}), tol=0.5, decay_fraction=0)
    assert interp is not None and interp.change == pytest.approx((0.25 - 0.2) / 0.2)
    # train-only points (val_fvu None) are ignored; TrainingPoint objects work as dicts do
    mixed = [TrainingPoint.model_validate(p) for p in _points({9: None, 74: 0.2, 99: 0.2})]
    assert convergence(mixed, 0.01, 0) == convergence(_points({74: 0.2, 99: 0.2}), 0.01, 0)


def test_criterion_window_ends_where_the_learning_rate_decays() -> None:
    # decay over the last 20 of 100 steps: the window is 55 -> 80 steps done; the annealing drop after it
    # (0.2 -> 0.18) does not count, a drop inside it does.
    annealed = _points({54: 0.201, 79: 0.200, 99: 0.180})
    plateau = convergence(annealed, tol=0.01, decay_fraction=0.2)
    assert plateau is not None and plateau.converged and plateau.change == pytest.approx(0.005)
    assert not convergence(annealed, tol=0.01, decay_fraction=0).converged  # type: ignore[union-attr]
    still = convergence(_points({54: 0.23, 79: 0.200, 99: 0.180}), tol=0.01, decay_fraction=0.2)
    assert still is not None and not still.converged and still.change == pytest.approx(0.15)
    assert window(100, 0.2) == (55, 80) and window_steps(100, 0.2) == (54, 79)


def test_criterion_needs_points_spanning_the_window() -> None:
    assert convergence([], tol=0.01, decay_fraction=0) is None
    assert convergence(_points({99: 0.2}), tol=0.01, decay_fraction=0) is None
    assert convergence(_points({9: None, 99: 0.2}), tol=0.01, decay_fraction=0) is None
    assert convergence(_points({80: 0.21, 99: 0.2}), tol=0.01, decay_fraction=0) is None  # starts too late
    assert convergence(_points({9: 0.2, 99: 0.2}), tol=0.01, decay_fraction=0.9) is None  # no window
    assert window_steps(100, 0) == (74, 99) and window_steps(1, 0) == (0, 0)


# -- the validation set -------------------------------------------------------------------------------


def _rows(store, train: bool) -> set[tuple[float, ...]]:
    out = set()
    for b in store.iter_batches([SITE]):
        keep = SPLIT.mask(b.context, b.position) == train
        out |= {tuple(r) for r in b.acts[SITE][keep].tolist()}
    return out


def test_validation_set_is_held_out_capped_and_from_few_shards(store) -> None:
    val = load_validation(store, SPLIT, [SITE], 100)[SITE]
    assert val.shape == (100, 12)
    rows = {tuple(r) for r in val.tolist()}
    assert len(rows) == 100 and rows <= _rows(store, train=False) and not rows & _rows(store, train=True)
    contexts = validation_contexts(store, SPLIT, 100)
    assert len({int(c) // store.shard_contexts for c in contexts}) <= 8 < store.n_shards
    assert torch.equal(load_validation(store, SPLIT, [SITE], 100)[SITE], val)  # deterministic
    everything = load_validation(store, SPLIT, [SITE], 10**6)[SITE]
    assert len(everything) == len(_rows(store, train=False))  # all test tokens when asked for more


# -- the trainer ----------------------------------------------------------------------------------------


def _independent_fvu(sae, x: torch.Tensor) -> float:
    with torch.no_grad():
        x64, xh = x.double(), sae(x).double()
    return float(((x64 - xh) ** 2).sum() / ((x64 - x64.mean(0)) ** 2).sum())


def test_trainer_records_validation_fvu_at_the_expected_steps(store, tmp_path: Path) -> None:
    specs = [SAESpec(name="a", site=SITE, d_sae=16, k=2), SAESpec(name="b", site=SITE, d_sae=8, k=1)]
    trainer = FamilyTrainer(store, specs, _cfg(eval_every=5, validation_tokens=300), tmp_path, split=SPLIT)
    saes = trainer.train()
    total = trainer.total_steps
    expected = {s for s in range(total) if (s + 1) % 5 == 0} | {*window_steps(total, 0.2), total - 1}
    x = load_validation(store, SPLIT, [SITE], 300)[SITE]
    assert trainer.validation is not None and trainer.validation.n_tokens == len(x) == 300
    for m, sae in zip(trainer.members, saes, strict=True):
        val = {int(h["step"]): h["val_fvu"] for h in m.history if "val_fvu" in h}
        assert set(val) == expected
        assert val[total - 1] == pytest.approx(_independent_fvu(sae, x), abs=1e-5)
        assert val[min(expected)] > val[total - 1]  # it learns
        assert convergence(m.history, tol=0.01, decay_fraction=0.2) is not None


def test_no_validation_when_switched_off(store, tmp_path: Path) -> None:
    spec = SAESpec(name="a", site=SITE, d_sae=8, k=1)
    trainer = FamilyTrainer(store, [spec], _cfg(epochs=1, validation_tokens=0), tmp_path, split=SPLIT)
    trainer.train()
    assert trainer.validation is None
    assert all("val_fvu" not in h for h in trainer.members[0].history)
    assert convergence(trainer.members[0].history, tol=0.01, decay_fraction=0.2) is None


# -- the family record and the report --------------------------------------------------------------------


def _record(name: str, change: float | None, ok: bool | None) -> SAERecord:
    return SAERecord(
        name=name,
        site=SITE,
        d_in=12,
        d_sae=16,
        k=2,
        activation="topk",
        path=f"saes/{name}",
        source="trained",
        fvu=0.2,
        nmse=0.2,
        l0=2.0,
        dead_fraction=0.0,
        eval_tokens=100,
        converged=ok,
        val_fvu_change=change,
    )


def test_family_record_and_report_show_convergence(tmp_path: Path) -> None:
    ctx = SimpleNamespace(cfg=SimpleNamespace(family=SimpleNamespace(external=[], train=_cfg())))
    sae = SimpleNamespace(cfg=SimpleNamespace(hook_site=SITE, d_in=12, d_sae=16, k=2, activation="topk"))
    quality = {"fvu": 0.2, "nmse": 0.2, "l0": 2.0, "dead_fraction": 0.0, "tokens": 100.0}
    history = _points({24: 0.30, 54: 0.24, 79: 0.20, 99: 0.18})  # window 55 -> 80 steps done (decay 0.2)
    rec = family_step._record("a", sae, "saes/a", history, quality, ctx)  # type: ignore[arg-type]
    assert rec.converged is False and rec.val_fvu_change == pytest.approx(0.2)
    assert rec.history[-1].val_fvu == 0.18
    res = FamilyResult(
        saes=[rec, _record("b", 0.004, True), _record("ext", None, None)],
        converge_tol=0.01,
        validation_tokens=8192,
    )
    html = family_section(res, {}, tmp_path)
    assert "<th>converged</th>" in html
    assert "<td>no (20.0% > 1%)</td>" in html and "<td>yes (0.4%)</td>" in html and "<td>—</td>" in html
    assert "8,192" in html and "1 of 2 SAEs miss it, by up to 20.0% (a)" in html


def test_old_family_files_still_load(tmp_path: Path) -> None:
    old = _record("a", None, None).model_dump(exclude={"converged", "val_fvu_change"})
    old["history"] = [{"step": 0.0, "fvu": 0.5, "l0": 2.0, "aux": 0.0, "dead_fraction": 0.0}]
    res = FamilyResult.model_validate({"saes": [old], "train_seconds": 1.0})
    assert res.saes[0].converged is None and res.saes[0].history[0].val_fvu is None
    assert res.converge_tol is None and "converged" in family_section(res, {}, tmp_path)
