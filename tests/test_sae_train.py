"""The family trainer: learns planted features, folds scaling, resumes after SIGKILL to identical weights."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from darkmatter.errors import ConfigError, DataError, ShapeError, StoreError
from darkmatter.sae.quality import evaluate_saes
from darkmatter.sae.train import DerivedInput, FamilyTrainer, SAESpec, TrainConfig
from darkmatter.stats import Split
from synthetic import sparse_features, synthetic_store

SITE = "blocks.0.hook_resid_post"
SPLIT = Split(seed=0, fraction=0.8)


def _cfg(**kw: object) -> TrainConfig:
    base = {
        "epochs": 6,
        "batch_size": 128,
        "lr": 2e-3,
        "dead_tokens": 1000,
        "checkpoint_every": 7,
        "aux_k": 8,
    }
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("syn") / "store"
    return synthetic_store(path, sparse_features(d=12, n_features=24, active=2), n_contexts=48, ctx_len=32)


def test_quality_improves_with_width_and_k(store, tmp_path: Path) -> None:
    pairs = [(4, 2), (8, 2), (16, 2), (16, 1), (16, 4)]  # 24 planted features: every width is short of them
    specs = [SAESpec(name=f"w{w}.k{k}", site=SITE, d_sae=w, k=k) for w, k in pairs]
    saes = FamilyTrainer(store, specs, _cfg(), tmp_path / "t", split=SPLIT).train()
    q = evaluate_saes(store, {s.name: sae for s, sae in zip(specs, saes, strict=True)}, split=SPLIT)
    fvu = {n: v["fvu"] for n, v in q.items()}
    assert fvu["w4.k2"] > fvu["w8.k2"] > fvu["w16.k2"]
    assert fvu["w16.k1"] > fvu["w16.k2"] > fvu["w16.k4"]
    assert fvu["w16.k4"] < 0.2
    assert all(v["dead_fraction"] < 0.2 for v in q.values())
    assert q["w16.k4"]["l0"] <= 4.0


def test_export_folds_input_scale_and_keeps_unit_decoder(store, tmp_path: Path) -> None:
    spec = SAESpec(name="s", site=SITE, d_sae=16, k=2)
    trainer = FamilyTrainer(store, [spec], _cfg(epochs=1), tmp_path / "t", split=SPLIT)
    (sae,) = trainer.train()
    m, s = trainer.members[0], trainer.scale[SITE]
    assert sae.cfg.input_scale == 1.0 and s != 1.0
    x = next(iter(store.iter_batches([SITE], batch_tokens=64))).acts[SITE]
    with torch.no_grad():
        idx, vals, _ = trainer.encode(m, x * s, len(x))
        ref = trainer.decode(m, idx, vals) / s
    torch.testing.assert_close(sae(x), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close((sae.W_dec * s).norm(dim=1), torch.ones(16), rtol=1e-5, atol=1e-5)


def test_batchtopk_has_inference_threshold(store, tmp_path: Path) -> None:
    spec = SAESpec(name="b", site=SITE, d_sae=24, k=2, kind="batchtopk")
    (sae,) = FamilyTrainer(store, [spec], _cfg(epochs=3), tmp_path / "t", split=SPLIT).train()
    assert sae.cfg.activation == "batchtopk" and sae.threshold is not None and float(sae.threshold[0]) > 0
    q = evaluate_saes(store, {"b": sae}, split=SPLIT)["b"]
    assert 0.5 < q["l0"] < 6 and q["fvu"] < 0.5
    q_train = evaluate_saes(store, {"b": sae}, split=SPLIT, part="train")["b"]
    assert q_train["tokens"] + q["tokens"] == 48 * 32 and q_train["tokens"] > q["tokens"]


RESUME = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from darkmatter.store import ActivationStore
    from darkmatter.sae.train import FamilyTrainer, SAESpec, TrainConfig
    import darkmatter.sae.train as tr
    from test_sae_train import _cfg, SITE, SPLIT

    original = tr.FamilyTrainer._train_step
    def dying(self, batch):
        if self.step == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)
        original(self, batch)
    tr.FamilyTrainer._train_step = dying
    specs = [SAESpec(name="a", site=SITE, d_sae=16, k=2), SAESpec(name="b", site=SITE, d_sae=8, k=1)]
    cfg = _cfg(epochs=3, eval_every=5, validation_tokens=200)
    FamilyTrainer(ActivationStore.open({store!r}), specs, cfg, {work!r}, split=SPLIT).train()
    """
)


def test_resume_after_sigkill_reaches_identical_weights_and_curves(store, tmp_path: Path) -> None:
    """A killed run resumes to the same weights and the same training curves, validation FVU included."""
    specs = [SAESpec(name="a", site=SITE, d_sae=16, k=2), SAESpec(name="b", site=SITE, d_sae=8, k=1)]
    cfg = _cfg(epochs=3, eval_every=5, validation_tokens=200)
    ref_trainer = FamilyTrainer(store, specs, cfg, tmp_path / "ref", split=SPLIT)
    ref = ref_trainer.train()
    work = tmp_path / "killed"
    script = RESUME.format(
        tests=str(Path(__file__).parent), kill_at=17, store=str(store.root), work=str(work)
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    saved = torch.load(work / "checkpoint.pt", weights_only=True)
    assert [h["step"] for h in saved["members"][0]["history"] if "val_fvu" in h]  # curves are checkpointed
    trainer = FamilyTrainer(store, specs, cfg, work, split=SPLIT)
    resumed = trainer.train()
    for a, b in zip(ref, resumed, strict=True):
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    for m_ref, m_res in zip(ref_trainer.members, trainer.members, strict=True):
        assert m_res.history == m_ref.history and any(h.get("val_fvu") for h in m_res.history)


def test_bad_family_input(store, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exceeds d_sae"):
        FamilyTrainer(store, [SAESpec(name="x", site=SITE, d_sae=4, k=8)], _cfg(), tmp_path, split=SPLIT)
    with pytest.raises(StoreError, match="lacks"):
        FamilyTrainer(
            store,
            [SAESpec(name="x", site="blocks.3.hook_mlp_out", d_sae=4, k=1)],
            _cfg(),
            tmp_path,
            split=SPLIT,
        )
    with pytest.raises(ConfigError, match="unique"):
        FamilyTrainer(store, [SAESpec(name="x", site=SITE, d_sae=4, k=1)] * 2, _cfg(), tmp_path, split=SPLIT)
    with pytest.raises(DataError, match="fewer than one batch"):
        FamilyTrainer(
            store, [SAESpec(name="x", site=SITE, d_sae=4, k=1)], _cfg(batch_size=10**6), tmp_path, split=SPLIT
        )
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(StoreError, match="cannot be read"):
        FamilyTrainer(
            store, [SAESpec(name="x", site=SITE, d_sae=4, k=1)], _cfg(), tmp_path / "c", split=SPLIT
        ).train()


def test_checkpoint_of_another_family_is_not_resumed(store, tmp_path: Path) -> None:
    work = tmp_path / "w"
    FamilyTrainer(
        store, [SAESpec(name="x", site=SITE, d_sae=8, k=1)], _cfg(epochs=1), work, split=SPLIT
    ).train()
    other = [SAESpec(name="x", site=SITE, d_sae=16, k=2)]
    (sae,) = FamilyTrainer(store, other, _cfg(epochs=1), work, split=SPLIT).train()
    fresh = FamilyTrainer(store, other, _cfg(epochs=1), tmp_path / "fresh", split=SPLIT).train()[0]
    assert sae.cfg.d_sae == 16
    torch.testing.assert_close(sae.W_dec, fresh.W_dec, rtol=0, atol=0)


def _double(x: torch.Tensor) -> torch.Tensor:
    return 2 * x


def test_derived_input_is_what_the_sae_trains_on(store, tmp_path: Path) -> None:
    """Training on 2x is training on x with half the input scale: the folded SAE is exactly rescaled."""
    derived = {"double": DerivedInput(SITE, _double, "double")}
    plain_tr = FamilyTrainer(
        store, [SAESpec(name="s", site=SITE, d_sae=16, k=2)], _cfg(epochs=2), tmp_path / "p", split=SPLIT
    )
    twice_tr = FamilyTrainer(
        store,
        [SAESpec(name="s", site="double", d_sae=16, k=2)],
        _cfg(epochs=2),
        tmp_path / "d",
        derived=derived,
        split=SPLIT,
    )
    (plain,), (twice,) = plain_tr.train(), twice_tr.train()
    assert twice_tr.scale["double"] == pytest.approx(plain_tr.scale[SITE] / 2, rel=1e-12)
    torch.testing.assert_close(twice.W_dec, 2 * plain.W_dec, rtol=1e-6, atol=0)
    torch.testing.assert_close(twice.b_dec, 2 * plain.b_dec, rtol=1e-6, atol=0)
    torch.testing.assert_close(twice.W_enc, plain.W_enc / 2, rtol=1e-6, atol=0)
    torch.testing.assert_close(twice.b_enc, plain.b_enc, rtol=1e-6, atol=0)
    assert twice.cfg.hook_site == SITE
    assert (
        twice.cfg.metadata["derived_input"] == "double" and twice.cfg.metadata["derived_identity"] == "double"
    )
    curve = twice_tr.members[0].history
    steps = [p["step"] for p in curve]  # logged every 10 steps, plus the validation marks
    assert steps[0] == 0.0 and 10.0 in steps and steps == sorted(set(steps))
    assert steps[-1] == twice_tr.total_steps - 1
    assert all(p["l0"] == 2.0 for p in curve)  # TopK keeps k positive latents on this data
    assert curve[0]["fvu"] > curve[-1]["fvu"]


def test_derived_identity_enters_the_signature(store, tmp_path: Path) -> None:
    spec = [SAESpec(name="s", site="double", d_sae=8, k=1)]

    def sig(identity: str) -> str:
        derived = {"double": DerivedInput(SITE, _double, identity)}
        return FamilyTrainer(store, spec, _cfg(), tmp_path, derived=derived, split=SPLIT).signature

    plain = FamilyTrainer(
        store, [SAESpec(name="s", site=SITE, d_sae=8, k=1)], _cfg(), tmp_path, split=SPLIT
    ).signature
    assert sig("a") == sig("a") != sig("b")
    assert plain not in (sig("a"), sig("b"))


def test_split_decides_the_train_tokens_and_the_signature(store, tmp_path: Path) -> None:
    spec = [SAESpec(name="s", site=SITE, d_sae=8, k=1)]
    ref = FamilyTrainer(store, spec, _cfg(), tmp_path, split=SPLIT)
    reseeded = FamilyTrainer(store, spec, _cfg(), tmp_path, split=Split(seed=1, fraction=0.8))
    half = FamilyTrainer(store, spec, _cfg(), tmp_path, split=Split(seed=0, fraction=0.5))
    assert len({ref.signature, reseeded.signature, half.signature}) == 3
    assert half.n_train < ref.n_train


def test_bad_derived_input(store, tmp_path: Path) -> None:
    spec = [SAESpec(name="s", site="d", d_sae=8, k=1)]
    with pytest.raises(ConfigError, match="name of a stored site"):
        FamilyTrainer(
            store, spec, _cfg(), tmp_path, derived={SITE: DerivedInput(SITE, _double, "x")}, split=SPLIT
        )
    with pytest.raises(StoreError, match="lacks"):
        FamilyTrainer(
            store,
            spec,
            _cfg(),
            tmp_path,
            derived={"d": DerivedInput("blocks.9.hook_mlp_out", _double, "x")},
            split=SPLIT,
        )
    with pytest.raises(StoreError, match="not a derived input"):
        FamilyTrainer(
            store, spec, _cfg(), tmp_path, derived={"e": DerivedInput(SITE, _double, "x")}, split=SPLIT
        )
    with pytest.raises(ShapeError, match="must map"):
        bad = {"d": DerivedInput(SITE, lambda x: x[:-1], "x")}
        FamilyTrainer(store, spec, _cfg(), tmp_path / "a", derived=bad, split=SPLIT).train()
    with pytest.raises(DataError, match="NaN"):
        nan = {"d": DerivedInput(SITE, lambda x: x / 0 - x / 0, "x")}
        FamilyTrainer(store, spec, _cfg(), tmp_path / "b", derived=nan, split=SPLIT).train()
