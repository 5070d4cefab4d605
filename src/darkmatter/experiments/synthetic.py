"""App. B.2 / C.3 synthetic test of the error decomposition (Table 1, Fig 15) and the App. D control.

Real activations x are replaced by x′ = Sae(x) = W_decᵀc + b_dec, a sparse sum of realistic latents with
known coefficients. Masking the fraction p of latents with the least activation mass gives an SAE that "did
not learn" them: r_p = decode(codes ⊙ mask_p). Gaussian noise on the input stands in for Dense(x′), and
noise on the reconstruction stands in for Introduced(x′):

    x̃ = x′ + σ_act·s·ε₁,   r = r_p + σ_rec·s·ε₂,   e = x̃ − r,   ε₁, ε₂ ~ N(0, I_d).

The linear error probe b* (with bias) is fitted on the train split and scored on the test split:
FVU_rec = FVU(x̃, r) and FVU_lin = FVU(x̃, r + b*x̃). At 0% ablation, estimated Dense = FVU_rec − FVU_lin and
estimated Introduced = FVU_lin. Table 1 correlates them with σ_act and σ_rec over the 5×5 grid. The paper
reports 0.9842 / 0.1417 for σ_act and 0.0988 / 0.9036 for σ_rec.

Every setting comes from one pass. ε₁ and ε₂ are drawn once per token and shared by every setting. With
D_p = x′ − r_p, each setting's input and error are fixed combinations of four blocks:
x̃ = x′ + αε₁ and e = D_p + αε₁ − βε₂, where α = σ_act·s and β = σ_rec·s. One streaming `Moments` per split,
of [x′, ε₁] against the targets ε₂ and one D_p per ablation fraction (plus Σ D_p·ε₂ per dimension),
therefore holds every Gram, cross moment and target variance that any setting needs. The rows are sorted
train first, so every chunk belongs to one split.

For each distinct σ_act, `fit_ridge_many` fits the probe of every block once (one Cholesky). The ridge
solve is linear in the target, so a setting's probe is the same combination of the block probes, and its
held-out SS_res is a quadratic form in the combination's coefficients over block-pair sums. These are
`evaluate`'s formula summed over dimensions, so they are exact, not Monte Carlo. Memory is
O(d²·(P + 3)) for the sums, plus one [N, d] float32 tensor.

Choices, and where they differ from the original script (paper-experiments.md §12):
- The SAE re-encodes the clean x′, as in the paper's code and text (Sae(x′)). The noiseless, unablated
  reconstruction therefore keeps the SAE's re-encoding error FVU(x′, Sae(x′)), reported as ``fvu_floor``.
  The script computed that number and ignored it. ``reencode=False`` decodes the codes that generated x′
  instead, as an ideal encoder would, and the floor is then exactly 0.
- ε₁ and ε₂ are seeded and shared by every setting and ablation. The script drew fresh, unseeded noise per
  run. Each setting's noise has the same distribution either way; shared draws also remove the
  Monte-Carlo jitter between the points of a curve.
- Scale s: the paper multiplied N(0, 1) by σ directly on Gemma-2-9B activations. Here the default is
  s = √(mean over dimensions of x′'s per-dimension variance) / 4, and ``scale`` overrides it. This rms is
  used rather than the plain mean std because it makes the noise share exact: noise at level σ adds
  σ²/16 of x′'s total variance. That is 6% at level 1, so the noise of (1, 0.6) alone gives an FVU of
  0.085, in the range of the paper's Fig 15 (ylim 0–0.16). At level 4 the noise equals x′'s own variance
  (SNR 1), so the grid runs from noiseless to very noisy.
- The probe has a bias (the paper's text) and is scored on held-out tokens. The script fitted it without a
  bias and scored it in-sample on all 50k rows. Held out, the probe's overfitting costs ≈ d/n_train of
  the unpredictable variance. This biases estimated Dense slightly *down* as σ_rec grows; the in-sample
  script's bias was upward, by about the same amount.
- FVU subtracts the per-dimension mean (the project's ``fvu``). The script subtracted one global scalar.
- b_dec stays in x′ and in every reconstruction, so ablating every latent leaves b_dec, not 0. The
  per-dimension centring and the probe's bias cancel it from every number.
- Latents are ranked by mean activation × decoder-row norm, over all N tokens of x's codes. For unit-norm
  decoders such as Gemma Scope's, this is the paper's mean activation. ⌊d_sae·p⌋ latents are masked.
  As in the script, codes are masked after encoding, so TopK does not reselect latents.
- App. D control: x′ = Σ_i w_i g_i over 25·d random Gaussian directions g_i ~ N(0, I/d); the paper used
  100k directions in R^4000. Each token makes Poisson(L0) draws of directions, with P(i) ∝ (i+1)^-exponent.
  L0 defaults to the SAE's mean L0 on x, and the weights are U(0.5, 1.5). The "SAE" only masks, so
  reencode does not apply.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, Field

from darkmatter.errors import ConfigError, DataError, StoreError
from darkmatter.experiments.inputs import on_device, placement
from darkmatter.experiments.synthetic_data import (
    CHUNK,
    RandomSource,
    SAESource,
    keeps,
    random_source,
    rms_std,
)
from darkmatter.experiments.synthetic_moments import accumulate, score
from darkmatter.experiments.synthetic_summary import (
    CURVED_ABOVE,
    FIG15_SETTINGS,
    FLAT_BELOW,
    curve_shape,
    summarise,
)
from darkmatter.hashing import stable_hash
from darkmatter.results import Number, Result, sae_identity
from darkmatter.sae.model import SAE
from darkmatter.stats import Split
from darkmatter.store import ActivationStore, identity_hash

__all__ = [
    "CHUNK",
    "CURVED_ABOVE",
    "EXPERIMENT",
    "FIG15_SETTINGS",
    "FLAT_BELOW",
    "RandomControl",
    "SimulationOutcome",
    "SyntheticResult",
    "curve_shape",
    "synthetic_simulation",
]

Tensor = torch.Tensor
F64 = torch.float64

EXPERIMENT = "synthetic_simulation"
SCALE_DIVISOR = 4.0
"""The default s is x′'s rms per-dimension std divided by this (see the module docstring)."""
CONTROL_DIRECTIONS_PER_DIM = 25
CONTROL_SEED_OFFSET = 0x9E3779B9
"""The control's data are seeded with ``seed`` + this; its noise with ``seed`` itself."""
PAPER_TABLE1 = [[0.9842, 0.1417], [0.0988, 0.9036]]
TABLE1_ROWS = ["sigma_act (noise on x')", "sigma_rec (noise on Sae(x'))"]
TABLE1_COLS = ["estimated Dense = FVU_rec - FVU_lin", "estimated Introduced = FVU_lin"]


class CurveShape(BaseModel):
    """A quadratic fit of one Fig 15 curve (see ``curve_shape``)."""

    c0: float
    c1: float
    c2: float
    curvature_ratio: float
    linear_r2: Number
    shape: str = Field(description="'linear' or 'curved'.")


class Fig15Curve(BaseModel):
    """FVU_rec and FVU_lin against the ablated fraction at one (σ_act, σ_rec) setting."""

    sigma_act: float
    sigma_rec: float
    ablation: list[float]
    fvu_rec: list[float]
    fvu_lin: list[float]
    shape_rec: CurveShape | None = None
    shape_lin: CurveShape | None = None
    unrecovered_share: Number | None = Field(
        None, description="Share of the variance removed by ablation that FVU_lin does not win back."
    )
    lin_verdict: str | None = Field(None, description="flat, or rising / falling (linear / curved).")


class SimulationOutcome(BaseModel):
    """One simulated data set: FVUs for every setting and ablation, Table 1, and the Fig 15 curve shapes."""

    scale: float = Field(description="s: noise level σ adds σ·s·N(0, I), in units of x′.")
    x_rms_std: float = Field(description="rms over dimensions of x′'s per-dimension std (all N tokens).")
    l0: float = Field(description="Mean number of active latents per token in the codes that build x′.")
    fvu_floor: float | None = Field(
        description="FVU_rec with no noise and no ablation (the re-encoding error); None without (0, 0)."
    )
    grid: list[dict[str, float]] = Field(
        description="One row per (sigma_act, sigma_rec, ablation): n_ablated, fvu_rec, fvu_lin (test split)."
    )
    table1: list[list[float | None]] = Field(
        description="Pearson r over the levels×levels grid at 0% ablation (rows, columns as labelled); "
        "None where an estimate is constant over the grid."
    )
    table1_intervals: list[list[list[float] | None]] = Field(
        default_factory=list,
        description="95% Fisher-z interval [low, high] of each Table 1 correlation over the grid's settings.",
    )
    table1_rows: list[str] = Field(default_factory=lambda: list(TABLE1_ROWS))
    table1_cols: list[str] = Field(default_factory=lambda: list(TABLE1_COLS))
    diagonal_ok: bool = Field(description="min(diagonal of table1) > max |off-diagonal|.")
    curves: list[Fig15Curve] = Field(
        description="Fig 15: FVU_rec and FVU_lin against the ablated fraction for a few noise settings, with "
        "quadratic-fit shapes (`curve_shape`), the share of the ablated variance FVU_lin does not win back, "
        "and lin_verdict: flat, or rising / falling (linear / curved)."
    )


class RandomControl(SimulationOutcome):
    """App. D: the same test on random data, where the paper finds the decomposition fails."""

    n_directions: int = Field(description="Random Gaussian directions the data are built from.")
    exponent: float = Field(description="A draw picks direction i with probability ∝ (i+1)^-exponent.")
    expected_l0: float = Field(description="Mean number of draws per token (Poisson).")


class SyntheticResult(Result, SimulationOutcome):
    """Table 1 and Fig 15 of the paper (App. B.2 / C.3) on x′ = Sae(x), and the App. D random control."""

    experiment: str = Field(EXPERIMENT, description="Experiment name; also the JSON file name.")
    sae: dict[str, Any] = Field(description="Identity of the SAE whose latents build x′.")
    n_tokens: int = Field(description="Tokens simulated: the first n_tokens the store yields.")
    n_train: int = Field(description="Tokens every probe is fitted on.")
    n_test: int = Field(description="Tokens every FVU is measured on.")
    reencode: bool = Field(description="True: the SAE re-encodes x′ (paper). False: x′'s codes are decoded.")
    table1_paper: list[list[float]] = Field(default_factory=lambda: [list(r) for r in PAPER_TABLE1])
    random_control: RandomControl | None = Field(None, description="The App. D control, when requested.")
    notes: list[str] = Field(default_factory=list, description="Choices and degenerate cases, in words.")


@dataclass(frozen=True)
class _Grid:
    """The validated settings: ablation fractions (ascending from 0), noise levels, and every (σ_act, σ_rec)
    setting: ``extra`` then the levels×levels grid, without repeats."""

    ablations: list[float]
    levels: list[float]
    settings: list[tuple[float, float]]


def _check(
    ablations: Sequence[float],
    levels: Sequence[float],
    extra: Sequence[tuple[float, float]],
    n_tokens: int,
    scale: float | None,
) -> _Grid:
    """The validated grid; ConfigError names the first bad setting."""
    abl = sorted({float(p) for p in ablations})
    if not abl or abl[0] != 0.0 or abl[-1] >= 1.0:
        raise ConfigError(
            f"synthetic_simulation: ablations must lie in [0, 1) and include 0 (Table 1 is read at 0% "
            f"ablation); found {list(ablations)}"
        )
    lev = list(dict.fromkeys(float(v) for v in levels))
    if len(lev) < 2 or min(lev) < 0:
        raise ConfigError(
            "synthetic_simulation: levels needs at least two distinct values >= 0 for Table 1's "
            f"correlations; found {list(levels)}"
        )
    ext = [(float(a), float(b)) for a, b in extra]
    if any(a < 0 or b < 0 for a, b in ext):
        raise ConfigError(f"synthetic_simulation: noise levels must be >= 0; found extra={list(extra)}")
    if n_tokens < 2:
        raise ConfigError(f"synthetic_simulation: n_tokens must be >= 2, found {n_tokens}")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ConfigError(f"synthetic_simulation: scale must be a finite number > 0, found {scale}")
    return _Grid(abl, lev, list(dict.fromkeys([*ext, *((a, b) for a in lev for b in lev)])))


def _read(
    store: ActivationStore, sae: SAE, n_tokens: int, reencode: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, float, float]:
    """The first n_tokens at the SAE's site, as (what the pass encodes [N, d] float32, context ids,
    positions, latent mass, the SAE's mean L0 on x, x′'s rms per-dimension std), all on the SAE's
    device."""
    site = sae.cfg.hook_site
    if site is None or site not in store.sites:
        raise StoreError(
            f"The SAE reads site {site!r}, which the store lacks (it has {store.sites}); harvest that site "
            "or pass an SAE trained on one of these."
        )
    sae.check_input_width(store.d[site], site)
    enc, x_prime, ctx, pos = [], [], [], []
    mass = torch.zeros(sae.cfg.d_sae, dtype=F64, device=sae.device)
    l0, got = 0.0, 0
    for batch in store.iter_batches([site], batch_tokens=CHUNK, device=sae.device):
        take = min(len(batch), n_tokens - got)
        x = batch.acts[site][:take]
        if not bool(torch.isfinite(x).all()):
            raise DataError(f"The store holds NaN or inf activations at {site}; re-harvest in fp32.")
        x_hat, codes = sae.reconstruct(x.to(sae.dtype))
        mass.index_add_(0, codes.indices.reshape(-1), codes.values.reshape(-1).to(F64))
        l0 += float(codes.l0().sum())
        x_prime.append(x_hat.float())
        if not reencode:
            enc.append(x.float())
        ctx.append(batch.context[:take])
        pos.append(batch.position[:take])
        got += take
        if got >= n_tokens:
            break
    if got == 0:
        raise DataError(f"The store yields no tokens at {site}; harvest some contexts first.")
    xp = torch.cat(x_prime)
    rms = rms_std(xp)
    enc_in = xp if reencode else torch.cat(enc)
    del x_prime, xp
    mass = mass / got * sae.W_dec.detach().to(F64).norm(dim=1)
    return enc_in, torch.cat(ctx), torch.cat(pos), mass, l0 / got, rms


def _notes(main: dict[str, Any], control: RandomControl | None, d: int, n_train: int) -> list[str]:
    """The result's notes: the re-encoding floor, Table 1's verdict, probe overfitting, Fig 15's shape."""
    notes = []
    if main["fvu_floor"] is not None and main["fvu_floor"] > 1e-3:
        notes.append(
            f"With no noise and no ablation FVU_rec = {main['fvu_floor']:.4g}: the SAE does not reproduce "
            "x′ = Sae(x) when it re-encodes it. This floor is part of every FVU_rec and FVU_lin."
        )
    if not main["diagonal_ok"]:
        notes.append(
            "Table 1's diagonal does not dominate: here the estimates do not separate the two noises."
        )
    notes.append(
        f"Held-out probe: overfitting costs ≈ d/n_train = {d / n_train:.3g} of the unpredictable variance. "
        "Estimated Dense therefore dips slightly below 0 as σ_rec grows (the in-sample script erred upward)."
    )
    curves = {(c.sigma_act, c.sigma_rec): c for c in map(Fig15Curve.model_validate, main["curves"])}
    ctrl = {(c.sigma_act, c.sigma_rec): c for c in control.curves} if control is not None else {}
    for key in [k for k, c in curves.items() if c.lin_verdict is not None][:1]:
        parts = [("SAE latents", curves[key])] + ([("random control", ctrl[key])] if key in ctrl else [])
        text = "; ".join(
            f"{name}: {c.lin_verdict} (unrecovered share {c.unrecovered_share:.2f}, curvature ratio "
            f"{c.shape_lin.curvature_ratio if c.shape_lin else float('nan'):.2f})"
            for name, c in parts
        )
        notes.append(f"FVU_lin against the ablated fraction at σ_act={key[0]:g}, σ_rec={key[1]:g}: {text}.")
    return notes


def _split_rows(split: Split, enc_in: Tensor, ctx: Tensor, pos: Tensor) -> tuple[Tensor, int, int]:
    """(the rows with the train rows first, n_train, n_test); DataError when the probe cannot be fitted."""
    n, d = enc_in.shape
    order, n_train = split.train_first(ctx, pos)
    n_test = n - n_train
    if n_train <= d + 1 or n_test < 2:
        raise DataError(
            f"synthetic_simulation: {n} tokens split into {n_train} train and {n_test} test; the probe "
            f"needs more than {d + 1} train and at least 2 test tokens. Raise n_tokens or harvest more."
        )
    return enc_in[order], n_train, n_test


def _scale(scale: float | None, rms: float) -> float:
    """s: ``scale`` when given, else x′'s rms per-dimension std / ``SCALE_DIVISOR``."""
    s = scale if scale is not None else rms / SCALE_DIVISOR
    if not s > 0:
        raise DataError(
            "synthetic_simulation: x′ = Sae(x) is constant over the tokens; pass scale explicitly."
        )
    return s


def _simulate(
    source: SAESource | RandomSource,
    mass: Tensor,
    grid: _Grid,
    n_train: int,
    d: int,
    s: float,
    seed: int,
) -> dict[str, Any]:
    """The `SimulationOutcome` fields of one data set: the pass over its rows (on the device of its latent
    ``mass``), then the exact algebra."""
    keep, counts = keeps(mass, grid.ablations)
    tr, te = accumulate(source, n_train, len(source), d, keep, seed, mass.device)
    scores = score(tr, te, s, grid.settings, len(grid.ablations))
    return summarise(scores, grid.settings, grid.ablations, counts, grid.levels)


def _random_control(
    grid: _Grid,
    n: int,
    n_train: int,
    d: int,
    seed: int,
    scale: float | None,
    l0: float,
    exponent: float,
    device: torch.device,
) -> RandomControl:
    """App. D: the same test on random data of the same size and settings, ``l0`` draws per token expected.

    ``scale`` is the caller's fixed s, or None: the control then uses its own rms / 4. The rows are i.i.d.,
    so the first ``n_train`` serve as the train split.
    """
    n_dir = CONTROL_DIRECTIONS_PER_DIM * d
    src, mass = random_source(
        n, d, n_directions=n_dir, l0=l0, exponent=exponent, seed=seed + CONTROL_SEED_OFFSET, device=device
    )
    x_rms = rms_std(src.x)
    s = x_rms / SCALE_DIVISOR if scale is None else scale
    return RandomControl(
        scale=s,
        x_rms_std=x_rms,
        l0=float((src.codes.values != 0).sum()) / n,
        n_directions=n_dir,
        exponent=exponent,
        expected_l0=l0,
        **_simulate(src, mass, grid, n_train, d, s, seed),
    )


def synthetic_simulation(
    store: ActivationStore,
    sae: SAE,
    *,
    split: Split,
    n_tokens: int = 50_000,
    ablations: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5),
    levels: Sequence[float] = (0.0, 1.0, 2.0, 3.0, 4.0),
    extra: Sequence[tuple[float, float]] = ((1.0, 0.6), (0.6, 1.0)),
    scale: float | None = None,
    seed: int = 0,
    random_control: bool = True,
    reencode: bool = True,
    control_l0: float | None = None,
    control_exponent: float = 1.0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> SyntheticResult:
    """Run the synthetic decomposition test on the first ``n_tokens`` tokens at the SAE's site.

    The settings are ``extra``, then the ``levels``×``levels`` grid of (σ_act, σ_rec), each at every
    ablation fraction. ``scale`` defaults to x′'s rms per-dimension std / 4; the control then uses its own
    rms / 4. ``seed`` drives the noise and, offset, the control's data; ``split`` is the train/test split
    of the tokens. ``control_l0`` defaults to the SAE's mean L0 on x. The module docstring gives every
    choice. Compute is two fp64 passes of ≈ 2·N·2d·9d flops each (SAE data, then the control), on
    ``device`` (None: the SAE's) with the SAE in ``dtype`` (None: its own); the noise is drawn on the host
    (the same stream on every device) and moved there.
    """
    grid = _check(ablations, levels, extra, n_tokens, scale)
    sae = on_device(sae, placement(device, sae), dtype)
    enc_in, ctx, pos, mass, l0, rms = _read(store, sae, n_tokens, reencode)
    n, d = enc_in.shape
    enc_in, n_train, n_test = _split_rows(split, enc_in, ctx, pos)
    s = _scale(scale, rms)
    with torch.no_grad():
        main = _simulate(SAESource(sae, enc_in, reencode), mass, grid, n_train, d, s, seed)
        control = None
        if random_control:
            c_l0 = float(control_l0) if control_l0 is not None else max(l0, 1.0)
            control = _random_control(grid, n, n_train, d, seed, scale, c_l0, control_exponent, sae.device)
    notes = _notes(main, control, d, n_train)
    if n < n_tokens:
        notes.insert(
            0, f"The store holds {n} tokens at the site, fewer than the {n_tokens} requested; all are used."
        )
    sae_id = sae_identity(sae)
    config = {
        "n_tokens": n_tokens,
        "ablations": grid.ablations,
        "levels": grid.levels,
        "extra": [[float(a), float(b)] for a, b in extra],
        "scale": scale,
        "seed": seed,
        "split_seed": split.seed,
        "train_fraction": split.fraction,
        "random_control": random_control,
        "reencode": reencode,
        "control_l0": control_l0,
        "control_exponent": control_exponent,
        "sae": sae_id,
        "store": identity_hash(store.identity),
    }
    return SyntheticResult(
        config_hash=stable_hash(config),
        seed=seed,
        config=config,
        sae=sae_id,
        n_tokens=n,
        n_train=n_train,
        n_test=n_test,
        reencode=reencode,
        scale=s,
        x_rms_std=rms,
        l0=l0,
        random_control=control,
        notes=notes,
        **main,
    )
