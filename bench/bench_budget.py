"""Training budget of the demo's SAE family: held-out FVU per width, the power law and convergence per budget.

Harvests the demo's text (SmolLM2-135M, the embedded model, on Austen) once, for the largest number of
contexts asked, into a temporary store (or ``--store``, kept for reuse); a budget with fewer contexts trains
on a copy of the first N contexts (the demo's N contexts: chunk packing takes a seeded permutation's
prefix). Every budget is measured on the same held-out tokens: the test split of the largest store, which no
budget trains on (the split is a hash of context and position). Per budget it prints the held-out FVU per
width, the fit FVU(W) = c + a·W^-m, the gap between the two widest SAEs, the convergence criterion of each
SAE (validation FVU change over the last quarter, from the trainer) and the training wall time.

    python bench/bench_budget.py [--store DIR] [--family widths|demo] [--budget CTX:EPOCHS:BATCH:LR ...]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

LAYER = 15
MAIN = f"blocks.{LAYER}.hook_resid_post"
AUX = [f"blocks.{LAYER - 1}.hook_resid_post", f"blocks.{LAYER}.hook_mlp_out", f"blocks.{LAYER}.hook_attn_out"]
DEFAULT_BUDGETS = [
    "256:4:512:1e-3",  # the demo today
    "256:8:512:1e-3",
    "256:16:512:1e-3",
    "512:4:512:1e-3",
    "512:8:512:1e-3",
    "1024:4:512:1e-3",
    "256:8:512:2e-3",
    "256:8:1024:2e-3",
]


@dataclass(frozen=True)
class Budget:
    contexts: int
    epochs: float
    batch: int
    lr: float

    @classmethod
    def parse(cls, text: str) -> Budget:
        ctx, ep, bs, lr = text.split(":")
        return cls(int(ctx), float(ep), int(bs), float(lr))


def harvest_store(root: Path, n_contexts: int, sites: list[str]):
    """The demo's text and harvest settings (one forward up to layer 15, no loss) for ``n_contexts``."""
    from darkmatter.config.loading import resolve_config
    from darkmatter.harvest import harvest
    from darkmatter.lm.loading import load_lm
    from darkmatter.store import MANIFEST, ActivationStore
    from darkmatter.text import make_contexts

    if (root / MANIFEST).is_file():
        store = ActivationStore.open(root)
        if store.complete and store.n_contexts >= n_contexts and set(sites) <= set(store.sites):
            return store
    cfg = resolve_config("demo", overrides=[f"text.n_contexts={n_contexts}"])
    lm = load_lm("embedded", device="cpu")
    contexts = make_contexts(cfg.text, lm.tokenizer, lm.bos_token_id)
    hcfg = cfg.harvest.model_copy(update={"sites": sites, "with_loss": False})
    t0 = time.perf_counter()
    store = harvest(lm, contexts, cfg.text, hcfg, str(root))
    print(
        f"harvest: {n_contexts} contexts, {len(sites)} sites in {time.perf_counter() - t0:.0f} s", flush=True
    )
    return store


def first_contexts(big, root: Path, n: int):
    """A store holding the first ``n`` contexts of ``big`` (whole shards, copied through the store API)."""
    from darkmatter.store import ActivationStore

    if n >= big.n_contexts:
        return big
    if n % big.shard_contexts:
        raise SystemExit(f"{n} contexts is not a multiple of the shard size {big.shard_contexts}")
    source = big.manifest["identity_hash"]
    identity = dict(big.identity, n_contexts=n, tokens_fingerprint=f"{source}-first{n}")
    store = ActivationStore.create_or_resume(root, identity, big.tokens[:n])
    for i in range(store.n_shards):
        if i not in store.done_shards():
            shard = big.load_shard(i)
            store.write_shard(i, {s: shard[s] for s in big.sites})
    return store


def train_budget(store, eval_store, specs, budget: Budget, workdir: Path, args) -> dict:
    from darkmatter.sae.convergence import convergence
    from darkmatter.sae.quality import evaluate_saes
    from darkmatter.sae.train import FamilyTrainer, TrainConfig
    from darkmatter.stats import Split

    split = Split(0, 0.8)
    cfg = TrainConfig(
        epochs=budget.epochs,
        batch_size=budget.batch,
        lr=budget.lr,
        dead_tokens=5000,
        eval_every=args.eval_every,
    )
    trainer = FamilyTrainer(store, specs, cfg, workdir, split=split)
    t0 = time.perf_counter()
    saes = trainer.train()
    seconds = time.perf_counter() - t0
    named = {s.name: sae for s, sae in zip(specs, saes, strict=True)}
    quality = evaluate_saes(eval_store, named, split=split, part="test")
    tol, decay = cfg.converge_tol, cfg.decay_fraction
    conv = {m.spec.name: convergence(m.history, tol, decay) for m in trainer.members}
    return {
        "budget": budget,
        "train_tokens": trainer.n_train,
        "steps": trainer.total_steps,
        "seconds": seconds,
        "fvu": {n: q["fvu"] for n, q in quality.items()},
        "dead": {n: q["dead_fraction"] for n, q in quality.items()},
        "change": {n: (c.change if c else float("nan")) for n, c in conv.items()},
        "converged": {n: bool(c and c.converged) for n, c in conv.items()},
        "eval_tokens": int(next(iter(quality.values()))["tokens"]),
        "history": {m.spec.name: m.history for m in trainer.members},
        "total_steps": trainer.total_steps,
    }


def width_sweep(specs) -> list:
    return [s for s in specs if s.site == MAIN and s.k == 32]


def fit_line(row: dict, specs) -> str:
    from darkmatter.experiments.powerlaw import fit_power_law

    sweep = sorted(width_sweep(specs), key=lambda s: s.d_sae)
    if len(sweep) < 3:
        return "n/a"
    fit = fit_power_law([s.d_sae for s in sweep], [row["fvu"][s.name] for s in sweep])
    return "degenerate" if not fit.converged else f"{fit.c:.3f} + {fit.a:.3g}·W^-{fit.m:.2f}"


def gap(row: dict, specs) -> float:
    sweep = sorted(width_sweep(specs), key=lambda s: s.d_sae)
    a, b = row["fvu"][sweep[-2].name], row["fvu"][sweep[-1].name]
    return (a - b) / a


def print_table(rows: list[dict], specs) -> None:
    names = [s.name for s in specs]
    short = [n.replace(f"L{LAYER}.resid.", "").replace(".k32", "") for n in names]
    head = ["contexts", "train tokens", "epochs", "batch", "lr", "steps", "presented"]
    head += [f"FVU {s}" for s in short] + [
        "fit c + a·W^-m",
        "gap 2048→4096",
        "converged (Δ last ¼)",
        "train s",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for r in rows:
        b = r["budget"]
        miss = [
            f"{s} {100 * r['change'][n]:+.1f}%"
            for n, s in zip(names, short, strict=True)
            if not r["converged"][n]
        ]
        worst = max(abs(v) for v in r["change"].values())
        conv = (
            f"all (max {100 * worst:.1f}%)"
            if not miss
            else f"{len(names) - len(miss)}/{len(names)}; " + ", ".join(miss)
        )
        cells = [str(b.contexts), f"{r['train_tokens']:,}", f"{b.epochs:g}", str(b.batch), f"{b.lr:g}"]
        cells += [str(r["steps"]), f"{r['steps'] * b.batch / 1e3:.0f}k"]
        cells += [f"{r['fvu'][n]:.4f}" for n in names]
        cells += [fit_line(r, specs), f"{100 * gap(r, specs):.1f}%", conv, f"{r['seconds']:.0f}"]
        print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=Path, default=None, help="Keep the harvested stores here (reused).")
    ap.add_argument("--family", choices=["widths", "demo"], default="widths")
    ap.add_argument("--budget", action="append", default=None, help="CONTEXTS:EPOCHS:BATCH:LR")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", type=Path, default=None, help="Also write every budget's results here.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from darkmatter.config.loading import resolve_config

    budgets = [Budget.parse(b) for b in args.budget or DEFAULT_BUDGETS]
    specs = resolve_config("demo").family.specs(LAYER)
    sites = sorted(
        {s.site for s in specs}
    )  # all the demo's sites, so that one kept store serves both families
    if args.family == "widths":
        specs = width_sweep(specs)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.store or Path(tmp)
        big = harvest_store(root / "store", max(b.contexts for b in budgets), sites)
        print(f"held-out tokens: test split of {big.n_contexts} contexts; load {os.getloadavg()[0]:.2f}")
        rows = []
        for i, b in enumerate(budgets):
            store = first_contexts(big, root / f"first{b.contexts}", b.contexts)
            rows.append(train_budget(store, big, specs, b, Path(tmp) / f"train{i}", args))
            r = rows[-1]
            print(f"{b}: {r['seconds']:.0f} s, {r['steps']} steps, load {os.getloadavg()[0]:.2f}", flush=True)
            print_table(rows[-1:], specs)
            if args.json:
                dump = [dict(r, budget=vars(r["budget"])) for r in rows]
                args.json.write_text(json.dumps(dump))
        print(f"\nheld-out tokens per FVU: {rows[0]['eval_tokens']:,}\n")
        print_table(rows, specs)


if __name__ == "__main__":
    main()
