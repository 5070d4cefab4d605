"""What the family trainer is told (the SAEs, the optimisation, derived inputs) and the curve it records."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

Tensor = torch.Tensor


class SAESpec(BaseModel):
    """One SAE of a family."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Unique name, also the folder name.")
    site: str = Field(description="Hook site it reads, e.g. blocks.15.hook_resid_post, or a derived input.")
    d_sae: int = Field(ge=1, description="Number of latents.")
    k: int = Field(
        ge=1,
        description="Active latents per token (TopK), on average (BatchTopK), or the target L0 (JumpReLU).",
    )
    kind: Literal["topk", "batchtopk", "jumprelu"] = Field("topk", description="Sparsity mechanism.")


class TrainingPoint(BaseModel):
    """One logged training step of an SAE: train-batch statistics, and the validation FVU where measured."""

    step: float
    fvu: float
    l0: float
    aux: float = Field(description="AuxK loss.")
    dead_fraction: float
    val_fvu: float | None = Field(None, description="FVU of the SAE as exported, on the validation tokens.")


class TrainConfig(BaseModel):
    """Optimisation settings shared by every SAE of a family."""

    model_config = ConfigDict(extra="forbid")
    epochs: float = Field(4.0, gt=0, description="Passes over the train split (fractions allowed).")
    batch_size: int = Field(2048, ge=1, description="Tokens per step.")
    lr: float = Field(2e-4, gt=0, description="Adam lr at 16384 latents; scaled by 1/sqrt(d_sae/16384).")
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="Linear warm-up share of steps.")
    decay_fraction: float = Field(0.2, ge=0, lt=1, description="Linear decay to 0 over this last share.")
    aux_k: int = Field(256, ge=0, description="Dead latents used by the AuxK loss (0 disables it).")
    aux_coef: float = Field(1 / 32, ge=0, description="Weight of the AuxK loss.")
    dead_tokens: int = Field(20_000, ge=1, description="Tokens without firing after which a latent is dead.")
    grad_blocks: int = Field(
        8,
        ge=1,
        description="Row blocks each batch's gradient is summed from (fewer when the batch has fewer rows); "
        "data-parallel ranks take whole blocks, so ranks beyond this number idle. Changing it changes the "
        "trained SAEs in their last bits.",
    )
    seed: int = Field(0, description="Seed for initialisation and batch order.")
    checkpoint_every: int = Field(100, ge=1, description="Steps between checkpoints.")
    device: str | None = Field(
        None,
        pattern=r"^(auto|cpu|mps|cuda(:[0-9]+)?)$",
        description="Training device: cpu, cuda:N, auto; empty: the study's analysis device (cpu outside "
        "a study).",
    )
    eval_every: int = Field(
        100,
        ge=1,
        description="Steps between validation FVU measurements (also where the convergence window starts "
        "and ends, and at the last step).",
    )
    validation_tokens: int = Field(
        8192,
        ge=0,
        description="Held-out (test-split) tokens of the validation set, spread over the store; 0: none.",
    )
    converge_tol: float = Field(
        0.01,
        gt=0,
        description="Converged: validation FVU changed by at most this fraction over the quarter of the "
        "steps before the learning rate decays.",
    )


@dataclass(frozen=True)
class DerivedInput:
    """An SAE input computed from a stored site: ``fn(x [n, d]) -> [n, d']``, run in float32 without grad.

    ``identity`` must change whenever ``fn`` would (it enters the checkpoint signature); the exported SAE's
    ``hook_site`` is ``source`` and its metadata names the derived input and its identity.
    """

    source: str
    fn: Callable[[Tensor], Tensor]
    identity: str
