"""Streaming moments vs materialise-and-lstsq for linear error prediction; prints ratios only.

Synthetic stand-in for the paper's E1 regression: TOKENS activations x [d] (float32, every 8th column at mean
100 and scale 10, neighbouring columns correlated) and 4 "SAE error" target sets y_k [d], each a linear
plus a nonlinear function of x plus noise. Tokens are split train/test by `is_train` (80 % train).

Variants, each in its own subprocess so its peak RSS (VmHWM) is its own:
  generate   only generates the chunks: the shared cost and the base RSS (torch + one chunk)
  streaming  one Moments per split (one Gram, 4 target blocks), fit_ridge_many, evaluate: float64 GEMMs
  stream-f32 the same with float32 chunk GEMMs (private knob, measured to justify not exposing it)
  lstsq      materialise every row in float64, then torch.linalg.lstsq per target set on [x, 1] (train)
             and explicit residuals on the test rows: what the original code did, on CPU

Run: python bench/bench_moments.py [--tokens 200000 --d 576 --targets 4 --chunk 8192]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from peak_memory import peak_rss_kb

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from darkmatter.stats import Moments, evaluate, fit_ridge_many, is_train

SEED = 0
CTX_LEN = 1024


def make_chunk(i: int, args: argparse.Namespace) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Chunk i: x [c, d] float32, targets [c, d] float32 each, train mask [c]; deterministic in i."""
    start = i * args.chunk
    c = min(args.chunk, args.tokens - start)
    d = args.d
    g = torch.Generator().manual_seed(SEED * 1_000_003 + i)
    z = torch.randn(c, d, generator=g)
    x = z + 0.5 * torch.roll(z, 1, dims=1)
    x[:, ::8] = x[:, ::8] * 10 + 100
    ys = []
    for k in range(args.targets):
        gk = torch.Generator().manual_seed(10_000 + k)  # the same maps in every chunk
        perm_lin, perm_nl = torch.randperm(d, generator=gk), torch.randperm(d, generator=gk)
        coef = torch.randn(d, generator=gk) * 0.5
        ys.append(coef * x[:, perm_lin] + torch.tanh(x[:, perm_nl]) + 0.3 * torch.randn(c, d, generator=g))
    t = torch.arange(start, start + c)
    return x, ys, is_train(t // CTX_LEN, t % CTX_LEN, seed=SEED, train_fraction=0.8)


def n_chunks(args: argparse.Namespace) -> int:
    return -(-args.tokens // args.chunk)


def run_generate(args: argparse.Namespace) -> dict[str, float]:
    for i in range(n_chunks(args)):
        make_chunk(i, args)
    return {}


def run_streaming(args: argparse.Namespace, gemm_dtype: torch.dtype) -> dict[str, float]:
    names = [f"sae{k}" for k in range(args.targets)]
    train = Moments(args.d, dict.fromkeys(names, args.d))
    test = Moments(args.d, dict.fromkeys(names, args.d))
    train._gemm_dtype = test._gemm_dtype = gemm_dtype  # measurement only; not a public option
    for i in range(n_chunks(args)):
        x, ys, mask = make_chunk(i, args)
        train.update(x[mask], {n: y[mask] for n, y in zip(names, ys, strict=True)})
        test.update(x[~mask], {n: y[~mask] for n, y in zip(names, ys, strict=True)})
    fits = fit_ridge_many(train)
    return {n: evaluate(fits[n], test, n).r2_mean_over_dims for n in names}


def run_lstsq(args: argparse.Namespace) -> dict[str, float]:
    x_all = torch.empty(args.tokens, args.d, dtype=torch.float64)
    ys_all = [torch.empty(args.tokens, args.d, dtype=torch.float64) for _ in range(args.targets)]
    mask_all = torch.empty(args.tokens, dtype=torch.bool)
    for i in range(n_chunks(args)):
        x, ys, mask = make_chunk(i, args)
        s = slice(i * args.chunk, i * args.chunk + x.shape[0])
        x_all[s], mask_all[s] = x, mask
        for y_all, y in zip(ys_all, ys, strict=True):
            y_all[s] = y
    ones = torch.ones(args.tokens, 1, dtype=torch.float64)
    x_tr = torch.cat([x_all[mask_all], ones[mask_all]], 1)
    x_te = torch.cat([x_all[~mask_all], ones[~mask_all]], 1)
    out = {}
    for k, y_all in enumerate(ys_all):
        sol = torch.linalg.lstsq(x_tr, y_all[mask_all]).solution
        y_te = y_all[~mask_all]
        ss_res = ((y_te - x_te @ sol) ** 2).sum(0)
        ss_tot = ((y_te - y_te.mean(0)) ** 2).sum(0)
        out[f"sae{k}"] = float((1 - ss_res / ss_tot).mean())
    return out


def child(args: argparse.Namespace) -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    if args.variant == "generate":
        r2 = run_generate(args)
    elif args.variant == "streaming":
        r2 = run_streaming(args, torch.float64)
    elif args.variant == "stream-f32":
        r2 = run_streaming(args, torch.float32)
    else:
        r2 = run_lstsq(args)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    rss_kb = peak_rss_kb()
    print(json.dumps({"seconds": seconds, "cpu": cpu, "rss_kb": rss_kb, "r2": r2}))


def measure(variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens), "--d", str(args.d)]
    cmd += ["--targets", str(args.targets), "--chunk", str(args.chunk)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--targets", type=int, default=4)
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument(
        "--variant", choices=["generate", "streaming", "stream-f32", "lstsq"], help=argparse.SUPPRESS
    )
    args = p.parse_args()
    if args.variant:
        child(args)
        return
    print(
        f"bench_moments: {args.tokens} tokens x d {args.d}, {args.targets} target sets of d {args.d} "
        f"sharing one Gram, chunks of {args.chunk}, {torch.get_num_threads()} threads"
    )
    res = {v: measure(v, args) for v in ("generate", "streaming", "stream-f32", "lstsq")}
    gen, st, f32, ls = res["generate"], res["streaming"], res["stream-f32"], res["lstsq"]
    names = sorted(st["r2"])
    d_ls = max(abs(st["r2"][n] - ls["r2"][n]) for n in names)
    d_f32 = max(abs(f32["r2"][n] - st["r2"][n]) for n in names)

    def ratio(key: str, a: dict, b: dict, minus: dict | None = None) -> str:
        sub = minus[key] if minus else 0.0
        return f"{(a[key] - sub) / max(b[key] - sub, 1e-9):7.2f}x"

    def row(label: str, *cells: str) -> None:
        print(f"{label:<51}" + "  ".join(cells))

    row("ratio", "   wall", "    CPU (process time: robust to other load)")
    row("time   lstsq / streaming", ratio("seconds", ls, st), ratio("cpu", ls, st))
    row(
        "time   lstsq / streaming, generation excluded",
        ratio("seconds", ls, st, gen),
        ratio("cpu", ls, st, gen),
    )
    row(
        "time   f64 / f32 chunk GEMMs, generation excluded",
        ratio("seconds", st, f32, gen),
        ratio("cpu", st, f32, gen),
    )
    row("memory lstsq / streaming, peak RSS", ratio("rss_kb", ls, st))
    row("memory lstsq / streaming, peak RSS above base", ratio("rss_kb", ls, st, gen))
    print(
        f"agreement: max |R2_mean_over_dims streaming - lstsq| = {d_ls:.1e} (R2 ~ {st['r2'][names[0]]:.3f})"
    )
    print(f"agreement: max |R2_mean_over_dims f32 GEMM - f64 GEMM| = {d_f32:.1e}")


if __name__ == "__main__":
    main()
