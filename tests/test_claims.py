"""The claims table: the verdict rule, paired jackknife statistics, and claims built from results."""

from __future__ import annotations

import math

import pytest

from darkmatter.claims import evaluate_claims
from darkmatter.claims.error_claims import PER_TOKEN, per_token_claims, synthetic_claim
from darkmatter.claims.intervention_claims import EARLIER, earlier_claim
from darkmatter.claims.rule import decide
from darkmatter.claims.spec import paired
from darkmatter.experiments.earlier_layers import EarlierLayersResult
from darkmatter.experiments.synthetic_summary import correlation_interval
from darkmatter.stats.jackknife import jackknife_interval
from darkmatter.study.steps.earlier_layers import EarlierLayersStepResult
from darkmatter.study.steps.per_token import PerTokenResult
from darkmatter.study.steps.synthetic import SyntheticStepResult


@pytest.mark.parametrize(
    ("interval", "region", "verdict"),
    [
        ([0.8, 0.9], [0.7, None], "reproduces"),
        ([0.5, 0.6], [0.7, None], "deviates"),
        ([0.6, 0.8], [0.7, None], "inconclusive"),
        ([-0.2, -0.1], [None, 0.0], "reproduces"),
        ([0.1, 0.2], [None, 0.0], "deviates"),
        ([0.2, 0.5], [0.15, 0.72], "reproduces"),
        ([0.1, 0.5], [0.15, 0.72], "inconclusive"),
        ([0.8, 0.9], [0.15, 0.72], "deviates"),
        ([0.1, 0.9], [0.15, 0.72], "inconclusive"),
        (None, [0.7, None], "inconclusive"),
        ([math.nan, 0.9], [0.7, None], "inconclusive"),
    ],
)
def test_the_rule(interval, region, verdict) -> None:
    assert decide(interval, region) == verdict


def test_paired_recomputes_the_statistic_per_block() -> None:
    points = {"a": {"fvu": 0.30}, "b": {"fvu": 0.20}}
    reps = {"a": {"fvu": [0.31, 0.29, 0.30, 0.32]}, "b": {"fvu": [0.22, 0.19, 0.20, 0.21]}}
    value, interval = paired(points, reps, lambda p: p["b"]["fvu"] - p["a"]["fvu"])
    assert value == pytest.approx(-0.10)
    want = jackknife_interval(-0.10, [0.22 - 0.31, 0.19 - 0.29, 0.20 - 0.30, 0.21 - 0.32])
    assert interval == pytest.approx(list(want))
    assert paired(points, {"a": reps["a"]}, lambda p: p["b"]["fvu"])[1] is None  # b has no replicates
    uneven = {"a": {"fvu": [0.3, 0.3, 0.3]}, "b": reps["b"]}
    assert paired(points, uneven, lambda p: p["b"]["fvu"])[1] is None


def test_no_results_means_every_claim_is_not_run() -> None:
    table = evaluate_claims({})
    assert len(table.claims) >= 15 and len({c.id for c in table.claims}) == len(table.claims)
    assert table.counts["not run"] == len(table.claims)
    assert all(c.value is None and c.note for c in table.claims)


def _per_token(r2: float, interval: list[float]) -> PerTokenResult:
    return PerTokenResult.model_construct(
        names=["small", "big"],
        r2=[[None, r2], [None, None]],
        nonlinear_gain_plain=[[None, 2.0], [None, None]],
        intervals={"r2": [[None, interval], [None, None]]},
    )


@pytest.mark.parametrize(
    ("interval", "verdict"),
    [([0.85, 0.95], "reproduces"), ([0.60, 0.70], "deviates"), ([0.70, 0.95], "inconclusive")],
)
def test_per_token_claim_follows_its_interval(interval: list[float], verdict: str) -> None:
    claim, gain = per_token_claims(_per_token(0.9 if verdict != "deviates" else 0.65, interval))
    assert claim.id == PER_TOKEN.id and claim.verdict == verdict and claim.interval == interval
    assert claim.note == "small → big"
    assert gain.verdict == "inconclusive" and gain.value == 2.0  # no interval for the gain: inconclusive


def test_the_papers_own_table1_reproduces() -> None:
    """The paper's Table 1 with Fisher intervals over its 25 settings passes the rule; swapped, it fails."""
    paper = [[0.9842, 0.1417], [0.0988, 0.9036]]

    def result(table: list[list[float]]) -> SyntheticStepResult:
        intervals = [[correlation_interval(v, 25) for v in row] for row in table]
        return SyntheticStepResult.model_construct(table1=table, table1_intervals=intervals)

    claim = synthetic_claim(result(paper))
    assert claim.verdict == "reproduces"
    assert claim.value == pytest.approx(0.9036 - 0.1417)
    assert claim.interval is not None and 0 < claim.interval[0] < claim.value < claim.interval[1]
    swapped = synthetic_claim(result([[0.1417, 0.9842], [0.9036, 0.0988]]))
    assert swapped.verdict == "deviates"


def _earlier(gap_intervals: dict[str, list[float]]) -> EarlierLayersStepResult:
    r2 = {
        "prev": {"linear": 0.32, "nonlinear": 0.14, "error": 0.09},
        "mlp": {"linear": 0.16, "nonlinear": 0.07, "error": 0.07},
        "self": {"linear": 0.34, "nonlinear": 0.49, "error": 0.06},  # not an earlier component
    }
    pred = EarlierLayersResult.model_construct(
        regressors=[*r2, "joint"], r2=r2 | {"joint": r2["self"]}, gap_intervals=gap_intervals
    )
    return EarlierLayersStepResult.model_construct(target="t", predictors=pred)


@pytest.mark.parametrize(
    ("mlp_gap", "verdict"),
    [([0.05, 0.13], "reproduces"), ([-0.12, -0.02], "deviates"), ([-0.01, 0.19], "inconclusive")],
)
def test_earlier_claim_takes_the_interval_of_the_smallest_gap(mlp_gap: list[float], verdict: str) -> None:
    claim = earlier_claim(_earlier({"prev": [0.1, 0.3], "mlp": mlp_gap, "self": [-0.2, -0.1]}))
    assert claim.id == EARLIER.id and claim.verdict == verdict
    assert claim.value == pytest.approx(0.09) and claim.interval == mlp_gap and claim.note == "mlp"
    assert "jackknife" in claim.interval_kind


def test_earlier_claim_without_intervals_is_inconclusive() -> None:
    claim = earlier_claim(_earlier({}))  # e.g. fewer than 3 blocks, or a result from before intervals
    assert claim.verdict == "inconclusive" and claim.interval is None and "no interval" in claim.note
    assert earlier_claim(None).verdict == "not run"
