"""The notes in words of the layer baselines' result: split, ridge, held-out token means, intervals,
degenerate inputs, grouping, reuse."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from darkmatter.experiments.layer_sums import REGRESSIONS
from darkmatter.stats import DEFAULT_RELATIVE_RIDGE, Split


def result_notes(
    constant: Mapping[int, Sequence[str]],
    split: Split,
    with_loss: bool,
    unseen: int,
    n_test: int,
    intervals: tuple[int, int, int],
) -> list[str]:
    """The result's notes: the split and ridge used, the token baseline's unseen ids, the intervals'
    blocks (``intervals``: blocks asked for, blocks used (0: no intervals), store shards), degenerate
    inputs (``constant``: layer -> the regressions whose input is constant on the train tokens)."""
    notes = [
        "Target: the squared error norm ‖x − Sae(x)‖² per token; every R² is on the test split "
        f"(seed {split.seed}, train fraction {split.fraction}) and every regression has an intercept "
        f"(float64 Cholesky, relative ridge {DEFAULT_RELATIVE_RIDGE:g}).",
        "token_identity is held out: per-token-id means over the train tokens predict the test tokens; "
        f"{unseen} of {n_test} test tokens have ids unseen in train and get the global train mean "
        "(the paper's Fig 13 version was in-sample).",
        "The last position of every context is left out for all predictors (it has no next-token loss).",
    ]
    if not with_loss:
        notes.append("model_loss skipped: the store holds no per-token loss (harvest with with_loss=True).")
    asked, blocks, shards = intervals
    if blocks:
        notes.append(
            f"Intervals: 95% delete-one-block jackknife over {blocks} blocks of whole shards ({shards} "
            "shards of contexts); each replicate refits every regression and the per-token-id means without "
            "the block and scores the test tokens outside it."
        )
    elif asked >= 3 and shards < 3:
        notes.append(
            f"No intervals: the store has {shards} shard(s) and a jackknife block is whole shards; at least "
            "3 are needed (harvest with smaller shard_contexts)."
        )
    elif asked >= 3:
        notes.append(
            "No intervals: leaving one block of shards out leaves too few tokens for a refit; harvest more "
            "contexts."
        )
    for name in REGRESSIONS:
        flat = [layer for layer, inputs in constant.items() if name in inputs]
        if flat:
            notes.append(
                f"{name} is constant on the train tokens at layer(s) {flat} (as for a TopK SAE's L0): the "
                "prediction there is the train mean of the target, so R² <= 0."
            )
    return notes


def grouping_note(groups: list[list[int]]) -> list[str]:
    """A note when the layers were read in several passes."""
    if len(groups) < 2:
        return []
    return [
        f"The layers were read in {len(groups)} passes over the store (groups {groups}) to bound the "
        "memory of the per-block sums; the numbers do not depend on the grouping."
    ]


def run_notes(reused: Sequence[int], kind: str, sae_dir: str) -> list[str]:
    """Notes of a layer sweep run: SAEs reused, what TopK means for the L0 baseline."""
    notes = []
    if reused:
        notes.append(f"SAEs for layers {list(reused)} were reused from an earlier run (in {sae_dir}/).")
    if kind == "topk":
        notes.append(
            "TopK SAEs have L0 = k on almost every token, so the l0 baseline says little here (the paper's "
            "JumpReLU SAEs vary per token); kind='batchtopk' gives a per-token L0."
        )
    return notes
