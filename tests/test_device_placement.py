"""Every step computes where the config says: a spy on the tiny study records, per step, where each SAE,
batch, accumulator, trainer and model is placed, and every experiment function a step calls must be given
the device explicitly (a default that happens to match is a miss: on an accelerator it would not).

The study runs once per device (``cpu`` always, ``cuda`` where there is one) with ``model.device`` and
``analysis.device`` both set; the checks are reported per step."""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import darkmatter.study.steps as steps_pkg
from darkmatter.cli import main
from darkmatter.sae.model import SAE
from darkmatter.sae.pursuit import PursuitSAE
from darkmatter.sae.train import FamilyTrainer
from darkmatter.stats.moments import Moments
from darkmatter.store import ActivationStore
from darkmatter.study.steps import STEPS

from conftest import tiny_study_overrides, write_corpus

COMPUTING_STEPS = [s.name for s in STEPS if s.name not in ("harvest", "per_token")]
"""Steps that run SAEs or accumulate over the store (harvest and per_token only read the model / tables)."""

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]


def _same(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` name the same device."""
    return a.type == b.type and (a.index or 0) == (b.index or 0)


@dataclass
class Spy:
    """(step, what, found device or a problem) per placement seen; ``misses`` are those off the setting."""

    expected: torch.device
    step: str = "(outside any step)"
    seen: list[tuple[str, str, str]] = field(default_factory=list)
    misses: list[tuple[str, str, str]] = field(default_factory=list)

    def place(self, what: str, device: Any) -> None:
        found = torch.device(device)
        self.seen.append((self.step, what, str(found)))
        if not _same(found, self.expected):
            self.misses.append((self.step, what, f"on {found}, not {self.expected}"))

    def missing(self, what: str) -> None:
        self.seen.append((self.step, what, "no device"))
        self.misses.append((self.step, what, "no device given"))


def _wrap(owner: Any, name: str, before: Callable[..., None], patch: pytest.MonkeyPatch) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def spied(*args: Any, **kwargs: Any) -> Any:
        before(*args, **kwargs)
        return original(*args, **kwargs)

    patch.setattr(owner, name, spied)


def _device_argument(fn: Callable[..., Any]) -> bool:
    try:
        return "device" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _step_modules() -> Iterator[Any]:
    for info in pkgutil.iter_modules(steps_pkg.__path__):
        yield importlib.import_module(f"{steps_pkg.__name__}.{info.name}")


def _device_check(spy: Spy, fn: Callable[..., Any]) -> Callable[..., None]:
    """A check that a call of ``fn`` names its device, and that it is the setting."""
    signature = inspect.signature(fn)
    what = f"{fn.__module__}.{fn.__name__}(device=)"

    def check(*args: Any, **kwargs: Any) -> None:
        given = signature.bind_partial(*args, **kwargs).arguments.get("device")
        if given is None:
            spy.missing(what)
        else:
            spy.place(what, given)

    return check


def _install(spy: Spy, patch: pytest.MonkeyPatch) -> None:
    # the current step: every Step.run sets it
    for step in STEPS:
        run = type(step).run

        def tracked(self: Any, ctx: Any, _run: Any = run, _name: str = step.name) -> Any:
            outer, spy.step = spy.step, _name
            try:
                return _run(self, ctx)
            finally:
                spy.step = outer

        patch.setattr(type(step), "run", tracked)

    # experiment functions a step calls that take a device: it must be given, and be the setting's
    for module in _step_modules():
        for name, fn in list(vars(module).items()):
            if not inspect.isfunction(fn) or not fn.__module__.startswith("darkmatter."):
                continue
            if fn.__module__.startswith("darkmatter.study") or not _device_argument(fn):
                continue

            _wrap(module, name, _device_check(spy, fn), patch)
        # experiment modules a step calls through (``layer_baselines.run``): their public functions too
        for sub in {m for m in vars(module).values() if inspect.ismodule(m)}:
            if not sub.__name__.startswith("darkmatter.experiments."):
                continue
            for name, fn in list(vars(sub).items()):
                if name.startswith("_") or not inspect.isfunction(fn) or fn.__module__ != sub.__name__:
                    continue
                if _device_argument(fn):
                    _wrap(sub, name, _device_check(spy, fn), patch)

    # store batches: the device must be passed, not left to the default
    def batches(self: ActivationStore, *args: Any, **kwargs: Any) -> None:
        if "device" in kwargs:
            spy.place("ActivationStore.iter_batches(device=)", kwargs["device"])
        else:
            spy.missing("ActivationStore.iter_batches(device=)")

    _wrap(ActivationStore, "iter_batches", batches, patch)

    # SAEs: weights and inputs
    def sae_call(kind: str) -> Callable[..., None]:
        def check(self: SAE, x: torch.Tensor, *args: Any, **kwargs: Any) -> None:
            spy.place(f"{type(self).__name__}.{kind}: weights", self.device)
            spy.place(f"{type(self).__name__}.{kind}: input", x.device)

        return check

    for kind in ("reconstruct", "encode", "encode_sparse"):
        _wrap(SAE, kind, sae_call(kind), patch)
    _wrap(PursuitSAE, "reconstruct", sae_call("reconstruct"), patch)

    # float64 accumulators: each chunk arrives, and the sums live, on the device
    def moments(self: Moments, buf: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        spy.place("Moments.update_packed: chunk", buf.device)
        if self.device is not None:
            spy.place("Moments: sums", self.device)

    _wrap(Moments, "update_packed", moments, patch)

    # SAE trainers
    original_init = FamilyTrainer.__init__

    def trainer_init(self: FamilyTrainer, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        spy.place("FamilyTrainer.device", self.device)

    patch.setattr(FamilyTrainer, "__init__", trainer_init)

    # models (the study's LM and a local judge): loaded on the setting
    import darkmatter.study.context as context_mod
    import darkmatter.study.steps.autointerp as autointerp_mod

    for owner in (context_mod, autointerp_mod):

        def load(*args: Any, **kwargs: Any) -> None:
            spy.place("load_lm(device=)", kwargs.get("device", "cpu"))

        _wrap(owner, "load_lm", load, patch)


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


@pytest.fixture(scope="module", params=DEVICES)
def spied_study(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Spy:
    device: str = request.param
    model_dir = request.getfixturevalue("tiny_model_dir")
    root = tmp_path_factory.mktemp(f"placement-{device}")
    corpus = write_corpus(root / "corpus.txt")
    overrides = [
        *tiny_study_overrides(model_dir, corpus),
        f"model.device={device}",
        f"analysis.device={device}",
    ]
    spy = Spy(expected=torch.device(device))
    with pytest.MonkeyPatch.context() as patch:
        _install(spy, patch)
        code = main(["run", "--out", str(root / "out"), "--quiet", *_sets(overrides)])
    assert code == 0, "the tiny study failed"
    return spy


@pytest.mark.slow
def test_every_computing_step_was_observed(spied_study: Spy) -> None:
    """The spy sees SAEs, batches or accumulators in every step that computes (so the checks have teeth)."""
    observed = {step for step, _, _ in spied_study.seen}
    assert not set(COMPUTING_STEPS) - observed, f"steps the spy never saw: {set(COMPUTING_STEPS) - observed}"


@pytest.mark.slow
@pytest.mark.parametrize("step", [s.name for s in STEPS])
def test_step_places_everything_on_the_setting(spied_study: Spy, step: str) -> None:
    misses = sorted({(what, why) for s, what, why in spied_study.misses if s == step})
    assert not misses, f"{step}: " + "; ".join(f"{what} {why}" for what, why in misses)


@pytest.mark.slow
def test_nothing_is_placed_outside_a_step_off_the_setting(spied_study: Spy) -> None:
    misses = [m for m in spied_study.misses if m[0] not in {s.name for s in STEPS}]
    assert not misses, misses


def test_a_planted_miss_is_caught() -> None:
    """The spy itself: a store pass without a device, an SAE elsewhere, a device off the setting."""
    spy = Spy(expected=torch.device("cuda"))
    spy.step = "synthetic"
    spy.missing("ActivationStore.iter_batches(device=)")
    spy.place("SAE.reconstruct: weights", "cpu")
    spy.place("FamilyTrainer.device", "cuda:0")
    assert [m[1] for m in spy.misses] == ["ActivationStore.iter_batches(device=)", "SAE.reconstruct: weights"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_analysis_on_cuda_without_cuda_is_one_clear_error(
    tiny_model_dir: Path, corpus_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    overrides = [*tiny_study_overrides(tiny_model_dir, corpus_file), "analysis.device=cuda"]
    assert main(["run", "--out", str(out), "--quiet", *_sets(overrides)]) == 2
    err = capsys.readouterr().err
    assert "analysis.device" in err and "CUDA is not available" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err and "internal error" not in err, err
    assert not (out / "store").exists()  # refused before any work
