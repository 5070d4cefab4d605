"""The study's steps and runner: what invalidates each step's key, skipping, subsets, deferred failures."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from darkmatter.config import StudyConfig, resolve_config
from darkmatter.errors import ConfigError, StepIncompleteError
from darkmatter.ranks import SINGLE
from darkmatter.results import Result, read_result
from darkmatter.runner import Runner
from darkmatter.study.context import StudyContext
from darkmatter.study.step import Step, upstream
from darkmatter.study.steps import STEPS

BASE = resolve_config("tiny")


def _changed(*overrides: str) -> set[str]:
    """Names of the steps whose key changes when ``overrides`` are applied to the tiny preset."""
    other = resolve_config("tiny", overrides=list(overrides))
    return {s.name for s in STEPS if s.key(BASE) != s.key(other)}


ALL = {s.name for s in STEPS}
BELOW_ENGINE = {
    "engine",
    "per_token",
    "pursuit",
    "downstream_ce",
    "earlier_layers",
    "error_saes",
    "autointerp",
}
BELOW_FAMILY = BELOW_ENGINE | {"family", "synthetic"}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["pursuit.n_contexts=3"], {"pursuit"}),
        (["synthetic.n_tokens=1234"], {"synthetic"}),
        (["downstream_ce.n_contexts=3"], {"downstream_ce", "earlier_layers"}),
        (["earlier_layers.mlp_hidden=8"], {"earlier_layers"}),
        (["earlier_layers.ce_contexts=3"], {"earlier_layers"}),
        (["error_saes.interp.n_latents=3"], {"autointerp"}),
        (["error_saes.interp.sae_latents=3"], {"autointerp"}),
        (["error_saes.k=4"], {"error_saes", "autointerp"}),
        (["layer_sweep.d_sae=32"], {"layer_sweep"}),
        (["engine.interval_blocks=5"], BELOW_ENGINE | {"layer_sweep"}),
        (["family.widths=[64,256]"], BELOW_FAMILY),
        (["split_seed=1"], BELOW_FAMILY | {"layer_sweep"}),
        (["seed=1"], BELOW_ENGINE | {"synthetic"}),
        (["text.n_contexts=17"], ALL),
        (["layer=14"], ALL - {"layer_sweep"}),
        (["synthetic.enabled=false"], set()),  # a disabled step keeps its key; the runner skips it
    ],
)
def test_what_changes_which_step_key(overrides: list[str], expected: set[str]) -> None:
    assert _changed(*overrides) == expected


def test_earlier_layers_with_its_own_ce_contexts_ignores_downstream_ce_count() -> None:
    a = resolve_config("tiny", overrides=["earlier_layers.ce_contexts=2", "downstream_ce.n_contexts=3"])
    b = resolve_config("tiny", overrides=["earlier_layers.ce_contexts=2", "downstream_ce.n_contexts=5"])
    changed = {s.name for s in STEPS if s.key(a) != s.key(b)}
    assert changed == {"downstream_ce"}


def test_keys_are_stable_and_steps_are_in_dependency_order() -> None:
    again = resolve_config("tiny")
    assert [s.key(BASE) for s in STEPS] == [s.key(again) for s in STEPS]
    seen: set[str] = set()
    for step in STEPS:
        assert {s.name for s in upstream(step)} <= seen, f"{step.name} runs before a step it needs"
        seen.add(step.name)
    assert len({s.name for s in STEPS}) == len(STEPS)


# --------------------------------------------------------------------------- the runner on fake steps


class Counted(Result):
    value: int = 0


class FakeStep(Step[Counted]):
    """A step that counts its runs; ``fail`` makes it stop early, ``files`` names a file it must leave."""

    result_type: ClassVar[type[Result]] = Counted
    runs: ClassVar[dict[str, int]] = {}

    def __init__(self, name: str, needs: tuple[Step[Any], ...] = (), *, enabled: bool = True):
        self.name, self.needs, self._enabled = name, needs, enabled  # type: ignore[misc]
        self.title = name  # type: ignore[misc]
        self.fail = False
        self.current = True

    def enabled(self, cfg: StudyConfig) -> bool:
        return self._enabled

    def settings(self, cfg: StudyConfig) -> dict[str, Any]:
        return {"seed": cfg.seed}

    def is_current(self, ctx: StudyContext, result: Counted) -> bool:
        return self.current

    def run(self, ctx: StudyContext) -> Counted:
        self.runs[self.name] = self.runs.get(self.name, 0) + 1
        return Counted(value=self.runs[self.name], error="endpoint down" if self.fail else None)

    def headline(self, result: Counted) -> str:
        return f"run {result.value}"


@pytest.fixture()
def fake(tmp_path: Path) -> tuple[list[FakeStep], Any]:
    FakeStep.runs = {}
    a = FakeStep("a")
    b = FakeStep("b", (a,))
    c = FakeStep("c", (b,))
    d = FakeStep("d")

    def run(*only: str, cfg: StudyConfig = BASE, **kw: Any) -> list[Any]:
        ctx = StudyContext(cfg, tmp_path, log=lambda _m: None)
        return Runner(ctx, [a, b, c, d], check=False).run(list(only) or None, report=False, **kw)

    return [a, b, c, d], run


def test_runner_skips_what_is_up_to_date_and_reruns_what_changed(fake: Any, tmp_path: Path) -> None:
    (_, b, _, _), run = fake
    outcomes = run()
    assert [o.status for o in outcomes] == ["ran"] * 4 and [o.headline for o in outcomes] == ["run 1"] * 4
    outcomes = run()
    assert [o.status for o in outcomes] == ["up to date"] * 4
    assert FakeStep.runs == {"a": 1, "b": 1, "c": 1, "d": 1}
    b.current = False  # b's files are gone: b reruns; c's key does not depend on b's files
    run()
    assert FakeStep.runs == {"a": 1, "b": 2, "c": 1, "d": 1}
    b.current = True
    run(cfg=resolve_config("tiny", overrides=["seed=5"]))  # every fake step reads the seed
    assert FakeStep.runs == {"a": 2, "b": 3, "c": 2, "d": 2}
    stored = read_result(tmp_path, "c", Counted)
    assert stored is not None and stored.experiment == "c" and stored.config == {"seed": 5}


def test_a_subset_reruns_only_what_it_names_and_runs_missing_upstream(fake: Any) -> None:
    _, run = fake
    outcomes = run("b")  # nothing done yet: a runs because b needs it; c and d are not touched
    assert [(o.name, o.status) for o in outcomes] == [("a", "ran"), ("b", "ran")]
    run()
    outcomes = run("b")  # everything done: only b reruns
    assert [(o.name, o.status) for o in outcomes] == [("a", "up to date"), ("b", "ran")]
    assert FakeStep.runs == {"a": 1, "b": 2, "c": 1, "d": 1}
    run("a", force=False)
    assert FakeStep.runs["a"] == 1
    with pytest.raises(ConfigError, match="Unknown step"):
        run("nope")


def test_a_step_that_stops_early_is_raised_after_the_others(fake: Any, tmp_path: Path) -> None:
    (_, b, _, _), run = fake
    b.fail = True
    with pytest.raises(StepIncompleteError, match="endpoint down"):
        run()
    assert FakeStep.runs == {"a": 1, "b": 1, "d": 1}  # c needs b: skipped; d is independent: ran
    partial = read_result(tmp_path, "b", Counted)
    assert partial is not None and partial.error == "endpoint down"
    b.fail = False
    outcomes = run()  # the partial result is never up to date: b resumes, then c
    assert [o.status for o in outcomes] == ["up to date", "ran", "ran", "up to date"]


def test_a_disabled_step_skips_the_steps_that_need_it(fake: Any) -> None:
    (_, b, _, _), run = fake
    b._enabled = False
    outcomes = run()
    assert [(o.name, o.status) for o in outcomes] == [
        ("a", "ran"),
        ("b", "disabled"),
        ("c", "skipped"),
        ("d", "ran"),
    ]
    with pytest.raises(ConfigError, match="disabled"):
        run("b")


def test_layer_sweep_records_the_loss_whatever_the_main_harvest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fig 13's model-loss predictor needs the loss; the sweep's own store always records it."""
    from types import SimpleNamespace

    from darkmatter.study.steps import layer_sweep

    seen: dict[str, Any] = {}
    monkeypatch.setattr(layer_sweep.layer_baselines, "run", lambda *a, **kw: seen.update(kw))
    cfg = resolve_config("tiny", overrides=["harvest.with_loss=false"])
    lm = SimpleNamespace(identity={"n_layers": 4})
    ctx = SimpleNamespace(cfg=cfg, lm=lm, paths=SimpleNamespace(layers=Path("x")), split=None, log=print)
    ctx.progress, ctx.ranks = print, SINGLE
    ctx.train_config = lambda train: train
    ctx.train_logs = lambda _group: contextlib.nullcontext()
    ctx.device, ctx.sae_dtype = torch.device("cpu"), torch.float32
    layer_sweep.LAYER_SWEEP.run(ctx)  # type: ignore[arg-type]
    assert seen["harvest_cfg"].with_loss is True and seen["harvest_cfg"].sites == []
