"""The arithmetic of the downstream CE (``downstream``): CE ratios and scores, the exactness check, the
streaming reference predictors (variance and norm shares) and the jackknife intervals of CE recovered."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from darkmatter.errors import DataError
from darkmatter.experiments.splice import UnitTally
from darkmatter.stats import FVU
from darkmatter.stats.jackknife import finite_interval

Tensor = torch.Tensor

CE_EPS = 1e-6
"""A ratio whose denominator is below this many nats (about float32 resolution of a mean CE) is None."""


def ratio(num: float, den: float, eps: float = CE_EPS) -> float | None:
    """num / den, or None when |den| <= eps (the ratio would be rounding noise)."""
    if not (math.isfinite(num) and math.isfinite(den)) or abs(den) <= eps:
        return None
    return num / den


def ce_scores(ce: Mapping[str, float], kl: Mapping[str, float]) -> dict[str, float | None]:
    """CE recovered by each component and the SAELens scores from mean CE / KL per setting.

    ``ce`` needs ``clean``, ``sae``, ``sae+linear``, ``sae+nonlinear``, ``zero`` (``mean`` optional);
    ``kl`` needs ``sae`` and ``zero``.
    """
    gap = ce["sae"] - ce["clean"]
    out = {
        "ce_recovered_linear": ratio(ce["sae"] - ce["sae+linear"], gap),
        "ce_recovered_nonlinear": ratio(ce["sae"] - ce["sae+nonlinear"], gap),
        "ce_loss_score": ratio(ce["zero"] - ce["sae"], ce["zero"] - ce["clean"]),
        "kl_score": ratio(kl["zero"] - kl["sae"], kl["zero"]),
    }
    if "mean" in ce:
        out["ce_loss_score_mean"] = ratio(ce["mean"] - ce["sae"], ce["mean"] - ce["clean"])
    return out


def fvu_on_cpu(metric: FVU) -> FVU:
    """A copy of ``metric`` whose sums are on the CPU."""
    copy = FVU(metric.d, device="cpu")
    copy.merge(metric)
    return copy


class ComponentShares:
    """Streaming reference predictors: variance and norm share of LinearError and NonlinearError.

    ``update(x, sae_x, linear)`` with ``[tokens, d]`` tensors; ``compute()`` returns the FVUs of x against
    Sae(x), Sae(x) + LinearError and Sae(x) + NonlinearError, the two variance shares and the mean norms
    and norm shares (definitions in ``downstream``'s docstring).
    """

    def __init__(self, d: int, device: str | torch.device = "cpu") -> None:
        self.d = d
        self.fvu = {k: FVU(d) for k in ("sae", "sae+linear", "sae+nonlinear")}
        self.norm_sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.n = 0

    def merge(self, other: ComponentShares) -> ComponentShares:
        """Add ``other``'s sums (tokens after this one's) into this one; returns self."""
        for k, fvu in self.fvu.items():
            fvu.merge(other.fvu[k])
        self.norm_sums += other.norm_sums.to(self.norm_sums.device)
        self.n += other.n
        return self

    def cpu(self) -> ComponentShares:
        """A copy whose sums are on the CPU."""
        copy = ComponentShares(self.d)
        copy.fvu = {k: fvu_on_cpu(v) for k, v in self.fvu.items()}
        copy.norm_sums += self.norm_sums.cpu()
        copy.n = self.n
        return copy

    def update(self, x: Tensor, sae_x: Tensor, linear: Tensor) -> None:
        error = x - sae_x
        nonlinear = error - linear
        self.fvu["sae"].update(x, sae_x)
        self.fvu["sae+linear"].update(x, sae_x + linear)  # x − that = NonlinearError
        self.fvu["sae+nonlinear"].update(x, sae_x + nonlinear)  # x − that = LinearError
        norms = torch.stack([error.norm(dim=1), linear.norm(dim=1), nonlinear.norm(dim=1)])
        self.norm_sums += norms.double().sum(1)
        self.n += int(x.shape[0])

    def compute(self) -> dict[str, float | None]:
        fvu = {k: m.compute() for k, m in self.fvu.items()}
        e, lin, nl = (float(v) / max(self.n, 1) for v in self.norm_sums)
        return {
            "fvu_sae": fvu["sae"],
            "fvu_sae_linear": fvu["sae+linear"],
            "fvu_sae_nonlinear": fvu["sae+nonlinear"],
            "variance_share_linear": ratio(fvu["sae"] - fvu["sae+linear"], fvu["sae"], 0.0),
            "variance_share_nonlinear": ratio(fvu["sae"] - fvu["sae+nonlinear"], fvu["sae"], 0.0),
            "norm_share_linear": ratio(lin, e, 0.0),
            "norm_share_nonlinear": ratio(nl, e, 0.0),
            "mean_error_norm": e,
            "mean_linear_norm": lin,
            "mean_nonlinear_norm": nl,
        }


def check_both(name: str, ce_both: float, ce_clean: float, tolerance: float) -> float:
    """|mean CE(sae+both) − mean CE(clean)|, or DataError when it exceeds ``tolerance`` nats."""
    diff = abs(ce_both - ce_clean)
    if not diff < tolerance:
        raise DataError(
            f"{name}: splicing Sae(x) + LinearError + NonlinearError (= x) changed the mean CE by {diff:.3g} "
            f"nats (tolerance {tolerance:g}); the splice or the error decomposition is not exact. Check that "
            "the model runs in fp32 and that the SAE and probe belong to this site."
        )
    return diff


def ce_intervals(tally: UnitTally, clean: list[float]) -> dict[str, list[float]]:
    """Jackknife intervals of each component's CE recovered, their sum and their gap (linear − nonlinear),
    leaving out one held-out context at a time."""
    per = tally.per_context
    settings = ("sae", "sae+linear", "sae+nonlinear")
    if any(len(per.get(k, [])) != len(clean) for k in settings) or len(clean) < 3:
        return {}
    sums = {k: sum(per[k]) for k in settings} | {"clean": sum(clean)}

    def recovered(without: int | None) -> dict[str, float] | None:
        left = {
            k: v - (0.0 if without is None else (per[k] if k != "clean" else clean)[without])
            for k, v in sums.items()
        }
        lin = ratio(left["sae"] - left["sae+linear"], left["sae"] - left["clean"])
        nl = ratio(left["sae"] - left["sae+nonlinear"], left["sae"] - left["clean"])
        if lin is None or nl is None:
            return None
        return {
            "ce_recovered_linear": lin,
            "ce_recovered_nonlinear": nl,
            "ce_recovered_sum": lin + nl,
            "ce_recovered_gap": lin - nl,
        }

    point = recovered(None)
    if point is None:
        return {}
    replicates = [r for r in (recovered(c) for c in range(len(clean))) if r is not None]
    out: dict[str, list[float]] = {}
    for name, value in point.items():
        interval = finite_interval(value, [r[name] for r in replicates])
        if interval is not None:
            out[name] = interval
    return out
