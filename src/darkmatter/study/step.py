"""The unit of a study: a step declares what it depends on, runs on a narrow context, returns a result.

A step's ``key`` hashes the config it reads (``settings``) with the keys of the steps it needs, so a
change anywhere upstream reaches every step below it, and a change elsewhere reaches none of them. The
runner compares the key with the one recorded in the step's result file to decide whether to run it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Generic, TypeVar

from darkmatter.config.schema import StudyConfig
from darkmatter.hashing import stable_hash
from darkmatter.results import Result
from darkmatter.study.context import StudyContext

R = TypeVar("R", bound=Result)


class Step(Generic[R]):
    """Base of every step. Subclasses set the class attributes and implement ``settings`` and ``run``."""

    name: ClassVar[str]
    """Step name: what ``--steps`` takes and the stem of its result file ``results/<name>.json``."""
    title: ClassVar[str]
    """What the step computes, for logs and the summary (e.g. 'error prediction (Figs 1-3, 6, 14)')."""
    result_type: ClassVar[type[Result]]
    needs: ClassVar[tuple[Step[Any], ...]] = ()
    """Steps whose results (or files) this one reads; they run first."""
    version: ClassVar[int] = 1
    """Bumped when the step's computation changes, so stored results are recomputed."""
    distributed: ClassVar[bool] = False
    """Under ``torchrun``: every rank runs the step on its share of the work and the sums meet (rank 0
    writes what is shared). Otherwise rank 0 runs it alone while the others wait."""

    def enabled(self, cfg: StudyConfig) -> bool:
        """Whether the study runs this step at all."""
        return True

    def settings(self, cfg: StudyConfig) -> dict[str, Any]:
        """The config this step reads itself (not its upstream steps'), as plain data."""
        raise NotImplementedError

    def key(self, cfg: StudyConfig) -> str:
        """Hash of the step's settings, its version and its upstream steps' keys."""
        return stable_hash(
            {
                "step": self.name,
                "version": self.version,
                "settings": self.settings(cfg),
                "upstream": {s.name: s.key(cfg) for s in self.needs},
            }
        )

    def run(self, ctx: StudyContext) -> R:
        """Compute the result; the runner stamps it with the key and writes it."""
        raise NotImplementedError

    def is_current(self, ctx: StudyContext, result: R) -> bool:
        """Beyond a matching key: whether the files the result points to are all there."""
        return True

    def headline(self, result: R) -> str:
        """One line of the result's main numbers for the end-of-run summary."""
        return ""

    def __repr__(self) -> str:
        return f"<step {self.name}>"


def upstream(step: Step[Any]) -> list[Step[Any]]:
    """Every step ``step`` needs, directly or not, each once, upstream first."""
    seen: dict[str, Step[Any]] = {}

    def visit(s: Step[Any]) -> None:
        for need in s.needs:
            if need.name not in seen:
                visit(need)
                seen[need.name] = need

    visit(step)
    return list(seen.values())
