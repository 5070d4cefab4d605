"""Claims about the SAE error itself: its linear predictability, its split with width, per-token scaling,
the norm test and the synthetic simulation (paper §4, §5.1, App. B-E)."""

from __future__ import annotations

import math

from darkmatter.claims.rule import Claim
from darkmatter.claims.spec import ClaimSpec, paired
from darkmatter.experiments.synthetic_summary import correlation_interval
from darkmatter.study.steps.engine import EngineResult, SAEErrorStats
from darkmatter.study.steps.per_token import PerTokenResult
from darkmatter.study.steps.synthetic import SyntheticStepResult

NORM_R2 = ClaimSpec(
    "norm_r2_high",
    "A linear map of x predicts most of the SAE error's squared norm.",
    "§4, Fig 2; abstract",
    "norm R² 0.70–0.95 over all SAEs",
    "lowest held-out norm R² over the family's SAEs at the main site",
    (0.70, None),
)
VECTOR_R2 = ClaimSpec(
    "vector_r2_about_half",
    "A linear map of x predicts about half of the SAE error vector.",
    "§4, Fig 2; abstract",
    'vector R² 0.15–0.72 ("about half")',
    "mean held-out vector R² (averaged over dimensions) over the width sweep",
    (0.15, 0.72),
)
VECTOR_R2_WIDTH = ClaimSpec(
    "vector_r2_falls_with_width",
    "The error vector's linear predictability falls as the SAE grows wider.",
    "§4, Fig 2",
    "vector R² falls with width and L0",
    "vector R² of the widest minus the narrowest SAE of the width sweep",
    (None, 0.0),
)
LINEAR_SHARE = ClaimSpec(
    "linear_share_falls_with_width",
    "Wider SAEs leave less linear error: the linear share of the error falls with width.",
    "§4.2, Fig 1",
    "FVU 0.312 → 0.215 with FVU_nonlinear ≈ 0.12 flat (16k → 1M)",
    "(FVU − FVU_nonlinear)/FVU of the widest minus the narrowest SAE",
    (None, 0.0),
)
NONLINEAR_FLAT = ClaimSpec(
    "fvu_nonlinear_flat",
    "FVU_nonlinear stays roughly constant as width grows at fixed L0.",
    "§4.2, Figs 1, 2",
    "0.118 → 0.117 from 16k to 1M latents (−0.1% per doubling), while FVU falls ≈ 6% per doubling",
    "relative change of FVU_nonlinear per doubling of width, widest vs narrowest SAE",
    (-0.03, 0.03),
)
ASYMPTOTE = ClaimSpec(
    "asymptote_above_nonlinear",
    "Linear error remains at infinite width: the power law's asymptote lies above FVU_nonlinear.",
    "§4.2, Fig 1",
    "asymptote c = 0.186 vs FVU_nonlinear ≈ 0.122",
    "power-law asymptote c minus the mean FVU_nonlinear of the width sweep",
    (0.0, None),
)
NORM_TEST = ClaimSpec(
    "nonlinear_norm_least_predictable",
    "The nonlinear error's norm is the least linearly predictable of the components.",
    "§5.1, Fig 6",
    "typical R² x 0.98, Sae(x) 0.93–0.99, error 0.85–0.96, linear 0.93–0.97, nonlinear 0.80–0.95",
    "mean over the width sweep of (lowest norm-test R² of x, Sae(x), error, linear) − R² of nonlinear",
    (0.0, None),
)
PER_TOKEN = ClaimSpec(
    "per_token_predictable",
    "A larger SAE's per-token error norm is predictable from a smaller SAE's with one scalar.",
    "§4.3, Fig 4",
    "R² ≥ 0.78 for every pair of widths, 0.95–0.97 for adjacent widths",
    "lowest R² over pairs of the width sweep (Eq. 13)",
    (0.78, None),
)
NONLINEAR_GAIN = ClaimSpec(
    "nonlinear_gain_positive",
    "Adding the smaller SAE's nonlinear-error norm improves the per-token prediction.",
    "App. E, Fig 16",
    "up to ≈ 5–6.5% less unexplained variance",
    "largest reduction (%) over pairs, with plain norms as the paper's code",
    (0.0, None),
)
TABLE1 = ClaimSpec(
    "table1_diagonal",
    "In the simulation, the linear estimate tracks the activation noise and the nonlinear estimate the "
    "reconstruction noise.",
    "App. B.2, Table 1",
    "diagonal 0.984 / 0.904, off-diagonal 0.142 / 0.099",
    "smaller diagonal correlation minus the larger |off-diagonal| one",
    (0.0, None),
)
PROBE_LATENTS = ClaimSpec(
    "probe_latents_line_up",
    "The norm probe's weight on each latent direction follows E[w²]/E[w] of the latent.",
    "App. C.2, Fig 14",
    "the probe's per-latent values line up with the latents' activation statistics",
    "Pearson r over latents of probe·direction vs E[w²]/E[w]",
    (0.5, None),
)


def _points(res: EngineResult, names: list[str], keys: tuple[str, ...]) -> dict[str, dict[str, float]]:
    return {n: {k: _number(res.sae(n), k) for k in keys} for n in names}


def _number(st: SAEErrorStats, key: str) -> float:
    if key.startswith("norm_test."):
        return float(st.norm_test[key.removeprefix("norm_test.")])
    return float(getattr(st, key))


def _replicates(res: EngineResult, names: list[str]) -> dict[str, dict[str, list[float]]]:
    return {n: {k: [float(v) for v in vs] for k, vs in res.sae(n).jackknife.items()} for n in names}


def engine_claims(res: EngineResult | None) -> list[Claim]:
    """Claims tested by the engine's numbers (error prediction, width trends, norm test, Fig 14)."""
    specs = (NORM_R2, VECTOR_R2, VECTOR_R2_WIDTH, LINEAR_SHARE, NONLINEAR_FLAT, ASYMPTOTE, NORM_TEST)
    if res is None:
        return [s.not_run("the engine step did not run") for s in (*specs, PROBE_LATENTS)]
    sweep = res.width_sweep
    reps = _replicates(res, sweep)
    out = [_norm_r2(res), _mean_vector_r2(res, sweep, reps)]
    if len(sweep) < 2:
        out += [s.not_run("needs a width sweep of two or more SAEs") for s in specs[2:]]
    else:
        out += _width_trends(res, sweep, reps)
    out.append(_norm_test(res, sweep, reps))
    pl = res.probe_latents
    out.append(
        PROBE_LATENTS.measured(
            float(pl.correlation), correlation_interval(float(pl.correlation), pl.n_latents), "95% Fisher z"
        )
    )
    return out


def _norm_r2(res: EngineResult) -> Claim:
    main = [res.sae(n) for n in dict.fromkeys(res.width_sweep + res.k_sweep)] or res.saes
    worst = min(main, key=lambda s: s.norm_r2)
    return NORM_R2.measured(
        float(worst.norm_r2), worst.intervals.get("norm_r2"), note=f"lowest: {worst.name}"
    )


def _mean_vector_r2(res: EngineResult, sweep: list[str], reps: dict[str, dict[str, list[float]]]) -> Claim:
    if not sweep:
        return VECTOR_R2.not_run("needs a width sweep")
    value, interval = paired(
        _points(res, sweep, ("vector_r2",)), reps, lambda p: sum(v["vector_r2"] for v in p.values()) / len(p)
    )
    return VECTOR_R2.measured(value, interval)


def _width_trends(
    res: EngineResult, sweep: list[str], reps: dict[str, dict[str, list[float]]]
) -> list[Claim]:
    first, last = sweep[0], sweep[-1]
    pair = [first, last]
    keys = ("fvu", "fvu_nonlinear", "vector_r2")
    points = _points(res, pair, keys)
    doublings = math.log2(res.sae(last).d_sae / res.sae(first).d_sae)

    def share(v: dict[str, float]) -> float:
        return (v["fvu"] - v["fvu_nonlinear"]) / v["fvu"]

    out = [
        VECTOR_R2_WIDTH.measured(
            *paired(points, reps, lambda p: p[last]["vector_r2"] - p[first]["vector_r2"])
        ),
        LINEAR_SHARE.measured(*paired(points, reps, lambda p: share(p[last]) - share(p[first]))),
    ]
    if doublings > 0:
        per_doubling = paired(
            points,
            reps,
            lambda p: (p[last]["fvu_nonlinear"] / p[first]["fvu_nonlinear"]) ** (1 / doublings) - 1,
        )
        out.append(NONLINEAR_FLAT.measured(*per_doubling, note=f"{first} → {last}"))
    else:
        out.append(NONLINEAR_FLAT.not_run("the width sweep spans one width"))
    out.append(_asymptote(res))
    return out


def _asymptote(res: EngineResult) -> Claim:
    pl, nl, ci = res.power_law, res.fvu_nonlinear_mean, res.fvu_nonlinear_ci
    if pl is None or nl is None:
        return ASYMPTOTE.not_run("needs a power law over three or more widths")
    c = pl.c
    interval = None if ci is None else [float(c.low) - ci[1], float(c.high) - ci[0]]
    return ASYMPTOTE.measured(
        float(c.point) - nl,
        interval,
        "95% bootstrap of c (contexts) and jackknife of FVU_nonlinear, ends combined conservatively",
    )


def _norm_test(res: EngineResult, sweep: list[str], reps: dict[str, dict[str, list[float]]]) -> Claim:
    if not sweep:
        return NORM_TEST.not_run("needs a width sweep")
    others = ("x", "sae", "error", "linear")
    keys = tuple(f"norm_test.{q}" for q in (*others, "nonlinear"))
    if not all(q in res.sae(n).norm_test for n in sweep for q in (*others, "nonlinear")):
        return NORM_TEST.not_run("the engine ran without its second pass")

    def margin(p: dict[str, dict[str, float]]) -> float:
        gaps = [min(v[f"norm_test.{q}"] for q in others) - v["norm_test.nonlinear"] for v in p.values()]
        return sum(gaps) / len(gaps)

    value, interval = paired(_points(res, sweep, keys), reps, margin)
    return NORM_TEST.measured(value, interval, note="the probes b* are held fixed in the replicates")


def per_token_claims(res: PerTokenResult | None) -> list[Claim]:
    """Per-token scaling: every pair predictable, and the App. E gain."""
    if res is None or len(res.names) < 2:
        note = "the per-token step did not run" if res is None else "needs two or more widths"
        return [PER_TOKEN.not_run(note), NONLINEAR_GAIN.not_run(note)]
    out = []
    for spec, key, pick in ((PER_TOKEN, "r2", min), (NONLINEAR_GAIN, "nonlinear_gain_plain", max)):
        matrix = getattr(res, key)
        cells = [(v, i, j) for i, row in enumerate(matrix) for j, v in enumerate(row) if v is not None]
        if not cells:
            out.append(spec.not_run("no pair of widths"))
            continue
        value, i, j = pick(cells)
        bounds = res.intervals.get(key)
        interval = bounds[i][j] if bounds else None
        out.append(spec.measured(float(value), interval, note=f"{res.names[i]} → {res.names[j]}"))
    return out


def synthetic_claim(res: SyntheticStepResult | None) -> Claim:
    """Table 1: each estimate follows its own noise."""
    if res is None or not res.table1:
        return TABLE1.not_run("the synthetic step did not run")
    t = res.table1
    if any(v is None for row in t for v in row):
        return TABLE1.not_run("an estimate is constant over the grid")
    (da, oa), (ob, db) = ((float(v or 0.0) for v in row) for row in t)
    value = min(da, db) - max(abs(oa), abs(ob))
    bounds = [c for row in res.table1_intervals for c in row if c is not None]
    if len(bounds) != 4:
        return TABLE1.measured(value, None)
    (da_ci, oa_ci), (ob_ci, db_ci) = bounds[:2], bounds[2:]
    abs_high = max(max(abs(v) for v in c) for c in (oa_ci, ob_ci))
    abs_low = max(0.0 if c[0] < 0 < c[1] else min(abs(v) for v in c) for c in (oa_ci, ob_ci))
    interval = [min(da_ci[0], db_ci[0]) - abs_high, min(da_ci[1], db_ci[1]) - abs_low]
    return TABLE1.measured(value, interval, "95% Fisher z per correlation, ends combined conservatively")
