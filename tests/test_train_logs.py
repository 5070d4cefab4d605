"""Training logs: TensorBoard event files with the expected tags (every trainer of a study), W&B offline,
clear errors, no hash."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

from darkmatter.config.schema import StudyConfig
from darkmatter.errors import ConfigError
from darkmatter.sae.train import FamilyTrainer, SAESpec, TrainConfig
from darkmatter.sae.train_logs import LoggingConfig, TrainLogs
from darkmatter.stats import Split
from synthetic import sparse_features, synthetic_store

from conftest import tiny_model, tiny_study_overrides, tiny_tokenizer

SITE = "blocks.0.hook_resid_post"
SPLIT = Split(seed=0, fraction=0.8)
CFG = TrainConfig(epochs=2, batch_size=128, lr=2e-3, dead_tokens=1000, checkpoint_every=1000, eval_every=5)
SPECS = [
    SAESpec(name="t", site=SITE, d_sae=16, k=2),
    SAESpec(name="j", site=SITE, d_sae=16, k=2, kind="jumprelu"),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("logs") / "store"
    return synthetic_store(path, sparse_features(d=12, n_features=24, active=2), n_contexts=32, ctx_len=32)


def test_tensorboard_event_files_hold_every_statistic(store, tmp_path: Path) -> None:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    cfg = LoggingConfig(tensorboard=True, every=3)
    logs = TrainLogs(cfg, tmp_path / "logs", group="family", run_name="r")
    trainer = FamilyTrainer(store, SPECS, CFG, tmp_path / "t", split=SPLIT, log=logs, log_every=3)
    trainer.train()
    logs.close()
    folder = tmp_path / "logs" / "tensorboard" / "family"
    assert list(folder.glob("events.out.tfevents.*"))
    acc = accumulator.EventAccumulator(str(folder))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for name in ("t", "j"):
        assert {f"{name}/{s}" for s in ("loss", "fvu", "l0", "dead_fraction", "val_fvu")} <= tags
    assert "j/sparsity_coef" in tags and "t/aux" in tags
    steps = [e.step for e in acc.Scalars("t/fvu")]
    last = trainer.total_steps - 1
    assert steps[0] == 0 and steps[-1] == last and {0, 3, 6} <= set(steps)
    assert {e.step for e in acc.Scalars("t/val_fvu")} >= {4, last}


def test_wandb_offline_run_under_the_logs_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: dict[str, Any] = {"log": []}

    class Run:
        def log(self, data: dict[str, float]) -> None:
            calls["log"].append(data)

        def finish(self) -> None:
            calls["finished"] = True

    def init(**kwargs: Any) -> Run:
        calls["init"] = kwargs
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    logs = TrainLogs(LoggingConfig(wandb=True), tmp_path / "logs", group="family", run_name="demo")
    logs("t", 7, {"fvu": 0.5, "l0": 2.0, "val_fvu": None})
    logs.close()
    init_kw = calls["init"]
    assert init_kw["mode"] == "offline" and init_kw["name"] == "demo" and init_kw["project"] == "darkmatter"
    assert init_kw["dir"] == str(tmp_path / "logs")
    assert calls["log"] == [{"t/fvu": 0.5, "t/l0": 2.0, "step": 7}] and calls["finished"]


@pytest.mark.parametrize("option", ["tensorboard", "wandb"])
def test_missing_package_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, option: str) -> None:
    module = "torch.utils.tensorboard" if option == "tensorboard" else "wandb"
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    with pytest.raises(ConfigError, match=f"pip install {option}"):
        TrainLogs(LoggingConfig(**{option: True}), tmp_path, group="family", run_name="r")


def test_logging_is_off_by_default_and_in_no_step_hash() -> None:
    from darkmatter.study.steps.family import FamilyStep

    base = StudyConfig()
    on = StudyConfig(logging=LoggingConfig(tensorboard=True, wandb=True, every=1))
    assert not base.logging.enabled and on.logging.enabled
    assert FamilyStep().settings(base) == FamilyStep().settings(on)
    assert base.section_hash("family") == on.section_hash("family")


def test_every_trainer_of_a_study_logs_its_saes(tmp_path: Path, corpus_file: Path) -> None:
    """The family, the layer sweep and the error SAEs each write an event folder, one tag set per SAE."""
    from darkmatter.config import resolve_config
    from darkmatter.runner import run_study

    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    model = tmp_path / "model"
    tiny_model("llama").save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    overrides = [*tiny_study_overrides(model, corpus_file), "logging.tensorboard=true", "logging.every=2"]
    run_study(
        resolve_config("tiny", overrides=overrides), tmp_path / "run", steps=["layer_sweep", "error_saes"]
    )
    saes = {
        "family": ["L1.resid.w16.k4", "L1.resid.w32.k4", "L1.resid.w32.k2"],
        "layer_sweep": ["layer0", "layer2"],
        "error_saes": ["linear", "nonlinear"],
    }
    for group, names in saes.items():
        acc = accumulator.EventAccumulator(str(tmp_path / "run" / "logs" / "tensorboard" / group))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert {f"{n}/{s}" for n in names for s in ("loss", "fvu", "l0", "dead_fraction", "val_fvu")} <= tags
        assert {t.split("/")[0] for t in tags} == set(names), group
        steps = [e.step for e in acc.Scalars(f"{names[0]}/fvu")]
        assert steps[0] == 0 and 2 in steps and steps == sorted(set(steps)), group
