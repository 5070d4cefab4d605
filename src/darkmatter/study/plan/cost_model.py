"""What the per-step cost models share: efficiencies, fixed costs, the cost record and the FLOP counts.

Seconds are FLOPs over the calibrated GEMM throughput (``Calibration.gemm_fp32`` / ``gemm_fp64``) divided
by an efficiency: the share of the GEMM peak each kind of work reaches (top-k, gathers, Python and
allocations around the GEMMs, small matmuls). Bytes on disk go at the calibrated disk bandwidth. Each
efficiency and fixed cost below was measured on the demo (2 CPU cores, `bench/bench_plan.py`) as measured
seconds against the FLOPs of the step; host memory is a measured base (the interpreter, torch,
transformers) plus what the step holds, counted from tensor shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from darkmatter.study.budget import (
    DTYPE_BYTES,
    Budget,
    BudgetError,
    sae_weight_bytes,
)
from darkmatter.study.plan.calibration import Calibration
from darkmatter.study.plan.inputs import PlannedSAE, StudyInputs
from darkmatter.study.plan.shapes import ModelDims

# --- efficiencies: achieved share of the calibrated GEMM peak (measured on the demo, 2 CPU cores) ---
E_FORWARD = 0.70
"""The model's forward pass (harvest, splices): mostly large fp32 GEMMs, plus norms, rotary, softmax."""
E_SAE_TRAIN = 0.33
"""SAE training (encoder GEMM forward and weight gradient, top-k, sparse decoder, Adam, AuxK)."""
E_SAE_ENCODE = 0.47
"""An SAE's forward on stored activations (encoder GEMM, blocked top-k, sparse decode)."""
E_MOMENTS = 0.47
"""Float64 moment updates (Gram matrices of inputs against errors) against the fp64 GEMM peak."""
E_PURSUIT = 0.35
"""Gradient pursuit: k small correlation GEMMs per token chunk, support gathers, line searches."""
E_GENERATE = 0.034
"""Token-by-token generation of the judge: batch-1 matrix-vector products, far from the GEMM peak."""

# --- fixed costs (seconds), measured ---
T_IMPORT_MODEL = 3.0
"""Building the model object and its tokenizer (beyond reading the weights off disk)."""
T_STEP = 0.5
"""Opening the store, reading results, writing JSON: every step that runs."""
T_FIGURE_STEP = 1.0
"""Small fits and bootstraps of a step's summary numbers (power law, intervals)."""
SAE_LOAD_RATE = 225e6
"""Bytes/s of loading an SAE's weights from its files onto the device (read, parse, copy; a Gemma Scope
``params.npz`` at d 2304 on the 2-core machine: 4.5 GB in about 20 s)."""
E_SPLICE_HALF_CPU = 0.31
"""The CE splices of a bf16/fp16 model on a CPU, against the bf16 GEMM peak: the spliced passes' non-GEMM
work (norms, soft-capping, the vocabulary-wide log-softmax and KL) in half precision dominates (2B stand-in,
one context per batch: 132.9 s measured). fp32 models and GPUs use E_FORWARD."""
T_SYNTHETIC_TOKEN = 1.25e-4
"""Seconds per simulated token of the synthetic simulation's grid of small fits and noise draws, which no
GEMM count captures (demo: 8.7 s measured for 2 x 20,000 tokens, 3.2 s of them GEMMs)."""


@dataclass
class Cost:
    """What one step costs (see ``StepPlan``)."""

    tokens: int = 0
    disk_bytes: int = 0
    flops: float = 0.0
    seconds: float = 0.0
    groups: list[list[str]] = field(default_factory=list)
    passes: int = 0
    device_bytes: int = 0
    host_bytes: int = 0
    """Bytes the step holds beyond the base and the resident model (added by the planner)."""
    uses_model: bool = False
    note: str = ""


@dataclass
class Env:
    """What the cost models share: the study, the machine's throughputs and the budget."""

    inp: StudyInputs
    cal: Calibration
    budget: Budget
    cuda: bool
    model_bytes: int

    def gemm32(self, flops: float, efficiency: float) -> float:
        return flops / (self.cal.gemm_fp32 * efficiency)

    def forward(self, flops: float, efficiency: float) -> float:
        """Seconds of the model's forward matmuls, in the model's precision."""
        half = self.inp.cfg.model.dtype != "fp32"
        return flops / ((self.cal.gemm_bf16 if half else self.cal.gemm_fp32) * efficiency)

    def splices(self, flops: float) -> float:
        """Seconds of the CE splices' forward passes."""
        half_cpu = self.inp.cfg.model.dtype != "fp32" and not self.cuda
        return self.forward(flops, E_SPLICE_HALF_CPU if half_cpu else E_FORWARD)

    def load_saes(self, saes: list[PlannedSAE]) -> float:
        """Seconds of loading ``saes`` from their files (each step loads what it uses)."""
        return sum(sae_weight_bytes(s.d_in, s.d_sae, 4) for s in saes) / SAE_LOAD_RATE

    def gemm64(self, flops: float, efficiency: float) -> float:
        return flops / (self.cal.gemm_fp64 * efficiency)

    def write(self, nbytes: float) -> float:
        return nbytes / self.cal.disk_write

    def read(self, nbytes: float) -> float:
        return nbytes / self.cal.disk_read

    @property
    def sae_bytes_per_value(self) -> int:
        return DTYPE_BYTES[self.inp.cfg.analysis.sae_dtype]

    @property
    def store_value_bytes(self) -> int:
        return DTYPE_BYTES[self.inp.cfg.harvest.dtype]


def model_bytes(dims: ModelDims, dtype: str) -> int:
    return dims.params() * DTYPE_BYTES[dtype]


def forward_flops(dims: ModelDims, ctx_len: int, layers: int, head: bool) -> float:
    """Forward FLOPs per token through ``layers`` decoder layers (and the unembedding)."""
    return layers * dims.layer_flops(ctx_len) + (dims.head_flops() if head else 0.0)


def load_model_seconds(env: Env) -> float:
    return T_IMPORT_MODEL + env.read(env.model_bytes)


def encode_flops(s: PlannedSAE) -> float:
    """One token through an SAE: the encoder GEMM, top-k and the sparse decoder."""
    return 2.0 * s.d_in * s.d_sae + 2.0 * s.k * s.d_in


def train_flops(s: PlannedSAE) -> float:
    """One training token of an SAE: encoder forward and weight gradient, sparse decoder both ways."""
    return 4.0 * s.d_in * s.d_sae + 6.0 * s.k * s.d_in


def train_state_bytes(s: PlannedSAE) -> int:
    """An SAE in training: fp32 weights, their gradients and Adam's two moments."""
    return 4 * sae_weight_bytes(s.d_in, s.d_sae, 4)


def budget_error(exc: BudgetError) -> str:
    return str(exc)
