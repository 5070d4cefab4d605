"""JumpReLU against TopK at the same width and mean L0, on real activations of the embedded SmolLM2.

Harvests layer ``--layer`` resid_post of the demo's text (``--contexts`` contexts of 256 tokens, the first
16 positions skipped as in the demo), trains one TopK and one JumpReLU SAE (target L0 = k) together on the
train split with the demo's training settings, and prints each one's held-out FVU and mean L0 on the test
split. The store is kept in ``--store`` when given (reused if it matches), else in a temporary folder.

    python bench/bench_jumprelu.py [--contexts 256] [--width 2048] [--k 32] [--epochs 7]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def harvest_store(folder: Path, layer: int, n_contexts: int):
    from darkmatter.harvest import HarvestConfig, harvest
    from darkmatter.lm.loading import load_lm
    from darkmatter.text import TextConfig, make_contexts

    lm = load_lm("embedded", device="cpu")
    text = TextConfig(source="austen", ctx_len=256, n_contexts=n_contexts, skip_positions=16)
    cfg = HarvestConfig(
        sites=[f"blocks.{layer}.hook_resid_post"], with_loss=False, batch_size=8, shard_contexts=32
    )
    contexts = make_contexts(text, lm.tokenizer, lm.bos_token_id)
    return harvest(lm, contexts, text, cfg, str(folder))


def compare(store, site: str, width: int, k: int, epochs: float, workdir: Path) -> dict[str, dict]:
    from darkmatter.sae.quality import evaluate_saes
    from darkmatter.sae.train import FamilyTrainer, SAESpec, TrainConfig
    from darkmatter.stats import Split

    split = Split(seed=0, fraction=0.8)
    cfg = TrainConfig(epochs=epochs, batch_size=512, lr=1e-3, dead_tokens=5000)
    specs = [
        SAESpec(name="topk", site=site, d_sae=width, k=k, kind="topk"),
        SAESpec(name="jumprelu", site=site, d_sae=width, k=k, kind="jumprelu"),
    ]
    trainer = FamilyTrainer(store, specs, cfg, workdir, split=split)
    t0 = time.perf_counter()
    saes = trainer.train()
    seconds = time.perf_counter() - t0
    quality = evaluate_saes(store, {s.name: sae for s, sae in zip(specs, saes, strict=True)}, split=split)
    for q in quality.values():
        q["train_tokens"] = trainer.step * cfg.batch_size
        q["train_seconds"] = seconds
    return quality


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, default=256)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--epochs", type=float, default=7)
    ap.add_argument("--store", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.store or Path(tmp) / "store"
        t0 = time.perf_counter()
        store = harvest_store(folder, args.layer, args.contexts)
        print(f"store: {store.n_contexts} contexts at layer {args.layer} ({time.perf_counter() - t0:.0f} s)")
        site = f"blocks.{args.layer}.hook_resid_post"
        q = compare(store, site, args.width, args.k, args.epochs, Path(tmp) / "train")
    for name, v in q.items():
        print(
            f"{name:<9} w={args.width} target L0={args.k}: held-out FVU {v['fvu']:.4f}  L0 {v['l0']:.1f}  "
            f"dead {v['dead_fraction']:.1%}  ({v['train_tokens']:,} train tokens)"
        )
    ratio = q["jumprelu"]["fvu"] / q["topk"]["fvu"]
    print(f"FVU jumprelu / topk = {ratio:.3f} (target <= 1.10 at matching L0)")


if __name__ == "__main__":
    main()
