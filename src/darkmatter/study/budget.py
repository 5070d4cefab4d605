"""Memory and disk budgets, what one SAE costs in each step, and SAEs grouped to fit.

The budget comes from ``resources`` (or is detected: 90% of the accelerator's memory, 80% of the host
memory available at start, the free disk under the run folder). A step that handles several SAEs asks
`group_saes` for groups whose summed cost fits what is left of the budget after its fixed part (the model,
batches); each group is one pass over the store, its SAEs loaded lazily and released after.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from darkmatter.config.schema import ResourcesConfig
from darkmatter.errors import ConfigError

GB = 1e9
F64 = 8

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

HOST_BASE = 700 * 1024**2
"""Resident bytes of the process before any step: Python, torch, transformers, the package."""
ALLOC_SLACK = 1.3
"""Host: allocator overhead and short-lived temporaries over the counted tensors."""
DEVICE_SLACK = 1.1
"""GPU: the caching allocator's fragmentation over the counted tensors."""


class BudgetError(ConfigError):
    """A study (or one SAE) does not fit the memory or disk budget."""


@dataclass(frozen=True)
class Budget:
    """Bytes a study may use: on the compute device, on the host, on disk under the run folder.

    On a CPU device the device and host budgets are the same memory: `device_bytes` equals `host_bytes`.
    """

    device: torch.device
    device_bytes: int
    host_bytes: int
    disk_bytes: int

    @property
    def shared(self) -> bool:
        """Device memory is host memory (cpu, mps)."""
        return self.device.type != "cuda"


def host_available_bytes() -> int:
    """Memory available to new allocations now (Linux MemAvailable; total memory elsewhere)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * 1024**3


def device_total_bytes(device: torch.device) -> int | None:
    """Total memory of a CUDA device (None for cpu/mps: they use host memory)."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).total_memory)


def detect_budget(resources: ResourcesConfig, device: torch.device, run_dir: Path) -> Budget:
    """The study's budget: the configured numbers, else what this machine has."""
    host = (
        int(resources.host_memory_gb * GB)
        if resources.host_memory_gb is not None
        else int(0.8 * host_available_bytes())
    )
    if resources.device_memory_gb is not None:
        dev = int(resources.device_memory_gb * GB)
    else:
        total = device_total_bytes(device)
        dev = host if total is None else int(0.9 * total)
    if device.type != "cuda":
        dev = min(dev, host)  # the device's memory is the host's
    if resources.disk_gb is not None:
        disk = int(resources.disk_gb * GB)
    else:
        probe = Path(run_dir).resolve()
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        disk = int(shutil.disk_usage(probe).free)
    return Budget(device, dev, host, disk)


def sae_weight_bytes(d_in: int, d_sae: int, dtype_bytes: int = 4) -> int:
    """Weights of one SAE: encoder and decoder matrices, biases and a threshold."""
    return (2 * d_in * d_sae + 2 * d_sae + d_in) * dtype_bytes


def engine_sae_bytes(
    d_in: int, d_sae: int, *, dtype_bytes: int = 4, blocks: int = 1, chunk_tokens: int = 1024
) -> int:
    """Device bytes one SAE holds during an engine pass: its weights, its share of the float64 moments
    (x against e, ‖e‖ and ‖e‖², both splits, per jackknife block; pass 1 is the larger pass) and its
    encoder's pre-activation chunk."""
    moments = 2 * blocks * d_in * (d_in + 2) * F64 + 2 * blocks * (3 * (d_in + 2)) * F64
    preact = chunk_tokens * d_sae * 4 * 2  # pre-activations and the top-k scratch
    return sae_weight_bytes(d_in, d_sae, dtype_bytes) + moments + preact


def sae_cost(d_in: int, d_sae: int, *, dtype_bytes: int, blocks: int, copies: int = 1) -> int:
    """What a step holds per SAE: `engine_sae_bytes`, with ``copies`` sets of moments and scratch sharing
    one copy of the weights (pursuit runs each SAE and its pursuit twin)."""
    weights = sae_weight_bytes(d_in, d_sae, dtype_bytes)
    return (
        copies * (engine_sae_bytes(d_in, d_sae, dtype_bytes=dtype_bytes, blocks=blocks) - weights) + weights
    )


def sae_capacity(budget: Budget, *, model_bytes: int, fixed: int, sae_memory_gb: float | None) -> int:
    """Device bytes a step may give its SAEs: ``resources.sae_memory_gb`` when set; else on a GPU the budget
    (less the caching allocator's slack) less the step's ``fixed`` part (the model included when the step
    runs it); on a CPU the budget less the process base, the resident model and the allocator's slack."""
    if sae_memory_gb is not None:
        return int(sae_memory_gb * GB)
    if budget.device.type == "cuda":
        return int(budget.device_bytes / DEVICE_SLACK) - fixed
    return int((budget.device_bytes - HOST_BASE - model_bytes) / ALLOC_SLACK) - fixed


def group_saes(
    costs: Mapping[str, int], capacity: int, *, what: str, setting: str = "resources.device_memory_gb"
) -> list[list[str]]:
    """SAEs in groups (in the given order) whose summed cost fits ``capacity`` bytes.

    One SAE that alone exceeds it stops the study with an error naming the SAE, both sizes and the setting
    to change.
    """
    groups: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, cost in costs.items():
        if cost > capacity:
            raise BudgetError(
                f"{what}: SAE {name!r} needs {cost / GB:.2f} GB but only {max(capacity, 0) / GB:.2f} GB "
                f"of the budget is left for SAEs; raise {setting}, use analysis.sae_dtype=bf16, or leave "
                "the SAE out."
            )
        if current and used + cost > capacity:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += cost
    if current:
        groups.append(current)
    return groups


def describe_groups(groups: Sequence[Sequence[str]]) -> str:
    """``3 groups (4, 4, 2 SAEs)``."""
    sizes = ", ".join(str(len(g)) for g in groups)
    return f"{len(groups)} group{'s' if len(groups) != 1 else ''} ({sizes} SAEs)"
