"""Runs a study: its steps in order, then the report. Skips a step whose key matches its result, times
each, defers a step that stopped early until the others and the report are done, and summarises the run."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from darkmatter import atomic
from darkmatter.config.schema import StudyConfig
from darkmatter.errors import ConfigError, DarkMatterError, StepIncompleteError, StoreError
from darkmatter.lock import run_lock
from darkmatter.ranks import RankFailedError
from darkmatter.report.build import write_report
from darkmatter.results import Result, read_result, write_result
from darkmatter.study.context import StudyContext
from darkmatter.study.preflight import preflight
from darkmatter.study.step import Step, upstream
from darkmatter.study.steps import STEPS


@dataclass
class StepOutcome:
    """One row of the end-of-run summary."""

    name: str
    status: str  # ran, up to date, stopped early, disabled, skipped
    seconds: float = 0.0
    headline: str = ""


class Runner:
    """Runs ``steps`` (default: every step of a study, in order) on one context."""

    def __init__(self, ctx: StudyContext, steps: Sequence[Step[Any]] = STEPS, *, check: bool = True):
        """``check``: run ``preflight`` (the model's config file against the study's) before any work."""
        self.ctx = ctx
        self.steps = list(steps)
        self.check = check
        self.outcomes: list[StepOutcome] = []

    def select(self, only: Sequence[str] | None) -> tuple[list[Step[Any]], set[str]]:
        """The steps to visit, in order, and those ``only`` names.

        The steps that those need are visited too, and run only when not up to date.
        """
        by_name = {s.name: s for s in self.steps}
        if only is None:
            return self.steps, set()
        unknown = [n for n in only if n not in by_name]
        if unknown:
            raise ConfigError(f"Unknown step(s) {unknown}; the steps are: {', '.join(by_name)}.")
        disabled = [n for n in only if not by_name[n].enabled(self.ctx.cfg)]
        if disabled:
            raise ConfigError(f"Step(s) {disabled} are disabled in this study's config; enable them first.")
        wanted = set(only)
        for name in only:
            wanted |= {s.name for s in upstream(by_name[name])}
        return [s for s in self.steps if s.name in wanted], set(only)

    def run(
        self, only: Sequence[str] | None = None, *, force: bool = True, report: bool = True
    ) -> list[StepOutcome]:
        """Run the study (``only``: just these steps, rerun even when up to date unless ``force`` is off, and
        what they need); a step that stopped early raises only after every other step and the report."""
        ranks = self.ctx.ranks
        if not ranks.active:
            return self._run(only, force, report)
        ranks.watch_failures(self.ctx.paths.root)
        try:
            return self._run(only, force, report)
        except StepIncompleteError:
            raise
        except DarkMatterError as exc:
            ranks.record_failure(str(exc))
            raise
        except Exception as exc:  # a collective broken by a rank that died, or a failure of this rank
            elsewhere = ranks.failure_elsewhere()
            if elsewhere is not None:
                raise RankFailedError(elsewhere) from exc
            ranks.record_failure(f"{type(exc).__name__}: {exc}")
            raise

    def _run(self, only: Sequence[str] | None, force: bool, report: bool) -> list[StepOutcome]:
        ctx = self.ctx
        ctx.cfg.require_local()  # everything that would need a download, in one error, before any work
        selected, forced = self.select(only)
        ranks = ctx.ranks
        if self.check:
            preflight(ctx.cfg)
            if ranks.leader:
                self.check_plan([s.name for s in selected])
        # one run per folder (rank 0 holds it for all ranks); cleaning up is safe only under the lock
        with run_lock(ctx.paths.root) if ranks.leader else contextlib.nullcontext():
            if ranks.leader:
                atomic.remove_temporaries(ctx.paths.root)
                ranks.clear_failures()
            ranks.barrier()
            errors = self._run_steps(selected, forced if force else set())
            if report and ranks.leader:
                t0 = time.perf_counter()
                figs = ctx.cfg.report
                path = write_report(ctx.paths.root, formats=tuple(figs.formats), dpi=figs.dpi)
                self.outcomes.append(StepOutcome("report", "ran", time.perf_counter() - t0, str(path)))
                ctx.log(f"report: {path}")
            ranks.barrier()
        if errors:
            raise errors[0]
        return self.outcomes

    def check_plan(self, names: list[str]) -> None:
        """Plan the steps about to run (cached calibration, no weights): log a one-line summary and stop
        with one ``BudgetError`` when memory or disk cannot hold them."""
        from darkmatter.study.plan import check_plan, plan_study

        plan = plan_study(self.ctx.cfg, self.ctx.paths.root, steps=names)
        self.ctx.log(plan.summary())
        check_plan(plan)

    def _run_steps(self, selected: list[Step[Any]], forced: set[str]) -> list[StepIncompleteError]:
        unavailable: set[str] = set()  # steps whose results the steps below cannot use
        errors: list[StepIncompleteError] = []
        for step in selected:
            outcome = self._visit(step, step.name in forced, unavailable)
            self.outcomes.append(outcome)
            if outcome.status == "stopped early":
                unavailable.add(step.name)
                errors.append(StepIncompleteError(outcome.headline))
        return errors

    def _visit(self, step: Step[Any], forced: bool, unavailable: set[str]) -> StepOutcome:
        cfg = self.ctx.cfg
        if not step.enabled(cfg):
            unavailable.add(step.name)
            return StepOutcome(step.name, "disabled")
        blocked = [s.name for s in step.needs if s.name in unavailable]
        if blocked:
            unavailable.add(step.name)
            return StepOutcome(step.name, "skipped", headline=f"needs {', '.join(blocked)}")
        key = step.key(cfg)
        ranks = self.ctx.ranks
        done = None if forced else self.current(step, key) if ranks.leader else None
        if ranks.broadcast(done is not None):  # rank 0 decides for all: the others may not see its files
            self.ctx.log(f"{step.name}: up to date")
            return StepOutcome(step.name, "up to date", headline=_headline(step, done) if done else "")
        t0 = time.perf_counter()
        if ranks.leader or step.distributed:
            result = step.run(self.ctx)
        ranks.barrier()  # the others wait here while rank 0 runs a step alone
        seconds = time.perf_counter() - t0
        if not ranks.leader:
            error = ranks.broadcast(None)
            if error:
                return StepOutcome(step.name, "stopped early", seconds, error)
            self.ctx.log(f"{step.name}: done ({seconds:.1f} s)")
            return StepOutcome(step.name, "ran", seconds)
        result.experiment, result.config_hash, result.seed = step.name, key, cfg.seed
        result.config = step.settings(cfg)
        write_result(self.ctx.paths.root, result)
        ranks.broadcast(result.error)
        if result.error:
            self.ctx.log(f"{step.name}: stopped early: {result.error}")
            return StepOutcome(step.name, "stopped early", seconds, result.error)
        headline = _headline(step, result)
        self.ctx.log(f"{step.name}: {headline} ({seconds:.1f} s)")
        return StepOutcome(step.name, "ran", seconds, headline)

    def current(self, step: Step[Any], key: str) -> Result | None:
        """The step's stored result when it was computed under ``key`` and is complete, else None."""
        try:
            done = read_result(self.ctx.paths.root, step.name, step.result_type)
        except StoreError:  # unreadable or from another version: recompute
            return None
        if done is None or done.config_hash != key or done.error or not step.is_current(self.ctx, done):
            return None
        return done


def _headline(step: Step[Any], result: Result) -> str:
    try:
        return step.headline(result)
    except (KeyError, IndexError, TypeError, ValueError):  # a headline never breaks a run
        return ""


def run_study(
    cfg: StudyConfig, out: str | Path, *, steps: Sequence[str] | None = None, **context: Any
) -> list[StepOutcome]:
    """Run a study into ``out`` (``steps``: rerun only these, and what they need); see ``Runner``.

    ``context`` goes to ``StudyContext`` (``log``, ``progress``). Returns one outcome per step visited.
    """
    return Runner(StudyContext(cfg, out, **context)).run(steps)
