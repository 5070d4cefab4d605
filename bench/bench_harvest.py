"""Harvest throughput against a bare forward of the same truncated model, and peak memory vs token count.

Prints ratios measured in this run (no absolute targets):
- throughput ratio = harvest tokens/s / bare tokens/s, where "bare" runs the decoder layers up to the
  harvested layer with no hooks and writes nothing (target >= 0.9);
- memory ratio = peak RSS of a harvest over 4x the tokens / peak RSS over 1x (target <= 1.10).

    python bench/bench_harvest.py [--contexts 48] [--ctx-len 256] [--layer 15]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import torch

from peak_memory import peak_rss_kb


def _load(layer: int, n_contexts: int, ctx_len: int):
    from darkmatter.lm.loading import load_lm
    from darkmatter.text import TextConfig, make_contexts

    lm = load_lm("embedded", device="cpu")
    text = TextConfig(source="austen", ctx_len=ctx_len, n_contexts=n_contexts, skip_positions=0)
    return lm, text, make_contexts(text, lm.tokenizer, lm.bos_token_id)


@torch.no_grad()
def bare_forward(lm, tokens, layer: int, batch_size: int) -> tuple[float, float]:
    """(wall, CPU) seconds to run decoder layers 0..layer over all contexts, nothing recorded."""
    base = lm.model.model
    full = base.layers
    base.layers = full[: layer + 1]
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        for a in range(0, len(tokens), batch_size):
            base(input_ids=torch.as_tensor(tokens[a : a + batch_size], dtype=torch.long), use_cache=False)
        return time.perf_counter() - t0, time.process_time() - c0
    finally:
        base.layers = full


def harvest_once(lm, text, contexts, layer: int, batch_size: int) -> tuple[float, float]:
    from darkmatter.harvest import HarvestConfig, harvest

    cfg = HarvestConfig(
        sites=[f"blocks.{layer}.hook_resid_post"], with_loss=False, batch_size=batch_size, shard_contexts=16
    )
    with tempfile.TemporaryDirectory() as d:
        t0, c0 = time.perf_counter(), time.process_time()
        harvest(lm, contexts, text, cfg, f"{d}/store")
        return time.perf_counter() - t0, time.process_time() - c0


def memory_child(n_contexts: int, ctx_len: int, layer: int) -> None:
    lm, text, contexts = _load(layer, n_contexts, ctx_len)
    harvest_once(lm, text, contexts, layer, 8)
    print(json.dumps({"maxrss_kb": peak_rss_kb()}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, default=48)
    ap.add_argument("--ctx-len", type=int, default=256)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.ctx_len, args.layer)
        return

    lm, text, contexts = _load(args.layer, args.contexts, args.ctx_len)
    n_tok = contexts.tokens.size
    bare_forward(lm, contexts.tokens[: args.batch_size], args.layer, args.batch_size)  # warm-up
    bare, harv = [], []
    for _ in range(args.repeats):  # interleave to share any drift in machine load
        bare.append(bare_forward(lm, contexts.tokens, args.layer, args.batch_size))
        harv.append(harvest_once(lm, text, contexts, args.layer, args.batch_size))
    bare_tps = n_tok / min(b[0] for b in bare)
    harv_tps = n_tok / min(h[0] for h in harv)
    cpu_ratio = min(b[1] for b in bare) / min(h[1] for h in harv)
    print(f"tokens per run: {n_tok} ({args.contexts} x {args.ctx_len}), layer {args.layer}, 1 site, fp32")
    print(f"bare forward: {bare_tps:,.0f} tok/s   harvest: {harv_tps:,.0f} tok/s (best of {args.repeats})")
    print(
        f"throughput ratio harvest/bare: wall {harv_tps / bare_tps:.3f}, CPU {cpu_ratio:.3f} (target >= 0.9)"
    )

    rss = {}
    for mult in (1, 4):
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--memory-child",
                str(args.contexts * mult),
                "--ctx-len",
                str(args.ctx_len),
                "--layer",
                str(args.layer),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rss[mult] = json.loads(proc.stdout.strip().splitlines()[-1])["maxrss_kb"] / 1024
    print(f"peak RSS: {rss[1]:,.0f} MiB at {n_tok} tokens, {rss[4]:,.0f} MiB at {4 * n_tok} tokens")
    print(f"memory ratio 4x/1x: {rss[4] / rss[1]:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
