"""SAE trainer and encode+decode throughput as a fraction of this machine's fp32 matmul peak.

Both the peak (a large square fp32 GEMM) and the workloads are measured in this run. FLOP accounting
per token and SAE (d = d_in, w = d_sae, k active latents):
- training step: encoder forward 2dw + encoder weight gradient 2dw + sparse decoder forward, value
  gradient and weight gradient 3 x 2kd;
- encode+decode (inference): encoder 2dw + sparse decoder 2kd.
Top-k selection, the unit-norm projection and Adam are not counted, so the fraction is conservative.

    python bench/bench_sae.py [--d 576] [--width 4096] [--k 32] [--batch 2048]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def gemm_peak(sizes: tuple[int, ...] = (2048, 3072), repeats: int = 10) -> float:
    """Best fp32 GFLOP/s of square n x n x n matmuls over a few sizes and repeats (a robust peak)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def synthetic_store(root: Path, d: int, n_contexts: int, ctx_len: int):
    from darkmatter.store import ActivationStore

    site = "blocks.0.hook_resid_post"
    identity = {
        "model": {"name": "bench"},
        "sites": [site],
        "d": {site: d},
        "dtype": "fp32",
        "ctx_len": ctx_len,
        "n_contexts": n_contexts,
        "skip_positions": 0,
        "with_loss": False,
        "shard_contexts": 16,
    }
    tokens = np.zeros((n_contexts, ctx_len), dtype=np.int32)
    store = ActivationStore.create_or_resume(root, identity, tokens)
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(4 * d, d, generator=g)
    for i in range(store.n_shards):
        a, b = store.shard_range(i)
        codes = torch.rand(b - a, ctx_len, 4 * d, generator=g).pow(8)
        store.write_shard(i, {site: (codes @ basis).contiguous()})
    return store, site


def bench_training(d: int, width: int, k: int, batch: int, steps: int) -> tuple[float, float]:
    """(tokens/s, GFLOP/s) of training steps of one SAE, data already in memory."""
    from darkmatter.sae.train import FamilyTrainer, SAESpec, TrainConfig
    from darkmatter.stats import Split

    with tempfile.TemporaryDirectory() as tmp:
        n_ctx = max(16, (steps + 2) * batch // 256 + 16)
        store, site = synthetic_store(Path(tmp) / "store", d, n_ctx, 256)
        cfg = TrainConfig(epochs=1, batch_size=batch, aux_k=0)
        spec = SAESpec(name="s", site=site, d_sae=width, k=k)
        trainer = FamilyTrainer(store, [spec], cfg, Path(tmp) / "t", split=Split(seed=0, fraction=0.8))
        trainer._init()
        batches = []
        for b in trainer.batches():
            batches.append(b)
            if len(batches) == steps + 1:
                break
        trainer._train_step(batches[0])  # warm-up
        t0 = time.perf_counter()
        for b in batches[1:]:
            trainer._train_step(b)
        dt = time.perf_counter() - t0
    tokens = batch * (len(batches) - 1)
    flops = tokens * (4 * d * width + 6 * k * d)
    return tokens / dt, flops / dt / 1e9


@torch.no_grad()
def bench_inference(d: int, width: int, k: int, batch: int, repeats: int) -> tuple[float, float]:
    """(tokens/s, GFLOP/s) of SAE.reconstruct (sparse encode + gather decode)."""
    from darkmatter.sae.model import SAE, SAEConfig

    g = torch.Generator().manual_seed(0)
    cfg = SAEConfig(d_in=d, d_sae=width, activation="topk", k=k)
    tensors = {
        "W_enc": torch.randn(d, width, generator=g) / d**0.5,
        "b_enc": torch.zeros(width),
        "W_dec": torch.randn(width, d, generator=g) / d**0.5,
        "b_dec": torch.zeros(d),
    }
    sae = SAE.from_tensors(cfg, tensors)
    x = torch.randn(batch, d, generator=g)
    sae.reconstruct(x)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        sae.reconstruct(x)
        best = min(best, time.perf_counter() - t0)
    return batch / best, batch * (2 * d * width + 2 * k * d) / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--infer-width", type=int, default=16384)
    args = ap.parse_args()
    peak = gemm_peak()
    print(
        f"fp32 GEMM peak (best of 2048^3 and 3072^3, {torch.get_num_threads()} threads): {peak:,.1f} GFLOP/s"
    )
    tps, gf = bench_training(args.d, args.width, args.k, args.batch, args.steps)
    print(
        f"train  d={args.d} w={args.width} k={args.k} batch={args.batch}: {tps:,.0f} tok/s, "
        f"{gf:,.1f} GFLOP/s = {gf / peak:.1%} of peak (target >= 40%)"
    )
    peak2 = gemm_peak()
    tps, gf = bench_inference(args.d, args.infer_width, args.k, 4096, 5)
    print(
        f"encode+decode d={args.d} w={args.infer_width} k={args.k}: {tps:,.0f} tok/s, "
        f"{gf:,.1f} GFLOP/s = {gf / max(peak, peak2):.1%} of peak"
    )


if __name__ == "__main__":
    main()
