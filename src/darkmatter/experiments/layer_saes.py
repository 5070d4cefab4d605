"""Training one SAE per layer for the error-norm baselines across layers (`layer_baselines`), and reusing
the SAEs a previous run saved.

Under ``torchrun`` every rank takes part: rank 0 decides which saved SAEs are reused (and tells the others),
the rest are trained data-parallel by one `FamilyTrainer` (every rank ends with the same SAEs) and rank 0
alone saves them."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from darkmatter.errors import ConfigError, StoreError
from darkmatter.progress import Progress
from darkmatter.ranks import SINGLE, Ranks
from darkmatter.results import config_hash
from darkmatter.sae import SAE, load_sae, save_sae
from darkmatter.sae.train import FamilyTrainer, SAESpec, TrainConfig
from darkmatter.sae.train_logs import TrainLogs, log_every
from darkmatter.stats import Split
from darkmatter.store import ActivationStore

Log = Callable[[str], None]

RESID_SITE = "blocks.{layer}.hook_resid_post"
SAE_KEY = "layer_baselines_key"  # SAE metadata entry: hash of the settings a trained SAE came from


def layer_site(site_template: str, layer: int) -> str:
    """The hook site of ``layer`` from a template such as ``blocks.{layer}.hook_resid_post``."""
    if "{layer}" not in site_template:
        raise ConfigError(f"site_template must contain '{{layer}}', found {site_template!r}.")
    return site_template.format(layer=layer)


def check_layers(layers: Sequence[int]) -> list[int]:
    """The layers as ints: at least one, distinct, non-negative (ConfigError otherwise)."""
    out = [int(layer) for layer in layers]
    if not out:
        raise ConfigError("Give at least one layer.")
    if len(set(out)) != len(out) or any(layer < 0 for layer in out):
        raise ConfigError(f"Layers must be distinct non-negative integers, found {list(layers)}.")
    return out


def train_layer_saes(
    store: ActivationStore,
    layers: Sequence[int],
    *,
    d_sae: int,
    k: int,
    train: TrainConfig,
    workdir: str | Path,
    split: Split,
    kind: Literal["topk", "batchtopk"] = "topk",
    site_template: str = RESID_SITE,
    progress: Progress | None = None,
    train_logs: TrainLogs | None = None,
    ranks: Ranks = SINGLE,
) -> dict[int, SAE]:
    """One SAE per layer on ``site_template`` (resid_post), all trained together by one FamilyTrainer run
    on the same batches of the train tokens of ``split``; the trainer checkpoints in ``workdir`` and resumes
    from it. ``train_logs`` records each SAE's training curve under the tag ``layer<L>/...``. ``ranks``:
    data-parallel under torchrun (every rank calls this and gets the same SAEs)."""
    layers = check_layers(layers)
    sites = {layer: layer_site(site_template, layer) for layer in layers}
    missing = [layer for layer, s in sites.items() if s not in store.sites]
    if missing:
        raise StoreError(
            f"Store {store.root} has no activations for layer(s) {missing}; it holds {store.sites}."
        )
    specs = [
        SAESpec(name=f"layer{layer}", site=sites[layer], d_sae=d_sae, k=k, kind=kind) for layer in layers
    ]
    trainer = FamilyTrainer(
        store,
        specs,
        train,
        workdir,
        split=split,
        log=train_logs,
        log_every=log_every(train_logs),
        ranks=ranks,
    )
    return dict(zip(layers, trainer.train(progress=progress), strict=True))


def _saved(
    layers: list[int], root: Path, settings: dict[str, Any], key: str
) -> tuple[dict[int, SAE], list[int]] | str:
    """(The SAEs saved under ``root/<L>/``, the layers still to train), or why a saved one cannot be used."""
    saes: dict[int, SAE] = {}
    todo: list[int] = []
    for layer in layers:
        folder = root / str(layer)
        if not folder.exists():
            todo.append(layer)
            continue
        sae = load_sae(folder)
        site = RESID_SITE.format(layer=layer)
        theirs = sae.cfg.metadata.get(SAE_KEY)
        if sae.cfg.hook_site not in (None, site) or (theirs is not None and theirs != key):
            return (
                f"{folder} holds an SAE trained for {sae.cfg.hook_site!r} with other settings than requested "
                f"(d_sae={settings['d_sae']}, k={settings['k']}, kind={settings['kind']}, training, split, "
                "store). Delete the folder to retrain it, or use another output directory."
            )
        saes[layer] = sae
    return saes, todo


def load_or_train(
    store: ActivationStore,
    layers: list[int],
    root: Path,
    settings: dict[str, Any],
    train: TrainConfig,
    split: Split,
    log: Log,
    progress: Progress | None = None,
    train_logs: TrainLogs | None = None,
    ranks: Ranks = SINGLE,
) -> tuple[dict[int, SAE], list[int]]:
    """Reuse ``root/<L>/`` SAEs (checking they match the settings), train the rest together, save them.

    ``ranks``: every rank calls this; rank 0 decides what is reused (the others follow), the training is
    data-parallel (every rank ends with the same SAEs) and rank 0 alone saves them."""
    key = config_hash({**settings, "store": store.manifest["identity_hash"]})
    found = _saved(layers, root, settings, key) if ranks.leader else None
    decided = ranks.broadcast(found if isinstance(found, str) or found is None else sorted(found[0]))
    if isinstance(decided, str):
        raise ConfigError(decided)
    assert decided is not None
    reused = [layer for layer in layers if layer in decided]
    # rank 0 has the SAEs it checked; the other ranks load them
    saes = found[0] if isinstance(found, tuple) else {layer: load_sae(root / str(layer)) for layer in reused}
    todo = [layer for layer in layers if layer not in saes]
    if reused:
        log(f"layer_baselines: reusing SAEs for layers {reused} from {root}")
    if todo:
        workdir = root / f".training-{config_hash({'key': key, 'layers': todo})}"
        log(f"layer_baselines: training SAEs for layers {todo}")
        trained = train_layer_saes(
            store,
            todo,
            d_sae=settings["d_sae"],
            k=settings["k"],
            kind=settings["kind"],
            train=train,
            workdir=workdir,
            split=split,
            progress=progress,
            train_logs=train_logs,
            ranks=ranks,
        )
        # the ranks trained in lockstep, so every rank keeps the same SAEs (saving folds the input scale
        # into the weights, so a loaded copy would differ in the last bits from the one rank 0 keeps)
        for layer, sae in trained.items():
            sae.cfg.metadata[SAE_KEY] = key
            saes[layer] = sae
        ranks.barrier()  # every rank is past reading the trainer's checkpoint before rank 0 removes it
        if ranks.leader:
            for layer, sae in trained.items():
                tmp = root / f".saving-{layer}"
                if tmp.exists():
                    shutil.rmtree(tmp)
                save_sae(sae, tmp)
                tmp.rename(root / str(layer))  # a folder appears complete or not at all
            shutil.rmtree(workdir, ignore_errors=True)  # optimizer state; the saved SAEs are what we keep
    return {layer: saes[layer] for layer in layers}, reused
