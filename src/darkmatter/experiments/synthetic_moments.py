"""The one pass of the synthetic test and the exact algebra that scores every setting from its sums.

Per split, one streaming `Moments` of [x′, ε₁] against ε₂ and each D_p = x′ − r_p (plus Σ D_p·ε₂ per
dimension) holds every Gram, cross moment and target variance any (σ_act, σ_rec, p) setting needs. A
setting's probe is a fixed combination of the block probes (the ridge solve is linear in the target), so its
held-out SS_res is a quadratic form over block-pair sums: exact, not Monte Carlo.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from darkmatter.errors import DataError
from darkmatter.experiments.synthetic_data import RandomSource, SAESource, chunk_spans, masked, noise_chunks
from darkmatter.stats import Moments, RidgeFit, fit_ridge_many

Tensor = torch.Tensor
F64 = torch.float64
Scores = dict[tuple[float, float, int], tuple[float, float]]
"""(FVU_rec, FVU_lin) on the test split, keyed by (σ_act, σ_rec, ablation index)."""


@dataclass
class BlockSums:
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
    def from_sums(cls, m: Moments, dots: dict[str, Tensor]) -> BlockSums:
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


def accumulate(
    source: SAESource | RandomSource,
    n_train: int,
    n: int,
    d: int,
    keeps: list[Tensor],
    seed: int,
    device: torch.device,
) -> tuple[BlockSums, BlockSums]:
    """One pass over rows sorted by split (train first): per split, `Moments` of [x′, ε₁] against ε₂ and
    D_p = x′ − r_p, plus the raw per-dimension Σ D_p·ε₂, all float64 on ``device`` (the source's rows and
    the noise drawn on the host are moved there chunk by chunk)."""
    names = [f"d{i}" for i in range(len(keeps))]
    targets = {"n2": d, **dict.fromkeys(names, d)}
    mom = {part: Moments(2 * d, targets, device=device) for part in ("train", "test")}
    dots = {part: {k: torch.zeros(d, dtype=F64, device=device) for k in names} for part in ("train", "test")}
    spans = chunk_spans(n_train, n)
    for (a, b), (e1, e2) in zip(spans, noise_chunks(seed, spans, d), strict=True):
        part = "train" if a < n_train else "test"
        x, codes, decode = source.chunk(a, b)
        x, e1, e2 = x.to(device), e1.to(device), e2.to(device)
        ds = {k: x - decode(masked(codes, keep)).to(device) for k, keep in zip(names, keeps, strict=True)}
        mom[part].update(torch.cat([x, e1], 1), {"n2": e2, **ds})
        e2d = e2.to(F64)
        for k, t in ds.items():
            dots[part][k] += (t.to(F64) * e2d).sum(0)
    tr, te = (BlockSums.from_sums(mom[part], dots[part]) for part in ("train", "test"))
    return tr, te


def fit_blocks(tr: BlockSums, alpha: float, blocks: list[str]) -> dict[str, RidgeFit]:
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


def pair_sums(
    te: BlockSums, alpha: float, fits: dict[str, RidgeFit], blocks: list[str]
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


def score(
    tr: BlockSums, te: BlockSums, scale: float, settings: list[tuple[float, float]], n_ablations: int
) -> Scores:
    """(FVU_rec, FVU_lin) on the test split, keyed by (σ_act, σ_rec, ablation index)."""
    blocks = ["n1", "n2", *(f"d{i}" for i in range(n_ablations))]
    out: Scores = {}
    for sa in dict.fromkeys(s for s, _ in settings):
        alpha = sa * scale
        raw, res, var_x = pair_sums(te, alpha, fit_blocks(tr, alpha, blocks), blocks)
        if not var_x > 0:
            raise DataError(f"synthetic_simulation: the test inputs are constant at sigma_act={sa}.")
        for sr in dict.fromkeys(r for s, r in settings if s == sa):
            for i in range(n_ablations):
                coef = torch.zeros(len(blocks), dtype=F64)  # over ["n1", "n2", "d0", ...]
                coef[0], coef[1], coef[2 + i] = alpha, -sr * scale, 1.0
                fvu_rec, fvu_lin = (max(float(coef @ q @ coef), 0.0) / var_x for q in (raw, res))
                out[(sa, sr, i)] = (fvu_rec, fvu_lin)
    return out
