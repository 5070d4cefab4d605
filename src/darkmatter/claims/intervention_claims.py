"""Claims about acting on the error: gradient pursuit, splicing components into the model, SAEs trained on
the components and their interpretability, and predicting the error from earlier components (§5.2-§6)."""

from __future__ import annotations

import math

from darkmatter.claims.rule import Claim
from darkmatter.claims.spec import JACKKNIFE, ClaimSpec, paired
from darkmatter.experiments.downstream import DownstreamResult
from darkmatter.study.steps.autointerp import AutoInterpStepResult
from darkmatter.study.steps.earlier_layers import EarlierLayersStepResult
from darkmatter.study.steps.error_saes import ErrorSAEsStepResult
from darkmatter.study.steps.pursuit import PursuitResult

PURSUIT_FVU = ClaimSpec(
    "pursuit_lowers_fvu",
    "Gradient pursuit over the SAE's decoder lowers the total FVU.",
    "§6.1, Figs 1, 9a",
    "FVU falls by ≈ 3–5% (e.g. 0.249 → 0.222 at 131k)",
    "smallest FVU drop (SAE − pursuit) over the width sweep",
    (0.0, None),
)
PURSUIT_NONLINEAR = ClaimSpec(
    "pursuit_keeps_nonlinear",
    "Pursuit barely moves FVU_nonlinear: the encoder error is a thin band.",
    "§6.1, Figs 1, 9a",
    "FVU_nonlinear 0.122 → ≈ 0.117 (≈ 4% of it)",
    "largest encoder error over the width sweep, as a fraction of the SAE's FVU_nonlinear",
    (-0.1, 0.1),
)
CE_LINEAR_MORE = ClaimSpec(
    "ce_linear_more_than_nonlinear",
    "Splicing in the linear error recovers more of the CE gap than splicing in the nonlinear error.",
    "§5.3, Fig 8",
    "CE recovered linear / nonlinear 60–88% / 32–63% in every setting",
    "smallest (CE recovered by linear − by nonlinear) over the width sweep",
    (0.0, None),
)
CE_SUM = ClaimSpec(
    "ce_shares_sum_past_one",
    "The two components' CE recovered add up to more than 100%.",
    "§5.3, Fig 8",
    "e.g. 76% + 42% at 16k, 60% + 43% at 1M",
    "smallest (CE recovered linear + nonlinear − 1) over the width sweep",
    (0.0, None),
)
CE_OVER_VARIANCE = ClaimSpec(
    "ce_linear_beyond_variance_share",
    "The linear error matters downstream more than its share of the variance predicts.",
    "§5.3, Fig 8",
    "CE recovered by linear 60–88% vs its variance share 40–71%",
    "smallest (CE recovered by linear − its variance share) over the width sweep",
    (0.0, None),
)
ERROR_SAE = ClaimSpec(
    "nonlinear_error_harder_to_learn",
    "An SAE trained on the nonlinear error reconstructs it worse than one trained on the linear error.",
    "§5.2",
    "FVU ≈ 0.59 on NonlinearError vs ≈ 0.54 on LinearError",
    "held-out FVU of the SAE on NonlinearError minus that on LinearError",
    (0.0, None),
)
AUTOINTERP = ClaimSpec(
    "linear_error_latents_more_interpretable",
    "Latents of an SAE trained on the linear error are more interpretable than those on the nonlinear error.",
    "§5.2, Fig 7",
    "≈ 5 points higher detection accuracy in every decile",
    "balanced detection accuracy of the linear-error SAE's latents minus the nonlinear-error SAE's",
    (0.0, None),
)
EARLIER = ClaimSpec(
    "earlier_components_predict_linear_more",
    "SAEs of earlier components predict the linear error better than the nonlinear error.",
    "§6.2, Fig 9b",
    "R² linear / nonlinear: previous residual 0.32 / 0.14, MLP 0.16 / 0.07, attention 0.18 / 0.04",
    "smallest (R² of LinearError − R² of NonlinearError) over the earlier-component regressors",
    (0.0, None),
)


def pursuit_claims(res: PursuitResult | None) -> list[Claim]:
    """Pursuit lowers FVU but leaves FVU_nonlinear nearly alone."""
    if res is None or not res.saes:
        note = "the pursuit step did not run" if res is None else "no SAEs to pursue"
        return [PURSUIT_FVU.not_run(note), PURSUIT_NONLINEAR.not_run(note)]
    drop = min(res.saes, key=lambda r: r.fvu - r.pursuit_fvu)
    out = [PURSUIT_FVU.measured(drop.fvu - drop.pursuit_fvu, drop.intervals.get("fvu_drop"), note=drop.name)]
    worst = max(res.saes, key=lambda r: abs(r.encoder_error / r.fvu_nonlinear))
    bounds = worst.intervals.get("encoder_error")
    scale = float(worst.fvu_nonlinear)
    out.append(
        PURSUIT_NONLINEAR.measured(
            worst.encoder_error / scale,
            None if bounds is None else [v / scale for v in bounds],
            note=f"{worst.name}; the SAE's FVU_nonlinear held fixed",
        )
    )
    return out


def downstream_claims(res: DownstreamResult | None) -> list[Claim]:
    """The CE recovered by each component, against each other and the variance share."""
    specs = (CE_LINEAR_MORE, CE_SUM, CE_OVER_VARIANCE)
    if res is None or not res.saes:
        return [s.not_run("the downstream CE step did not run") for s in specs]
    kind = "95% delete-one-context jackknife"
    rows = [(n, r) for n, r in res.saes.items() if r.ce_recovered_linear is not None]
    if not rows or any(r.ce_recovered_nonlinear is None for _, r in rows):
        return [s.not_run("CE recovered is undefined (the SAE does not raise the CE)") for s in specs]

    def lowest(key: str, value: dict[str, float]) -> tuple[float, list[float] | None, str]:
        name = min(value, key=lambda n: value[n])
        return value[name], res.saes[name].intervals.get(key), name

    gap = {n: (r.ce_recovered_linear or 0.0) - (r.ce_recovered_nonlinear or 0.0) for n, r in rows}
    total = {n: (r.ce_recovered_linear or 0.0) + (r.ce_recovered_nonlinear or 0.0) - 1 for n, r in rows}
    out = []
    v, ci, name = lowest("ce_recovered_gap", gap)
    out.append(CE_LINEAR_MORE.measured(v, ci, kind, note=name))
    v, ci, name = lowest("ce_recovered_sum", total)
    out.append(CE_SUM.measured(v, None if ci is None else [c - 1 for c in ci], kind, note=name))
    shares = {n: r for n, r in rows if r.variance_share_linear is not None}
    if not shares:
        out.append(CE_OVER_VARIANCE.not_run("no variance share"))
        return out
    beyond = {n: (r.ce_recovered_linear or 0.0) - (r.variance_share_linear or 0.0) for n, r in shares.items()}
    v, _, name = lowest("ce_recovered_linear", beyond)
    ci = res.saes[name].intervals.get("ce_recovered_linear")
    shift = res.saes[name].variance_share_linear or 0.0
    bounds = None if ci is None else [c - shift for c in ci]
    out.append(CE_OVER_VARIANCE.measured(v, bounds, kind, note=f"{name}; the variance share held fixed"))
    return out


def error_sae_claim(res: ErrorSAEsStepResult | None) -> Claim:
    """The nonlinear error is the harder one to learn with an SAE."""
    if res is None or not {"linear", "nonlinear"} <= set(res.saes):
        return ERROR_SAE.not_run("the error-SAEs step did not run on both components")
    lin, nl = res.saes["linear"], res.saes["nonlinear"]
    points = {"linear": {"fvu": lin.fvu}, "nonlinear": {"fvu": nl.fvu}}
    reps = {"linear": {"fvu": lin.fvu_jackknife}, "nonlinear": {"fvu": nl.fvu_jackknife}}
    value, interval = paired(points, reps, lambda p: p["nonlinear"]["fvu"] - p["linear"]["fvu"])
    return ERROR_SAE.measured(value, interval, JACKKNIFE + " (the SAEs held fixed)")


def autointerp_claim(res: AutoInterpStepResult | None) -> Claim:
    """Linear-error latents are the more interpretable."""
    if res is None or not {"linear", "nonlinear"} <= set(res.components):
        return AUTOINTERP.not_run("auto-interpretability did not run on both components")
    a, b = res.components["linear"].summary, res.components["nonlinear"].summary
    if a.balanced_accuracy is None or b.balanced_accuracy is None:
        return AUTOINTERP.not_run("no latent was scored")
    value = a.balanced_accuracy - b.balanced_accuracy
    ends = (a.balanced_ci_low, a.balanced_ci_high, b.balanced_ci_low, b.balanced_ci_high)
    interval = None
    if all(e is not None for e in ends):
        a_low, a_high, b_low, b_high = (float(e or 0.0) for e in ends)
        down = math.hypot(a.balanced_accuracy - a_low, b_high - b.balanced_accuracy)
        up = math.hypot(a_high - a.balanced_accuracy, b.balanced_accuracy - b_low)
        interval = [value - down, value + up]
    weak = res.components["linear"].weak_judge or res.components["nonlinear"].weak_judge
    note = "a small local judge: a smoke test of the method, not the paper's scorer" if weak else ""
    return AUTOINTERP.measured(value, interval, "95% Newcombe (MOVER) from the Wilson ends", note=note)


def earlier_claim(res: EarlierLayersStepResult | None) -> Claim:
    """Earlier components explain the linear error more than the nonlinear error."""
    pred = None if res is None else res.predictors
    if pred is None:
        return EARLIER.not_run("the earlier-layer regressions did not run (no regressor SAEs)")
    earlier = [n for n in pred.regressors if n not in ("self", "joint")]
    if not earlier:
        return EARLIER.not_run("no earlier-component regressors")
    margins = {n: pred.r2[n]["linear"] - pred.r2[n]["nonlinear"] for n in earlier}
    name = min(margins, key=lambda n: margins[n])
    interval = pred.gap_intervals.get(name)
    note = name if interval is not None else f"{name}; fewer than 3 usable blocks of contexts"
    return EARLIER.measured(margins[name], interval, JACKKNIFE + " (every regression refitted)", note=note)
