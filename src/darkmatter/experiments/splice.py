"""The splice engine: CE and KL of a causal LM with a site's activations replaced at positions ``>= start``.

Each batch runs the model once, clean, and then once per spliced setting. A splice at layer L leaves
layers < L (and layer L itself for a ``resid_post`` site) unchanged, so with ``prefix_cache`` the clean
pass records the output of the last unchanged decoder layer and every spliced pass replays it and computes
only the layers after it (the skipped layers' ``forward`` is swapped for a replay for the duration of the
pass). Logits are computed only for positions ``>= start`` (``logits_to_keep``) when the model supports it.
Without ``prefix_cache`` every pass is the plain full forward; the two agree to float rounding.

Under ``torchrun`` each rank runs a contiguous share of whole batches (``rank_batches``, passed as
``batches``), so every batch is computed exactly as in one process; ``merge_outputs`` joins the ranks' outputs
in rank order and ``gather_splices`` does it across ranks, with the callers' streaming accumulators.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from darkmatter.errors import ConfigError, DataError, HookSiteError, ShapeError
from darkmatter.lm.hooks import capture, splice
from darkmatter.lm.sites import Site, decoder_layers
from darkmatter.progress import Progress, Ticker
from darkmatter.ranks import Ranks

Tensor = torch.Tensor

Compute = Callable[[Tensor, Mapping[str, Tensor]], tuple[dict[str, Tensor], dict[str, Tensor]]]
Observe = Callable[[Tensor, Mapping[str, Tensor]], None]


@dataclass
class SpliceUnit:
    """A group of spliced settings at one site.

    ``compute(x, upstream)`` maps the site's activations at the spliced positions ``[n, d]`` (batch-major,
    positions ``>= start``) and those of the ``upstream`` sites at the same positions to
    ``({setting: replacement [n, d]}, extras)``; ``observe(x, extras)`` then sees them at the scored
    positions only (the clean pass calls it once per batch).
    """

    name: str
    site: Site
    compute: Compute
    upstream: tuple[str, ...] = ()
    observe: Observe | None = None
    limit_batches: dict[str, int] = field(default_factory=dict)
    """Settings run only on the first N batches (e.g. an exactness check), by name."""


@dataclass
class UnitTally:
    """Float64 sums over the scored tokens each of a unit's settings ran on."""

    ce: dict[str, float] = field(default_factory=dict)
    kl: dict[str, float] = field(default_factory=dict)
    clean: dict[str, float] = field(default_factory=dict)
    """Clean CE summed over the same tokens as the setting (differs from the total when limited)."""
    n: dict[str, int] = field(default_factory=dict)
    max_abs_ce_diff: dict[str, float] = field(default_factory=dict)
    per_context: dict[str, list[float]] = field(default_factory=dict)
    """CE summed over each context's scored tokens, per setting, contexts in order (for intervals)."""
    seconds: float = 0.0

    def add(self, setting: str, ce: Tensor, kl: Tensor, ce_clean: Tensor) -> None:
        """Add one batch's per-token CE, KL and clean CE ``[contexts, positions]`` of ``setting``."""
        self.per_context.setdefault(setting, []).extend(ce.double().reshape(ce.shape[0], -1).sum(1).tolist())
        self.ce[setting] = self.ce.get(setting, 0.0) + float(ce.double().sum())
        self.kl[setting] = self.kl.get(setting, 0.0) + float(kl.double().sum())
        self.clean[setting] = self.clean.get(setting, 0.0) + float(ce_clean.double().sum())
        self.n[setting] = self.n.get(setting, 0) + int(ce.numel())
        diff = float((ce - ce_clean).abs().max())
        self.max_abs_ce_diff[setting] = max(self.max_abs_ce_diff.get(setting, 0.0), diff)

    def mean(self, what: str, setting: str) -> float:
        """Mean ``ce``, ``kl`` or ``clean`` (CE) per scored token of ``setting``."""
        return getattr(self, what)[setting] / self.n[setting]

    def merge(self, later: UnitTally) -> UnitTally:
        """Add the tally of later contexts (run side by side): sums added, the larger max difference, its
        per-context sums appended, the longer time; returns self."""
        for mine, theirs in ((self.ce, later.ce), (self.kl, later.kl), (self.clean, later.clean)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0.0) + v
        for k, m in later.n.items():
            self.n[k] = self.n.get(k, 0) + m
        for k, d in later.max_abs_ce_diff.items():
            self.max_abs_ce_diff[k] = max(self.max_abs_ce_diff.get(k, 0.0), d)
        for k, sums in later.per_context.items():
            self.per_context.setdefault(k, []).extend(sums)
        self.seconds = max(self.seconds, later.seconds)
        return self


@dataclass
class EngineOutput:
    """What ``run_splices`` measured: the clean CE sum, per-unit tallies and the forward passes made."""

    clean_ce_sum: float
    n_scored: int
    tallies: dict[str, UnitTally]
    forward_passes: int
    clean_per_context: list[float] = field(default_factory=list)  # clean CE summed per context, in order


def merge_outputs(parts: Sequence[EngineOutput]) -> EngineOutput:
    """One output from those of consecutive runs of batches, in order (the ranks' shares in rank order): sums
    and passes added, max differences maxed, per-context lists concatenated. The parts are left unchanged."""
    if not parts:
        raise ValueError("merge_outputs needs at least one part.")
    tallies: dict[str, UnitTally] = {}
    for part in parts:
        for name, tally in part.tallies.items():
            tallies.setdefault(name, UnitTally()).merge(tally)
    return EngineOutput(
        clean_ce_sum=sum(p.clean_ce_sum for p in parts),
        n_scored=sum(p.n_scored for p in parts),
        tallies=tallies,
        forward_passes=sum(p.forward_passes for p in parts),
        clean_per_context=[c for p in parts for c in p.clean_per_context],
    )


class Mergeable(Protocol):
    def merge(self, other: Any) -> Any: ...


A = TypeVar("A", bound=Mergeable)


def gather_splices(
    ranks: Ranks, out: EngineOutput, accumulators: Mapping[str, A], on_cpu: Callable[[A], A]
) -> tuple[EngineOutput, dict[str, A]]:
    """Every rank's output and streaming accumulators (``merge(other)`` adds other's sums into self)
    merged in rank order, on every rank; as given when alone. ``on_cpu``: a copy of an accumulator whose
    tensors are on the CPU (what crosses between ranks: no rank receives another's device tensors)."""
    if not ranks.active:
        return out, dict(accumulators)
    parts = ranks.gather((out, {k: on_cpu(v) for k, v in accumulators.items()}))
    merged = {}
    for k in accumulators:
        first, *rest = (p[1][k] for p in parts)
        for other in rest:
            first.merge(other)
        merged[k] = first
    return merge_outputs([p[0] for p in parts]), merged


def rank_batches(n: int, batch_size: int, ranks: Ranks) -> range:
    """The global indices of this rank's batches of ``n`` contexts: a contiguous share of whole batches."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, found {batch_size}.")
    return range(*ranks.bounds(-(-n // batch_size)))


# --------------------------------------------------------------------------- replaying unchanged layers


def _first(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_first(output: Any, new: Tensor) -> Any:
    return (new, *output[1:]) if isinstance(output, tuple) else new


def resume_layer(site: Site) -> int:
    """First decoder layer a splice at ``site`` changes: layers before it see clean inputs only."""
    return site.layer + 1 if site.kind == "hook_resid_post" else site.layer


@contextmanager
def record_layer_outputs(model: torch.nn.Module, indices: Sequence[int]) -> Iterator[dict[int, Any]]:
    """Record the raw output (tensor or tuple) of the given decoder layers during forward passes."""
    layers = decoder_layers(model)
    rec: dict[int, Any] = {}
    handles = []
    for i in sorted(set(indices)):

        def hook(_m: Any, _a: Any, out: Any, i: int = i) -> None:
            rec[i] = out

        handles.append(layers[i].register_forward_hook(hook))
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


_NO_FORWARD = object()


@contextmanager
def replay_prefix(model: torch.nn.Module, resume: int, output: Any) -> Iterator[None]:
    """Skip decoder layers ``< resume``: layer ``resume − 1`` returns (a copy of) its recorded ``output``.

    Earlier layers pass their input through untouched (cheap; their result is never used). Forward hooks
    on the skipped layers still run, so a splice at layer ``resume − 1``'s output applies to the replay.
    """
    if resume <= 0:
        yield
        return
    layers = decoder_layers(model)

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        return _with_first(output, args[0] if args else kwargs["hidden_states"])

    def replay(*_args: Any, **_kwargs: Any) -> Any:
        return _with_first(output, _first(output).clone())

    saved: list[tuple[torch.nn.Module, Any]] = []
    try:
        for i in range(resume):
            layer = layers[i]
            saved.append((layer, layer.__dict__.get("forward", _NO_FORWARD)))
            layer.forward = replay if i == resume - 1 else passthrough  # type: ignore[method-assign]
        yield
    finally:
        for layer, old in saved:
            if old is _NO_FORWARD:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = old  # type: ignore[method-assign]


# --------------------------------------------------------------------------- scoring


def _keep_kwargs(model: torch.nn.Module, keep: int) -> dict[str, Any]:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": keep} if "logits_to_keep" in params else {}


def _scored_logits(out: Any, ctx_len: int, start: int) -> Tensor:
    """Logits predicting tokens start+1 .. ctx_len−1: ``[b, ctx_len − start − 1, vocab]``."""
    logits = out.logits
    return logits[:, logits.shape[1] - (ctx_len - start) : -1]


def _ce_kl(logits: Tensor, targets: Tensor, logp_clean: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token CE ``[b, n]`` and KL(clean ‖ this) (float32), one context at a time to bound memory."""
    ce = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
    kl = torch.empty_like(ce)
    for i in range(logits.shape[0]):
        lp = F.log_softmax(logits[i].float(), dim=-1)
        ce[i] = -lp.gather(-1, targets[i, :, None])[:, 0]
        kl[i] = F.kl_div(lp, logp_clean[i], reduction="none", log_target=True).sum(-1)
    return ce, kl


def _constant(rep: Tensor) -> Callable[[Tensor], Tensor]:
    """Replacement precomputed from the clean pass (checked against the selected activations' shape)."""

    def fn(x: Tensor) -> Tensor:
        if x.shape != rep.shape:
            raise ShapeError(f"splice selected {list(x.shape)} activations, expected {list(rep.shape)}.")
        return rep

    return fn


def _live(
    unit: SpliceUnit, setting: str, live: Any, part: Callable[[Tensor], Tensor]
) -> Callable[[Tensor], Tensor]:
    """Replacement computed inside the forward pass from the live upstream captures."""

    def fn(x: Tensor) -> Tensor:
        missing = [s for s in unit.upstream if live is None or s not in live.acts]
        if missing:
            raise HookSiteError(
                f"{unit.name}: upstream site(s) {missing} had not run when {unit.site.name} was reached; "
                "regressor sites must come earlier in the forward pass than the spliced site."
            )
        ups = {s: part(live.acts[s]) for s in unit.upstream}
        return unit.compute(x, ups)[0][setting]

    return fn


def _check_replacements(unit: SpliceUnit, reps: Mapping[str, Tensor], x: Tensor) -> None:
    for setting, rep in reps.items():
        if tuple(rep.shape) != tuple(x.shape):
            raise ShapeError(
                f"{unit.name}: replacement {setting!r} has shape {list(rep.shape)}, expected {list(x.shape)}."
            )


# --------------------------------------------------------------------------- the engine


@dataclass
class _Clean:
    """One batch's clean pass: its ids, targets, captured sites, recorded layer outputs and clean CE."""

    ids: Tensor
    targets: Tensor
    acts: dict[str, Tensor]
    recorded: dict[int, Any]
    logp: Tensor
    ce: Tensor


@dataclass
class _Passes:
    """The forward passes of one ``run_splices`` call: the model, the splice window and the counters."""

    model: torch.nn.Module
    start: int
    ctx_len: int
    prefix_cache: bool
    keep: dict[str, Any]
    count: int = 0

    def forward(self, ids: Tensor) -> Any:
        self.count += 1
        return self.model(input_ids=ids, use_cache=False, **self.keep)

    def spliced_part(self, t: Tensor) -> Tensor:
        """Rows ``[b, ctx_len, d]`` at positions ``>= start``, batch-major: ``[b·(ctx_len − start), d]``."""
        return t[:, self.start :].reshape(-1, t.shape[-1])

    def scored(self, t: Tensor, b: int) -> Tensor:
        """The scored rows (all spliced positions but the last of each context) of spliced rows ``t``."""
        return t.reshape(b, self.ctx_len - self.start, -1)[:, :-1].reshape(-1, t.shape[-1])

    def clean(self, ids: Tensor, sites: list[str], resumes: list[int]) -> _Clean:
        """The clean pass: capture ``sites``, record the layers before each resume, clean log-probs."""
        targets = ids[:, self.start + 1 :]
        before = [r - 1 for r in resumes]
        with capture(self.model, sites) as cap, record_layer_outputs(self.model, before) as rec:
            out = self.forward(ids)
        logp_clean = torch.stack(
            [F.log_softmax(row.float(), dim=-1) for row in _scored_logits(out, self.ctx_len, self.start)]
        )
        del out
        ce_clean = -logp_clean.gather(-1, targets[..., None])[..., 0]
        return _Clean(ids, targets, cap.acts, rec, logp_clean, ce_clean)

    def spliced(self, unit: SpliceUnit, setting: str, rep: Tensor, clean: _Clean) -> Any:
        """One forward pass with ``unit``'s site replaced by ``setting`` at positions ``>= start``."""
        with ExitStack() as stack:
            if self.prefix_cache:
                resume = resume_layer(unit.site)
                stack.enter_context(replay_prefix(self.model, resume, clean.recorded.get(resume - 1)))
                rep_fn = _constant(rep)
            else:
                ups = list(unit.upstream)
                live = stack.enter_context(capture(self.model, ups)) if ups else None
                rep_fn = _live(unit, setting, live, self.spliced_part)
            stack.enter_context(splice(self.model, unit.site.name, rep_fn, start=self.start))
            return self.forward(clean.ids)

    def unit(self, unit: SpliceUnit, clean: _Clean, batch_index: int, tally: UnitTally) -> None:
        """Every setting of ``unit`` on one batch, tallied; ``observe`` sees the batch's scored rows."""
        t0 = time.perf_counter()
        x_sel = self.spliced_part(clean.acts[unit.site.name])
        if not bool(torch.isfinite(x_sel).all()):
            raise DataError(f"The model produced NaN or inf activations at {unit.site.name}.")
        ups = {s: self.spliced_part(clean.acts[s]) for s in unit.upstream}
        reps, extras = unit.compute(x_sel, ups)
        _check_replacements(unit, reps, x_sel)
        if unit.observe is not None:
            b = clean.ids.shape[0]
            unit.observe(self.scored(x_sel, b), {k: self.scored(v, b) for k, v in extras.items()})
        for setting in reps:
            limit = unit.limit_batches.get(setting)
            if limit is not None and batch_index >= limit:
                continue
            out = self.spliced(unit, setting, reps[setting], clean)
            ce, kl = _ce_kl(_scored_logits(out, self.ctx_len, self.start), clean.targets, clean.logp)
            del out
            tally.add(setting, ce, kl, clean.ce)
        tally.seconds += time.perf_counter() - t0


def _check_engine(model: torch.nn.Module, batch_size: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, found {batch_size}.")
    if model.training:
        raise ConfigError(
            "The model is in training mode (dropout would make passes differ); call model.eval()."
        )


def run_splices(
    model: torch.nn.Module,
    tokens: np.ndarray,
    units: Sequence[SpliceUnit],
    *,
    start: int,
    batch_size: int,
    prefix_cache: bool = True,
    progress: Progress | None = None,
    batches: range | None = None,
) -> EngineOutput:
    """Clean pass plus one spliced pass per (unit, setting) per batch; CE and KL sums on scored tokens.

    ``batches``: the global indices of the batches to run (None: all; a rank's share from
    ``rank_batches``): batch i is contexts ``i·batch_size ..`` as in a run over all of them, and a
    setting's ``limit_batches`` counts global indices. The output covers those batches only.

    With ``prefix_cache`` the spliced passes replay the clean output of the layer before the first one the
    splice changes, and the replacements are computed once per batch from the clean pass (the site's own
    activations and its upstream sites are unchanged by a splice at the site). Without it every pass is a
    full forward in which ``upstream`` sites are captured live and ``compute`` runs inside the splice hook.
    """
    _check_engine(model, batch_size)
    device = next(model.parameters()).device
    n, ctx_len = tokens.shape
    batches = _checked_batches(batches, n, batch_size)
    rows = max(0, min(n, batches.stop * batch_size) - batches.start * batch_size) if batches else 0
    passes = _Passes(model, start, ctx_len, prefix_cache, _keep_kwargs(model, ctx_len - start))
    sites = sorted({u.site.name for u in units} | {s for u in units for s in u.upstream})
    resumes = sorted({resume_layer(u.site) for u in units if prefix_cache and resume_layer(u.site) > 0})
    tallies = {u.name: UnitTally() for u in units}
    clean_sum = 0.0
    clean_per_context: list[float] = []
    ticker = Ticker(progress, rows)
    with torch.no_grad():
        for batch_index in batches:
            a = batch_index * batch_size
            ids = torch.as_tensor(tokens[a : a + batch_size], device=device)
            clean = passes.clean(ids, sites, resumes)
            clean_sum += float(clean.ce.double().sum())
            clean_per_context += clean.ce.double().sum(1).tolist()
            for unit in units:
                passes.unit(unit, clean, batch_index, tallies[unit.name])
            del clean
            ticker.advance(ids.shape[0])
    return EngineOutput(clean_sum, rows * (ctx_len - start - 1), tallies, passes.count, clean_per_context)


def _checked_batches(batches: range | None, n: int, batch_size: int) -> range:
    """``batches`` (None: every batch), checked to be consecutive indices of batches that exist."""
    n_batches = -(-n // batch_size)
    if batches is None:
        return range(n_batches)
    if len(batches) and (batches.step != 1 or batches.start < 0 or batches.stop > n_batches):
        raise ConfigError(f"batches must be consecutive indices below {n_batches}, found {batches}.")
    return batches
