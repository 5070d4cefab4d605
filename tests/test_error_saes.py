"""SAEs trained on an SAE's linear and nonlinear error: inputs, quality, resume, activations, bad inputs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from darkmatter.errors import ConfigError, ShapeError
from darkmatter.experiments.error_saes import (
    ErrorComponents,
    ErrorSAEsResult,
    component_activations_fn,
    evaluate_error_saes,
    train_error_saes,
)
from darkmatter.sae.model import SAE
from darkmatter.sae.train import DerivedInput, FamilyTrainer, SAESpec, TrainConfig
from darkmatter.stats.split import Split
from synthetic import sparse_features, synthetic_store

SITE = "blocks.0.hook_resid_post"
D = 12
SPLIT = Split(seed=0, fraction=0.8)
Probe = tuple[torch.Tensor, torch.Tensor]


def _cfg(**kw: object) -> TrainConfig:
    base = {
        "epochs": 3,
        "batch_size": 128,
        "lr": 2e-3,
        "dead_tokens": 1000,
        "checkpoint_every": 4,
        "aux_k": 8,
    }
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny matrices: one thread is several times faster than contended multi-threading."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("err") / "store"
    return synthetic_store(path, sparse_features(d=D, n_features=24, active=2), n_contexts=48, ctx_len=32)


@pytest.fixture(scope="module")
def base_sae(store, tmp_path_factory: pytest.TempPathFactory) -> SAE:
    """A narrow SAE (8 latents for 24 planted features), so its error has structure."""
    spec = SAESpec(name="base", site=SITE, d_sae=8, k=2)
    (sae,) = FamilyTrainer(
        store, [spec], _cfg(epochs=2), tmp_path_factory.mktemp("base"), split=SPLIT
    ).train()
    return sae


def _tokens(store) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows of the store and their train mask."""
    rows = list(store.iter_batches([SITE], batch_tokens=10**6))
    x = torch.cat([b.acts[SITE] for b in rows])
    return x, torch.cat([SPLIT.mask(b.context, b.position) for b in rows])


def _fit_probe(store, sae: SAE, seed: int | None = None) -> Probe:
    """Least squares of x − Sae(x) on [x, 1] over train tokens (``seed``: a perturbed, different probe)."""
    x, train = _tokens(store)
    with torch.no_grad():
        e = x - sae(x)
    xt = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    sol = torch.linalg.lstsq(xt[train], e[train].double()).solution.float()
    if seed is not None:
        sol = sol + 0.05 * torch.randn(sol.shape, generator=torch.Generator().manual_seed(seed))
    return sol[:-1].contiguous(), sol[-1].contiguous()


@pytest.fixture(scope="module")
def probe(store, base_sae: SAE) -> Probe:
    return _fit_probe(store, base_sae)


@pytest.fixture(scope="module")
def trained(store, base_sae: SAE, probe: Probe, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("errsae")
    result, saes = train_error_saes(
        store, base_sae, probe, d_sae=32, k=3, train=_cfg(), workdir=work, split=SPLIT
    )
    return result, saes


def _fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x, x_hat = x.double(), x_hat.double()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_components_decompose_x(store, base_sae: SAE, probe: Probe) -> None:
    x, _ = _tokens(store)
    parts = ErrorComponents(base_sae, probe)
    with torch.no_grad():
        recon = base_sae(x)
    lin, nl, err = parts.linear_error(x), parts.nonlinear_error(x), parts.sae_error(x)
    torch.testing.assert_close(lin, x @ probe[0] + probe[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(err, x - recon, rtol=0, atol=0)
    torch.testing.assert_close(lin + nl, err, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recon + lin + nl, x, rtol=1e-5, atol=1e-5)
    assert float(nl.norm()) > 0.1 * float(lin.norm()) > 0  # neither part is trivially zero
    every = parts.all(x)
    torch.testing.assert_close(every["nonlinear"], nl, rtol=0, atol=1e-6)


def test_trainer_batches_hold_the_components_of_their_own_tokens(
    store, base_sae: SAE, probe: Probe, tmp_path: Path
) -> None:
    parts = ErrorComponents(base_sae, probe)
    derived = {c: DerivedInput(SITE, parts.component(c), parts.identity(c)) for c in ("linear", "nonlinear")}
    specs = [SAESpec(name=n, site=n, d_sae=8, k=1) for n in ("linear", "nonlinear")]
    specs.append(SAESpec(name="raw", site=SITE, d_sae=8, k=1))
    trainer = FamilyTrainer(store, specs, _cfg(), tmp_path, split=SPLIT, derived=derived)
    for i, batch in enumerate(trainer.batches()):
        x = batch[SITE]
        with torch.no_grad():
            err = x - base_sae(x)
        torch.testing.assert_close(batch["linear"], x @ probe[0] + probe[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch["linear"] + batch["nonlinear"], err, rtol=1e-5, atol=1e-5)
        if i == 12:  # past the first epoch: shuffled across shards
            break
    assert len({parts.identity(c) for c in ("linear", "nonlinear", "error")}) == 3


def test_error_saes_learn_their_components(store, base_sae: SAE, probe: Probe, trained) -> None:
    result, saes = trained
    assert set(saes) == {"linear", "nonlinear"} and result.experiment == "error_saes"
    x, train = _tokens(store)
    ctx_ids = torch.cat([b.context for b in store.iter_batches([SITE], batch_tokens=10**6)])
    x_test = x[~train]
    parts = ErrorComponents(base_sae, probe)
    comps = parts.all(x_test)
    for c, sae in saes.items():
        q = result.saes[c]
        assert sae.cfg.hook_site == SITE and sae.cfg.metadata["derived_input"] == f"{SITE}:{c}_error"
        with torch.no_grad():
            explicit = _fvu(comps[c], sae(comps[c]))
        assert q.fvu == pytest.approx(explicit, rel=1e-4)
        assert q.fvu < 0.4
        assert 0 < q.l0 <= 3 and q.dead_fraction < 0.5
        curve = result.curves[c]
        assert curve[0].fvu > 2 * curve[-1].fvu
        assert all(0 < p.l0 <= 3 for p in curve)
        assert curve[-1].step == q.train_steps - 1
        ctx_test = ctx_ids[~train]
        for b, value in enumerate(q.fvu_jackknife):  # the FVU on the test tokens outside block b
            keep = (ctx_test * 8) // store.n_contexts != b
            with torch.no_grad():
                assert value == pytest.approx(_fvu(comps[c][keep], sae(comps[c][keep])), rel=1e-4)
        assert len(q.fvu_jackknife) == 8 and q.fvu_interval is not None
        assert q.fvu_interval[0] < q.fvu < q.fvu_interval[1]
    var_x = float((x_test.double() - x_test.double().mean(0)).pow(2).sum())
    for c, v in comps.items():
        explicit = float((v.double() - v.double().mean(0)).pow(2).sum()) / var_x
        assert result.variance_ratio[c] == pytest.approx(explicit, rel=1e-6)
    assert result.n_test == int((~train).sum())
    again = evaluate_error_saes(store, base_sae, probe, saes, split=SPLIT)
    assert again["nonlinear"]["fvu"] == pytest.approx(result.saes["nonlinear"].fvu, rel=1e-9)
    assert ErrorSAEsResult.model_validate_json(result.model_dump_json()) == result


class KilledError(Exception):
    pass


def test_resume_is_bit_identical_and_other_probe_restarts(
    store, base_sae: SAE, probe: Probe, trained, tmp_path: Path
) -> None:
    _, ref = trained
    kill_at = 10 * 128  # tokens; the last checkpoint before it is at step 8

    def dying(done: int, _total: int, _rate: float) -> None:
        if done == kill_at:
            raise KilledError

    with pytest.raises(KilledError):
        train_error_saes(
            store, base_sae, probe, d_sae=32, k=3, train=_cfg(), workdir=tmp_path, split=SPLIT, progress=dying
        )
    seen: list[int] = []
    _, resumed = train_error_saes(
        store,
        base_sae,
        probe,
        d_sae=32,
        k=3,
        train=_cfg(),
        workdir=tmp_path,
        split=SPLIT,
        progress=lambda done, _t, _r: seen.append(done),
    )
    assert seen[0] == 9 * 128  # resumed from the step-8 checkpoint
    for c in ref:
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            torch.testing.assert_close(getattr(resumed[c], name), getattr(ref[c], name), rtol=0, atol=0)
    other = _fit_probe(store, base_sae, seed=1)
    seen.clear()
    _, fresh = train_error_saes(
        store,
        base_sae,
        other,
        d_sae=32,
        k=3,
        train=_cfg(),
        workdir=tmp_path,
        split=SPLIT,
        progress=lambda done, _t, _r: seen.append(done),
    )
    assert seen[0] == 128  # the finished checkpoint belongs to another probe: trained from step 0
    assert not torch.equal(fresh["linear"].W_dec, ref["linear"].W_dec)


def test_component_activations_fn_returns_chosen_latents(store, base_sae: SAE, probe: Probe, trained) -> None:
    _, saes = trained
    latents = [17, 0, 5, 31, 2]
    fn = component_activations_fn(base_sae, probe, saes["nonlinear"], "nonlinear", latents)
    batch = next(iter(store.iter_batches([SITE], batch_tokens=200)))
    got = fn(batch)
    comp = ErrorComponents(base_sae, probe).nonlinear_error(batch.acts[SITE])
    with torch.no_grad():
        dense = saes["nonlinear"].encode(comp)
    assert got.shape == (len(batch), len(latents)) and got.dtype == torch.float32
    torch.testing.assert_close(got, dense[:, latents], rtol=1e-6, atol=1e-6)
    assert int((got != 0).sum()) > 0


def test_bad_inputs(store, base_sae: SAE, probe: Probe, trained, tmp_path: Path) -> None:
    w, b = probe
    kw = {"d_sae": 16, "k": 2, "train": _cfg(), "workdir": tmp_path, "split": SPLIT}
    with pytest.raises(ShapeError, match="probe"):
        train_error_saes(store, base_sae, (w[:-1], b), **kw)  # type: ignore[arg-type]
    with pytest.raises(ShapeError, match="probe"):
        train_error_saes(store, base_sae, (w, b[:-1]), **kw)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="Unknown error component"):
        train_error_saes(store, base_sae, probe, components=("linear", "quadratic"), **kw)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="at most once"):
        train_error_saes(store, base_sae, probe, components=("linear", "linear"), **kw)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="exceeds d_sae"):
        train_error_saes(store, base_sae, probe, d_sae=4, k=8, train=_cfg(), workdir=tmp_path, split=SPLIT)
    assert not any(tmp_path.iterdir())  # nothing was trained
    err_sae = trained[1]["linear"]
    with pytest.raises(ShapeError, match="probe"):
        component_activations_fn(base_sae, (w[:, :-1], b), err_sae, "linear", [0])
    with pytest.raises(ConfigError, match="Unknown error component"):
        component_activations_fn(base_sae, probe, err_sae, "bilinear", [0])
    with pytest.raises(ConfigError, match="at most once"):
        component_activations_fn(base_sae, probe, err_sae, "linear", [1, 1])
    with pytest.raises(ConfigError, match="must lie in"):
        component_activations_fn(base_sae, probe, err_sae, "linear", [32])
