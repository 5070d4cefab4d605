"""The paper's qualitative claims, each tested on a run's results by one stated rule (see ``rule``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from darkmatter import atomic
from darkmatter.claims.error_claims import engine_claims, per_token_claims, synthetic_claim
from darkmatter.claims.intervention_claims import (
    autointerp_claim,
    downstream_claims,
    earlier_claim,
    error_sae_claim,
    pursuit_claims,
)
from darkmatter.claims.rule import RULE, Claim, ClaimsTable, decide, table
from darkmatter.experiments.downstream import DownstreamResult
from darkmatter.results import Result, results_dir
from darkmatter.study.steps.autointerp import AutoInterpStepResult
from darkmatter.study.steps.earlier_layers import EarlierLayersStepResult
from darkmatter.study.steps.engine import EngineResult
from darkmatter.study.steps.error_saes import ErrorSAEsStepResult
from darkmatter.study.steps.per_token import PerTokenResult
from darkmatter.study.steps.pursuit import PursuitResult
from darkmatter.study.steps.synthetic import SyntheticStepResult

__all__ = ["RULE", "Claim", "ClaimsTable", "decide", "evaluate_claims", "write_claims"]

CLAIMS_FILE = "claims.json"
R = TypeVar("R", bound=Result)


def _get(results: Mapping[str, Result], name: str, kind: type[R]) -> R | None:
    found = results.get(name)
    return found if isinstance(found, kind) else None


def evaluate_claims(results: Mapping[str, Any]) -> ClaimsTable:
    """Every claim tested on ``results`` (step name -> typed result; missing steps give "not run")."""
    claims = [
        *engine_claims(_get(results, "engine", EngineResult)),
        *per_token_claims(_get(results, "per_token", PerTokenResult)),
        synthetic_claim(_get(results, "synthetic", SyntheticStepResult)),
        *pursuit_claims(_get(results, "pursuit", PursuitResult)),
        *downstream_claims(_get(results, "downstream_ce", DownstreamResult)),
        error_sae_claim(_get(results, "error_saes", ErrorSAEsStepResult)),
        autointerp_claim(_get(results, "autointerp", AutoInterpStepResult)),
        earlier_claim(_get(results, "earlier_layers", EarlierLayersStepResult)),
    ]
    return table(claims)


def write_claims(run_dir: str | Path, claims: ClaimsTable) -> Path:
    """``run_dir/results/claims.json``, written atomically, and left alone when its content is unchanged."""
    path = results_dir(run_dir) / CLAIMS_FILE
    text = claims.model_dump_json(indent=2) + "\n"
    try:
        unchanged = path.read_text(encoding="utf-8") == text
    except (OSError, UnicodeDecodeError):
        unchanged = False
    if not unchanged:
        atomic.write_text(path, text)
    return path
