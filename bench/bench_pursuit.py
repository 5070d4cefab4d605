"""Sparse-support gradient pursuit against the dense reference, timed in the same process.

The workload is a random TopK SAE with unit-norm decoder rows and a tied encoder. Its inputs are sparse
non-negative combinations of decoder rows plus Gaussian noise. Every token's budget is its encoder L0 (k).
The bench prints, relative to ``pursuit_dense`` (run on the first ``--dense-tokens`` tokens to keep the
bench near a minute). Times are compared per token, which both paths scale linearly in, and the three paths
alternate chunk by chunk so that load from other processes affects all of them alike:
- the largest per-token relative difference of the reconstructions and the codes (target <= 1e-5);
- the speed ratio of ``gradient_pursuit`` with screened bf16 selection (default) and with full-precision
  selection (target >= 5x);
- how often screened selection fell back to the full-precision matmul.
Per iteration, the dense reference does three ``[n, d_in] x [d_in, d_sae]`` matmuls. The sparse path does one
(bf16 when screened) plus work that grows with the support, not with d_sae.

    python bench/bench_pursuit.py [--d 576] [--width 16384] [--tokens 2048] [--k 32] [--threads 1]

On a shared machine, many small kernels suffer more than a few large ones when other processes compete for
the cores (each parallel region waits for a descheduled thread); ``--threads 1`` gives steadier ratios.
"""

from __future__ import annotations

import argparse
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


def count_fallbacks() -> list[tuple[int, int]]:
    """Wrap the screened selector to record ``(tokens, fallbacks)`` per call."""
    calls: list[tuple[int, int]] = []
    inner = pursuit._select_screened

    def counting(r: torch.Tensor, *args: Any) -> Any:
        best, new, fallbacks = inner(r, *args)
        calls.append((int(r.shape[0]), fallbacks))
        return best, new, fallbacks

    pursuit._select_screened = counting  # type: ignore[assignment]
    return calls


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-token ``||a - b|| / ||b||``."""
    return float(((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12)).max())


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--width", type=int, default=16384)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dense-tokens", type=int, default=1024, help="tokens also run by the dense reference")
    ap.add_argument("--chunk", type=int, default=1024, help="tokens per timed call; the paths alternate")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--active", type=int, default=32, help="decoder rows planted per token")
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sae, x = make_workload(args.d, args.width, args.k, args.tokens, args.active, args.noise)
    sae, x = sae.to(args.device), x.to(args.device)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    budget = sae.encode_sparse(x).l0()
    steps, nd = int(budget.max()), min(args.dense_tokens, args.tokens)
    print(
        f"d_in={args.d} d_sae={args.width} tokens={args.tokens} (dense: first {nd}) TopK k={args.k}, "
        f"{args.active} planted rows + noise {args.noise}; {torch.get_num_threads()} threads, {args.device}; "
        f"{steps} iterations"
    )
    pursuit.gradient_pursuit(sae, x[:64], budget=budget[:64].clamp_max(2))  # warm-up
    pursuit.pursuit_dense(sae, x[:64], budget=budget[:64].clamp_max(2))
    calls = count_fallbacks()
    paths: dict[str, Callable[[torch.Tensor, torch.Tensor], Any]] = {
        "sparse, screened": lambda xs, bs: pursuit.pursuit_reconstruct(sae, xs, budget=bs),
        "sparse, full matmul": lambda xs, bs: pursuit.pursuit_reconstruct(sae, xs, budget=bs, screen=False),
        "dense reference": lambda xs, bs: pursuit.pursuit_dense(sae, xs, budget=bs),
    }
    seconds = dict.fromkeys(paths, 0.0)
    chunks = dict.fromkeys(paths, 0)
    outputs: dict[str, list[Any]] = {name: [] for name in paths}
    # The paths alternate chunk by chunk, so that load from other processes falls on all of them alike.
    for i in range(0, args.tokens, args.chunk):
        xs, bs = x[i : i + args.chunk], budget[i : i + args.chunk]
        for name, path in paths.items():
            if name == "dense reference" and i >= nd:
                continue
            t0 = time.perf_counter()
            outputs[name].append(path(xs, bs))
            sync()
            seconds[name] += time.perf_counter() - t0
            chunks[name] += 1
    ms = {name: 1e3 * seconds[name] / chunks[name] / steps for name in paths}  # per iteration of one chunk
    dense = torch.cat(outputs.pop("dense reference"))
    x_dense = sae.decode(dense)
    print(f"{'dense reference':20s} {ms['dense reference']:8.1f} ms per iteration of {args.chunk} tokens")
    for name, parts in outputs.items():
        x_hat = torch.cat([part[0] for part in parts])
        codes = torch.cat([part[1].to_dense(args.width) for part in parts])[:nd].float()
        ratio = ms["dense reference"] / ms[name]
        dx, dc = rel(x_hat[:nd], x_dense), rel(codes, dense)
        print(
            f"{name:20s} {ms[name]:8.1f} ms  speed-up {ratio:5.2f}x (target >= 5x)  "
            f"max rel diff: x_hat {dx:.1e}, codes {dc:.1e} (target <= 1e-5)"
        )
    fell, seen = sum(f for _, f in calls), sum(n for n, _ in calls)
    print(f"screened selection fell back to full precision for {fell}/{seen} token-iterations")
    fvu = lambda xh: float((x - xh).pow(2).sum() / (x - x.mean(0)).pow(2).sum())  # noqa: E731
    print(f"FVU: SAE encoder {fvu(sae.reconstruct(x)[0]):.4f}, pursuit {fvu(x_hat):.4f} (full matmul)")


if __name__ == "__main__":
    main()
