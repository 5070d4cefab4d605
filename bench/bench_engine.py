"""The streaming engine against the original approach on the same data, in the same run.

Original approach (the paper's ``sae_power_laws.py``, per SAE): load every activation, materialise the
SAE's error matrix, ``torch.linalg.lstsq`` of the error vectors on the train rows (float32, bias column) with
FVU_nonlinear from explicit residuals, then a second ``lstsq`` of the squared error norms on the same rows.
Engine: ``decompose(..., second_pass=False)``: one streaming pass, float64 moments, Cholesky solves; it gives
both numbers (and more). Both use the same SAEs and the same train/test split. Each variant runs in its own
subprocess so its peak RSS (VmHWM) is its own. Prints the differences in FVU_nonlinear and norm R², the
speed ratios (also against the vector regression alone) and the peak-memory ratios.

    python bench/bench_engine.py [--tokens 200000] [--d 576] [--widths 512 1024 2048 4096] [--k 32]
        [--rounds 3] [--sparse-original] [--skip-comparison] [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peak_memory import peak_rss_kb

SITE = "blocks.0.hook_resid_post"


def make_store(root: Path, tokens: int, d: int) -> None:
    from darkmatter.store import ActivationStore

    ctx_len, shard = 256, 16
    n_ctx = tokens // ctx_len
    identity = {
        "model": {"name": "bench"},
        "sites": [SITE],
        "d": {SITE: d},
        "dtype": "fp32",
        "ctx_len": ctx_len,
        "n_contexts": n_ctx,
        "skip_positions": 0,
        "with_loss": False,
        "shard_contexts": shard,
    }
    store = ActivationStore.create_or_resume(root, identity, np.zeros((n_ctx, ctx_len), dtype=np.int32))
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(2 * d, d, generator=g) / d**0.5
    for i in range(store.n_shards):
        a, b = store.shard_range(i)
        codes = torch.rand(b - a, ctx_len, 2 * d, generator=g).pow(6) * 4
        store.write_shard(
            i, {SITE: (codes @ basis + 0.1 * torch.randn(b - a, ctx_len, d, generator=g)).contiguous()}
        )


def make_saes(widths: list[int], d: int, k: int) -> dict:
    from darkmatter.sae.model import SAE, SAEConfig

    saes = {}
    for i, width in enumerate(widths):
        g = torch.Generator().manual_seed(100 + i)
        w_dec = torch.randn(width, d, generator=g)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        cfg = SAEConfig(d_in=d, d_sae=width, activation="topk", k=k, hook_site=SITE)
        tensors = {
            "W_enc": w_dec.T.contiguous() * 0.5,
            "b_enc": torch.zeros(width),
            "W_dec": w_dec,
            "b_dec": torch.zeros(d),
        }
        saes[f"w{width}"] = SAE.from_tensors(cfg, tensors)
    return saes


def run_engine(store_dir: str, args: argparse.Namespace) -> dict:
    from darkmatter.experiments.decomposition import decompose
    from darkmatter.stats.split import Split
    from darkmatter.store import ActivationStore

    store = ActivationStore.open(store_dir)
    saes = make_saes(args.widths, args.d, args.k)
    inputs_kb = peak_rss_kb()  # the SAEs and the open store: the inputs both approaches share
    t0 = time.perf_counter()
    dec = decompose(store, saes, split=Split(0, 0.8), second_pass=False)
    return {
        "seconds": time.perf_counter() - t0,
        "inputs_kb": inputs_kb,
        "fvu_nonlinear": {n: s.fvu_nonlinear for n, s in dec.stats.items()},
        "norm_r2": {n: s.norm_r2 for n, s in dec.stats.items()},
    }


def _dense_topk_forward(sae: Any, x: torch.Tensor) -> torch.Tensor:
    """A TopK SAE's forward as the original scripts and the common SAE libraries compute it: dense
    pre-activations, ``torch.topk``, a dense code matrix, a dense decoder GEMM."""
    pre = (x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x) @ sae.W_enc + sae.b_enc
    values, indices = pre.topk(sae.cfg.k, dim=-1)
    codes = torch.zeros_like(pre).scatter_(-1, indices, values.relu())
    return codes @ sae.W_dec + sae.b_dec


def run_original(store_dir: str, args: argparse.Namespace, *, dense: bool = True) -> dict:
    """``dense``: codes and reconstruction as the original scripts computed them (``f = sae.encode(acts)``,
    ``rec = sae.decode(f)`` with ``torch.topk``: a dense [tokens, d_sae] code matrix and a dense decoder
    GEMM); otherwise this library's sparse encode and gather decode, so only the regression differs."""
    from darkmatter.stats.split import is_train
    from darkmatter.store import ActivationStore

    store = ActivationStore.open(store_dir)
    saes = make_saes(args.widths, args.d, args.k)
    inputs_kb = peak_rss_kb()  # the SAEs and the open store: the inputs both approaches share
    t0 = time.perf_counter()
    rows = list(store.iter_batches([SITE], batch_tokens=1 << 30))
    x = torch.cat([b.acts[SITE] for b in rows])
    train = torch.cat([is_train(b.context, b.position, 0, 0.8) for b in rows])
    del rows
    xt = torch.cat([x, torch.ones(len(x), 1)], 1)
    out, norm_r2, norm_seconds = {}, {}, 0.0
    for name, sae in saes.items():
        err = torch.empty_like(x)  # materialised [N, d] error matrix, as the original scripts stored
        with torch.no_grad():
            for a in range(0, len(x), 4096):
                xb = x[a : a + 4096]
                err[a : a + 4096] = xb - (_dense_topk_forward(sae, xb) if dense else sae(xb))
        sol = torch.linalg.lstsq(xt[train], err[train], rcond=1e-9).solution  # the paper's rcond
        res = err[~train] - xt[~train] @ sol
        xs = x[~train].double()
        out[name] = float(res.double().pow(2).sum() / (xs - xs.mean(0)).pow(2).sum())
        del sol, res
        # The error-norm regression, a second lstsq on the same rows (sae_power_laws.py runs both).
        t1 = time.perf_counter()
        sq = err.pow(2).sum(1, keepdim=True)
        del err
        sol = torch.linalg.lstsq(xt[train], sq[train], rcond=1e-9).solution
        y = sq[~train].double()
        res_sq = (y - xt[~train].double() @ sol.double()).pow(2).sum()
        norm_r2[name] = float(1 - res_sq / (y - y.mean()).pow(2).sum())
        norm_seconds += time.perf_counter() - t1
    return {
        "seconds": time.perf_counter() - t0,
        "inputs_kb": inputs_kb,
        "norm_seconds": norm_seconds,
        "fvu_nonlinear": out,
        "norm_r2": norm_r2,
    }


def run_engine_full(store_dir: str, args: argparse.Namespace) -> dict:
    """Both passes with the per-token table: what ``darkmatter run`` does."""
    from darkmatter.experiments.decomposition import decompose
    from darkmatter.stats.split import Split
    from darkmatter.store import ActivationStore

    store = ActivationStore.open(store_dir)
    saes = make_saes(args.widths, args.d, args.k)
    inputs_kb = peak_rss_kb()  # the SAEs and the open store: the inputs both approaches share
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        decompose(store, saes, split=Split(0, 0.8), table_path=Path(tmp) / "tokens.parquet")
    return {"seconds": time.perf_counter() - t0, "inputs_kb": inputs_kb, "fvu_nonlinear": {}}


def child(kind: str, store_dir: str, args: argparse.Namespace) -> None:
    import darkmatter.experiments.decomposition  # noqa: F401  (imports counted in the base RSS)

    base = peak_rss_kb()
    runner = {
        "engine": run_engine,
        "original": run_original,
        "original_sparse": lambda d, a: run_original(d, a, dense=False),
        "engine_full": run_engine_full,
    }[kind]
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    res = runner(store_dir, args)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    res["cpu_seconds"] = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    res["peak_kb"] = peak_rss_kb()
    res["base_kb"] = base
    print(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument(
        "--widths", type=int, nargs="+", default=[512, 1024, 2048, 4096], help="The demo's sweep."
    )
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--child", default="")
    ap.add_argument("--store", default="")
    ap.add_argument("--rounds", type=int, default=3, help="Alternating original/engine runs.")
    ap.add_argument(
        "--sparse-original", action="store_true", help="Also time the original regression with sparse SAEs."
    )
    ap.add_argument("--skip-comparison", action="store_true", help="Only the memory-scaling part.")
    ap.add_argument(
        "--skip-memory", action="store_true", help="Only the comparison with the original approach."
    )
    args = ap.parse_args()
    if args.child:
        child(args.child, args.store, args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        make_store(Path(tmp) / "store", args.tokens, args.d)
        make_store(Path(tmp) / "small", args.tokens // 10, args.d)

        def launch(kind: str, store: str) -> dict:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                kind,
                "--store",
                str(Path(tmp) / store),
                "--tokens",
                str(args.tokens),
                "--d",
                str(args.d),
                "--widths",
                *map(str, args.widths),
                "--k",
                str(args.k),
            ]
            out = (
                subprocess.run(cmd, capture_output=True, text=True, check=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            return json.loads(out)

        print(f"{args.tokens} tokens x d {args.d}, TopK SAEs of widths {args.widths}, k={args.k}")
        if not args.skip_comparison:
            # Rounds alternate original and engine, so drift in the machine's speed hits both alike.
            rounds = [(launch("original", "store"), launch("engine", "store")) for _ in range(args.rounds)]
            speed = [o["seconds"] / e["seconds"] for o, e in rounds]
            cpu = [o["cpu_seconds"] / e["cpu_seconds"] for o, e in rounds]
            vector_only = [(o["seconds"] - o["norm_seconds"]) / e["seconds"] for o, e in rounds]

            def max_diff(key: str) -> float:
                return max(abs(o[key][n] - e[key][n]) for o, e in rounds for n in o[key])

            o, e = rounds[0]
            print(f"FVU_nonlinear: engine {[round(v, 6) for v in e['fvu_nonlinear'].values()]}")
            fvu_diff = max_diff("fvu_nonlinear")
            print(f"max |FVU_nonlinear engine - original| = {fvu_diff:.2e}  (target <= 1e-5)")
            print(f"norm R²: engine {[round(v, 6) for v in e['norm_r2'].values()]}")
            print(f"max |norm R² engine - original| = {max_diff('norm_r2'):.2e}")
            for i, (o, e) in enumerate(rounds):
                print(
                    f"round {i + 1}: original {o['seconds']:.1f}s (norm lstsq {o['norm_seconds']:.1f}s), "
                    f"engine {e['seconds']:.1f}s, speed-up {speed[i]:.2f}x, CPU-time ratio {cpu[i]:.2f}x, "
                    f"against the vector regression alone {vector_only[i]:.2f}x"
                )
            print(
                f"speed-up: median {statistics.median(speed):.2f}x, min {min(speed):.2f}x over {len(speed)} "
                f"rounds (target >= 2x); CPU-time ratio median {statistics.median(cpu):.2f}x; against the "
                f"original's vector regression alone median {statistics.median(vector_only):.2f}x"
            )
            if args.sparse_original:
                osp = launch("original_sparse", "store")
                print(
                    "time: original regression with this library's sparse SAE forward "
                    f"{osp['seconds']:.1f}s, speed-up {osp['seconds'] / e['seconds']:.2f}x "
                    "(the regression alone differs)"
                )

            def mib(key: str, runs: list[dict]) -> float:
                return statistics.median(r[key] for r in runs) / 1024

            orig, eng = [o for o, _ in rounds], [e for _, e in rounds]
            po, pe = mib("peak_kb", orig), mib("peak_kb", eng)
            bo, be = po - mib("base_kb", orig), pe - mib("base_kb", eng)
            io, ie = po - mib("inputs_kb", orig), pe - mib("inputs_kb", eng)
            print(
                f"peak RSS (median): original {po:,.0f} MiB, engine {pe:,.0f} MiB, ratio {po / pe:.1f}x in "
                f"total; above the post-import base (interpreter, torch): {bo:,.0f} vs {be:,.0f} MiB, ratio "
                f"{bo / max(be, 1):.1f}x (target >= 10x); above the loaded inputs (SAEs, open store): "
                f"{io:,.0f} vs {ie:,.0f} MiB, ratio {io / max(ie, 1):.1f}x"
            )
        if args.skip_memory:
            return
        small, big = launch("engine_full", "small"), launch("engine_full", "store")
        ps, pb = small["peak_kb"] / 1024, big["peak_kb"] / 1024
        print(
            f"full two-pass engine with per-token table: {args.tokens // 10} tokens {small['seconds']:.1f}s "
            f"peak {ps:,.0f} MiB; {args.tokens} tokens {big['seconds']:.1f}s peak {pb:,.0f} MiB; "
            f"memory ratio 10x/1x {pb / ps:.3f} (target <= 1.10)"
        )


if __name__ == "__main__":
    main()
