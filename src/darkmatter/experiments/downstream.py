"""Downstream cross-entropy of splicing SAE reconstructions and error components (paper Figs 8 and 9).

For each SAE, the model runs on held-out contexts with the SAE's site replaced, at positions ``>= start``, by

- ``sae``: Sae(x);
- ``sae+linear``: Sae(x) + LinearError(x), LinearError(x) = x @ W + b the SAE's error probe b*;
- ``sae+nonlinear``: Sae(x) + NonlinearError(x), NonlinearError = x − Sae(x) − LinearError;
- ``sae+both``: Sae(x) + LinearError + NonlinearError, which is x up to rounding: a built-in check that the
  decomposition and the splice are exact (``both_max_abs_ce_diff``; a mean difference above
  ``both_tolerance`` nats raises DataError);
- ``zero``: zero ablation, and ``mean``: the site's mean activation (when ``mean_acts`` gives one).

Scored positions are ``start .. ctx_len − 2`` (the last position has no next token). On them we report the
mean next-token CE and the mean KL(clean ‖ setting) of every setting, the paper's CE recovered by each
component, ``ce_recovered_c = (L_sae − L_sae+c) / (L_sae − L_clean)``, the SAELens-style
``ce_loss_score = (L_zero − L_sae) / (L_zero − L_clean)`` and ``kl_score = (KL_zero − KL_sae) / KL_zero``,
and two reference predictors of the CE shares (the original code loaded them from files no script
produced, paper-experiments §7 and §15.6; these are our definitions, on the same scored positions):

- ``variance_share_c = (FVU(x, Sae(x)) − FVU(x, Sae(x) + c)) / FVU(x, Sae(x))``, the share of the variance
  left by the SAE that adding component c recovers (the paper's "R² % recovered"; equal to
  1 − Σ‖other component‖² / Σ‖SaeError‖²);
- ``norm_share_c = mean‖c‖ / mean‖SaeError‖``.

Cost. Splicing at layer L leaves layers < L (and layer L itself for a ``resid_post`` site) unchanged, so
with ``prefix_cache`` (the default) each batch runs the full model once, clean, recording the output of
the last unchanged decoder layer; every spliced pass then replays that output and computes only the
layers after it (the skipped layers' ``forward`` is swapped for a replay for the duration of the pass; the
embedding lookup, rotary tables and masks are still computed, which is cheap). Logits are computed only
for positions ``>= start`` (``logits_to_keep``) when the model supports it. ``prefix_cache=False`` runs
the plain full forward pass for every setting; the two agree to float rounding (tests check it).
Memory is one batch: its clean activations at the needed sites and its clean log-probabilities
``[batch, ctx_len − start − 1, vocab]`` (float32).
"""

from __future__ import annotations

import hashlib
import inspect
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from darkmatter.errors import ConfigError, DataError, HookSiteError, ShapeError
from darkmatter.lm.hooks import capture, splice
from darkmatter.lm.loading import LoadedLM
from darkmatter.lm.sites import Site, decoder_layers, validate_sites
from darkmatter.progress import Progress, Ticker
from darkmatter.results import Result, config_hash, sae_identity
from darkmatter.sae.model import SAE
from darkmatter.stats import FVU

Tensor = torch.Tensor

SETTINGS = ("sae", "sae+linear", "sae+nonlinear", "sae+both", "zero")
"""Spliced settings of ``downstream_ce`` (plus ``mean`` when a mean activation is given)."""

CE_EPS = 1e-6
"""A ratio whose denominator is below this many nats (about float32 resolution of a mean CE) is None."""

_SITE_ORDER = {"hook_resid_pre": 0, "hook_attn_out": 1, "hook_mlp_out": 2, "hook_resid_post": 3}


# --------------------------------------------------------------------------- results


class DownstreamSAE(BaseModel):
    """Downstream numbers of one SAE on the scored positions of the held-out contexts."""

    site: str = Field(description="Hook site the SAE reads and the splice replaces.")
    ce: dict[str, float] = Field(description="Mean next-token CE (nats) per setting, 'clean' included.")
    kl: dict[str, float] = Field(description="Mean KL(clean ‖ setting) (nats) per spliced setting.")
    ce_recovered_linear: float | None = Field(
        description="(L_sae − L_sae+linear) / (L_sae − L_clean), the paper's CE recovered (a fraction)."
    )
    ce_recovered_nonlinear: float | None = Field(
        description="(L_sae − L_sae+nonlinear) / (L_sae − L_clean) (a fraction)."
    )
    ce_loss_score: float | None = Field(description="SAELens: (L_zero − L_sae) / (L_zero − L_clean).")
    kl_score: float | None = Field(description="SAELens: (KL_zero − KL_sae) / KL_zero.")
    ce_loss_score_mean: float | None = Field(
        None, description="(L_mean − L_sae) / (L_mean − L_clean), against mean ablation (when run)."
    )
    both_max_abs_ce_diff: float = Field(
        description="Max over scored tokens of |CE(sae+both) − CE(clean)|: the exactness check."
    )
    both_mean_ce_diff: float = Field(
        description="|mean CE(sae+both) − mean CE(clean)| on the tokens the check ran on (must be tiny)."
    )
    both_scored_tokens: int = Field(description="Scored tokens the sae+both check ran on.")
    variance_share_linear: float | None = Field(
        description="(FVU(x, Sae) − FVU(x, Sae + Linear)) / FVU(x, Sae) (reference predictor)."
    )
    variance_share_nonlinear: float | None = Field(
        description="(FVU(x, Sae) − FVU(x, Sae + Nonlinear)) / FVU(x, Sae) (reference predictor)."
    )
    norm_share_linear: float | None = Field(description="mean‖LinearError‖ / mean‖SaeError‖.")
    norm_share_nonlinear: float | None = Field(description="mean‖NonlinearError‖ / mean‖SaeError‖.")
    fvu_sae: float = Field(description="FVU(x, Sae(x)) on the scored positions.")
    fvu_sae_linear: float = Field(description="FVU(x, Sae(x) + LinearError) (= FVU_nonlinear here).")
    fvu_sae_nonlinear: float = Field(description="FVU(x, Sae(x) + NonlinearError).")
    mean_error_norm: float = Field(description="mean‖SaeError‖ on the scored positions.")
    mean_linear_norm: float = Field(description="mean‖LinearError‖.")
    mean_nonlinear_norm: float = Field(description="mean‖NonlinearError‖.")
    seconds: float = Field(description="Wall time of this SAE's spliced passes.")


class DownstreamResult(Result):
    """Figs 8/9: CE of splicing each SAE and each error component back into the model."""

    experiment: str = "downstream_ce"
    n_contexts: int = Field(description="Held-out contexts evaluated.")
    ctx_len: int = Field(description="Tokens per context.")
    start: int = Field(description="First spliced and scored position.")
    scored_tokens: int = Field(description="Predictions scored: n_contexts × (ctx_len − start − 1).")
    clean_ce: float = Field(description="Mean CE of the unmodified model on the scored positions.")
    saes: dict[str, DownstreamSAE] = Field(description="Per-SAE numbers, by SAE name.")
    prefix_cache: bool = Field(description="Spliced passes replayed the unchanged layers' clean output.")
    forward_passes: int = Field(description="Model calls made (clean + spliced).")
    seconds: float = Field(description="Wall time of the whole experiment.")


# --------------------------------------------------------------------------- small pure helpers


def ratio(num: float, den: float, eps: float = CE_EPS) -> float | None:
    """num / den, or None when |den| <= eps (the ratio would be rounding noise)."""
    if not (math.isfinite(num) and math.isfinite(den)) or abs(den) <= eps:
        return None
    return num / den


def ce_scores(ce: Mapping[str, float], kl: Mapping[str, float]) -> dict[str, float | None]:
    """CE recovered by each component and the SAELens scores from mean CE / KL per setting.

    ``ce`` needs ``clean``, ``sae``, ``sae+linear``, ``sae+nonlinear``, ``zero`` (``mean`` optional);
    ``kl`` needs ``sae`` and ``zero``.
    """
    gap = ce["sae"] - ce["clean"]
    out = {
        "ce_recovered_linear": ratio(ce["sae"] - ce["sae+linear"], gap),
        "ce_recovered_nonlinear": ratio(ce["sae"] - ce["sae+nonlinear"], gap),
        "ce_loss_score": ratio(ce["zero"] - ce["sae"], ce["zero"] - ce["clean"]),
        "kl_score": ratio(kl["zero"] - kl["sae"], kl["zero"]),
    }
    if "mean" in ce:
        out["ce_loss_score_mean"] = ratio(ce["mean"] - ce["sae"], ce["mean"] - ce["clean"])
    return out


class ComponentShares:
    """Streaming reference predictors: variance and norm share of LinearError and NonlinearError.

    ``update(x, sae_x, linear)`` with ``[tokens, d]`` tensors; ``compute()`` returns the FVUs of x against
    Sae(x), Sae(x) + LinearError and Sae(x) + NonlinearError, the two variance shares and the mean norms
    and norm shares (definitions in the module docstring).
    """

    def __init__(self, d: int) -> None:
        self.fvu = {k: FVU(d) for k in ("sae", "sae+linear", "sae+nonlinear")}
        self.norm_sums = torch.zeros(3, dtype=torch.float64)
        self.n = 0

    def update(self, x: Tensor, sae_x: Tensor, linear: Tensor) -> None:
        error = x - sae_x
        nonlinear = error - linear
        self.fvu["sae"].update(x, sae_x)
        self.fvu["sae+linear"].update(x, sae_x + linear)  # x − that = NonlinearError
        self.fvu["sae+nonlinear"].update(x, sae_x + nonlinear)  # x − that = LinearError
        norms = torch.stack([error.norm(dim=1), linear.norm(dim=1), nonlinear.norm(dim=1)])
        self.norm_sums += norms.double().sum(1).cpu()
        self.n += int(x.shape[0])

    def compute(self) -> dict[str, float | None]:
        fvu = {k: m.compute() for k, m in self.fvu.items()}
        e, lin, nl = (float(v) / max(self.n, 1) for v in self.norm_sums)
        return {
            "fvu_sae": fvu["sae"],
            "fvu_sae_linear": fvu["sae+linear"],
            "fvu_sae_nonlinear": fvu["sae+nonlinear"],
            "variance_share_linear": ratio(fvu["sae"] - fvu["sae+linear"], fvu["sae"], 0.0),
            "variance_share_nonlinear": ratio(fvu["sae"] - fvu["sae+nonlinear"], fvu["sae"], 0.0),
            "norm_share_linear": ratio(lin, e, 0.0),
            "norm_share_nonlinear": ratio(nl, e, 0.0),
            "mean_error_norm": e,
            "mean_linear_norm": lin,
            "mean_nonlinear_norm": nl,
        }


# --------------------------------------------------------------------------- input checks


def model_of(lm: Any) -> torch.nn.Module:
    """The torch module of a ``LoadedLM`` (or the module itself)."""
    model = lm.model if isinstance(lm, LoadedLM) else lm
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"Expected a LoadedLM or a torch causal LM, found {type(lm).__name__}.")
    return model


def model_width(model: torch.nn.Module) -> int:
    cfg = model.config  # type: ignore[attr-defined]
    return int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0))


def check_tokens(tokens: Any, model: torch.nn.Module, start: int) -> np.ndarray:
    """Validate held-out contexts ``[n, ctx_len]`` and the splice start; returns an int64 array."""
    arr = tokens.detach().cpu().numpy() if isinstance(tokens, Tensor) else np.asarray(tokens)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(
            f"Contexts must be an integer array [n_contexts, ctx_len], found dtype {arr.dtype} and shape "
            f"{list(arr.shape)}."
        )
    n, ctx_len = arr.shape
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise ConfigError(f"start must be an integer position >= 0, found {start!r}.")
    if n < 1 or ctx_len - 1 - start < 1 or n * (ctx_len - 1 - start) < 2:
        scored = max(n * (ctx_len - 1 - start), 0)
        raise DataError(
            f"{n} context(s) of {ctx_len} tokens with start={start} leave {scored} scored prediction(s) "
            "(positions start .. ctx_len − 2); at least 2 are needed. Use more or longer contexts, or a "
            "smaller start."
        )
    vocab = int(model.get_input_embeddings().weight.shape[0])  # type: ignore[operator]
    if int(arr.min()) < 0 or int(arr.max()) >= vocab:
        raise DataError(
            f"Token ids must lie in [0, {vocab}) for this model, found [{int(arr.min())}, {int(arr.max())}]; "
            "were the contexts made with another tokenizer?"
        )
    return arr.astype(np.int64)


def check_sae_site(model: torch.nn.Module, name: str, sae: SAE) -> Site:
    """The SAE's hook site, checked against the model (HookSiteError) and its width (ShapeError)."""
    site = sae.cfg.hook_site
    if not site:
        raise HookSiteError(
            f"SAE {name!r} has no hook_site; set sae.cfg.hook_site (e.g. 'blocks.12.hook_resid_post')."
        )
    (parsed,) = validate_sites(model, [site])
    sae.check_input_width(model_width(model), parsed.name)
    return parsed


def check_probe(name: str, probe: tuple[Tensor, Tensor], d: int) -> tuple[Tensor, Tensor]:
    """(weights [d, d], bias [d]) as float32, or a ShapeError / DataError naming the SAE."""
    if not isinstance(probe, (tuple, list)) or len(probe) != 2:
        raise ShapeError(f"The probe of SAE {name!r} must be a pair (weights [d, d], bias [d]).")
    w, b = (torch.as_tensor(t).detach().float() for t in probe)
    if tuple(w.shape) != (d, d) or tuple(b.shape) != (d,):
        raise ShapeError(
            f"The probe of SAE {name!r} has weights {list(w.shape)} and bias {list(b.shape)}; expected "
            f"[{d}, {d}] and [{d}] (fit it on the SAE's own site)."
        )
    if not (bool(torch.isfinite(w).all()) and bool(torch.isfinite(b).all())):
        raise DataError(f"The probe of SAE {name!r} holds NaN or inf values.")
    return w, b


def site_order(site: Site) -> tuple[int, int]:
    """Execution order of sites in a forward pass (attn before mlp within a layer)."""
    return site.layer, _SITE_ORDER[site.kind]


# --------------------------------------------------------------------------- the splice engine


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
    seconds: float = 0.0

    def add(self, setting: str, ce: Tensor, kl: Tensor, ce_clean: Tensor) -> None:
        self.ce[setting] = self.ce.get(setting, 0.0) + float(ce.double().sum())
        self.kl[setting] = self.kl.get(setting, 0.0) + float(kl.double().sum())
        self.clean[setting] = self.clean.get(setting, 0.0) + float(ce_clean.double().sum())
        self.n[setting] = self.n.get(setting, 0) + int(ce.numel())
        diff = float((ce - ce_clean).abs().max())
        self.max_abs_ce_diff[setting] = max(self.max_abs_ce_diff.get(setting, 0.0), diff)

    def mean(self, what: str, setting: str) -> float:
        """Mean ``ce``, ``kl`` or ``clean`` (CE) per scored token of ``setting``."""
        return getattr(self, what)[setting] / self.n[setting]


@dataclass
class EngineOutput:
    clean_ce_sum: float
    n_scored: int
    tallies: dict[str, UnitTally]
    forward_passes: int


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


def run_splices(
    model: torch.nn.Module,
    tokens: np.ndarray,
    units: Sequence[SpliceUnit],
    *,
    start: int,
    batch_size: int,
    prefix_cache: bool = True,
    progress: Progress | None = None,
) -> EngineOutput:
    """Clean pass plus one spliced pass per (unit, setting) per batch; CE and KL sums on scored tokens.

    With ``prefix_cache`` the spliced passes replay the clean output of the layer before the first one the
    splice changes, and the replacements are computed once per batch from the clean pass (the site's own
    activations and its upstream sites are unchanged by a splice at the site). Without it every pass is a
    full forward in which ``upstream`` sites are captured live and ``compute`` runs inside the splice hook.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, found {batch_size}.")
    if model.training:
        raise ConfigError(
            "The model is in training mode (dropout would make passes differ); call model.eval()."
        )
    device = next(model.parameters()).device
    n, ctx_len = tokens.shape
    n_pred = ctx_len - start - 1
    keep = _keep_kwargs(model, ctx_len - start)
    sites = sorted({u.site.name for u in units} | {s for u in units for s in u.upstream})
    resumes = sorted({resume_layer(u.site) for u in units if prefix_cache and resume_layer(u.site) > 0})
    tallies = {u.name: UnitTally() for u in units}
    clean_sum, passes = 0.0, 0
    ticker = Ticker(progress, n)
    with torch.no_grad():
        for batch_index, a in enumerate(range(0, n, batch_size)):
            ids = torch.as_tensor(tokens[a : a + batch_size], device=device)
            b = ids.shape[0]
            targets = ids[:, start + 1 :]
            with capture(model, sites) as cap, record_layer_outputs(model, [r - 1 for r in resumes]) as rec:
                out = model(input_ids=ids, use_cache=False, **keep)
            passes += 1
            logp_clean = torch.stack(
                [F.log_softmax(row.float(), dim=-1) for row in _scored_logits(out, ctx_len, start)]
            )
            del out
            ce_clean = -logp_clean.gather(-1, targets[..., None])[..., 0]
            clean_sum += float(ce_clean.double().sum())

            def spliced_part(t: Tensor) -> Tensor:
                return t[:, start:].reshape(-1, t.shape[-1])

            for unit in units:
                t0 = time.perf_counter()
                x_sel = spliced_part(cap.acts[unit.site.name])
                if not bool(torch.isfinite(x_sel).all()):
                    raise DataError(f"The model produced NaN or inf activations at {unit.site.name}.")
                ups = {s: spliced_part(cap.acts[s]) for s in unit.upstream}
                reps, extras = unit.compute(x_sel, ups)
                for setting, rep in reps.items():
                    if tuple(rep.shape) != tuple(x_sel.shape):
                        raise ShapeError(
                            f"{unit.name}: replacement {setting!r} has shape {list(rep.shape)}, expected "
                            f"{list(x_sel.shape)}."
                        )
                if unit.observe is not None:

                    def scored(t: Tensor, b: int = b) -> Tensor:
                        return t.reshape(b, ctx_len - start, -1)[:, :-1].reshape(-1, t.shape[-1])

                    unit.observe(scored(x_sel), {k: scored(v) for k, v in extras.items()})
                resume = resume_layer(unit.site)
                for setting in reps:
                    limit = unit.limit_batches.get(setting)
                    if limit is not None and batch_index >= limit:
                        continue
                    with ExitStack() as stack:
                        if prefix_cache:
                            stack.enter_context(replay_prefix(model, resume, rec.get(resume - 1)))
                            rep_fn = _constant(reps[setting])
                        else:
                            live = (
                                stack.enter_context(capture(model, list(unit.upstream)))
                                if unit.upstream
                                else None
                            )
                            rep_fn = _live(unit, setting, live, spliced_part)
                        stack.enter_context(splice(model, unit.site.name, rep_fn, start=start))
                        out = model(input_ids=ids, use_cache=False, **keep)
                    passes += 1
                    ce, kl = _ce_kl(_scored_logits(out, ctx_len, start), targets, logp_clean)
                    del out
                    tallies[unit.name].add(setting, ce, kl, ce_clean)
                tallies[unit.name].seconds += time.perf_counter() - t0
            del cap, rec, logp_clean
            ticker.advance(b)
    return EngineOutput(clean_sum, n * n_pred, tallies, passes)


def _constant(rep: Tensor) -> Callable[[Tensor], Tensor]:
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


# --------------------------------------------------------------------------- the experiment


def _sae_unit(
    name: str,
    site: Site,
    sae: SAE,
    probe: tuple[Tensor, Tensor],
    mean: Tensor | None,
    shares: ComponentShares,
) -> SpliceUnit:
    w, b = probe

    def compute(x: Tensor, _ups: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        xf = x.float()
        sae_x = sae(x.to(device=sae.device, dtype=sae.dtype)).to(device=x.device, dtype=torch.float32)
        lin = torch.addmm(b.to(x.device), xf, w.to(x.device))
        nl = (xf - sae_x) - lin
        reps = {
            "sae": sae_x,
            "sae+linear": sae_x + lin,
            "sae+nonlinear": sae_x + nl,
            "sae+both": sae_x + lin + nl,
            "zero": torch.zeros_like(xf),
        }
        if mean is not None:
            reps["mean"] = mean.to(xf).expand_as(xf)
        return reps, {"sae": sae_x, "linear": lin}

    def observe(x: Tensor, extras: Mapping[str, Tensor]) -> None:
        shares.update(x.float(), extras["sae"], extras["linear"])

    return SpliceUnit(name=name, site=site, compute=compute, observe=observe)


def check_both(name: str, ce_both: float, ce_clean: float, tolerance: float) -> float:
    """|mean CE(sae+both) − mean CE(clean)|, or DataError when it exceeds ``tolerance`` nats."""
    diff = abs(ce_both - ce_clean)
    if not diff < tolerance:
        raise DataError(
            f"{name}: splicing Sae(x) + LinearError + NonlinearError (= x) changed the mean CE by {diff:.3g} "
            f"nats (tolerance {tolerance:g}); the splice or the error decomposition is not exact. Check that "
            "the model runs in fp32 and that the SAE and probe belong to this site."
        )
    return diff


def downstream_ce(
    lm: Any,
    contexts_tokens: np.ndarray,
    saes: Mapping[str, SAE],
    probes: Mapping[str, tuple[Tensor, Tensor]],
    *,
    start: int,
    batch_size: int = 4,
    mean_acts: Mapping[str, Tensor] | None = None,
    prefix_cache: bool = True,
    both_tolerance: float = 1e-3,
    both_batches: int | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> DownstreamResult:
    """Paper Figs 8/9 on held-out contexts ``[n, ctx_len]`` (see the module docstring).

    ``lm`` is a ``LoadedLM`` or a HF causal LM; ``saes[name]`` reads ``sae.cfg.hook_site`` and
    ``probes[name] = (weights [d, d], bias [d])`` is its error probe. ``mean_acts[site]`` (a ``[d]`` mean
    activation, e.g. over the store's train tokens) adds the ``mean`` ablation for SAEs at that site.
    ``both_batches`` runs the ``sae+both`` check on the first N batches only (None: all; it costs one
    spliced pass per SAE and batch, 1/5 of the spliced work); its CE and KL then cover those batches and
    are compared with the clean CE on the same tokens. ``seed`` is only recorded (nothing is random).
    """
    t_start = time.perf_counter()
    model = model_of(lm)
    if not saes:
        raise ConfigError("downstream_ce needs at least one SAE.")
    if not (math.isfinite(both_tolerance) and both_tolerance > 0):
        raise ConfigError(f"both_tolerance must be a positive number of nats, found {both_tolerance}.")
    if both_batches is not None and (isinstance(both_batches, bool) or both_batches < 1):
        raise ConfigError(f"both_batches must be None (every batch) or >= 1, found {both_batches!r}.")
    tokens = check_tokens(contexts_tokens, model, start)
    d = model_width(model)
    units, shares = [], {}
    for name, sae in saes.items():
        site = check_sae_site(model, name, sae)
        if name not in probes:
            raise ConfigError(f"No error probe given for SAE {name!r}; probes has {sorted(probes)}.")
        probe = check_probe(name, probes[name], d)
        mean = None
        if mean_acts is not None and site.name in mean_acts:
            mean = torch.as_tensor(mean_acts[site.name]).detach().float()
            if tuple(mean.shape) != (d,):
                raise ShapeError(f"mean_acts[{site.name!r}] has shape {list(mean.shape)}, expected [{d}].")
        shares[name] = ComponentShares(d)
        unit = _sae_unit(name, site, sae, probe, mean, shares[name])
        if both_batches is not None:
            unit.limit_batches["sae+both"] = both_batches
        units.append(unit)
    out = run_splices(
        model, tokens, units, start=start, batch_size=batch_size, prefix_cache=prefix_cache, progress=progress
    )
    n = out.n_scored
    clean = out.clean_ce_sum / n
    per_sae: dict[str, DownstreamSAE] = {}
    for unit in units:
        tally = out.tallies[unit.name]
        ce = {"clean": clean} | {k: tally.mean("ce", k) for k in tally.ce}
        kl = {k: tally.mean("kl", k) for k in tally.kl}
        both_mean = check_both(unit.name, ce["sae+both"], tally.mean("clean", "sae+both"), both_tolerance)
        per_sae[unit.name] = DownstreamSAE(
            site=unit.site.name,
            ce=ce,
            kl=kl,
            **ce_scores(ce, kl),  # type: ignore[arg-type]
            both_max_abs_ce_diff=tally.max_abs_ce_diff["sae+both"],
            both_mean_ce_diff=both_mean,
            both_scored_tokens=tally.n["sae+both"],
            **shares[unit.name].compute(),  # type: ignore[arg-type]
            seconds=tally.seconds,
        )
    identity = lm.identity if isinstance(lm, LoadedLM) else {"name": type(model).__name__}
    config = {
        "start": int(start),
        "batch_size": batch_size,
        "prefix_cache": prefix_cache,
        "both_tolerance": both_tolerance,
        "both_batches": both_batches,
        "mean_ablation_sites": sorted(mean_acts) if mean_acts else [],
        "model": identity,
        "contexts": {
            "n": int(tokens.shape[0]),
            "ctx_len": int(tokens.shape[1]),
            "sha256": hashlib.sha256(tokens.tobytes()).hexdigest()[:16],
        },
        "saes": {name: sae_identity(sae) for name, sae in saes.items()},
    }
    return DownstreamResult(
        config_hash=config_hash(config),
        seed=seed,
        config=config,
        n_contexts=int(tokens.shape[0]),
        ctx_len=int(tokens.shape[1]),
        start=int(start),
        scored_tokens=n,
        clean_ce=clean,
        saes=per_sae,
        prefix_cache=prefix_cache,
        forward_passes=out.forward_passes,
        seconds=time.perf_counter() - t_start,
    )
