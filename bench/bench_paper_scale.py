"""A paper study at the paper's dimensions, on a randomly initialised stand-in of the model.

Builds (once, cached under ``--out``) a random model with the published dimensions of Gemma 2 2B, Gemma 2 9B
or Llama 3.1 8B and random SAEs of the real widths in the real folder layouts (see ``stand_ins.py``), then
runs the model's paper preset on it through the library's ``Runner``: harvest -> family -> engine ->
per_token -> pursuit -> downstream CE, on the packaged Austen text. Per step it prints seconds, tokens/s,
peak host RSS (``VmHWM``, reset between steps) and peak device memory; for the harvest and the engine the
FLOP rate as a fraction of this device's matmul peak, timed in this process before the study (fp32, and
bf16 where the model runs in bf16 or on CUDA); and the planner's prediction beside each figure when
``darkmatter.study.plan`` exists. FLOPs counted: harvest, the model's forward matmuls (projections, MLP,
causal attention, unembedding); engine, the SAE encoder GEMMs only (2·d·W per token, SAE and pass; both
passes encode every analysed token), so its fraction is a lower bound.

    python bench/bench_paper_scale.py --model gemma-2-2b --tokens 4096 --budget-gb 6
    python bench/bench_paper_scale.py --model tiny-gemma-2 --tokens 512 --ctx-len 128   # seconds, for tests

Machine-readable lines start with ``RESULT`` (``key=value`` pairs); ``--out`` also gets ``result.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import contextlib

from peak_memory import peak_rss_kb
from stand_ins import (
    GRID_2B,
    MODELS,
    StandIn,
    build_model,
    forward_flops_per_token,
    link_or_copy,
    llama_scope_hyperparams,
    pooled_quantile,
    sample_activations,
    scaled_width,
    write_gemma_scope,
    write_llama_scope_weights,
)

GB = 1e9
SAMPLE_TOKENS = 1024
_HUB = re.compile(r"^[^/]+/(?P<repo>[^:]+):(?P<sub>.+)$")
_WIDTH_SWEEP = re.compile(r"^L(\d+)-res-(\d+[km])$")
_L0 = re.compile(r"average_l0_(\d+)")


def parse_scale(text: str) -> float:
    if "/" in text:
        a, b = text.split("/")
        return float(a) / float(b)
    return float(text)


def args_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="gemma-2-2b")
    ap.add_argument("--tokens", type=int, default=4096, help="Tokens to harvest (rounded up to contexts).")
    ap.add_argument("--ctx-len", type=int, default=1024)
    ap.add_argument("--widths", default=None, help="Comma-separated width labels (16k,32k,...).")
    ap.add_argument("--width-scale", default=None, help="Scale every width, e.g. 1/64 (keeps the grid).")
    ap.add_argument("--full-grid", action="store_true", help="Every Gemma Scope layer-12 SAE of the 2B.")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="Model dtype; default: the preset's on cuda, bf16 on cpu.")
    ap.add_argument("--sae-dtype", default="fp32", help="analysis.sae_dtype.")
    ap.add_argument("--budget-gb", type=float, default=None, help="resources.host/device_memory_gb.")
    ap.add_argument("--sae-memory-gb", type=float, default=None, help="resources.sae_memory_gb.")
    ap.add_argument("--pursuit-contexts", type=int, default=1, help="0: no pursuit.")
    ap.add_argument("--ce-contexts", type=int, default=1)
    ap.add_argument("--skip-positions", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("paper-scale-out"))
    ap.add_argument("--gates", action="store_true", help="Print PASS/FAIL against the GPU targets.")
    return ap


# --------------------------------------------------------------------------- matmul peak


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: torch.dtype) -> float:
    """Best FLOP/s of large square GEMMs on ``device`` in ``dtype`` (a robust peak)."""
    sizes = (8192, 16384) if device.startswith("cuda") else (2048,)
    repeats = 5
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b
        _sync(device)
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            _sync(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
        del a, b
    return best


# --------------------------------------------------------------------------- SAEs


def preset_width_sweep(preset: str, layer: int) -> list[dict[str, Any]]:
    """The preset's width-sweep entries (main site, one per width label), in preset order."""
    from darkmatter.config.loading import load_preset

    data = load_preset(preset)
    out = []
    for e in data["family"]["external"]:
        m = _WIDTH_SWEEP.match(e["name"])
        if m and int(m.group(1)) == layer:
            l0 = _L0.search(e["path"])
            out.append({**e, "label": m.group(2), "l0": int(l0.group(1)) if l0 else None})
    return out


def _local(path: str) -> str:
    m = _HUB.match(path)
    if not m:
        raise SystemExit(f"preset SAE path {path!r} is not 'owner/repo:subfolder'")
    return f"{m.group('repo')}/{m.group('sub')}"


class SAEBuilder:
    """Writes the stand-in SAEs that are missing; samples the model's activations only if needed."""

    def __init__(self, args: argparse.Namespace, spec: StandIn, model_dir: Path, layer: int, scale: float):
        self.args, self.spec, self.model_dir, self.layer, self.scale = args, spec, model_dir, layer, scale
        tag = "1" if scale == 1 else f"{scale:.6g}"
        self.root = args.out / "saes" / args.model / f"scale-{tag}"
        self._xs: torch.Tensor | None = None
        self.facts: dict[str, dict[str, Any]] = {}

    def xs(self) -> torch.Tensor:
        if self._xs is None:
            ctx_len = min(self.args.ctx_len, 256)
            text = {"source": "austen", "packing": "chunk", "ctx_len": ctx_len, "n_contexts": 16, "seed": 42}
            skip = min(self.args.skip_positions, ctx_len // 4)
            dev = self.args.device
            self._xs = sample_activations(self.model_dir, self.layer, text, SAMPLE_TOKENS, skip, dev)
        return self._xs

    def gemma_scope(self, name: str, rel: str, width: int, l0: int, seed: int) -> Path:
        folder = self.root / rel
        marker = folder / "standin.json"
        if not marker.is_file():
            t0 = time.perf_counter()
            facts = write_gemma_scope(folder, self.xs(), width, l0, seed, self.args.device)
            facts.update(width=width, l0=l0, seconds=time.perf_counter() - t0)
            marker.write_text(json.dumps(facts))
            print(f"  wrote {name}: {width:,} latents, L0 {l0} (sample L0 {facts['l0_sample']:.1f})")
        self.facts[name] = json.loads(marker.read_text())
        return folder

    def llama_topk(self, name: str, rel: str, width: int, seed: int) -> Path:
        folder = self.root / rel
        marker = folder / "standin.json"
        if not marker.is_file():
            weights = folder / "checkpoints" / "final.safetensors"
            d = self.spec.config["hidden_size"]
            site = f"blocks.{self.layer}.hook_resid_post"
            write_llama_scope_weights(weights, self.xs(), width, seed, self.args.device, standardise=False)
            hp = llama_scope_hyperparams(d, width, site, l0_threshold=None)
            (folder / "hyperparams.json").write_text(json.dumps(hp, indent=1))
            marker.write_text(json.dumps({"width": width, "k": hp["top_k"]}))
            print(f"  wrote {name}: {width:,} latents, TopK k = {hp['top_k']}")
        self.facts[name] = json.loads(marker.read_text())
        return folder

    def shared_grid(self, label: str, width: int, l0s: tuple[int, ...], seed: int) -> dict[int, Path]:
        """One weights file per width, hard-linked into a Llama Scope JumpReLU folder per L0."""
        weights = self.root / "grid" / "_weights" / f"{label}.safetensors"
        marker = weights.with_suffix(".json")
        d = self.spec.config["hidden_size"]
        if not marker.is_file():
            t0 = time.perf_counter()
            z = write_llama_scope_weights(weights, self.xs(), width, seed, self.args.device, standardise=True)
            # scaled widths: an L0 above a quarter of the width is capped there
            q = {str(l0): pooled_quantile(z, min(l0, width // 4) / width) for l0 in l0s}
            marker.write_text(
                json.dumps({"width": width, "quantile": q, "seconds": time.perf_counter() - t0})
            )
            print(f"  wrote weights {label}: {width:,} latents (shared by L0s {', '.join(map(str, l0s))})")
        q = json.loads(marker.read_text())["quantile"]
        out = {}
        site = f"blocks.{self.layer}.hook_resid_post"
        for l0 in l0s:
            folder = self.root / "grid" / f"L{self.layer}-res-{label}-l0_{l0}"
            if not (folder / "hyperparams.json").is_file():
                link_or_copy(weights, folder / "checkpoints" / "final.safetensors")
                hp = llama_scope_hyperparams(d, width, site, l0_threshold=q[str(l0)])
                (folder / "hyperparams.json").write_text(json.dumps(hp, indent=1))
            self.facts[f"L{self.layer}-res-{label}-l0_{l0}"] = {"width": width, "l0": min(l0, width // 4)}
            out[l0] = folder
        return out


def family_overrides(args: argparse.Namespace, builder: SAEBuilder, labels: list[str]) -> list[str]:
    """``--set`` items naming the stand-in SAEs (building the missing ones)."""
    spec, layer, scale = builder.spec, builder.layer, builder.scale
    site = f"blocks.{layer}.hook_resid_post"
    if args.full_grid:
        entries = []
        for i, label in enumerate(labels):
            w = scaled_width(label, scale)
            for l0, folder in builder.shared_grid(label, w, GRID_2B[label], 1000 + i).items():
                name = f"L{layer}-res-{label}-l0_{l0}"
                entries.append({"name": name, "path": str(folder), "format": "llama_scope", "site": site})
        return [f"family.external={json.dumps(entries)}"]
    sweep = {e["label"]: e for e in preset_width_sweep(spec.preset, layer)}
    missing = [x for x in labels if x not in sweep]
    if missing:
        raise SystemExit(f"widths {missing} are not in {spec.preset}'s width sweep ({', '.join(sweep)})")
    chosen, paths = [], {}
    for i, label in enumerate(labels):
        e, w = sweep[label], scaled_width(label, scale)
        rel = _local(e["path"])
        if scale != 1:
            rel = re.sub(r"width_\d+[km]", f"width_{w}", rel) + ("" if "width_" in rel else f"-w{w}")
        if spec.sae_layout == "gemma_scope":
            folder = builder.gemma_scope(e["name"], rel, w, e["l0"], 100 + i)
        else:
            folder = builder.llama_topk(e["name"], rel, w, 100 + i)
        chosen.append(e["name"])
        paths[e["name"]] = str(folder)
    items = [f"family.external_only={json.dumps(chosen)}"]
    if scale == 1:
        return [f"family.external_root={builder.root}", *items]
    return items + [f"family.external_paths.{n}={p}" for n, p in paths.items()]


# --------------------------------------------------------------------------- the study


def study_overrides(args: argparse.Namespace, model_dir: Path, dtype: str) -> list[str]:
    n_contexts = max(1, math.ceil(args.tokens / args.ctx_len))
    skip = min(args.skip_positions, args.ctx_len // 4)
    items = [
        f"model.name={model_dir}",
        f"model.device={args.device}",
        f"model.dtype={dtype}",
        "text.source=austen",
        "text.packing=chunk",
        f"text.ctx_len={args.ctx_len}",
        f"text.n_contexts={n_contexts}",
        f"text.skip_positions={skip}",
        f"analysis.sae_dtype={args.sae_dtype}",
        "layer_sweep.enabled=false",
        "synthetic.enabled=false",
        "earlier_layers.enabled=false",
        "error_saes.enabled=false",
        f"pursuit.n_contexts={max(args.pursuit_contexts, 1)}",
        f"pursuit.enabled={str(args.pursuit_contexts > 0).lower()}",
        f"downstream_ce.n_contexts={args.ce_contexts}",
    ]
    if args.sae_memory_gb is not None:
        items.append(f"resources.sae_memory_gb={args.sae_memory_gb}")
    if args.budget_gb is not None:
        items += [
            f"resources.host_memory_gb={args.budget_gb}",
            f"resources.device_memory_gb={args.budget_gb}",
        ]
    return items


def reset_peaks(device: str) -> None:
    """Peak RSS (``VmHWM``) and the CUDA allocator's peak start again from the current use."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def device_peak(device: str) -> int | None:
    return int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None


def make_runner(ctx: Any, device: str, rows: list[dict[str, Any]]) -> Any:
    from darkmatter.runner import Runner

    class MeasuredRunner(Runner):
        """The library's runner, with each step's wall time and memory peaks recorded."""

        def _visit(self, step: Any, forced: bool, unavailable: set[str]) -> Any:
            reset_peaks(device)
            t0 = time.perf_counter()
            outcome = super()._visit(step, forced, unavailable)
            _sync(device)
            if outcome.status == "ran":
                row = {
                    "step": step.name,
                    "seconds": time.perf_counter() - t0,
                    "peak_rss_bytes": peak_rss_kb() * 1024,
                    "peak_device_bytes": device_peak(device),
                    "headline": outcome.headline,
                }
                rows.append(row)
                print(
                    f"  [{step.name}: {row['seconds']:.1f} s, peak RSS {fmt_bytes(row['peak_rss_bytes'])}, "
                    f"peak device {fmt_bytes(row['peak_device_bytes'])}]",
                    flush=True,
                )
            return outcome

    return MeasuredRunner(ctx)


def planned(cfg: Any, run_dir: Path) -> Any:
    """The planner's prediction, or None where ``darkmatter.study.plan`` does not exist (yet)."""
    try:
        from darkmatter.study.plan import plan_study
    except ImportError:
        return None
    return plan_study(cfg, run_dir)


def step_tokens(args: argparse.Namespace, cfg: Any) -> dict[str, int]:
    n, ctx, skip = cfg.text.n_contexts, cfg.text.ctx_len, cfg.text.skip_positions
    analysed = n * (ctx - skip)
    return {
        "harvest": n * ctx,
        "family": analysed,
        "engine": analysed,
        "per_token": analysed,
        "pursuit": min(args.pursuit_contexts, n) * (ctx - skip),
        "downstream_ce": args.ce_contexts * ctx,
    }


def flop_counts(spec: StandIn, cfg: Any, widths: dict[str, int]) -> dict[str, float]:
    d = spec.config["hidden_size"]
    n, ctx, skip = cfg.text.n_contexts, cfg.text.ctx_len, cfg.text.skip_positions
    analysed = n * (ctx - skip)
    return {
        "harvest": n * ctx * forward_flops_per_token(spec, ctx),
        "engine": 2 * analysed * sum(2 * d * w for w in widths.values()),
    }


def fmt_bytes(b: float | None) -> str:
    return "-" if b is None else f"{b / GB:.2f} GB"


def ratio(measured: float | None, predicted: float | None) -> str:
    if measured is None or not predicted:
        return "-"
    return f"{measured / predicted:.2f}"


def report(rows: list[dict[str, Any]], plan: Any, peaks: dict[str, float], tokens: dict[str, int]) -> None:
    """One line per step, then the RESULT lines."""
    by_plan = {s.name: s for s in plan.steps} if plan is not None else {}
    print(
        f"\n{'step':<14} {'seconds':>9} {'tok/s':>10} {'of peak':>8} {'peak RSS':>10} {'peak dev':>10}"
        f" {'plan s':>8} {'x plan':>7} {'RSS x plan':>10} {'dev x plan':>10} {'groups':>6}"
    )
    for r in rows:
        p = by_plan.get(r["step"])
        frac = r.get("flop_fraction")
        print(
            f"{r['step']:<14} {r['seconds']:9.1f} {r['tokens_per_s']:10,.0f} "
            f"{'-' if frac is None else f'{frac:.1%}':>8} {fmt_bytes(r['peak_rss_bytes']):>10} "
            f"{fmt_bytes(r['peak_device_bytes']):>10} {'-' if p is None else f'{p.seconds:.1f}':>8} "
            f"{ratio(r['seconds'], p and p.seconds):>7} "
            f"{ratio(r['peak_rss_bytes'], p and p.peak_host_bytes):>10} "
            f"{ratio(r['peak_device_bytes'], p and p.peak_device_bytes):>10} "
            f"{'-' if p is None else len(p.groups):>6}"
        )
    for r in rows:
        p = by_plan.get(r["step"])
        fields = {
            "step": r["step"],
            "seconds": f"{r['seconds']:.3f}",
            "tokens": tokens.get(r["step"], 0),
            "tokens_per_s": f"{r['tokens_per_s']:.1f}",
            "flop_fraction": "-" if r.get("flop_fraction") is None else f"{r['flop_fraction']:.4f}",
            "peak_rss_gb": f"{r['peak_rss_bytes'] / GB:.3f}",
            "peak_device_gb": "-" if r["peak_device_bytes"] is None else f"{r['peak_device_bytes'] / GB:.3f}",
            "plan_seconds": "-" if p is None else f"{p.seconds:.3f}",
            "plan_peak_host_gb": "-" if p is None else f"{p.peak_host_bytes / GB:.3f}",
            "plan_peak_device_gb": "-" if p is None else f"{p.peak_device_bytes / GB:.3f}",
            "plan_groups": "-" if p is None else len(p.groups),
        }
        print("RESULT " + " ".join(f"{k}={v}" for k, v in fields.items()))
    print("RESULT " + " ".join(f"{k}={v / 1e9:.1f}" for k, v in peaks.items()))


GATES = (  # the GPU targets: (label, figure, limit, is an upper limit)
    ("engine over all SAEs (s)", "engine_seconds", 30 * 60, True),
    ("peak GPU memory (GB)", "peak_device_gb", 70, True),
    ("peak host RSS (GB)", "peak_rss_gb", 32, True),
    ("encoder GEMM fraction of matmul peak", "engine_flop_fraction", 0.5, False),
)


def gates(figures: dict[str, float | None]) -> bool:
    ok = True
    print("\ntargets:")
    for label, key, limit, upper in GATES:
        value = figures.get(key)
        passed = value is not None and (value <= limit if upper else value >= limit)
        ok &= passed
        shown = "unmeasured" if value is None else f"{value:.4g}"
        print(f"  {'PASS' if passed else 'FAIL'}  {label}: {shown} ({'<=' if upper else '>='} {limit})")
        print(f"RESULT gate={key} value={shown} limit={limit} status={'PASS' if passed else 'FAIL'}")
    return ok


def choose_widths(args: argparse.Namespace, spec: StandIn) -> list[str]:
    if args.full_grid:
        if spec.preset != "paper-gemma-2-2b":
            raise SystemExit(
                "--full-grid is the Gemma 2 2B layer-12 grid: use --model gemma-2-2b (or tiny-gemma-2)"
            )
        wanted = args.widths.split(",") if args.widths else list(GRID_2B)
        return [w for w in GRID_2B if w in wanted]
    return args.widths.split(",") if args.widths else list(spec.default_widths)


def prepare(args: argparse.Namespace) -> tuple[Any, StandIn, dict[str, int], str, dict[str, Any]]:
    """Build what is missing and resolve the study's config; returns (config, spec, SAE widths, dtype)."""
    from darkmatter.config import resolve_config
    from darkmatter.config.loading import load_preset

    spec = MODELS[args.model]
    scale = parse_scale(args.width_scale) if args.width_scale else spec.default_width_scale
    labels = choose_widths(args, spec)
    preset = load_preset(spec.preset)
    dtype = args.dtype or (preset["model"]["dtype"] if args.device.startswith("cuda") else "bf16")
    if scale != 1:
        print(
            f"NOTE: widths are SCALED by {scale:.6g}: "
            + ", ".join(f"{x} -> {scaled_width(x, scale):,}" for x in labels)
        )
    model_dir = build_model(args.model, args.out)
    builder = SAEBuilder(args, spec, model_dir, int(preset["layer"]), scale)
    overrides = study_overrides(args, model_dir, dtype) + family_overrides(args, builder, labels)
    cfg = resolve_config(spec.preset, None, overrides)
    widths = {e.name: builder.facts[e.name]["width"] for e in cfg.family.external}
    shown = [o if len(o) < 200 else o[:120] + f"... ({len(o)} characters)" for o in overrides]
    print(
        "the same study from the command line:\n  darkmatter run --preset "
        + spec.preset
        + " --out RUN "
        + " ".join(f"--set '{o}'" for o in shown)
    )
    return cfg, spec, widths, dtype, builder.facts


def main() -> None:
    args = args_parser().parse_args()
    from darkmatter.study.context import StudyContext
    from darkmatter.study.family_saes import FamilyResult

    device = args.device
    t_start = time.perf_counter()
    peaks = {"fp32_peak_gflops": matmul_peak(device, torch.float32)}
    cfg, spec, widths, dtype, facts = prepare(args)
    if dtype == "bf16" or device.startswith("cuda"):
        peaks["bf16_peak_gflops"] = matmul_peak(device, torch.bfloat16)
    d = spec.config["hidden_size"]
    print(
        f"device {device} ({torch.get_num_threads()} threads"
        + (f", {torch.cuda.get_device_name()}" if device.startswith("cuda") else "")
        + "): matmul peak "
        + ", ".join(f"{k.split('_')[0]} {v / 1e9:,.1f} GFLOP/s" for k, v in peaks.items())
    )
    print(
        f"stand-in {args.model}: d = {d}, {spec.config['num_hidden_layers']} layers, model {dtype}; "
        f"{len(widths)} SAEs ({sum(widths.values()):,} latents, "
        f"{sum(2 * d * w * 4 for w in widths.values()) / GB:.1f} GB of fp32 weights); "
        f"{cfg.text.n_contexts} x {cfg.text.ctx_len} tokens"
    )
    print(
        f"budget: {'none (detected)' if args.budget_gb is None else f'{args.budget_gb} GB host and device'}"
    )
    run_dir = args.out / "runs" / args.model
    shutil.rmtree(run_dir, ignore_errors=True)
    plan = planned(cfg, run_dir)
    if plan is None:
        print("planner: darkmatter.study.plan is not importable here; no predictions")
    else:
        print(
            f"planner: {plan.total_seconds:.1f} s, peak host {fmt_bytes(plan.peak_host_bytes)}, "
            f"peak device {fmt_bytes(plan.peak_device_bytes)}; engine groups "
            + "; ".join(", ".join(g) for g in plan.step("engine").groups)
        )
    logs: list[str] = []
    ctx = StudyContext(cfg, run_dir, log=lambda m: (logs.append(m), print("  " + m, flush=True)))
    rows: list[dict[str, Any]] = []
    reset_peaks(device)
    t0 = time.perf_counter()
    ctx.lm  # noqa: B018 - the model loads here, timed apart from the harvest's forward passes
    rows.append(
        {
            "step": "load_model",
            "seconds": time.perf_counter() - t0,
            "peak_rss_bytes": peak_rss_kb() * 1024,
            "peak_device_bytes": device_peak(device),
        }
    )
    make_runner(ctx, device, rows).run(report=False)
    figures = finish(args, cfg, spec, widths, dtype, rows, peaks, plan)
    fam = ctx.result("family", FamilyResult)
    for r in fam.saes:
        nominal = facts.get(r.name, {}).get("l0") or facts.get(r.name, {}).get("k")
        print(f"  L0 {r.name:<24} {r.l0:8.1f}  (nominal {nominal}; FVU {r.fvu:.3f})")
        print(f"RESULT sae={r.name} l0={r.l0:.2f} nominal_l0={nominal} fvu={r.fvu:.4f}")
    group_lines = [m for m in logs if "group" in m.lower()]
    print("engine groups (the library's log): " + ("; ".join(group_lines) or "none logged"))
    if args.budget_gb is not None:
        peak = max(r["peak_rss_bytes"] for r in rows) / GB
        ok = peak <= args.budget_gb
        print(f"{'PASS' if ok else 'FAIL'}  peak RSS {peak:.2f} GB <= budget {args.budget_gb} GB")
        print(f"RESULT budget_gb={args.budget_gb} peak_rss_gb={peak:.3f} status={'PASS' if ok else 'FAIL'}")
    print(f"bench wall time {time.perf_counter() - t_start:.1f} s")
    (args.out / "result.json").write_text(
        json.dumps({"rows": rows, "peaks": peaks, "figures": figures}, indent=1)
    )
    if args.gates:
        sys.exit(0 if gates(figures) else 1)


def finish(
    args: argparse.Namespace,
    cfg: Any,
    spec: StandIn,
    widths: dict[str, int],
    dtype: str,
    rows: list[dict[str, Any]],
    peaks: dict[str, float],
    plan: Any,
) -> dict[str, float | None]:
    """Tokens/s and FLOP fractions per step; the report; the figures the GPU targets read."""
    tokens = step_tokens(args, cfg)
    flops = flop_counts(spec, cfg, widths)
    model_peak = peaks["bf16_peak_gflops" if dtype == "bf16" else "fp32_peak_gflops"]
    sae_peak = peaks["fp32_peak_gflops" if args.sae_dtype == "fp32" else "bf16_peak_gflops"]
    peak_for = {"harvest": model_peak, "engine": sae_peak}
    for r in rows:
        r["tokens_per_s"] = tokens.get(r["step"], 0) / r["seconds"] if r["seconds"] else 0.0
        if r["step"] in flops:
            r["flop_fraction"] = flops[r["step"]] / r["seconds"] / peak_for[r["step"]]
    report(rows, plan, peaks, tokens)
    engine = next((r for r in rows if r["step"] == "engine"), None)
    dev = [r["peak_device_bytes"] for r in rows if r["peak_device_bytes"] is not None]
    return {
        "engine_seconds": engine["seconds"] if engine else None,
        "engine_flop_fraction": engine.get("flop_fraction") if engine else None,
        "peak_rss_gb": max(r["peak_rss_bytes"] for r in rows) / GB,
        "peak_device_gb": max(dev) / GB if dev else None,
        "total_seconds": sum(r["seconds"] for r in rows),
    }


if __name__ == "__main__":
    main()
