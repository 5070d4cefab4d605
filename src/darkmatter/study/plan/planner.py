"""The plan of a study before any work: per enabled step, tokens, disk, FLOPs, SAE groups and passes, peak
memory and seconds, against the study's budget."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from darkmatter.config.schema import StudyConfig
from darkmatter.errors import ConfigError
from darkmatter.lm.loading import resolve_device
from darkmatter.study.budget import (
    ALLOC_SLACK,
    DEVICE_SLACK,
    GB,
    HOST_BASE,
    Budget,
    BudgetError,
    detect_budget,
)
from darkmatter.study.plan import costs
from darkmatter.study.plan.calibration import Calibration, calibrate
from darkmatter.study.plan.cost_model import Cost, Env, model_bytes
from darkmatter.study.plan.inputs import StudyInputs, study_inputs
from darkmatter.study.plan.shapes import ModelDims, model_dims


@dataclass
class StepPlan:
    """One step's estimate. Peak memory includes the process base and the model when it is resident."""

    name: str
    tokens: int
    disk_bytes: int
    flops: float
    groups: list[list[str]]
    passes: int
    peak_device_bytes: int
    peak_host_bytes: int
    seconds: float
    problem: str = ""
    """Set when the step cannot be planned within the budget (e.g. one SAE larger than the device budget)."""


@dataclass
class StudyPlan:
    """Every enabled step's plan, the totals and the budget they are held against."""

    steps: list[StepPlan]
    budget: Budget
    calibration: Calibration
    dims: ModelDims
    notes: list[str] = field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.steps)

    @property
    def peak_device_bytes(self) -> int:
        return max((s.peak_device_bytes for s in self.steps), default=0)

    @property
    def peak_host_bytes(self) -> int:
        return max((s.peak_host_bytes for s in self.steps), default=0)

    @property
    def disk_bytes(self) -> int:
        return sum(s.disk_bytes for s in self.steps)

    def step(self, name: str) -> StepPlan:
        return next(s for s in self.steps if s.name == name)

    def problems(self) -> list[str]:
        """What exceeds the budget, each naming the setting to change; empty when the study fits."""
        out = [s.problem for s in self.steps if s.problem]
        b = self.budget
        if self.steps and self.peak_host_bytes > b.host_bytes:
            worst = max(self.steps, key=lambda s: s.peak_host_bytes)
            out.append(
                f"host memory: step {worst.name} needs {_gb(worst.peak_host_bytes)} but the host budget is "
                f"{_gb(b.host_bytes)}; raise resources.host_memory_gb, or lower text.n_contexts, "
                "family.widths or the train batch sizes."
            )
        if self.steps and not b.shared and self.peak_device_bytes > b.device_bytes:
            worst = max(self.steps, key=lambda s: s.peak_device_bytes)
            out.append(
                f"device memory: step {worst.name} needs {_gb(worst.peak_device_bytes)} but the device "
                f"budget is {_gb(b.device_bytes)}; raise resources.device_memory_gb, use "
                "analysis.sae_dtype=bf16 or model.dtype=bf16, or lower the train batch sizes."
            )
        if self.disk_bytes > b.disk_bytes:
            harvest = next((s for s in self.steps if s.name == "harvest"), None)
            store = f" (the store alone {_gb(harvest.disk_bytes)})" if harvest else ""
            out.append(
                f"disk: the run writes {_gb(self.disk_bytes)}{store} but the disk budget is "
                f"{_gb(b.disk_bytes)}; raise resources.disk_gb (or free space under the run folder), lower "
                "text.n_contexts, or use harvest.dtype=bf16."
            )
        return out

    def summary(self) -> str:
        """One line: estimated time, peak memory, disk."""
        dev = "" if self.budget.shared else f", device {_gb(self.peak_device_bytes)}"
        return (
            f"plan: about {_duration(self.total_seconds)} on {self.calibration.device}; peak host memory "
            f"{_gb(self.peak_host_bytes)}{dev}; disk {_gb(self.disk_bytes)}"
        )


def _gb(n: float) -> str:
    return f"{n / GB:,.2f} GB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _judge_dims(cfg: StudyConfig, dims: ModelDims) -> ModelDims | None:
    ic = cfg.error_saes.interp
    if ic.judge != "local":
        return None
    if ic.local_model == "embedded" and cfg.model.name == "embedded":
        return dims
    try:
        return model_dims(ic.local_model)
    except Exception:  # the judge's size is a detail of one step's estimate
        return model_dims("embedded")


def _enabled(cfg: StudyConfig) -> list[tuple[str, Callable[[Env], Cost]]]:
    from darkmatter.study.steps import STEPS

    judge: list[ModelDims | None] = []

    def autointerp(env: Env) -> Cost:
        if not judge:
            judge.append(_judge_dims(cfg, env.inp.dims))
        return costs.autointerp(env, judge[0])

    models: dict[str, Callable[[Env], Cost]] = {
        "harvest": costs.harvest,
        "family": costs.family,
        "engine": costs.engine,
        "per_token": costs.per_token,
        "layer_sweep": costs.layer_sweep,
        "synthetic": costs.synthetic,
        "pursuit": costs.pursuit,
        "downstream_ce": costs.downstream_ce,
        "earlier_layers": costs.earlier_layers,
        "error_saes": costs.error_saes,
        "autointerp": autointerp,
    }
    return [(s.name, models[s.name]) for s in STEPS if s.enabled(cfg) and s.name in models]


def plan_study(
    cfg: StudyConfig,
    run_dir: Path,
    *,
    calibration: Calibration | None = None,
    steps: list[str] | None = None,
) -> StudyPlan:
    """The study's plan, from its config, the model's config file (or the planner's table) and SAE headers:
    no weights are read. ``calibration``: this machine's throughputs (default: the cached one, measured
    once when none is cached). ``steps``: plan only these (default: every enabled step)."""
    m = cfg.model
    dims = model_dims(m.name, online=m.online, trust_remote_code=m.trust_remote_code)
    inp = study_inputs(cfg, dims)
    device, absent = planned_device(cfg.analysis_device)
    if absent:
        cal = calibration or reference_gpu(run_dir)
        budget = reference_budget(cfg, device, run_dir)
        inp.notes.append(
            f"{cfg.analysis_device!r} is not available here: planned for a reference GPU ({cal.device}, "
            f"{REFERENCE_GPU_MEMORY_GB:.0f} GB, on a host of {REFERENCE_HOST_MEMORY_GB:.0f} GB with "
            f"{REFERENCE_DISK_GB:.0f} GB of disk, unless "
            "resources says otherwise)"
        )
    else:
        cal = calibration or calibrate(device, run_dir)
        budget = detect_budget(cfg.resources, device, run_dir)
    cuda = device.type == "cuda"
    model_on = planned_device(m.device)[0].type == "cuda"
    env = Env(inp, cal, budget, cuda, model_bytes(dims, m.dtype))
    plans: list[StepPlan] = []
    model_loaded = False
    for name, model in _enabled(cfg):
        if steps is not None and name not in steps:
            continue
        plans.append(_step_plan(name, model, env, inp, model_loaded, model_on))
        model_loaded = model_loaded or plans[-1].name in _MODEL_STEPS
    return StudyPlan(plans, budget, cal, dims, list(inp.notes))


_MODEL_STEPS = {"harvest", "layer_sweep", "downstream_ce", "earlier_layers", "autointerp"}


def _step_plan(
    name: str, model: Callable[[Env], Cost], env: Env, inp: StudyInputs, loaded: bool, model_on_cuda: bool
) -> StepPlan:
    try:
        c = model(env)
    except BudgetError as exc:
        return StepPlan(name, 0, 0, 0.0, [], 0, 0, 0, 0.0, problem=str(exc))
    if c.uses_model and not loaded and name != "harvest":
        c.seconds += costs.load_model_seconds(env)
    resident = loaded or c.uses_model  # the loaded model stays for the rest of the run
    loading = c.uses_model and not loaded  # weights pass through host memory on their way to a GPU
    model_host = env.model_bytes if (resident and not model_on_cuda) or loading else 0
    model_dev = env.model_bytes if c.uses_model and model_on_cuda else 0  # moved off between its steps
    host = HOST_BASE + model_host + int(c.host_bytes * ALLOC_SLACK)
    device = host if env.budget.shared else int((model_dev + c.device_bytes) * DEVICE_SLACK)
    return StepPlan(
        name=name,
        tokens=int(c.tokens),
        disk_bytes=int(c.disk_bytes),
        flops=float(c.flops),
        groups=c.groups,
        passes=int(c.passes),
        peak_device_bytes=int(device),
        peak_host_bytes=int(host),
        seconds=float(c.seconds),
    )


def check_plan(plan: StudyPlan) -> None:
    """Raise one ``BudgetError`` listing every problem of ``plan`` (nothing when it fits)."""
    problems = plan.problems()
    if problems:
        raise BudgetError("The study does not fit its budget: " + " ".join(problems))


REFERENCE_GPU = "cuda:reference (H100-class, 80 GB)"
REFERENCE_GPU_MEMORY_GB = 80.0
REFERENCE_HOST_MEMORY_GB = 128.0
REFERENCE_DISK_GB = 1000.0
REFERENCE_GPU_FP32 = 40e12
"""Dense fp32 GEMM FLOP/s of the reference GPU (no TF32), about an H100's."""
REFERENCE_GPU_FP64 = 45e12
"""fp64 GEMM FLOP/s of the reference GPU (fp64 tensor cores)."""
REFERENCE_GPU_BF16 = 400e12
"""bf16 GEMM FLOP/s of the reference GPU (dense tensor cores, below the data-sheet peak)."""


def planned_device(name: str) -> tuple[torch.device, bool]:
    """(the device a study names, whether it is absent here: a CUDA study planned on a machine without)."""
    try:
        return resolve_device(name), False
    except ConfigError:
        if name.startswith("cuda"):
            return torch.device(name), True
        raise


def reference_gpu(run_dir: Path) -> Calibration:
    """A nominal calibration for a CUDA study planned where no GPU is: the reference GPU's GEMM
    throughputs and this machine's disk (cached like a measured one)."""
    disk = calibrate(torch.device("cpu"), run_dir)
    return replace(
        disk,
        key=REFERENCE_GPU,
        device=REFERENCE_GPU,
        gemm_fp32=REFERENCE_GPU_FP32,
        gemm_fp64=REFERENCE_GPU_FP64,
        gemm_bf16=REFERENCE_GPU_BF16,
    )


def reference_budget(cfg: StudyConfig, device: torch.device, run_dir: Path) -> Budget:
    """The budget of a CUDA study planned without a GPU: the reference machine's (90% of the GPU's memory,
    80% of the host's, its disk): this machine will not run it; ``resources`` wins."""
    r = cfg.resources
    dev = int((r.device_memory_gb or 0.9 * REFERENCE_GPU_MEMORY_GB) * GB)
    host = int((r.host_memory_gb or 0.8 * REFERENCE_HOST_MEMORY_GB) * GB)
    disk = int((r.disk_gb or REFERENCE_DISK_GB) * GB)
    return Budget(device, dev, host, disk)
