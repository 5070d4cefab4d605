"""Sparse-support gradient pursuit against the dense reference, timed in the same process.

The workload is a random TopK SAE with unit-norm decoder rows and a tied encoder. Its inputs are sparse
non-negative combinations of decoder rows plus Gaussian noise. Every token's budget is its encoder L0 (k).

Each round takes fresh tokens and, at the default thread count and then at one thread, times
``gradient_pursuit`` with screened bf16 selection (the default) on ``--chunk`` tokens, optionally with
full-precision selection (``--full``), and ``pursuit_dense`` on the first ``--dense-tokens`` of them. Times
are compared per token, which both paths scale linearly in. The bench prints, per thread count, the median
and range over rounds of the dense/sparse ratio of wall-clock time and of process CPU time (all threads),
the target being >= 5x; the largest per-token relative difference of reconstructions and codes (target
<= 1e-5); how often screened selection could not prove its choice from the bf16 scores; the load average.

Per iteration, the dense reference does three ``[n, d_in] x [d_in, d_sae]`` matmuls and a dozen elementwise
passes over ``[n, d_sae]``. The sparse path does one (bf16) matmul, a block-maximum pass and work that grows
with the support, not with d_sae.

    python bench/bench_pursuit.py [--d 576] [--width 16384] [--chunk 1024] [--dense-tokens 256] [--rounds 3]

On a machine shared with other processes, wall-clock ratios move with the load; the CPU-time ratio less so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import darkmatter.sae.pursuit as pursuit
from darkmatter.sae.model import SAE, SAEConfig


def make_workload(
    d: int, width: int, k: int, tokens: int, active: int, noise: float
) -> tuple[SAE, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    D = torch.randn(width, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    b_dec = 0.1 * torch.randn(d, generator=g)
    cfg = SAEConfig(d_in=d, d_sae=width, activation="topk", k=k)
    tensors = {"W_enc": D.T.contiguous(), "b_enc": torch.zeros(width), "W_dec": D, "b_dec": b_dec}
    idx = torch.rand(tokens, width, generator=g).topk(active, dim=1).indices  # distinct atoms per token
    mags = torch.rand(tokens, active, generator=g) * 1.5 + 0.5
    x = torch.nn.functional.embedding_bag(idx, D, per_sample_weights=mags, mode="sum") + b_dec
    return SAE.from_tensors(cfg, tensors), x + noise * torch.randn(tokens, d, generator=g)


def count_unproven() -> list[tuple[int, int, int]]:
    """Wrap the screened selector to record ``(tokens, unproven, full-matmul)`` per call."""
    calls: list[tuple[int, int, int]] = []
    inner = pursuit._select_screened

    def counting(r: torch.Tensor, *args: Any) -> Any:
        best, new, unproven, full = inner(r, *args)
        calls.append((int(r.shape[0]), unproven, full))
        return best, new, unproven, full

    pursuit._select_screened = counting  # type: ignore[assignment]
    return calls


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-token ``||a - b|| / ||b||``."""
    return float(((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12)).max())


def timed(f: Callable[[], Any]) -> tuple[Any, float, float]:
    """``(f(), wall seconds, process CPU seconds)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = f()
    return out, time.perf_counter() - wall, time.process_time() - cpu


DENSE = "dense reference"


def load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--width", type=int, default=16384)
    ap.add_argument("--chunk", type=int, default=1024, help="tokens per sparse call (the default chunk_size)")
    ap.add_argument("--dense-tokens", type=int, default=256, help="of those, tokens the dense reference runs")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--active", type=int, default=32, help="decoder rows planted per token")
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--full", action="store_true", help="also time full-precision selection (screen=False)")
    args = ap.parse_args()
    default_threads = torch.get_num_threads()
    thread_counts = [default_threads] + ([1] if default_threads > 1 else [])
    sae, x = make_workload(args.d, args.width, args.k, args.rounds * args.chunk, args.active, args.noise)
    budget = sae.encode_sparse(x).l0()
    steps, nd = int(budget.max()), min(args.dense_tokens, args.chunk)
    print(f"d_in={args.d} d_sae={args.width} TopK k={args.k}, {args.active} planted rows, noise {args.noise}")
    print(f"{args.rounds} rounds of {args.chunk} tokens (dense reference: {nd}), {steps} iterations each")
    print(f"threads {thread_counts}; at start: {load()}")
    pursuit.gradient_pursuit(sae, x[:64], budget=budget[:64].clamp_max(2))  # warm-up
    pursuit.pursuit_dense(sae, x[:64], budget=budget[:64].clamp_max(2))
    calls = count_unproven()
    paths: dict[str, Callable[[torch.Tensor, torch.Tensor], Any]] = {
        "sparse, screened": lambda xs, bs: pursuit.pursuit_reconstruct(sae, xs, budget=bs),
        "sparse, full matmul": lambda xs, bs: pursuit.pursuit_reconstruct(sae, xs, budget=bs, screen=False),
        DENSE: lambda xs, bs: pursuit.pursuit_dense(sae, xs, budget=bs),
    }
    if not args.full:
        del paths["sparse, full matmul"]
    seconds: dict[tuple[int, str], list[tuple[float, float]]] = {}  # per token: (wall, CPU) per round
    diffs: dict[str, list[tuple[float, float]]] = {name: [] for name in paths if name != DENSE}
    for rnd in range(args.rounds):
        span = slice(rnd * args.chunk, (rnd + 1) * args.chunk)
        for threads in thread_counts:
            torch.set_num_threads(threads)
            outputs: dict[str, Any] = {}
            for name, path in paths.items():
                n = nd if name == DENSE else args.chunk
                outputs[name], wall, cpu = timed(lambda: path(x[span][:n], budget[span][:n]))  # noqa: B023
                seconds.setdefault((threads, name), []).append((wall / n, cpu / n))
            dense = outputs.pop(DENSE)
            for name, (x_hat, codes) in outputs.items():
                dx, dc = rel(x_hat[:nd], sae.decode(dense)), rel(codes.to_dense(args.width)[:nd], dense)
                diffs[name].append((dx, dc))
        print(f"  round {rnd + 1}/{args.rounds} done; {load()}", flush=True)
    torch.set_num_threads(default_threads)
    for threads in thread_counts:
        for name in diffs:
            pairs = zip(seconds[(threads, DENSE)], seconds[(threads, name)], strict=True)
            walls, cpus = zip(*[(dw / sw, dc / sc) for (dw, dc), (sw, sc) in pairs], strict=True)
            ms = 1e3 * statistics.median(t[0] for t in seconds[(threads, name)]) * args.chunk / steps
            print(
                f"{threads} thread(s), {name}: dense/sparse wall {statistics.median(walls):.2f}x "
                f"({min(walls):.2f}-{max(walls):.2f}), CPU time {statistics.median(cpus):.2f}x "
                f"({min(cpus):.2f}-{max(cpus):.2f}) (target >= 5x); {ms:.0f} ms per iteration"
            )
    for name, d in diffs.items():
        dx, dc = max(v[0] for v in d), max(v[1] for v in d)
        print(f"{name}: max rel diff vs dense: x_hat {dx:.1e}, codes {dc:.1e} (target <= 1e-5)")
    seen, unproven, full = (sum(c[i] for c in calls) for i in range(3))
    print(
        f"screened selection: {unproven}/{seen} token-iterations not proven by their candidates, "
        f"{full} of them settled by a full-precision matmul"
    )
    xs, bs = x[: args.chunk], budget[: args.chunk]
    encoder, pursued = sae.reconstruct(xs)[0], pursuit.pursuit_reconstruct(sae, xs, budget=bs)[0]
    print(f"FVU on {args.chunk} tokens: SAE encoder {fvu(encoder, xs):.4f}, pursuit {fvu(pursued, xs):.4f}")
    print(f"at end: {load()}")


def fvu(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


if __name__ == "__main__":
    main()
