"""Optional TensorBoard and W&B logs of SAE training: per SAE and step, the loss, FVU, L0 and dead latents.

Off by default and no hard dependency: ``tensorboard`` and ``wandb`` are imported only when asked for, and a
missing one is a ``ConfigError`` naming the package to install. The trainer calls a ``TrainLogs`` every
``every`` steps (and at the last step and wherever it measures the validation FVU) with the step's
train-batch statistics; scalars are tagged ``<sae name>/<statistic>``. W&B runs offline by default (it then
writes under the run folder and needs no network; ``wandb sync`` uploads later); ``wandb_mode = "online"``
streams the run instead. Logging never changes a result, so its settings are part of no step's hash.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from darkmatter.errors import ConfigError


class LoggingConfig(BaseModel):
    """Training logs of the SAEs a study trains; written under the run folder's ``logs/``."""

    model_config = ConfigDict(extra="forbid")
    tensorboard: bool = Field(False, description="Write TensorBoard event files (needs tensorboard).")
    wandb: bool = Field(False, description="Log to Weights & Biases (needs wandb).")
    wandb_project: str = Field("darkmatter", min_length=1, description="W&B project.")
    wandb_run_name: str | None = Field(None, description="W&B run name; empty: the run folder's name.")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline",
        description="offline: write the W&B run locally (wandb sync uploads it); online: stream it.",
    )
    every: int = Field(10, ge=1, description="Steps between logged points.")

    @property
    def enabled(self) -> bool:
        return self.tensorboard or self.wandb


def _require(module: str, package: str, option: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"logging.{option} is on, but the {package} package cannot be imported ({exc}); install it "
            f"(pip install {package}) or set logging.{option}=false."
        ) from exc


class TrainLogs:
    """The logging callback of one trainer: ``logs(sae_name, step, statistics)``; ``close()`` when done."""

    def __init__(self, cfg: LoggingConfig, folder: str | Path, *, group: str, run_name: str) -> None:
        self.cfg = cfg
        self.folder = Path(folder)
        self._writer: Any = None
        self._wandb: Any = None
        if cfg.tensorboard:
            tb = _require("torch.utils.tensorboard", "tensorboard", "tensorboard")
            self._writer = tb.SummaryWriter(log_dir=str(self.folder / "tensorboard" / group))
        if cfg.wandb:
            wandb = _require("wandb", "wandb", "wandb")
            self.folder.mkdir(parents=True, exist_ok=True)
            self._wandb = wandb.init(
                project=cfg.wandb_project,
                name=cfg.wandb_run_name or run_name,
                group=group,
                dir=str(self.folder),
                mode=cfg.wandb_mode,
                reinit=True,
            )

    def __call__(self, sae: str, step: int, point: Mapping[str, float | None]) -> None:
        scalars = {f"{sae}/{k}": float(v) for k, v in point.items() if v is not None and k != "step"}
        if self._writer is not None:
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, value, step)
        if self._wandb is not None:
            self._wandb.log({**scalars, "step": step})

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def log_every(logs: TrainLogs | None) -> int:
    """Steps between a trainer's logged points: the logging section's ``every`` (10 without logs)."""
    return 10 if logs is None else logs.cfg.every
