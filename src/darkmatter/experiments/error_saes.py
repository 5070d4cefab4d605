"""SAEs trained on the linear and nonlinear parts of another SAE's error (paper Sec. 6, Fig. 8).

For an SAE and its error probe ``(W, b)``, the linear prediction of SaeError(x) = x − Sae(x):
- ``error``: SaeError(x) = x − Sae(x);
- ``linear``: LinearError(x) = x @ W + b;
- ``nonlinear``: NonlinearError(x) = SaeError(x) − LinearError(x);
so x = Sae(x) + LinearError(x) + NonlinearError(x).
The original code regressed Sae(x) − x and fed x·(−P); with a probe of x − Sae(x) these are the same inputs.
One TopK SAE per component is trained by a single ``FamilyTrainer`` run on the same train-split batches, the
components computed on the fly from the stored site. Quality is then measured on the test split by
streaming, with each component's total variance relative to that of x for context.

Under ``torchrun`` (``ranks``) the training is data-parallel and the quality pass deals the store's shards
across the ranks (contiguous shares, whole batches as one process reads them); its float64 sums are added up
across ranks, so every rank gets one process's numbers up to the order of the additions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field

from darkmatter.errors import ConfigError, DataError, ShapeError, StoreError
from darkmatter.experiments.inputs import on_device, placement
from darkmatter.hashing import sha256_hex, stable_hash
from darkmatter.lm.loading import resolve_device
from darkmatter.progress import Progress
from darkmatter.ranks import SINGLE, Ranks
from darkmatter.results import Result, config_hash, sae_identity, store_summary
from darkmatter.sae.codes import SparseCodes
from darkmatter.sae.model import SAE
from darkmatter.sae.train import DerivedInput, FamilyTrainer, SAESpec, TrainConfig, TrainingPoint
from darkmatter.sae.train_logs import TrainLogs, log_every
from darkmatter.stats.jackknife import finite_interval
from darkmatter.stats.metrics import FVU, L0, NMSE
from darkmatter.stats.split import Split
from darkmatter.store import ActivationStore, Batch

Tensor = torch.Tensor
EXPERIMENT = "error_saes"
COMPONENTS: tuple[str, ...] = ("linear", "nonlinear", "error")
Probe = tuple[Tensor, Tensor]  # (weights [d, d], bias [d]) of LinearError(x) = x @ weights + bias
_EQUATION_FIELDS = ("d_in", "d_sae", "activation", "k", "apply_b_dec_to_input", "input_scale", "normalize")


def _tensor_checksum(t: Tensor) -> list[Any]:
    """[dtype, shape, sha256 of the raw bytes] of ``t``."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return [str(t.dtype), list(t.shape), sha256_hex(flat.view(torch.uint8).numpy().tobytes())]


def check_component(component: str) -> str:
    """``component`` if it is one of ``COMPONENTS``, else ConfigError."""
    if component not in COMPONENTS:
        raise ConfigError(f"Unknown error component {component!r}; expected one of {', '.join(COMPONENTS)}.")
    return component


class ErrorComponents:
    """SaeError, LinearError and NonlinearError of one SAE and its probe, in float32 on the SAE's device."""

    def __init__(self, sae: SAE, probe: Probe) -> None:
        weights, bias = probe
        d = sae.cfg.d_in
        if tuple(weights.shape) != (d, d) or tuple(bias.shape) != (d,):
            raise ShapeError(
                f"The error probe has weights {tuple(weights.shape)} and bias {tuple(bias.shape)}, but the "
                f"SAE reads width {d}, so they must be ({d}, {d}) and ({d},); fit the probe for this SAE."
            )
        if not (bool(torch.isfinite(weights).all()) and bool(torch.isfinite(bias).all())):
            raise DataError("The error probe has NaN or infinite values; refit it.")
        self.sae = sae
        self.weights = weights.detach().to(sae.device, torch.float32)
        self.bias = bias.detach().to(sae.device, torch.float32)
        self._digest: str | None = None

    def _rows(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.sae.cfg.d_in:
            raise ShapeError(f"Expected activations [n, {self.sae.cfg.d_in}], got {tuple(x.shape)}.")
        return x.to(self.sae.device, torch.float32)

    @torch.no_grad()
    def sae_error(self, x: Tensor) -> Tensor:
        """x − Sae(x) for ``x [n, d]``; Sae runs in its own dtype, the difference in float32."""
        x = self._rows(x)
        return x - self.sae(x).to(torch.float32)

    @torch.no_grad()
    def linear_error(self, x: Tensor) -> Tensor:
        """x @ W + b for ``x [n, d]``: the probe's linear prediction of SaeError(x)."""
        return torch.addmm(self.bias, self._rows(x), self.weights)

    @torch.no_grad()
    def nonlinear_error(self, x: Tensor) -> Tensor:
        """SaeError(x) − LinearError(x) for ``x [n, d]``."""
        return self.sae_error(x) - self.linear_error(x)

    @torch.no_grad()
    def all(self, x: Tensor) -> dict[str, Tensor]:
        """Every component of ``x [n, d]`` from one SAE forward pass."""
        error, linear = self.sae_error(x), self.linear_error(x)
        return {"linear": linear, "nonlinear": error - linear, "error": error}

    def component(self, name: str) -> Callable[[Tensor], Tensor]:
        """The function computing component ``name``."""
        fns = {"linear": self.linear_error, "nonlinear": self.nonlinear_error, "error": self.sae_error}
        return fns[check_component(name)]

    def identity(self, name: str) -> str:
        """Hash of the component name, the SAE's computation (equation settings and tensors) and the probe."""
        if self._digest is None:
            cfg = self.sae.cfg.to_dict()
            tensors = [*(t for _, t in self.sae.named_tensors()), self.weights, self.bias]
            identity = {
                "equation": {k: cfg[k] for k in _EQUATION_FIELDS},
                "tensors": [_tensor_checksum(t) for t in tensors],
            }
            self._digest = stable_hash(identity, length=64)
        return f"{check_component(name)}:{self._digest}"


JACKKNIFE_BLOCKS = 8
"""Blocks of contexts (by id) the held-out FVU of each error SAE is jackknifed over."""


class ErrorSAEQuality(BaseModel):
    """Held-out quality of the SAE trained on one component."""

    component: str = Field(description="linear, nonlinear or error.")
    d_sae: int = Field(description="Number of latents.")
    k: int = Field(description="Active latents per token (TopK).")
    fvu: float = Field(description="FVU of the SAE on its component, test split.")
    nmse: float = Field(description="Mean over tokens of ‖c − ĉ‖² / ‖c‖², test split.")
    l0: float = Field(description="Mean active latents per token, test split.")
    dead_fraction: float = Field(description="Share of latents never active on the test split.")
    train_steps: int = Field(description="Optimiser steps taken.")
    train_tokens: int = Field(description="Training tokens seen (with repeats over epochs).")
    fvu_jackknife: list[float] = Field(
        default_factory=list,
        description=f"FVU with each of {JACKKNIFE_BLOCKS} blocks of test contexts left out (the SAE fixed).",
    )
    fvu_interval: list[float] | None = Field(None, description="95% jackknife interval of fvu.")


class ErrorSAEsResult(Result):
    """SAEs trained on an SAE's linear and nonlinear error: quality, training curves, component variance."""

    experiment: str = Field(EXPERIMENT, description="Experiment name; also the JSON file name.")
    site: str = Field(description="Stored site the components are computed from.")
    components: list[str] = Field(description="Components an SAE was trained on, in training order.")
    saes: dict[str, ErrorSAEQuality] = Field(description="Component -> held-out quality of its SAE.")
    curves: dict[str, list[TrainingPoint]] = Field(
        description="Component -> training curve: step, train FVU, L0, AuxK loss, dead fraction."
    )
    variance_ratio: dict[str, float] = Field(
        description="Component -> total variance of the component / total variance of x, test split."
    )
    n_test: int = Field(description="Test-split tokens evaluated.")


def _check_width(d_sae: int, k: int) -> None:
    if d_sae < 1 or k < 1:
        raise ConfigError(f"Error SAEs need d_sae >= 1 and k >= 1, got d_sae={d_sae}, k={k}.")
    if k > d_sae:
        raise ConfigError(f"Error SAEs: k={k} exceeds d_sae={d_sae}.")


def _site(store: ActivationStore, sae: SAE) -> str:
    site = sae.cfg.hook_site
    if site is None or site not in store.sites:
        raise StoreError(f"The SAE reads site {site!r}, which the store lacks (it has {store.sites}).")
    sae.check_input_width(store.d[site], site)
    return site


def train_error_saes(
    store: ActivationStore,
    sae: SAE,
    probe: Probe,
    *,
    components: Sequence[str] = ("linear", "nonlinear"),
    d_sae: int,
    k: int,
    train: TrainConfig,
    workdir: str | Path,
    split: Split,
    progress: Progress | None = None,
    dtype: torch.dtype | None = None,
    train_logs: TrainLogs | None = None,
    ranks: Ranks = SINGLE,
) -> tuple[ErrorSAEsResult, dict[str, SAE]]:
    """Train one TopK SAE per component together on the train tokens of ``split`` (resuming from ``workdir``),
    then evaluate them on its test tokens. Everything runs on ``train.device`` (None: the CPU), where the
    components are computed with ``sae`` in ``dtype`` (None: its own). ``train_logs`` records each SAE's
    training curve under its component's name (``linear/fvu``, ``nonlinear/l0``, ...). ``ranks``: under
    torchrun every rank calls this (training and quality pass shared) and gets the same SAEs and result.

    The returned SAEs have ``hook_site`` = the SAE's site and name their input in
    ``cfg.metadata["derived_input"]``; compute their inputs with ``ErrorComponents``.
    """
    comps = _check_components(components, d_sae, k)
    device = resolve_device(train.device or "cpu")
    parts = ErrorComponents(on_device(sae, device, dtype), probe)
    site = _site(store, sae)
    names = {c: f"{site}:{c}_error" for c in comps}
    derived = {names[c]: DerivedInput(site, parts.component(c), parts.identity(c)) for c in comps}
    specs = [SAESpec(name=c, site=names[c], d_sae=d_sae, k=k, kind="topk") for c in comps]
    trainer = FamilyTrainer(
        store,
        specs,
        train,
        workdir,
        split=split,
        derived=derived,
        log=train_logs,
        log_every=log_every(train_logs),
        ranks=ranks,
    )
    saes = dict(zip(comps, trainer.train(progress), strict=True))
    quality, ratios, n_test = _evaluate(store, parts, saes, split=split, device=trainer.device, ranks=ranks)
    config = {
        "sae": sae_identity(sae),
        "inputs": {c: parts.identity(c) for c in comps},
        "store": store_summary(store),
        "components": comps,
        "d_sae": d_sae,
        "k": k,
        "train": train.model_dump(),
        "split_seed": split.seed,
        "train_fraction": split.fraction,
    }
    result = ErrorSAEsResult(
        experiment=EXPERIMENT,
        config_hash=config_hash(config),
        seed=train.seed,
        config=config,
        site=site,
        components=comps,
        saes={
            c: ErrorSAEQuality(
                component=c,
                d_sae=d_sae,
                k=k,
                **quality[c],
                train_steps=trainer.step,
                train_tokens=trainer.step * train.batch_size,
            )
            for c in comps
        },
        curves={m.spec.name: [TrainingPoint.model_validate(h) for h in m.history] for m in trainer.members},
        variance_ratio=ratios,
        n_test=n_test,
    )
    return result, saes


def _check_components(components: Sequence[str], d_sae: int, k: int) -> list[str]:
    """The components, each once and at least one (ConfigError otherwise), after checking width and k."""
    comps = [check_component(c) for c in components]
    if not comps or len(set(comps)) != len(comps):
        raise ConfigError(f"Give each error component at most once and at least one, got {list(components)}.")
    _check_width(d_sae, k)
    return comps


class _TotalVariance:
    """Σ_t ‖x_t − x̄‖² over a stream, in float64 about the first chunk's mean."""

    def __init__(self) -> None:
        self.n = 0
        # reference [d], Σ(x − ref) [d], Σ(x − ref)² [d]
        self.state: tuple[Tensor, Tensor, Tensor] | None = None

    def update(self, x: Tensor) -> None:
        x = x.detach().to(torch.float64)  # the sums stay on x's device
        if self.state is None:
            ref = x.mean(0)
            self.state = (ref, torch.zeros_like(ref), torch.zeros_like(ref))
        ref, s, ss = self.state
        xs = x - ref
        s += xs.sum(0)
        ss += xs.pow(2).sum(0)
        self.n += x.shape[0]

    def reduce_(self, ranks: Ranks) -> None:
        """Add up every rank's sums, about the first reference in rank order (the others are moved to it)."""
        refs = ranks.gather(None if self.state is None else self.state[0].cpu())
        common = next((r for r in refs if r is not None), None)
        if common is None:
            return
        if self.state is None:
            zero = torch.zeros_like(common, device=ranks.collective_device)
            self.state = (zero.clone(), zero.clone(), zero.clone())
        ref, s, ss = self.state
        if not torch.equal(ref.cpu(), common):
            delta = ref - common.to(ref.device)  # x − R = (x − r) + delta
            s, ss = s + self.n * delta, ss + 2 * delta * s + self.n * delta * delta
        self.state = (common.to(ref.device), s, ss)
        count = torch.tensor([self.n], dtype=torch.int64, device=ref.device)
        ranks.sum_([s, ss, count])
        self.n = int(count[0])

    def compute(self) -> float:
        if self.state is None or self.n == 0:
            raise DataError("No test-split tokens to measure variance on; harvest more text.")
        _, s, ss = self.state
        return float((ss - s**2 / self.n).clamp_min(0).sum())


def _jackknife_fvu(blocks: list[FVU]) -> list[float]:
    """FVU over every block but one, for each block that holds tokens."""
    out = []
    for b, block in enumerate(blocks):
        if block.n == 0:
            continue
        rest = FVU(block.d)
        for other in blocks[:b] + blocks[b + 1 :]:
            rest.merge(other)
        out.append(rest.compute())
    return out


@torch.no_grad()
def _evaluate(
    store: ActivationStore,
    parts: ErrorComponents,
    saes: Mapping[str, SAE],
    *,
    split: Split,
    device: str | torch.device,
    batch_tokens: int = 4096,
    ranks: Ranks = SINGLE,
) -> tuple[dict[str, dict[str, Any]], dict[str, float], int]:
    """Per-component quality, variance ratios and the token count: one streaming pass over the test split,
    on ``device`` (the components' SAE must be there); ``ranks``: each reads its share of the shards and the
    sums are added up."""
    site = _site(store, parts.sae)
    for c, s in saes.items():
        s.check_input_width(parts.sae.cfg.d_in, f"{c} error of {site}")
    placed = {c: on_device(s, device) for c, s in saes.items()}
    fvu = {c: FVU(s.cfg.d_in) for c, s in saes.items()}
    nmse = {c: NMSE(s.cfg.d_in) for c, s in saes.items()}
    l0 = {c: L0(s.cfg.d_sae) for c, s in saes.items()}
    var = {q: _TotalVariance() for q in ("x", *COMPONENTS)}
    blocks = {c: [FVU(s.cfg.d_in) for _ in range(JACKKNIFE_BLOCKS)] for c, s in saes.items()}
    shards = ranks.share(range(store.n_shards)) if ranks.active else None
    for batch in store.iter_batches([site], batch_tokens=batch_tokens, device=device, shards=shards):
        test = ~split.mask(batch.context, batch.position)
        if not bool(test.any()):
            continue
        x = batch.acts[site][test]
        block_of = (batch.context[test] * JACKKNIFE_BLOCKS) // store.n_contexts
        comps = parts.all(x)
        var["x"].update(x)
        for q, v in comps.items():
            var[q].update(v)
        for c, s in placed.items():
            target = comps[c]
            x_hat, codes = s.reconstruct(target)
            fvu[c].update(target, x_hat)
            for b in block_of.unique().tolist():
                rows = block_of == b
                blocks[c][b].update(target[rows], x_hat[rows])
            nmse[c].update(target, x_hat)
            l0[c].update_sparse(codes.indices, codes.values)
    if ranks.active:
        _reduce(ranks, fvu, nmse, l0, blocks, var)
    var_x = var["x"].compute()
    if not var_x > 0:
        raise DataError(f"Activations at {site} are constant on the test split; their variance is zero.")
    quality: dict[str, dict[str, Any]] = {
        c: {
            "fvu": fvu[c].compute(),
            "nmse": nmse[c].compute(),
            "l0": l0[c].compute(),
            "dead_fraction": l0[c].dead_fraction(),
            "fvu_jackknife": _jackknife_fvu(blocks[c]),
        }
        for c in saes
    }
    for numbers in quality.values():
        numbers["fvu_interval"] = finite_interval(numbers["fvu"], numbers["fvu_jackknife"])
    return quality, {q: var[q].compute() / var_x for q in COMPONENTS}, var["x"].n


def _reduce(
    ranks: Ranks,
    fvu: Mapping[str, FVU],
    nmse: Mapping[str, NMSE],
    l0: Mapping[str, L0],
    blocks: Mapping[str, list[FVU]],
    var: Mapping[str, _TotalVariance],
) -> None:
    """Every rank's sums of the quality pass added up (every rank calls this with the same components)."""
    for c in fvu:
        for metric in (fvu[c], nmse[c], l0[c], *blocks[c]):
            metric.all_reduce_()
    for total in var.values():
        total.reduce_(ranks)


def evaluate_error_saes(
    store: ActivationStore,
    sae: SAE,
    probe: Probe,
    error_saes: Mapping[str, SAE],
    *,
    split: Split,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    ranks: Ranks = SINGLE,
) -> dict[str, dict[str, Any]]:
    """Test-split fvu, nmse, l0 and dead_fraction of SAEs keyed by the component each was trained on, on
    ``device`` (``sae`` in ``dtype``, None: its own); ``ranks``: every rank calls this and reads its share
    of the store."""
    for c in error_saes:
        check_component(c)
    parts = ErrorComponents(on_device(sae, device, dtype), probe)
    quality, _, _ = _evaluate(store, parts, error_saes, split=split, device=device, ranks=ranks)
    return quality


def component_activations_fn(
    sae: SAE,
    probe: Probe,
    error_sae: SAE,
    component: str,
    latents: Sequence[int],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Callable[[Batch], Tensor]:
    """A function from a store batch to ``[n, len(latents)]`` float32 CPU activations of ``error_sae``'s
    chosen latents on ``component``, computed from ``batch.acts[sae.cfg.hook_site]`` on ``device`` (None:
    ``sae``'s), both SAEs there in ``dtype`` (None: their own); the result is moved to the host."""
    dev = placement(device, sae)
    fn = ErrorComponents(on_device(sae, dev, dtype), probe).component(component)
    error_sae = on_device(error_sae, dev, dtype)
    site = sae.cfg.hook_site
    if site is None:
        raise ConfigError("The SAE names no hook site, so its activations cannot be found in a batch.")
    error_sae.check_input_width(sae.cfg.d_in, f"{component} error of {site}")
    columns = latent_columns(latents, error_sae.cfg.d_sae)

    @torch.no_grad()
    def activations(batch: Batch) -> Tensor:
        if site not in batch.acts:
            raise StoreError(f"The batch lacks site {site}; load it with that site.")
        return columns(error_sae.encode_sparse(fn(batch.acts[site])))

    return activations


def latent_columns(latents: Sequence[int], width: int) -> Callable[[SparseCodes], Tensor]:
    """A function from sparse codes ``[n, m]`` to ``[n, len(latents)]`` float32 host activations of the
    chosen latents (each in ``[0, width)``, at most once), in the order given."""
    ids = torch.as_tensor(list(latents), dtype=torch.long)
    if ids.numel() == 0 or len(set(ids.tolist())) != ids.numel():
        raise ConfigError(f"Choose at least one latent and each at most once, got {list(latents)}.")
    if bool((ids < 0).any()) or bool((ids >= width).any()):
        raise ConfigError(f"Latent indices must lie in [0, {width}), got {ids.tolist()}.")
    slot_of = torch.full((width,), -1, dtype=torch.long)
    slot_of[ids] = torch.arange(ids.numel())

    def columns(codes: SparseCodes) -> Tensor:
        idx, vals = codes.indices.cpu(), codes.values.cpu().to(torch.float32)
        slot = slot_of[idx]  # [n, m]: column of each active latent in the output, -1 when not chosen
        hit = (slot >= 0) & (vals != 0)
        out = torch.zeros(idx.shape[0], ids.numel())
        rows = torch.arange(idx.shape[0])[:, None].expand_as(idx)
        out[rows[hit], slot[hit]] = vals[hit]
        return out

    return columns
