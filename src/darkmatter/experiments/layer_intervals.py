"""Delete-one-block jackknife intervals for the error-norm baselines across layers (``layer_baselines``).

As in the engine and ``earlier_intervals``, blocks are contiguous groups of whole store shards (contexts)
and every sum is kept per block (`LayerSums`): moments and per-token-id sums are additive, so replicate b
refits every regression on the train tokens of every block but b and scores it on the test tokens of every
block but b, and the token baseline's per-id means are recomputed without block b's train tokens (ids that
only block b had in train fall back to the global train mean). Each interval so includes the fits' own
variance. Fewer than 3 blocks, or a block too big to leave out, give no interval (never an error).

Memory. The per-block activations moments are d x d float64 per layer, block and part (~42 MB per layer at
d = 576 and 8 blocks, ~1.6 GB at d = 3584), so the layers are processed in groups that fit a byte budget,
one pass over the store per group (each layer's SAE still runs once); a layer's sums are freed once it is
scored. A layer bigger than the budget is a group of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from darkmatter.errors import DataError
from darkmatter.experiments.decomposition.accumulators import replicates_fit
from darkmatter.experiments.layer_sums import LayerSums, layer_bytes
from darkmatter.stats.jackknife import finite_interval

__all__ = [
    "PASS_BYTES",
    "layer_groups",
    "layer_replicates",
    "layer_shard_contexts",
    "per_layer_intervals",
]

Tensor = torch.Tensor

PASS_BYTES = 128 * 2**20
"""Default budget for the per-block sums held during one pass over the store (all layers of a group).

Measured on a demo-sized synthetic layer store (16 layers, d = 576, 48 contexts of 128 tokens, 8 shards,
8 blocks; 1 CPU thread): peak RSS 661 MB against 559 MB without intervals (785 MB with a 256 MiB budget,
587 MB with 64 MiB), 7.4 s against 4.0 s, most of the extra time being the 8 refits per layer and
predictor."""


def layer_shard_contexts(shard_contexts: int, n_contexts: int, interval_blocks: int) -> int:
    """Contexts per shard of the layer store: at most ``shard_contexts`` (the harvest's), and small enough
    that the store has at least ``interval_blocks`` shards, since a jackknife block is whole shards
    (e.g. 48 contexts and 8 blocks: 6 per shard, not the harvest's 32, which would give 2 shards and no
    interval). Without intervals (fewer than 3 blocks) the harvest's shard size is kept."""
    if interval_blocks < 3:
        return shard_contexts
    return max(1, min(shard_contexts, n_contexts // interval_blocks))


def layer_groups(
    widths: dict[int, int], n_ids: int, blocks: int, with_loss: bool, budget: int = PASS_BYTES
) -> list[list[int]]:
    """The layers (in the given order) split into contiguous groups of about equal size whose per-block
    sums together fit ``budget`` bytes; one pass over the store per group."""
    layers = list(widths)
    if not layers:
        return []
    biggest = max(layer_bytes(d, n_ids, blocks, with_loss) for d in widths.values())
    per_group = max(1, budget // max(1, biggest))
    n_groups = -(-len(layers) // per_group)
    size = -(-len(layers) // n_groups)
    return [layers[a : a + size] for a in range(0, len(layers), size)]


def _enough_tokens(acc: LayerSums, name: str) -> bool:
    """Every replicate of regression ``name`` keeps more train tokens than coefficients and two test
    tokens (the token baseline checks its own counts)."""
    if name not in acc.moments["train"]:
        return True
    return replicates_fit(acc.moments["train"][name], acc.moments["test"][name])


def layer_replicates(
    acc: LayerSums, names: Sequence[str], train_count: Tensor, test_count: Tensor
) -> dict[str, list[float]]:
    """predictor -> its R² with each block left out, every fit refitted. None with fewer than 3 blocks; a
    predictor is left out when a block is too big to leave out or a refit fails (e.g. a target constant
    without that block)."""
    if acc.blocks < 3:
        return {}
    out: dict[str, list[float]] = {}
    for name in names:
        if not _enough_tokens(acc, name):
            continue
        try:
            if name == "token_identity":
                reps = [acc.token_identity_r2(train_count, test_count, b)[0] for b in range(acc.blocks)]
            else:
                reps = [acc.regression_r2(name, b) for b in range(acc.blocks)]
        except DataError:
            continue
        out[name] = reps
    return out


def per_layer_intervals(
    r2: dict[str, list[float]], replicates: Sequence[dict[str, list[float]]]
) -> dict[str, list[list[float]]]:
    """predictor -> per layer (as in ``r2``) its 95% jackknife interval ``[low, high]``, or ``[]`` for a
    layer without one; predictors without any interval are left out."""
    out: dict[str, list[list[float]]] = {}
    for name, values in r2.items():
        rows = [
            finite_interval(value, reps[name]) if name in reps else None
            for value, reps in zip(values, replicates, strict=True)
        ]
        if any(row is not None for row in rows):
            out[name] = [row if row is not None else [] for row in rows]
    return out
