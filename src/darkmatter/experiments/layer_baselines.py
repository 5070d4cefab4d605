"""Fig 13 / Fig 3: how well simple baselines predict an SAE's squared error norm, layer by layer.

For one SAE per layer, the target is y = ‖x − Sae(x)‖² per token and each predictor's R² is measured on
held-out (test-split) tokens:

- ``activations``: linear regression on x with bias (Fig 3's "norm R²" and Fig 13's "Acts");
- ``token_identity``: the mean y of each token id over the train tokens, ids unseen in train getting the
  global train mean (the paper's version was in-sample; this one is held out);
- ``l0``, ``activation_norm``, ``model_loss``: linear regression with bias on the SAE's per-token L0, on
  ‖x‖, and on the next-token loss.

Every number comes from streaming sums: the regressions from train and test `Moments` (fit on train,
scored exactly on test), the token baseline from per-token-id sums of y and y² (over the ids the store
holds, not the tokens), FVU and L0 from the test moments. The last position of every context is left out
for all predictors (it has no next-token loss), so they are all scored on the same tokens.

Intervals: every sum is kept per block of whole shards (``interval_blocks``) and each R² gets a 95%
delete-one-block jackknife interval, every fit (and the per-id means) refitted without the block
(`layer_intervals`). Memory is O(blocks · (d² + ids)) per layer, independent of the token count; the layers
are processed in groups within a byte budget (`PASS_BYTES`), one pass over the store per group, each layer's
SAE running once; with one block (no intervals) and small d that is a single pass.

Under ``torchrun`` (``ranks``) every rank harvests its share of the store's shards, the SAEs are trained
data-parallel, and each pass reads this rank's contiguous share of the shards (whole batches, as one process
reads them); the sums are added up across ranks in float64 (`reduce_layer_sums`) and every rank scores the
totals, so the numbers equal one process's up to the order of the additions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from darkmatter.errors import ConfigError, StoreError
from darkmatter.experiments.decomposition.accumulators import block_of, n_blocks
from darkmatter.experiments.inputs import on_device, placement
from darkmatter.experiments.layer_intervals import (
    PASS_BYTES,
    layer_groups,
    layer_replicates,
    layer_shard_contexts,
    per_layer_intervals,
)
from darkmatter.experiments.layer_notes import grouping_note, result_notes, run_notes
from darkmatter.experiments.layer_saes import (
    RESID_SITE,
    SAE_KEY,
    Log,
    check_layers,
    layer_site,
    load_or_train,
    train_layer_saes,
)
from darkmatter.experiments.layer_sums import REGRESSIONS, LayerSums, reduce_layer_sums
from darkmatter.harvest import HarvestConfig, harvest, store_identity
from darkmatter.lm.loading import LoadedLM
from darkmatter.progress import Progress
from darkmatter.ranks import SINGLE, Ranks
from darkmatter.results import Result, config_hash, sae_identity, store_summary
from darkmatter.sae import SAE
from darkmatter.sae.train import TrainConfig
from darkmatter.sae.train_logs import TrainLogs
from darkmatter.stats import Split
from darkmatter.store import MANIFEST, ActivationStore, identity_hash
from darkmatter.text import TextConfig, make_contexts

__all__ = [
    "EXPERIMENT",
    "PREDICTORS",
    "REGRESSIONS",
    "RESID_SITE",
    "LayerBaselinesResult",
    "layer_baselines",
    "run",
    "train_layer_saes",
]

Tensor = torch.Tensor

EXPERIMENT = "layer_baselines"
PREDICTORS = ("activations", "token_identity", "l0", "activation_norm", "model_loss")
STORE_DIR = "store_layers"
SAE_DIR = "saes_layers"


class LayerBaselinesResult(Result):
    """Held-out R² of predicting the squared SAE error norm from each baseline, per layer."""

    experiment: str = Field(EXPERIMENT, description="Experiment name; also the JSON file name.")
    layers: list[int] = Field(description="Layers, ascending; every per-layer list follows this order.")
    sites: list[str] = Field(description="Hook site read at each layer.")
    r2: dict[str, list[float]] = Field(
        description="Test-split R² per predictor (activations, token_identity, l0, activation_norm, "
        "model_loss) per layer; model_loss is absent when the store has no per-token loss."
    )
    fvu: list[float] = Field(description="The SAE's FVU on the test tokens, per layer.")
    l0: list[float] = Field(description="The SAE's mean L0 on the test tokens, per layer.")
    n_train_tokens: int = Field(description="Tokens the fits and per-token means were computed on.")
    n_test_tokens: int = Field(description="Tokens every R², FVU and L0 is measured on.")
    interval_blocks: int = Field(
        0, description="Blocks of whole shards left out one at a time for the intervals (0: no intervals)."
    )
    intervals: dict[str, list[list[float]]] = Field(
        default_factory=dict,
        description="predictor -> per layer (as r2) the 95% delete-one-block jackknife interval [low, high] "
        "of its R², every fit refitted without the block; [] for a layer without one, and empty with fewer "
        "than 3 blocks.",
    )
    notes: list[str] = Field(default_factory=list, description="Choices and degenerate cases, in words.")


def _sae_identity(sae: SAE) -> dict[str, Any]:
    return {**sae_identity(sae), "key": sae.cfg.metadata.get(SAE_KEY)}


def _check_inputs(store: ActivationStore, saes: Mapping[int, SAE], site_template: str) -> dict[int, str]:
    """Each layer's site, once every SAE is known to fit the store (layers ascending)."""
    if not saes:
        raise ConfigError("layer_baselines needs at least one SAE (a mapping layer -> SAE).")
    sites = {int(layer): layer_site(site_template, int(layer)) for layer in sorted(saes)}
    missing = {layer: s for layer, s in sites.items() if s not in store.sites}
    if missing:
        raise StoreError(
            f"Store {store.root} has no activations for layer(s) {sorted(missing)} (sites "
            f"{list(missing.values())}); it holds {store.sites}. Harvest those sites or drop those layers."
        )
    for layer, site in sites.items():
        sae = saes[layer]
        if sae.cfg.hook_site is not None and sae.cfg.hook_site != site:
            raise ConfigError(
                f"The SAE given for layer {layer} was trained on {sae.cfg.hook_site!r} but would be applied "
                f"to {site!r}; key each SAE by the layer it reads."
            )
        sae.check_input_width(store.d[site], site)
    return sites


def _id_index(store: ActivationStore, device: torch.device) -> tuple[Tensor, int]:
    """(lookup [max id + 1] on ``device`` from a token id to its row in the per-id sums, rows): one row per
    id the store holds, so the per-id sums scale with the ids seen, not the vocabulary."""
    tokens = torch.as_tensor(store.tokens.astype("int64")).reshape(-1)
    ids = torch.unique(tokens)
    lookup = torch.full((int(ids[-1]) + 1,), -1, dtype=torch.int64)
    lookup[ids] = torch.arange(len(ids))
    return lookup.to(device), len(ids)


def _accumulate(
    store: ActivationStore,
    layers: Mapping[int, LayerSums],
    sites: Mapping[int, str],
    *,
    split: Split,
    lookup: Tensor,
    n_ids: int,
    blocks: int,
    batch_tokens: int,
    device: torch.device,
    shards: list[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """One streaming pass on ``device`` (over ``shards``, None: all) feeding ``layers``' sums; returns the
    train and test token counts per block and id [blocks, ids] (on ``device``)."""
    with_loss = store.has_loss
    train_count = torch.zeros(blocks, n_ids, dtype=torch.int64, device=device)  # shared by all layers
    test_count = torch.zeros(blocks, n_ids, dtype=torch.int64, device=device)
    batches = store.iter_batches(
        list(sites.values()), batch_tokens=batch_tokens, drop_last_position=True, device=device, shards=shards
    )
    for batch in batches:
        k = block_of(store, blocks, int(batch.context[0]))  # a batch never spans two shards
        train = split.mask(batch.context, batch.position)
        token = lookup[batch.token]
        train_count[k] += torch.bincount(token[train], minlength=n_ids)
        test_count[k] += torch.bincount(token[~train], minlength=n_ids)
        loss = batch.loss if with_loss else None
        if with_loss and loss is None:
            raise StoreError(f"Store {store.root} says it holds per-token loss but a shard has none.")
        for layer, acc in layers.items():
            acc.update(batch.acts[sites[layer]], token, loss, train, k)
    return train_count, test_count


@dataclass
class _LayerScores:
    """One layer's numbers, kept once its sums are freed."""

    r2: dict[str, float]
    fvu: float
    l0: float
    unseen: int
    constant_inputs: list[str]
    replicates: dict[str, list[float]]


def _score(acc: LayerSums, names: Sequence[str], train_count: Tensor, test_count: Tensor) -> _LayerScores:
    """R² per predictor, FVU and mean L0 on the test tokens, the test tokens whose id is unseen in train,
    and the jackknife replicates (none with fewer than 3 blocks)."""
    r2: dict[str, float] = {}
    unseen = 0
    for name in names:
        if name == "token_identity":
            r2[name], unseen = acc.token_identity_r2(train_count, test_count)
        else:
            r2[name] = acc.regression_r2(name)
    fvu, mean_l0 = acc.quality()
    reps = layer_replicates(acc, names, train_count, test_count)
    return _LayerScores(r2, fvu, mean_l0, unseen, list(acc.constant_inputs), reps)


def _config(
    store: ActivationStore, saes: Mapping[int, SAE], sites: dict[int, str], split: Split, interval_blocks: int
) -> dict[str, Any]:
    return {
        "layers": list(sites),
        "sites": list(sites.values()),
        "split_seed": split.seed,
        "train_fraction": split.fraction,
        "drop_last_position": True,
        "store": store_summary(store),
        "saes": {str(layer): _sae_identity(saes[layer]) for layer in sites},
        "interval_blocks": interval_blocks,
    }


def layer_baselines(
    store: ActivationStore,
    saes: Mapping[int, SAE],
    *,
    split: Split,
    batch_tokens: int = 4096,
    site_template: str = RESID_SITE,
    interval_blocks: int = 8,
    pass_bytes: int = PASS_BYTES,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    ranks: Ranks = SINGLE,
) -> LayerBaselinesResult:
    """R² on test tokens of predicting each layer's ‖x − Sae(x)‖² from the five baselines (module doc).

    ``saes`` maps a layer to its SAE; each reads ``site_template`` of its layer and runs on its own device.
    ``interval_blocks``: keep every sum in that many blocks of whole shards (at most one per shard) for
    delete-one-block jackknife intervals; with fewer than 3 there are none. ``pass_bytes``: budget for the
    per-block sums of one pass; layers beyond it are processed in further passes over the store (each
    layer's SAE runs once whatever the grouping, and the numbers do not depend on it). Bad input: a layer
    the store lacks is a StoreError, an SAE of the wrong width a ShapeError, a constant target a DataError
    naming the layer. Everything runs on ``device`` (None: the first SAE's), each SAE in ``dtype`` (None:
    its own); the float64 sums stay there. ``ranks``: under torchrun every rank calls this, reads its share
    of the shards, and gets the result of the summed sums.
    """
    sites = _check_inputs(store, saes, site_template)
    dev = placement(device, saes[min(saes)])
    saes = {layer: on_device(sae, dev, dtype) for layer, sae in saes.items()}
    store.require_complete()
    with_loss = store.has_loss
    lookup, n_ids = _id_index(store, dev)
    blocks = n_blocks(store, interval_blocks)
    names = [p for p in PREDICTORS if with_loss or p != "model_loss"]
    widths = {layer: store.d[site] for layer, site in sites.items()}
    groups = layer_groups(widths, n_ids, blocks, with_loss, pass_bytes)
    scores, counts = _scores(
        store, saes, sites, groups, names, split, lookup, n_ids, blocks, batch_tokens, ranks
    )
    n_train, n_test = int(counts[0]), int(counts[1])
    ordered = [scores[layer] for layer in sites]
    r2 = {name: [sc.r2[name] for sc in ordered] for name in names}
    intervals = per_layer_intervals(r2, [sc.replicates for sc in ordered])
    config = _config(store, saes, sites, split, interval_blocks)
    used = blocks if intervals else 0
    blocks_note = (interval_blocks, used, store.n_shards)
    constant = {layer: sc.constant_inputs for layer, sc in scores.items()}
    notes = result_notes(constant, split, with_loss, ordered[-1].unseen, n_test, blocks_note)
    notes += grouping_note(groups)
    return LayerBaselinesResult(
        config_hash=config_hash(config),
        seed=split.seed,
        config=config,
        layers=list(sites),
        sites=list(sites.values()),
        r2=r2,
        fvu=[sc.fvu for sc in ordered],
        l0=[sc.l0 for sc in ordered],
        n_train_tokens=n_train,
        n_test_tokens=n_test,
        interval_blocks=used,
        intervals=intervals,
        notes=notes,
    )


def _scores(
    store: ActivationStore,
    saes: Mapping[int, SAE],
    sites: Mapping[int, str],
    groups: list[list[int]],
    names: list[str],
    split: Split,
    lookup: Tensor,
    n_ids: int,
    blocks: int,
    batch_tokens: int,
    ranks: Ranks,
) -> tuple[dict[int, _LayerScores], Tensor]:
    """Each layer's scores, one pass over (this rank's share of) the store per group of layers, the sums
    met across ranks; and the [train, test] token counts."""
    dev = lookup.device
    widths = {layer: store.d[site] for layer, site in sites.items()}
    with_loss = store.has_loss
    shards = ranks.share(range(store.n_shards)) if ranks.active else None
    scores: dict[int, _LayerScores] = {}
    counts = torch.zeros(2, dtype=torch.int64, device=dev)
    for group in groups:
        layers = {
            layer: LayerSums(layer, sites[layer], saes[layer], widths[layer], n_ids, with_loss, blocks)
            for layer in group
        }
        train_count, test_count = _accumulate(
            store,
            layers,
            {layer: sites[layer] for layer in group},
            split=split,
            lookup=lookup,
            n_ids=n_ids,
            blocks=blocks,
            batch_tokens=batch_tokens,
            device=dev,
            shards=shards,
        )
        if ranks.active:
            reduce_layer_sums(list(layers.values()), train_count, test_count, ranks)
        for layer, acc in layers.items():
            scores[layer] = _score(acc, names, train_count, test_count)
        counts = torch.stack([train_count.sum(), test_count.sum()])
        del layers  # free this group's per-block sums before the next pass
    return scores, counts


def _reused_shard_size(
    root: Path, identity: dict[str, Any], hcfg: HarvestConfig, log: Log, ranks: Ranks
) -> HarvestConfig:
    """``hcfg`` with the shard size of a store harvested at ``root`` earlier with another (rank 0 looks)."""
    shard = hcfg.shard_contexts
    earlier = ranks.broadcast(_earlier_shard_contexts(root, identity) if ranks.leader else None)
    if earlier is None or earlier == shard:
        return hcfg
    log(
        f"layer_baselines: {root} was harvested with {earlier} contexts per shard; reusing it as it is "
        f"(delete it for {shard} per shard)"
    )
    return hcfg.model_copy(update={"shard_contexts": earlier})


def _earlier_shard_contexts(root: Path, identity: dict[str, Any]) -> int | None:
    """The shard size of a store already at ``root`` whose identity is ``identity`` but for its shard size
    (e.g. harvested before the layer store's shards were made small for the intervals), else None.

    The store identity includes the shard size, so a store of another shard size is never resumed with
    this one's layout; reusing it with its own keeps its (identical) activations instead of refusing it."""
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        theirs = json.loads(path.read_text()).get("identity")
    except (OSError, ValueError, AttributeError):
        return None  # create_or_resume reports a damaged store
    if not isinstance(theirs, dict) or "shard_contexts" not in theirs:
        return None
    if identity_hash({**theirs, "shard_contexts": identity["shard_contexts"]}) != identity_hash(identity):
        return None  # another configuration: create_or_resume refuses it
    return int(theirs["shard_contexts"])


def run(
    lm: LoadedLM,
    text_cfg: TextConfig,
    layers: Sequence[int],
    out_dir: str | Path,
    *,
    d_sae: int,
    k: int,
    kind: Literal["topk", "batchtopk"] = "topk",
    train: TrainConfig | None = None,
    harvest_cfg: HarvestConfig | None = None,
    split: Split,
    batch_tokens: int = 4096,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    interval_blocks: int = 8,
    log: Log | None = None,
    progress: Callable[[str], Progress | None] | None = None,
    train_logs: TrainLogs | None = None,
    ranks: Ranks = SINGLE,
) -> LayerBaselinesResult:
    """Harvest resid_post of ``layers`` (with loss) into ``out_dir/store_layers``, train one SAE per layer
    (or reuse ``out_dir/saes_layers/<L>/``), and compute `layer_baselines` on ``device`` with the SAEs in
    ``dtype`` (None: as trained); the caller writes the result. The SAEs train on ``train.device`` (curves
    to ``train_logs``, tags ``layer<L>/...``).

    ``harvest_cfg`` supplies dtype, batch size, the largest shard size and ``with_loss`` (without it the
    model-loss baseline is left out and the forward stops after the last layer asked for); its sites are
    overridden, and its shard size lowered so that the store has at least ``interval_blocks`` shards (see
    `layer_shard_contexts`). Resumable: the harvest resumes its shards, the trainer its checkpoint, saved
    SAEs are reused; a store harvested earlier with another shard size is reused with its own (never mixed).
    ``ranks``: under torchrun every rank calls this (harvest, training and sums are shared, rank 0 decides
    what is reused and alone writes the SAEs) and gets the same result.
    """
    layers = sorted(check_layers(layers))  # the store identity lists sites in this order
    log = log or (lambda _msg: None)
    out = Path(out_dir)
    train = train or TrainConfig()
    sites = [RESID_SITE.format(layer=layer) for layer in layers]
    hcfg = (harvest_cfg or HarvestConfig()).model_copy(update={"sites": sites})
    contexts = make_contexts(text_cfg, lm.tokenizer, lm.bos_token_id)
    n_contexts = int(contexts.tokens.shape[0])
    shard = layer_shard_contexts(hcfg.shard_contexts, n_contexts, interval_blocks)
    hcfg = hcfg.model_copy(update={"shard_contexts": shard})
    hcfg = _reused_shard_size(out / STORE_DIR, store_identity(lm, text_cfg, hcfg, contexts), hcfg, log, ranks)
    bars = progress or (lambda _name: None)
    store = harvest(
        lm, contexts, text_cfg, hcfg, str(out / STORE_DIR), progress=bars("layer sweep: harvest"), ranks=ranks
    )
    log(f"layer_baselines: store {store.root} ({store.n_contexts} contexts x {store.ctx_len} tokens)")
    settings = {
        "d_sae": d_sae,
        "k": k,
        "kind": kind,
        "train": train.model_dump(),
        "split_seed": split.seed,
        "train_fraction": split.fraction,
    }
    bar = bars("layer sweep: train SAEs")
    saes, reused = load_or_train(
        store, layers, out / SAE_DIR, settings, train, split, log, bar, train_logs, ranks=ranks
    )
    result = layer_baselines(
        store,
        saes,
        split=split,
        batch_tokens=batch_tokens,
        interval_blocks=interval_blocks,
        device=device,
        dtype=dtype,
        ranks=ranks,
    )
    config = {
        **result.config,
        "text": text_cfg.model_dump(),
        "harvest": hcfg.model_dump(),
        "sae_training": settings,
    }
    notes = list(result.notes) + run_notes(reused, kind, SAE_DIR)
    return result.model_copy(update={"config": config, "config_hash": config_hash(config), "notes": notes})
