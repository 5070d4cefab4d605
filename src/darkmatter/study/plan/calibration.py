"""What this machine does per second: GEMM throughput (fp32, fp64) on the study's device and disk bandwidth.

Measured once (a few seconds) and cached as JSON in ``cache_dir()/calibration.json``, keyed by the device's
name, the torch version and the thread count, so a planner on the same machine reads it back instantly;
``darkmatter plan --recalibrate`` measures again. The model's forward throughput is not measured (that would
need its weights): the cost models estimate it from the fp32 GEMM throughput (see ``costs``).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from darkmatter import atomic
from darkmatter.lm.loading import cache_dir

CACHE_FILE = "calibration.json"
VERSION = 3
GEMM_SECONDS = 0.4
"""Wall time each GEMM throughput is measured for (after a warm-up call)."""
DISK_BYTES = 64 * 1024**2
"""Bytes written (fsynced) and read back (page cache dropped first where the OS allows) for disk bandwidth."""


@dataclass(frozen=True)
class Calibration:
    """Throughputs of one machine: FLOP/s of fp32 and fp64 GEMMs on the device, disk bytes/s."""

    key: str
    device: str
    gemm_fp32: float
    gemm_fp64: float
    gemm_bf16: float
    """bf16 GEMMs (the model's forward in bf16 or fp16; fp16 on a CPU is assumed as fast as bf16)."""
    disk_write: float
    disk_read: float
    threads: int
    torch_version: str
    measured_seconds: float = 0.0
    created: float = 0.0

    def describe(self) -> str:
        return (
            f"{self.device}, {self.threads} threads: fp32 GEMM {self.gemm_fp32 / 1e9:,.1f} GFLOP/s, "
            f"fp64 {self.gemm_fp64 / 1e9:,.1f}, bf16 {self.gemm_bf16 / 1e9:,.1f} GFLOP/s; "
            f"disk write {self.disk_write / 1e6:,.0f} MB/s, read {self.disk_read / 1e6:,.0f} MB/s"
        )


def device_name(device: torch.device) -> str:
    """A stable name for the device: the GPU's model, or the CPU's."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    if device.type == "mps":
        return "mps"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu:{cpu}"


def calibration_key(device: torch.device) -> str:
    return f"{device_name(device)}|torch {torch.__version__}|threads {torch.get_num_threads()}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def gemm_throughput(
    device: torch.device, dtype: torch.dtype, m: int, k: int, n: int, seconds: float | None = None
) -> float:
    """FLOP/s of ``[m, k] @ [k, n]`` in ``dtype`` on ``device`` (median-free: total work over total time)."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    seconds = GEMM_SECONDS if seconds is None else seconds
    torch.matmul(a, b, out=out)  # warm-up: thread pool, kernels
    _sync(device)
    calls, t0 = 0, time.perf_counter()
    while True:
        torch.matmul(a, b, out=out)
        calls += 1
        if calls % 2 == 0:
            _sync(device)
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                return 2.0 * m * k * n * calls / elapsed


def disk_bandwidth(folder: Path, nbytes: int | None = None) -> tuple[float, float]:
    """(write, read) bytes/s of a file in ``folder`` (its nearest existing ancestor)."""
    nbytes = DISK_BYTES if nbytes is None else nbytes
    probe = Path(folder).resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    block = os.urandom(4 * 1024**2)
    blocks = max(1, nbytes // len(block))
    fd, name = tempfile.mkstemp(prefix=".darkmatter-calibration-", dir=probe)
    try:
        t0 = time.perf_counter()
        with os.fdopen(fd, "wb") as f:
            for _ in range(blocks):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        write = blocks * len(block) / max(time.perf_counter() - t0, 1e-6)
        with open(name, "rb") as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            t0 = time.perf_counter()
            while f.read(len(block)):
                pass
            read = blocks * len(block) / max(time.perf_counter() - t0, 1e-6)
    finally:
        Path(name).unlink()
    return write, read


def measure(device: torch.device, folder: Path) -> Calibration:
    """Measure this machine now (about 2 s on a CPU)."""
    t0 = time.perf_counter()
    big = device.type == "cuda"
    # square GEMMs large enough to reach the device's peak; each step's efficiency (``cost_model``) is its
    # measured share of that peak
    # (the best of three short runs: a busy moment of the machine lowers one run, not the peak)
    m, k, n = (4096, 4096, 16384) if big else (2048, 2048, 2048)
    fp32 = max(gemm_throughput(device, torch.float32, m, k, n, GEMM_SECONDS / 3) for _ in range(3))
    dm, dn = (4096, 4096) if big else (1024, 1024)
    fp64 = max(gemm_throughput(device, torch.float64, dm, dn, dm, GEMM_SECONDS / 3) for _ in range(3))
    bf16 = max(gemm_throughput(device, torch.bfloat16, m, k, n, GEMM_SECONDS / 3) for _ in range(3))
    write, read = disk_bandwidth(folder)
    return Calibration(
        key=calibration_key(device),
        device=device_name(device),
        gemm_fp32=fp32,
        gemm_fp64=fp64,
        gemm_bf16=bf16,
        disk_write=write,
        disk_read=read,
        threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        measured_seconds=time.perf_counter() - t0,
        created=time.time(),
    )


def cache_path() -> Path:
    return cache_dir() / CACHE_FILE


def cached(device: torch.device) -> Calibration | None:
    """This machine's cached calibration for ``device``, or None."""
    try:
        data = json.loads(cache_path().read_text(encoding="utf-8"))
        entry = data.get("entries", {}).get(calibration_key(device))
        if data.get("version") != VERSION or entry is None:
            return None
        return Calibration(**entry)
    except (OSError, ValueError, TypeError):
        return None


def save(cal: Calibration) -> None:
    path = cache_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != VERSION:
            data = {}
    except (OSError, ValueError):
        data = {}
    entries = dict(data.get("entries", {}))
    entries[cal.key] = asdict(cal)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, json.dumps({"version": VERSION, "entries": entries}, indent=1).encode())


def calibrate(device: torch.device, folder: Path, *, recalibrate: bool = False) -> Calibration:
    """The cached calibration of ``device``, measured (and cached) when absent or when ``recalibrate``."""
    if not recalibrate:
        found = cached(device)
        if found is not None:
            return found
    cal = measure(device, folder)
    with contextlib.suppress(OSError):  # a read-only cache: measure again next time
        save(cal)
    return cal
