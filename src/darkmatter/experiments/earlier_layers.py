"""Predicting an SAE's error from other components' SAE outputs (paper Fig 9b / 10b), and beyond.

``earlier_layer_predictors``: for the target SAE at site s (a layer-L residual in the paper), the targets are
its SaeError e = x − Sae(x), LinearError = x @ W + b (its probe b*) and NonlinearError = e − LinearError.
Each regressor is one component's SAE reconstruction at its own site (e.g. layer L−1 resid_post, layer L
attn_out and mlp_out), the target SAE's own Sae(x) (``self``, the paper's "residual"), and all of them
concatenated (``joint``, beyond the paper). Every (regressor, target) pair is a separate least-squares fit
with bias on train tokens, scored exactly on test tokens from streaming float64 moments. One pass; the
single-regressor moments are blocks of the joint ones (a regression on a subset of columns needs only the
sub-blocks of the Gram and cross moments), so the singles cost nothing extra.

Intervals (``earlier_intervals``): the moments are kept per block of whole shards and every fit is refitted
with each block left out, giving delete-one-block jackknife intervals of every R², of the paired
R²(LinearError) − R²(NonlinearError) and of the two FVUs.

Beyond the paper: the joint map J predicting SaeError gives an improved reconstruction
x̂' = Sae(x) + J([regressor reconstructions]); we report FVU(x, Sae(x)) and FVU(x, x̂') on test tokens and
return J (``result.joint_map``, a ``JointMap`` from ``joint_map``) so ``downstream_ce_with_joint``
(``joint_ce``) can measure the CE of splicing x̂'.

``mlp_probe`` (module ``mlp_probe``): does a nonlinear map of x predict what the linear probe could not?
Those entry points are re-exported here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field, PrivateAttr

from darkmatter.errors import ConfigError, DataError
from darkmatter.experiments.decomposition.accumulators import block_of, n_blocks
from darkmatter.experiments.earlier_intervals import (
    BlockMoments,
    fvu_intervals,
    gap_intervals,
    jackknife_replicates,
    r2_intervals,
    sub_moments,
)
from darkmatter.experiments.inputs import check_probe, check_store_sae, on_device, sae_recon
from darkmatter.experiments.joint_ce import JointCEResult, downstream_ce_with_joint
from darkmatter.experiments.joint_map import JOINT, SELF, Block, JointMap, joint_replacement, regressors
from darkmatter.experiments.mlp_probe import mlp_probe
from darkmatter.hashing import stable_hash
from darkmatter.progress import Progress, Ticker
from darkmatter.ranks import SINGLE, Ranks
from darkmatter.results import Result, sae_identity, store_summary
from darkmatter.sae.model import SAE
from darkmatter.stats import (
    HeldOutEval,
    Moments,
    RidgeFit,
    Split,
    evaluate,
    fit_ridge_many,
    fvu_with_prediction,
)
from darkmatter.store import ActivationStore, Batch

__all__ = [
    "JOINT",
    "PAPER_R2",
    "SELF",
    "TARGETS",
    "EarlierLayersResult",
    "JointCEResult",
    "JointMap",
    "downstream_ce_with_joint",
    "earlier_layer_predictors",
    "joint_replacement",
    "mlp_probe",
]

Tensor = torch.Tensor

TARGETS = ("nonlinear", "error", "linear")
"""Targets in the paper's panel order: NonlinearError, SaeError, LinearError."""

PAPER_R2 = {
    "residual": {"nonlinear": 0.49, "error": 0.06, "linear": 0.34},
    "prev residual": {"nonlinear": 0.14, "error": 0.09, "linear": 0.32},
    "MLP": {"nonlinear": 0.07, "error": 0.07, "linear": 0.16},
    "attention": {"nonlinear": 0.04, "error": 0.10, "linear": 0.18},
}
"""Paper Fig 9b (Gemma 2 9B, layer 20, 16k, L0 ≈ 60): test R², mean over dims, per regressor and target."""


class EarlierLayersResult(Result):
    """Fig 9b/10b: R² of the target SAE's error components from other components' SAE outputs."""

    experiment: str = "earlier_layers"
    target_site: str = Field(description="Site of the target SAE.")
    regressors: list[str] = Field(description="Regressor names: the given SAEs, then 'self' and 'joint'.")
    regressor_sites: dict[str, str] = Field(description="Site of each single regressor.")
    targets: list[str] = Field(description="nonlinear (NonlinearError), error (SaeError), linear.")
    r2: dict[str, dict[str, float]] = Field(
        description="Test R², unweighted mean over output dims (the paper's number): regressor -> target."
    )
    r2_variance_weighted: dict[str, dict[str, float]] = Field(description="Test 1 − ΣSS_res / ΣSS_tot.")
    r2_train: dict[str, dict[str, float]] = Field(
        description="In-sample (train) R², mean over dims; the joint fit is never below a single one."
    )
    fvu_sae: float = Field(description="FVU(x, Sae(x)) on test tokens.")
    fvu_sae_linear: float = Field(
        description="FVU(x, Sae(x) + LinearError): the linear probe's FVU_nonlinear on these test tokens."
    )
    fvu_with: dict[str, float] = Field(
        description="FVU(x, Sae(x) + R_j-prediction of SaeError) per regressor; 'joint' is FVU(x, x̂')."
    )
    fvu_sae_linear_joint: float = Field(
        description="FVU(x, Sae(x) + LinearError + joint prediction of NonlinearError) on test tokens."
    )
    ridge: dict[str, float] = Field(description="Absolute ridge λ of each regressor's fit.")
    n_train: int
    n_test: int
    interval_blocks: int = Field(
        0, description="Blocks of whole shards left out one at a time for the intervals (0: no intervals)."
    )
    jackknife: dict[str, dict[str, list[float]]] = Field(
        default_factory=dict,
        description="regressor -> target -> test R² with each block left out, every fit refitted.",
    )
    intervals: dict[str, dict[str, list[float]]] = Field(
        default_factory=dict,
        description="regressor -> target -> [low, high]: 95% delete-one-block jackknife interval of the R² "
        "(empty with fewer than 3 blocks).",
    )
    gap_intervals: dict[str, list[float]] = Field(
        default_factory=dict,
        description="regressor -> 95% jackknife interval of R²(LinearError) − R²(NonlinearError), from the "
        "paired replicates.",
    )
    fvu_intervals: dict[str, list[float]] = Field(
        default_factory=dict,
        description="'sae': interval of fvu_sae; 'joint': of fvu_with['joint'] (FVU(x, x̂')).",
    )
    paper_r2: dict[str, dict[str, float]] = Field(
        default_factory=lambda: PAPER_R2, description="The paper's Fig 9b values, for reference."
    )
    seconds: float = 0.0
    _joint_map: JointMap | None = PrivateAttr(None)

    @property
    def joint_map(self) -> JointMap | None:
        """The joint map predicting SaeError (not serialised; ``JointMap.save`` writes it)."""
        return self._joint_map


@dataclass
class _Layout:
    """The regression's inputs: the target site and width, the regressor column blocks and their spans."""

    target_site: str
    d: int
    blocks: list[Block]
    spans: dict[str, slice] = field(default_factory=dict)
    """Columns of each regressor in the joint input (``JOINT``: all of them)."""

    def __post_init__(self) -> None:
        offset = 0
        for n, _s, width in self.blocks:
            self.spans[n] = slice(offset, offset + width)
            offset += width
        self.spans[JOINT] = slice(0, offset)

    @property
    def width(self) -> int:
        """Columns of the joint input."""
        return self.spans[JOINT].stop

    @property
    def sites(self) -> list[str]:
        """The store sites to read: the target's, then each regressor's, once each."""
        return list(dict.fromkeys([self.target_site, *(s for n, s, _w in self.blocks if n != SELF)]))


def _check_names(regressor_saes: Mapping[str, SAE]) -> None:
    for reserved in (SELF, JOINT):
        if reserved in regressor_saes:
            raise ConfigError(f"Regressor name {reserved!r} is reserved; rename that SAE.")


def _layout(store: ActivationStore, target_site: str, regressor_saes: Mapping[str, SAE]) -> _Layout:
    """Blocks of the regressors (checked against the store) in the given order, then ``SELF``."""
    reg_sites = {n: check_store_sae(store, n, s) for n, s in regressor_saes.items()}
    d = store.d[target_site]
    blocks = [(n, reg_sites[n], store.d[reg_sites[n]]) for n in regressor_saes] + [(SELF, target_site, d)]
    return _Layout(target_site, d, blocks)


def _train_mask(batch: Batch, split: Split) -> Tensor:
    """The batch's train rows, hashed on the CPU and returned on the batch's device."""
    return split.mask(batch.context.cpu(), batch.position.cpu()).to(batch.context.device)


@dataclass
class _Accumulated:
    """Train and test moments of (joint input, targets) and the test moments of x alone: the totals and,
    for the intervals, the same per block of whole shards (the totals are their sum)."""

    train: Moments
    test: Moments
    x_test: Moments
    blocks: BlockMoments

    @classmethod
    def of(cls, blocks: BlockMoments) -> _Accumulated:
        """The totals merged from the blocks (with one block, that block itself)."""
        return cls(blocks.total("train"), blocks.total("test"), blocks.total("x_test"), blocks)


def _accumulate(
    store: ActivationStore,
    layout: _Layout,
    target_sae: SAE,
    probe: tuple[Tensor, Tensor],
    regressor_saes: Mapping[str, SAE],
    *,
    split: Split,
    batch_tokens: int,
    device: str | torch.device,
    blocks: int,
    progress: Progress | None,
    ranks: Ranks,
) -> _Accumulated:
    """One pass over the store (this rank's shards): the moments of every regression, split into train and
    test tokens, in ``blocks`` blocks of whole shards (summed across ranks)."""
    dims = dict.fromkeys(TARGETS, layout.d)
    mom = BlockMoments.empty(blocks, layout.width, dims, layout.d, device=device)
    shards = ranks.share(range(store.n_shards)) if ranks.active else None
    problem: str | None = None
    try:
        _pass(
            store,
            layout,
            target_sae,
            probe,
            regressor_saes,
            mom,
            split,
            batch_tokens,
            device,
            shards,
            progress,
        )
    except DataError as exc:
        if not ranks.active:
            raise
        problem = str(exc)
    if ranks.active:  # one rank's bad data stops every rank at the same point
        found = [p for p in ranks.gather(problem) if p is not None]
        if found:
            raise DataError(found[0])
        mom.all_reduce_(ranks)
    acc = _Accumulated.of(mom)
    _check_counts(acc.train.n, acc.test.n, layout.width)
    return acc


def _pass(
    store: ActivationStore,
    layout: _Layout,
    target_sae: SAE,
    probe: tuple[Tensor, Tensor],
    regressor_saes: Mapping[str, SAE],
    mom: BlockMoments,
    split: Split,
    batch_tokens: int,
    device: str | torch.device,
    shards: list[int] | None,
    progress: Progress | None,
) -> None:
    """The moments of ``shards`` (None: every shard) added to ``mom``."""
    w, b = probe
    blocks = len(mom.train)
    skip = int(store.identity.get("skip_positions", 0))
    n_ctx = store.n_contexts if shards is None else len(store.shard_contexts_of(shards))
    ticker = Ticker(progress, n_ctx * (store.ctx_len - skip))
    for batch in store.iter_batches(layout.sites, batch_tokens=batch_tokens, device=device, shards=shards):
        ticker.advance(len(batch))
        train = _train_mask(batch, split)
        x = batch.acts[layout.target_site]
        if not bool(torch.isfinite(x).all()):
            raise DataError(
                f"The store holds NaN or inf activations at {layout.target_site}; re-harvest in fp32."
            )
        sae_x = sae_recon(target_sae, x)
        error = x - sae_x
        linear = torch.addmm(b, x, w)
        ys = {"nonlinear": error - linear, "error": error, "linear": linear}
        z = regressors(layout.blocks, sae_x, batch.acts, regressor_saes)
        k = block_of(store, blocks, int(batch.context[0]))
        for part, mask in ((mom.train[k], train), (mom.test[k], ~train)):
            if bool(mask.any()):
                part.update(z[mask], {name: v[mask] for name, v in ys.items()})
        if bool((~train).any()):
            mom.x_test[k].update(x[~train])


def _check_counts(n_train: int, n_test: int, width: int) -> None:
    if n_train <= width + 1 or n_test < 2:
        raise DataError(
            f"The split has {n_train} train and {n_test} test tokens; the joint regression has {width} "
            f"inputs, so it needs more than {width + 1} train and at least 2 test tokens. Harvest more "
            "contexts or use fewer regressors."
        )


@dataclass
class _Fits:
    """Per-regressor tables of the result, and the joint fits and their test evaluations."""

    r2: dict[str, dict[str, float]] = field(default_factory=dict)
    r2_w: dict[str, dict[str, float]] = field(default_factory=dict)
    r2_tr: dict[str, dict[str, float]] = field(default_factory=dict)
    fvu_with: dict[str, float] = field(default_factory=dict)
    ridge: dict[str, float] = field(default_factory=dict)
    joint: dict[str, RidgeFit] = field(default_factory=dict)
    joint_ev: dict[str, HeldOutEval] = field(default_factory=dict)


def _fit_all(names: list[str], acc: _Accumulated, layout: _Layout, var_x: float) -> _Fits:
    """Fit every (regressor, target) pair on train moments (a sub-block for a single regressor); score."""
    out = _Fits()
    for name in names:
        tr = acc.train if name == JOINT else sub_moments(acc.train, layout.spans[name])
        te = acc.test if name == JOINT else sub_moments(acc.test, layout.spans[name])
        fits = fit_ridge_many(tr, list(TARGETS), bias=True)
        ev = {t: evaluate(fits[t], te, t) for t in TARGETS}
        out.r2[name] = {t: ev[t].r2_mean_over_dims for t in TARGETS}
        out.r2_w[name] = {t: ev[t].r2_variance_weighted for t in TARGETS}
        out.r2_tr[name] = {t: evaluate(fits[t], tr, t).r2_mean_over_dims for t in TARGETS}
        out.fvu_with[name] = fvu_with_prediction(ev["error"], var_x)
        out.ridge[name] = fits["error"].ridge
        if name == JOINT:
            out.joint, out.joint_ev = fits, ev
    return out


def _interval_fields(
    acc: _Accumulated, layout: _Layout, fits: _Fits, fvu: dict[str, float]
) -> dict[str, Any]:
    """The result's jackknife fields: every fit refitted with each block left out (none without enough)."""
    spans = {name: layout.spans[name] for name in fits.r2}
    reps = jackknife_replicates(acc.blocks, spans, TARGETS)
    if reps is None:
        return {}
    return {
        "interval_blocks": len(acc.blocks.train),
        "jackknife": reps.r2,
        "intervals": r2_intervals(fits.r2, reps),
        "gap_intervals": gap_intervals(fits.r2, reps),
        "fvu_intervals": fvu_intervals(fvu, reps),
    }


def _joint_map(layout: _Layout, fit: RidgeFit) -> JointMap:
    """The joint fit predicting SaeError as a float32 CPU ``JointMap``."""
    assert fit.bias is not None
    return JointMap(
        target_site=layout.target_site,
        blocks=layout.blocks,
        weights=fit.weights.float().cpu(),
        bias=fit.bias.float().cpu(),
    )


def earlier_layer_predictors(
    store: ActivationStore,
    target_sae: SAE,
    probe: tuple[Tensor, Tensor],
    regressor_saes: Mapping[str, SAE],
    *,
    split: Split,
    batch_tokens: int = 4096,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    interval_blocks: int = 8,
    progress: Progress | None = None,
    ranks: Ranks = SINGLE,
) -> EarlierLayersResult:
    """R² of each error component of ``target_sae`` from each regressor (see the module docstring).

    ``probe = (W [d, d], b [d])`` is the target SAE's error probe, fitted on the train tokens of the same
    ``split`` so that every test number is out of sample. ``interval_blocks``: keep the moments in that
    many blocks of whole shards (at most one per shard) for delete-one-block jackknife intervals; with
    fewer than 3 there are none. Memory grows with the blocks (each holds the joint regression's moments).
    Every SAE (in ``dtype``, None: its own), the probe, the batches and the float64 moments are on
    ``device``. ``ranks``: under ``torchrun`` every rank (each must call this) passes over its share of the
    shards, the blocks' moments are summed across ranks and every rank fits and returns the same result.
    """
    t0 = time.perf_counter()
    _check_names(regressor_saes)
    target_site = check_store_sae(store, "target", target_sae)
    target_sae = on_device(target_sae, device, dtype)
    regressor_saes = {n: on_device(s, device, dtype) for n, s in regressor_saes.items()}
    w, b = (t.to(device) for t in check_probe("target", probe, store.d[target_site]))
    layout = _layout(store, target_site, regressor_saes)
    acc = _accumulate(
        store,
        layout,
        target_sae,
        (w, b),
        regressor_saes,
        split=split,
        batch_tokens=batch_tokens,
        device=device,
        blocks=n_blocks(store, interval_blocks),
        progress=progress,
        ranks=ranks,
    )
    var_x = acc.x_test.total_variance_x()
    names = [*regressor_saes, SELF, JOINT]
    fits = _fit_all(names, acc, layout, var_x)
    fvu_sae = float(acc.test.target_sum_sq("error").sum()) / var_x
    config = {
        "split_seed": split.seed,
        "train_fraction": split.fraction,
        "store": store_summary(store),
        "target": sae_identity(target_sae),
        "regressors": {n: sae_identity(s) for n, s in regressor_saes.items()},
        "probe_sha": stable_hash([float(w.double().sum()), float(b.double().sum())]),
        "interval_blocks": interval_blocks,
    }
    result = EarlierLayersResult(
        config_hash=stable_hash(config),
        seed=split.seed,
        config=config,
        target_site=target_site,
        regressors=names,
        regressor_sites={n: s for n, s, _ in layout.blocks},
        targets=list(TARGETS),
        r2=fits.r2,
        r2_variance_weighted=fits.r2_w,
        r2_train=fits.r2_tr,
        fvu_sae=fvu_sae,
        fvu_sae_linear=float(acc.test.target_sum_sq("nonlinear").sum()) / var_x,
        fvu_with=fits.fvu_with,
        fvu_sae_linear_joint=fvu_with_prediction(fits.joint_ev["nonlinear"], var_x),
        ridge=fits.ridge,
        n_train=acc.train.n,
        n_test=acc.test.n,
        **_interval_fields(acc, layout, fits, {"sae": fvu_sae, JOINT: fits.fvu_with[JOINT]}),
        seconds=time.perf_counter() - t0,
    )
    result._joint_map = _joint_map(layout, fits.joint["error"])
    return result
