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

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from darkmatter.errors import ConfigError, DataError, StoreError
from darkmatter.results import Result
from darkmatter.sae.model import SAE, SparseCodes
from darkmatter.stats import Moments, RidgeFit, fit_ridge_many
from darkmatter.stats.split import is_train
from darkmatter.store import ActivationStore, identity_hash

Tensor = torch.Tensor
F64 = torch.float64
Decode = Callable[[SparseCodes], Tensor]

EXPERIMENT = "synthetic_simulation"
CHUNK = 4096
"""Tokens per chunk of the pass. The noise is drawn chunk by chunk, so this is part of the seeded stream."""
SCALE_DIVISOR = 4.0
"""The default s is x′'s rms per-dimension std divided by this (see the module docstring)."""
CONTROL_DIRECTIONS_PER_DIM = 25
CURVED_ABOVE = 0.5
"""A curve counts as "curved" when the quadratic term is more than this share of its fitted change."""
FLAT_BELOW = 0.25
"""FVU_lin counts as "flat" in p when it leaves less than this share of the ablated variance unrecovered.

The paper's App. D contrast: with real SAE latents the probe wins back the absent features (flat); with
random directions it cannot, and FVU_lin rises with FVU_rec."""
FIG15_SETTINGS = ((0.0, 0.0), (1.0, 0.6), (0.6, 1.0), (2.0, 2.0))
PAPER_TABLE1 = [[0.9842, 0.1417], [0.0988, 0.9036]]
TABLE1_ROWS = ["sigma_act (noise on x')", "sigma_rec (noise on Sae(x'))"]
TABLE1_COLS = ["estimated Dense = FVU_rec - FVU_lin", "estimated Introduced = FVU_lin"]


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
    table1_rows: list[str] = Field(default_factory=lambda: list(TABLE1_ROWS))
    table1_cols: list[str] = Field(default_factory=lambda: list(TABLE1_COLS))
    diagonal_ok: bool = Field(description="min(diagonal of table1) > max |off-diagonal|.")
    curves: list[dict[str, Any]] = Field(
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


# --------------------------------------------------------------------------- data sources


class _SAESource:
    """x′ = Sae(x) from a stored [N, d] tensor, which holds x′ itself when re-encoding and x otherwise."""

    def __init__(self, sae: SAE, enc_in: Tensor, reencode: bool) -> None:
        self.sae, self.enc_in, self.reencode = sae, enc_in, reencode

    def chunk(self, a: int, b: int) -> tuple[Tensor, SparseCodes, Decode]:
        """(x′ [m, d] float32, the codes that r_0 decodes, the decoder for this chunk's tokens)."""
        inp = self.enc_in[a:b].to(self.sae.device)
        stats = self.sae.input_stats(inp)
        codes = self.sae.encode_sparse(inp)

        def decode(c: SparseCodes) -> Tensor:
            return self.sae.decode_sparse(c, stats=stats).float()

        return (inp.float() if self.reencode else decode(codes)), codes, decode


class _RandomSource:
    """App. D data: sparse power-law sums of random Gaussian directions. The decoder is the directions."""

    def __init__(self, directions: Tensor, codes: SparseCodes) -> None:
        self.directions, self.codes = directions, codes
        n = len(codes.indices)
        self.x = torch.cat([self._decode(self._slice(a, a + CHUNK)) for a in range(0, n, CHUNK)])

    def _slice(self, a: int, b: int) -> SparseCodes:
        return SparseCodes(self.codes.indices[a:b], self.codes.values[a:b])

    def _decode(self, c: SparseCodes) -> Tensor:
        return F.embedding_bag(c.indices, self.directions, per_sample_weights=c.values, mode="sum")

    def chunk(self, a: int, b: int) -> tuple[Tensor, SparseCodes, Decode]:
        return self.x[a:b], self._slice(a, b), self._decode


def _random_source(
    n: int, d: int, *, n_directions: int, l0: float, exponent: float, seed: int, device: torch.device
) -> tuple[_RandomSource, Tensor]:
    """The control data, and each direction's mass (mean weight × norm over the N tokens)."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_directions, d, generator=g) / math.sqrt(d)
    probs = torch.arange(1, n_directions + 1, dtype=F64).pow(-exponent)
    k_max = math.ceil(l0 + 6 * math.sqrt(l0)) + 1
    parts_i, parts_v = [], []
    for a in range(0, n, CHUNK):
        m = min(CHUNK, n - a)
        idx = torch.multinomial(probs, m * k_max, replacement=True, generator=g).view(m, k_max)
        count = torch.poisson(torch.full((m, 1), float(l0), dtype=F64), generator=g)
        keep = torch.arange(k_max)[None, :] < count
        parts_i.append(idx.masked_fill(~keep, 0))
        parts_v.append(((torch.rand(m, k_max, generator=g) + 0.5) * keep).float())
    codes = SparseCodes(torch.cat(parts_i).to(device), torch.cat(parts_v).to(device))
    directions = directions.to(device)
    mass = torch.zeros(n_directions, dtype=F64, device=device)
    mass.index_add_(0, codes.indices.reshape(-1), codes.values.reshape(-1).to(F64))
    return _RandomSource(directions, codes), mass / n * directions.norm(dim=1).to(F64)


def _spans(n_train: int, n: int) -> list[tuple[int, int]]:
    """Chunks of at most CHUNK tokens over the train rows [0, n_train), then the test rows [n_train, n)."""
    return [(a, min(a + CHUNK, hi)) for lo, hi in ((0, n_train), (n_train, n)) for a in range(lo, hi, CHUNK)]


def _noise_chunks(seed: int, spans: list[tuple[int, int]], d: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(ε₁, ε₂) [b − a, d] float32 per span, drawn in order on the CPU (the same on every device)."""
    g = torch.Generator().manual_seed(seed)
    for a, b in spans:
        yield torch.randn(b - a, d, generator=g), torch.randn(b - a, d, generator=g)


def _masked(codes: SparseCodes, keep: Tensor) -> SparseCodes:
    return SparseCodes(codes.indices, codes.values * keep[codes.indices].to(codes.values.dtype))


def _keeps(mass: Tensor, ablations: Sequence[float]) -> tuple[list[Tensor], list[int]]:
    """Per ablation fraction p, a bool mask of kept latents: the ⌊n·p⌋ with the least mass are dropped."""
    n = mass.numel()
    order = torch.sort(mass.cpu(), stable=True).indices.to(mass.device)
    keeps, counts = [], []
    for p in ablations:
        k = math.floor(n * p + 1e-9)
        keep = torch.ones(n, dtype=torch.bool, device=mass.device)
        keep[order[:k]] = False
        keeps.append(keep)
        counts.append(k)
    return keeps, counts


# --------------------------------------------------------------------------- the pass and the algebra


@dataclass
class _Split:
    """Centred sums of one split over the blocks x′ ("a"), ε₁ ("n1"), ε₂ ("n2") and D_p ("d{p}").

    ``cross_a[k]`` is Σ(x′ − x̄′)(T_k − T̄_k)ᵀ [d, d] and ``cross_n[k]`` is Σ(ε₁ − ε̄₁)(T_k − T̄_k)ᵀ [d, d].
    ``ss[k]`` is the per-dimension Σ(T_k − T̄_k)², and ``cov_n2[k]`` the per-dimension Σ(D_p − D̄_p)(ε₂ − ε̄₂).
    """

    n: int
    mean_a: Tensor
    gaa: Tensor
    mean: dict[str, Tensor]
    ss: dict[str, Tensor]
    cross_a: dict[str, Tensor]
    cross_n: dict[str, Tensor]
    cov_n2: dict[str, Tensor]

    @classmethod
    def from_sums(cls, m: Moments, dots: dict[str, Tensor]) -> _Split:
        """From the pass's `Moments` of [x′, ε₁] and the raw per-dimension Σ D_p·ε₂."""
        d = m.d_x // 2
        mean_l, g = m.mean_x(), m.centred_gram()
        names = list(m.target_dims)
        mean = {k: m.mean_target(k) for k in names} | {"n1": mean_l[d:]}
        cross = {k: m.centred_cross(k) for k in names}
        return cls(
            n=m.n,
            mean_a=mean_l[:d],
            gaa=g[:d, :d],
            mean=mean,
            ss={k: m.target_ss_tot(k) for k in names} | {"n1": g[d:, d:].diagonal().clamp_min(0)},
            cross_a={k: c[:d] for k, c in cross.items()} | {"n1": g[:d, d:]},
            cross_n={k: c[d:] for k, c in cross.items()} | {"n1": g[d:, d:]},
            cov_n2={k: v - m.n * mean[k] * mean["n2"] for k, v in dots.items()},
        )

    def inputs(self, alpha: float) -> tuple[Tensor, Tensor]:
        """Mean [d] and centred Gram [d, d] of x̃ = x′ + αε₁."""
        gan = self.cross_a["n1"]
        gram = self.gaa + alpha * (gan + gan.T) + alpha**2 * self.cross_n["n1"]
        return self.mean_a + alpha * self.mean["n1"], gram

    def cross_x(self, k: str, alpha: float) -> Tensor:
        """Centred Σ(x̃ − x̄̃)(T_k − T̄_k)ᵀ [d, d] for x̃ = x′ + αε₁."""
        return self.cross_a[k] + alpha * self.cross_n[k]

    def cov(self, k: str, j: str) -> Tensor:
        """Per-dimension centred Σ(T_k − T̄_k)(T_j − T̄_j), for blocks of which at most one is a D_p."""
        if k == j:
            return self.ss[k]
        if "n1" in (k, j):
            return self.cross_n[j if k == "n1" else k].diagonal()
        return self.cov_n2[j if k == "n2" else k]


def _accumulate(
    source: _SAESource | _RandomSource, n_train: int, n: int, d: int, keeps: list[Tensor], seed: int
) -> tuple[_Split, _Split]:
    """One pass over rows sorted by split (train first): per split, `Moments` of [x′, ε₁] against ε₂ and
    D_p = x′ − r_p, plus the raw per-dimension Σ D_p·ε₂."""
    names = [f"d{i}" for i in range(len(keeps))]
    mom = {part: Moments(2 * d, {"n2": d, **dict.fromkeys(names, d)}) for part in ("train", "test")}
    dots = {part: {k: torch.zeros(d, dtype=F64) for k in names} for part in ("train", "test")}
    spans = _spans(n_train, n)
    for (a, b), (e1, e2) in zip(spans, _noise_chunks(seed, spans, d), strict=True):
        part = "train" if a < n_train else "test"
        x, codes, decode = source.chunk(a, b)
        e1, e2 = e1.to(x.device), e2.to(x.device)
        ds = {k: x - decode(_masked(codes, keep)) for k, keep in zip(names, keeps, strict=True)}
        mom[part].update(torch.cat([x, e1], 1), {"n2": e2, **ds})
        e2d = e2.to(F64)
        for k, t in ds.items():
            dots[part][k] += (t.to(F64) * e2d).sum(0).cpu()
    splits = []
    for part in ("train", "test"):
        device = mom[part].device
        splits.append(_Split.from_sums(mom[part], {k: v.to(device) for k, v in dots[part].items()}))
    return splits[0], splits[1]


def _fit_blocks(tr: _Split, alpha: float, blocks: list[str]) -> dict[str, RidgeFit]:
    """The probe of every block on x̃ (one Cholesky), under the house ridge policy."""
    mean_x, gram = tr.inputs(alpha)
    d = gram.shape[0]
    m = Moments(d, dict.fromkeys(blocks, d), device=gram.device)
    state = {"n": torch.tensor(tr.n), "x.ref": mean_x, "x.sum": torch.zeros_like(mean_x), "x.gram": gram}
    for k in blocks:  # reference = mean, so every shifted sum is 0 and the stored sums are the centred ones
        state |= {
            f"y.{k}.ref": tr.mean[k],
            f"y.{k}.sum": torch.zeros_like(mean_x),
            f"y.{k}.sumsq": tr.ss[k],
            f"y.{k}.cross": tr.cross_x(k, alpha),
        }
    m.load_state_dict(state)
    return fit_ridge_many(m, bias=True)


def _pair_sums(
    te: _Split, alpha: float, fits: dict[str, RidgeFit], blocks: list[str]
) -> tuple[Tensor, Tensor, float]:
    """Test-split Σ_t⟨T_k, T_j⟩ and Σ_t⟨res_k, res_j⟩ [B, B] over the blocks, and Σ_t‖x̃ − x̄̃‖².

    res_k = T_k − x̃W_k − b_k. A setting's error and probe are the same combination Σ c_k·(block), so its
    SS_res is cᵀ·res·c: `evaluate`'s per-dimension formula, summed over dimensions. No setting pairs
    two different D_p, so those entries are left at 0.
    """
    mean_x, gram = te.inputs(alpha)
    nb = len(blocks)
    w = torch.stack([fits[k].weights for k in blocks])  # [B, d, d]
    c = torch.stack([te.cross_x(k, alpha) for k in blocks])
    wf, cf, gwf = (t.reshape(nb, -1) for t in (w, c, torch.matmul(gram, w)))
    quad = wf @ gwf.T - wf @ cf.T - cf @ wf.T
    mean = torch.stack([te.mean[k] for k in blocks])  # [B, d]
    bias = torch.stack([fits[k].bias for k in blocks])  # type: ignore[misc]
    off = mean - torch.einsum("i,bij->bj", mean_x, w) - bias
    cov = torch.zeros(nb, nb, dtype=F64, device=gram.device)
    for i, k in enumerate(blocks):
        for j, kj in enumerate(blocks):
            if not (k.startswith("d") and kj.startswith("d") and k != kj):
                cov[i, j] = te.cov(k, kj).sum()
    raw = cov + te.n * mean @ mean.T
    res = cov + (quad + quad.T) / 2 + te.n * off @ off.T
    return raw.cpu(), res.cpu(), float(gram.diagonal().sum())


def _score(
    tr: _Split, te: _Split, scale: float, settings: list[tuple[float, float]], n_ablations: int
) -> dict[tuple[float, float, int], tuple[float, float]]:
    """(FVU_rec, FVU_lin) on the test split, keyed by (σ_act, σ_rec, ablation index)."""
    blocks = ["n1", "n2", *(f"d{i}" for i in range(n_ablations))]
    out: dict[tuple[float, float, int], tuple[float, float]] = {}
    for sa in dict.fromkeys(s for s, _ in settings):
        alpha = sa * scale
        raw, res, var_x = _pair_sums(te, alpha, _fit_blocks(tr, alpha, blocks), blocks)
        if not var_x > 0:
            raise DataError(f"synthetic_simulation: the test inputs are constant at sigma_act={sa}.")
        for sr in dict.fromkeys(r for s, r in settings if s == sa):
            for i in range(n_ablations):
                coef = torch.zeros(len(blocks), dtype=F64)  # over ["n1", "n2", "d0", ...]
                coef[0], coef[1], coef[2 + i] = alpha, -sr * scale, 1.0
                fvu_rec, fvu_lin = (max(float(coef @ q @ coef), 0.0) / var_x for q in (raw, res))
                out[(sa, sr, i)] = (fvu_rec, fvu_lin)
    return out


# --------------------------------------------------------------------------- summaries


def _pearson(a: Sequence[float], b: Sequence[float]) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else float("nan")


def curve_shape(ablation: Sequence[float], fvu: Sequence[float]) -> dict[str, Any]:
    """Quadratic fit f ≈ c0 + c1·q + c2·q², with q = p − p_min, and how curved that fit is.

    ``curvature_ratio`` = |c2|Q² / (|c1|Q + |c2|Q²) over the range Q. It is 0 for a line, 1 for a parabola
    with its vertex at p_min, and 0.5 for one with its vertex mid-range. ``linear_r2`` is the R² of a
    straight line. A curve whose fitted change is below 1e-9 (relative) counts as linear.
    """
    p, f = np.asarray(ablation, dtype=np.float64), np.asarray(fvu, dtype=np.float64)
    q = p - p.min()
    span = float(q.max())
    c2, c1, c0 = (float(v) for v in np.polyfit(q, f, 2))
    bend, slope = abs(c2) * span**2, abs(c1) * span
    tiny = 1e-9 * (1.0 + float(np.abs(f).mean()))
    ratio = bend / (bend + slope) if bend + slope > tiny else 0.0
    line = np.polyval(np.polyfit(q, f, 1), q)
    ss_tot = float(((f - f.mean()) ** 2).sum())
    r2 = 1 - float(((f - line) ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    shape = "curved" if ratio > CURVED_ABOVE else "linear"
    return {"c0": c0, "c1": c1, "c2": c2, "curvature_ratio": ratio, "linear_r2": r2, "shape": shape}


def _curve(
    scores: dict[tuple[float, float, int], tuple[float, float]], sa: float, sr: float, ablations: list[float]
) -> dict[str, Any]:
    rec = [scores[(sa, sr, i)][0] for i in range(len(ablations))]
    lin = [scores[(sa, sr, i)][1] for i in range(len(ablations))]
    curve: dict[str, Any] = {
        "sigma_act": sa,
        "sigma_rec": sr,
        "ablation": list(ablations),
        "fvu_rec": rec,
        "fvu_lin": lin,
    }
    if len(ablations) >= 3:
        rise = rec[-1] - rec[0]
        shape_lin = curve_shape(ablations, lin)
        # the share of the variance removed by ablation that the probe does not win back
        share = (lin[-1] - lin[0]) / rise if rise > 0 else float("nan")
        if not math.isfinite(share):
            verdict = shape_lin["shape"]
        elif abs(share) < FLAT_BELOW:
            verdict = "flat"
        else:
            verdict = f"{'rising' if share > 0 else 'falling'} ({shape_lin['shape']})"
        curve |= {
            "shape_rec": curve_shape(ablations, rec),
            "shape_lin": shape_lin,
            "unrecovered_share": share,
            "lin_verdict": verdict,
        }
    return curve


def _summarise(
    scores: dict[tuple[float, float, int], tuple[float, float]],
    settings: list[tuple[float, float]],
    ablations: list[float],
    counts: list[int],
    levels: list[float],
) -> dict[str, Any]:
    """The SimulationOutcome fields that come from the scores: grid, Table 1, curves, floor."""
    grid = [
        {
            "sigma_act": sa,
            "sigma_rec": sr,
            "ablation": p,
            "n_ablated": float(c),
            "fvu_rec": scores[(sa, sr, i)][0],
            "fvu_lin": scores[(sa, sr, i)][1],
        }
        for sa, sr in settings
        for i, (p, c) in enumerate(zip(ablations, counts, strict=True))
    ]
    pairs = [(sa, sr) for sa in levels for sr in levels]
    fr = [scores[(sa, sr, 0)] for sa, sr in pairs]  # ablations[0] == 0
    dense, intro = [rec - lin for rec, lin in fr], [lin for _, lin in fr]
    table = [[_pearson(v, dense), _pearson(v, intro)] for v in ([a for a, _ in pairs], [r for _, r in pairs])]
    ok = bool(min(table[0][0], table[1][1]) > max(abs(table[0][1]), abs(table[1][0])))  # False with NaN
    curves = [_curve(scores, sa, sr, ablations) for sa, sr in FIG15_SETTINGS if (sa, sr) in settings]
    floor = scores[(0.0, 0.0, 0)][0] if (0.0, 0.0) in settings else None
    table1 = [[v if math.isfinite(v) else None for v in row] for row in table]  # JSON has no NaN
    return {"grid": grid, "table1": table1, "diagonal_ok": ok, "curves": curves, "fvu_floor": floor}


def _rms_std(x: Tensor) -> float:
    """√(mean over dimensions of the per-dimension variance) of x [N, d], from float64 chunks."""
    ref = x[:CHUNK].to(F64).mean(0)
    s, s2 = torch.zeros_like(ref), torch.zeros_like(ref)
    for a in range(0, len(x), CHUNK):
        c = x[a : a + CHUNK].to(F64) - ref
        s += c.sum(0)
        s2 += (c * c).sum(0)
    n = len(x)
    return math.sqrt(float(((s2 - s * s / n) / n).clamp_min(0).mean()))


# --------------------------------------------------------------------------- entry point


def _check(
    ablations: Sequence[float],
    levels: Sequence[float],
    extra: Sequence[tuple[float, float]],
    n_tokens: int,
    train_fraction: float,
    scale: float | None,
) -> tuple[list[float], list[float], list[tuple[float, float]]]:
    """Validated (ablations ascending from 0, levels, settings = extra then the grid, without repeats)."""
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
    if not 0.0 < train_fraction < 1.0:
        raise ConfigError(f"synthetic_simulation: train_fraction must be in (0, 1), found {train_fraction}")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ConfigError(f"synthetic_simulation: scale must be a finite number > 0, found {scale}")
    return abl, lev, list(dict.fromkeys([*ext, *((a, b) for a in lev for b in lev)]))


def _read(
    store: ActivationStore, sae: SAE, n_tokens: int, reencode: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, float, float]:
    """The first n_tokens at the SAE's site, as (what the pass encodes [N, d] float32, context ids,
    positions, latent mass, the SAE's mean L0 on x, x′'s rms per-dimension std)."""
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
    for batch in store.iter_batches([site], batch_tokens=CHUNK):
        take = min(len(batch), n_tokens - got)
        x = batch.acts[site][:take]
        if not bool(torch.isfinite(x).all()):
            raise DataError(f"The store holds NaN or inf activations at {site}; re-harvest in fp32.")
        x_hat, codes = sae.reconstruct(x.to(device=sae.device, dtype=sae.dtype))
        mass.index_add_(0, codes.indices.reshape(-1), codes.values.reshape(-1).to(F64))
        l0 += float(codes.l0().sum())
        x_prime.append(x_hat.float().cpu())
        if not reencode:
            enc.append(x.float().cpu())
        ctx.append(batch.context[:take].cpu())
        pos.append(batch.position[:take].cpu())
        got += take
        if got >= n_tokens:
            break
    if got == 0:
        raise DataError(f"The store yields no tokens at {site}; harvest some contexts first.")
    xp = torch.cat(x_prime)
    rms = _rms_std(xp)
    enc_in = xp if reencode else torch.cat(enc)
    del x_prime, xp
    mass = mass / got * sae.W_dec.detach().to(F64).norm(dim=1)
    return enc_in, torch.cat(ctx), torch.cat(pos), mass, l0 / got, rms


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _notes(main: dict[str, Any], control: RandomControl | None, d: int, n_train: int) -> list[str]:
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
    curves = {(c["sigma_act"], c["sigma_rec"]): c for c in main["curves"]}
    ctrl = {(c["sigma_act"], c["sigma_rec"]): c for c in control.curves} if control is not None else {}
    for key in [k for k in curves if "lin_verdict" in curves[k]][:1]:
        parts = [("SAE latents", curves[key])] + ([("random control", ctrl[key])] if key in ctrl else [])
        text = "; ".join(
            f"{name}: {c['lin_verdict']} (unrecovered share {c['unrecovered_share']:.2f}, curvature ratio "
            f"{c['shape_lin']['curvature_ratio']:.2f})"
            for name, c in parts
        )
        notes.append(f"FVU_lin against the ablated fraction at σ_act={key[0]:g}, σ_rec={key[1]:g}: {text}.")
    return notes


def synthetic_simulation(
    store: ActivationStore,
    sae: SAE,
    *,
    n_tokens: int = 50_000,
    ablations: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5),
    levels: Sequence[float] = (0.0, 1.0, 2.0, 3.0, 4.0),
    extra: Sequence[tuple[float, float]] = ((1.0, 0.6), (0.6, 1.0)),
    scale: float | None = None,
    split_seed: int = 0,
    train_fraction: float = 0.8,
    seed: int = 0,
    random_control: bool = True,
    reencode: bool = True,
    control_l0: float | None = None,
    control_exponent: float = 1.0,
) -> SyntheticResult:
    """Run the synthetic decomposition test on the first ``n_tokens`` tokens at the SAE's site.

    The settings are ``extra``, then the ``levels``×``levels`` grid of (σ_act, σ_rec), each at every
    ablation fraction. ``scale`` defaults to x′'s rms per-dimension std / 4; the control then uses its own
    rms / 4. ``seed`` drives the noise and, offset, the control's data; ``split_seed`` drives the
    train/test hash. ``control_l0`` defaults to the SAE's mean L0 on x. The module docstring gives every
    choice. Compute is two fp64 passes of ≈ 2·N·2d·9d flops each (SAE data, then the control).
    """
    abl, lev, settings = _check(ablations, levels, extra, n_tokens, train_fraction, scale)
    enc_in, ctx, pos, mass, l0, rms = _read(store, sae, n_tokens, reencode)
    n, d = enc_in.shape
    train = is_train(ctx, pos, split_seed, train_fraction)
    n_train, n_test = int(train.sum()), int((~train).sum())
    enc_in = enc_in[torch.argsort((~train).to(torch.int8), stable=True)]  # train rows first
    if n_train <= d + 1 or n_test < 2:
        raise DataError(
            f"synthetic_simulation: {n} tokens split into {n_train} train and {n_test} test; the probe "
            f"needs more than {d + 1} train and at least 2 test tokens. Raise n_tokens or harvest more."
        )
    s = scale if scale is not None else rms / SCALE_DIVISOR
    if not s > 0:
        raise DataError(
            "synthetic_simulation: x′ = Sae(x) is constant over the tokens; pass scale explicitly."
        )
    keeps, counts = _keeps(mass, abl)
    control = None
    with torch.no_grad():
        tr, te = _accumulate(_SAESource(sae, enc_in, reencode), n_train, n, d, keeps, seed)
        main = _summarise(_score(tr, te, s, settings, len(abl)), settings, abl, counts, lev)
        if random_control:
            n_dir = CONTROL_DIRECTIONS_PER_DIM * d
            c_l0 = float(control_l0) if control_l0 is not None else max(l0, 1.0)
            src, c_mass = _random_source(
                n,
                d,
                n_directions=n_dir,
                l0=c_l0,
                exponent=control_exponent,
                seed=seed + 0x9E3779B9,
                device=sae.device,
            )
            c_rms = _rms_std(src.x)
            c_scale = c_rms / SCALE_DIVISOR if scale is None else s
            c_keeps, c_counts = _keeps(c_mass, abl)
            ctr, cte = _accumulate(src, n_train, n, d, c_keeps, seed)  # i.i.d. rows: any split works
            control = RandomControl(
                scale=c_scale,
                x_rms_std=c_rms,
                l0=float((src.codes.values != 0).sum()) / n,
                n_directions=n_dir,
                exponent=control_exponent,
                expected_l0=c_l0,
                **_summarise(_score(ctr, cte, c_scale, settings, len(abl)), settings, abl, c_counts, lev),
            )
    notes = _notes(main, control, d, n_train)
    if n < n_tokens:
        notes.insert(
            0, f"The store holds {n} tokens at the site, fewer than the {n_tokens} requested; all are used."
        )
    c = sae.cfg
    sae_id = {
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "activation": c.activation,
        "k": c.k,
        "hook_site": c.hook_site,
        "model_name": c.model_name,
        "source_format": c.source_format,
    }
    config = {
        "n_tokens": n_tokens,
        "ablations": abl,
        "levels": lev,
        "extra": [[float(a), float(b)] for a, b in extra],
        "scale": scale,
        "seed": seed,
        "split_seed": split_seed,
        "train_fraction": train_fraction,
        "random_control": random_control,
        "reencode": reencode,
        "control_l0": control_l0,
        "control_exponent": control_exponent,
        "sae": sae_id,
        "store": identity_hash(store.identity),
    }
    return SyntheticResult(
        config_hash=_hash(config),
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
