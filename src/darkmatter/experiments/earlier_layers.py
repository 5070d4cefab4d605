"""Predicting an SAE's error from other components' SAE outputs (paper Fig 9b / 10b), and beyond.

``earlier_layer_predictors``: for the target SAE at site s (a layer-L residual in the paper), the targets are
its SaeError e = x − Sae(x), LinearError = x @ W + b (its probe b*) and NonlinearError = e − LinearError.
Each regressor is one component's SAE reconstruction at its own site (e.g. layer L−1 resid_post, layer L
attn_out and mlp_out), the target SAE's own Sae(x) (``self``, the paper's "residual"), and all of them
concatenated (``joint``, beyond the paper). Every (regressor, target) pair is a separate least-squares fit
with bias on train tokens, scored exactly on test tokens from streaming float64 moments. One pass; the
single-regressor moments are blocks of the joint ones (a regression on a subset of columns needs only the
sub-blocks of the Gram and cross moments), so the singles cost nothing extra.

Beyond the paper: the joint map J predicting SaeError gives an improved reconstruction
x̂' = Sae(x) + J([regressor reconstructions]); we report FVU(x, Sae(x)) and FVU(x, x̂') on test tokens and
return J (``result.joint_map``) so ``downstream_ce_with_joint`` can measure the CE of splicing x̂'.

``mlp_probe``: does a nonlinear map of x predict what the linear probe could not? A one-hidden-layer MLP
is trained with Adam on train tokens to predict SaeError from x and scored on test tokens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, PrivateAttr

from darkmatter.errors import ConfigError, DataError, HookSiteError, ShapeError, StoreError
from darkmatter.experiments.downstream import (
    SpliceUnit,
    check_both,
    check_probe,
    check_sae_site,
    check_tokens,
    config_hash,
    model_of,
    model_width,
    ratio,
    run_splices,
    sae_identity,
    site_order,
)
from darkmatter.lm.loading import LoadedLM
from darkmatter.progress import Progress, Ticker
from darkmatter.results import Result, store_summary
from darkmatter.sae.model import SAE
from darkmatter.stats import (
    CONSTANT_TARGET_TOL,
    FVU,
    Moments,
    evaluate,
    fit_ridge_many,
    fvu_with_prediction,
    is_train,
)
from darkmatter.store import ActivationStore, Batch, atomic_write_bytes

Tensor = torch.Tensor

SELF = "self"
"""Regressor name of the target SAE's own reconstruction Sae(x) (the paper's "residual")."""
JOINT = "joint"
"""Regressor name of all regressors concatenated."""
TARGETS = ("nonlinear", "error", "linear")
"""Targets in the paper's panel order: NonlinearError, SaeError, LinearError."""

PAPER_R2 = {
    "residual": {"nonlinear": 0.49, "error": 0.06, "linear": 0.34},
    "prev residual": {"nonlinear": 0.14, "error": 0.09, "linear": 0.32},
    "MLP": {"nonlinear": 0.07, "error": 0.07, "linear": 0.16},
    "attention": {"nonlinear": 0.04, "error": 0.10, "linear": 0.18},
}
"""Paper Fig 9b (Gemma 2 9B, layer 20, 16k, L0 ≈ 60): test R², mean over dims, per regressor and target."""


# --------------------------------------------------------------------------- the joint map


@dataclass
class JointMap:
    """x̂' = Sae(x) + [R_1, ..., R_m] @ weights + bias, R_j the SAE reconstructions listed in ``blocks``.

    ``blocks`` are ``(name, site, width)`` in column order; ``name == SELF`` is the target SAE's Sae(x).
    """

    target_site: str
    blocks: list[tuple[str, str, int]]
    weights: Tensor  # [Σ widths, d] float32
    bias: Tensor  # [d] float32

    def save(self, path: str | Path) -> None:
        """Write atomically as safetensors (blocks and target site in the metadata)."""
        import json

        from safetensors.torch import save as st_save

        meta = {"target_site": self.target_site, "blocks": json.dumps(self.blocks)}
        tensors = {"weights": self.weights.contiguous().cpu(), "bias": self.bias.contiguous().cpu()}
        atomic_write_bytes(Path(path), st_save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> JointMap:
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "blocks" not in meta or "target_site" not in meta:
                raise StoreError(f"{path} is not a joint map (no 'blocks'/'target_site' metadata).")
            weights, bias = f.get_tensor("weights"), f.get_tensor("bias")
        blocks = [(str(n), str(s), int(w)) for n, s, w in json.loads(meta["blocks"])]
        return cls(meta["target_site"], blocks, weights, bias)


def _check_joint_map(
    joint_map: JointMap, target_sae: SAE, regressor_saes: Mapping[str, SAE]
) -> list[tuple[str, str, int]]:
    if joint_map.target_site != target_sae.cfg.hook_site:
        raise ConfigError(
            f"The joint map predicts the error at {joint_map.target_site!r}, but the target SAE reads "
            f"{target_sae.cfg.hook_site!r}."
        )
    total = 0
    for name, site, width in joint_map.blocks:
        sae = target_sae if name == SELF else regressor_saes.get(name)
        if sae is None:
            raise ConfigError(f"The joint map needs regressor SAE {name!r}; given {sorted(regressor_saes)}.")
        if sae.cfg.hook_site != site or sae.cfg.d_in != width:
            raise ShapeError(
                f"Joint-map block {name!r} expects an SAE at {site!r} with d_in={width}; the SAE given reads "
                f"{sae.cfg.hook_site!r} with d_in={sae.cfg.d_in}."
            )
        total += width
    d = target_sae.cfg.d_in
    if tuple(joint_map.weights.shape) != (total, d) or tuple(joint_map.bias.shape) != (d,):
        raise ShapeError(
            f"Joint map weights {list(joint_map.weights.shape)} / bias {list(joint_map.bias.shape)}; "
            f"expected [{total}, {d}] / [{d}] for blocks {joint_map.blocks}."
        )
    return joint_map.blocks


def _recon(sae: SAE, x: Tensor) -> Tensor:
    """Sae(x) as float32 on x's device."""
    return sae(x.to(device=sae.device, dtype=sae.dtype)).to(device=x.device, dtype=torch.float32)


def _regressors(
    blocks: list[tuple[str, str, int]],
    sae_x: Tensor,
    acts: Mapping[str, Tensor],
    regressor_saes: Mapping[str, SAE],
) -> Tensor:
    """The concatenated reconstructions ``[n, Σ widths]`` in block order."""
    cols = [sae_x if n == SELF else _recon(regressor_saes[n], acts[s]) for n, s, _ in blocks]
    return torch.cat(cols, 1)


def joint_replacement(
    x: Tensor,
    regressor_acts: Mapping[str, Tensor],
    target_sae: SAE,
    regressor_saes: Mapping[str, SAE],
    joint_map: JointMap,
) -> Tensor:
    """x̂' = Sae(x) + J(regressor reconstructions) ``[n, d]`` (float32).

    ``x [n, d]`` are the target site's activations and ``regressor_acts[site] [n, d_site]`` those of each
    regressor site at the same tokens (e.g. captured in the same forward pass).
    """
    blocks = _check_joint_map(joint_map, target_sae, regressor_saes)
    sae_x = _recon(target_sae, x)
    z = _regressors(blocks, sae_x, regressor_acts, regressor_saes)
    return sae_x + torch.addmm(joint_map.bias.to(z), z, joint_map.weights.to(z))


# --------------------------------------------------------------------------- the regression experiment


class EarlierLayersResult(Result):
    """Fig 9b/10b: R² of the target SAE's error components from other components' SAE outputs."""

    experiment: str = "earlier_layers"
    target_site: str = Field(description="Site of the target SAE.")
    regressors: list[str] = Field(description="Regressor names: the given SAEs, then 'self' and 'joint'.")
    regressor_sites: dict[str, str] = Field(description="Site of each single regressor.")
    targets: list[str] = Field(description="nonlinear (NonlinearError), error (SaeError), linear.")
    r2: dict[str, dict[str, float]] = Field(
        description="Test R², unweighted mean over output dims (the paper's number): regressor -> target."
    )
    r2_variance_weighted: dict[str, dict[str, float]] = Field(description="Test 1 − ΣSS_res / ΣSS_tot.")
    r2_train: dict[str, dict[str, float]] = Field(
        description="In-sample (train) R², mean over dims; the joint fit is never below a single one."
    )
    fvu_sae: float = Field(description="FVU(x, Sae(x)) on test tokens.")
    fvu_sae_linear: float = Field(
        description="FVU(x, Sae(x) + LinearError): the linear probe's FVU_nonlinear on these test tokens."
    )
    fvu_with: dict[str, float] = Field(
        description="FVU(x, Sae(x) + R_j-prediction of SaeError) per regressor; 'joint' is FVU(x, x̂')."
    )
    fvu_sae_linear_joint: float = Field(
        description="FVU(x, Sae(x) + LinearError + joint prediction of NonlinearError) on test tokens."
    )
    ridge: dict[str, float] = Field(description="Absolute ridge λ of each regressor's fit.")
    n_train: int
    n_test: int
    paper_r2: dict[str, dict[str, float]] = Field(
        default_factory=lambda: PAPER_R2, description="The paper's Fig 9b values, for reference."
    )
    seconds: float = 0.0
    _joint_map: JointMap | None = PrivateAttr(None)

    @property
    def joint_map(self) -> JointMap | None:
        """The joint map predicting SaeError (not serialised; ``JointMap.save`` writes it)."""
        return self._joint_map


def _check_store_sae(store: ActivationStore, name: str, sae: SAE) -> str:
    site = sae.cfg.hook_site
    if site is None or site not in store.sites:
        raise StoreError(f"SAE {name!r} reads site {site!r}, which the store lacks (it has {store.sites}).")
    sae.check_input_width(store.d[site], site)
    return site


def _sub_moments(m: Moments, cols: slice) -> Moments:
    """The moments of a column block of x (same targets): exact, as shifted sums slice per column."""
    state = m.state_dict()
    sub = Moments(cols.stop - cols.start, m.target_dims)
    new = {
        "n": state["n"],
        "x.ref": state["x.ref"][cols],
        "x.sum": state["x.sum"][cols],
        "x.gram": state["x.gram"][cols, cols],
    }
    for name in m.target_dims:
        for key in ("ref", "sum", "sumsq"):
            new[f"y.{name}.{key}"] = state[f"y.{name}.{key}"]
        new[f"y.{name}.cross"] = state[f"y.{name}.cross"][cols]
    sub.load_state_dict(new)
    return sub


def _split(batch: Batch, seed: int, fraction: float) -> Tensor:
    return is_train(batch.context.cpu(), batch.position.cpu(), seed, fraction).to(batch.context.device)


def earlier_layer_predictors(
    store: ActivationStore,
    target_sae: SAE,
    probe: tuple[Tensor, Tensor],
    regressor_saes: Mapping[str, SAE],
    *,
    split_seed: int,
    train_fraction: float,
    batch_tokens: int = 4096,
    device: str = "cpu",
    progress: Progress | None = None,
) -> EarlierLayersResult:
    """R² of each error component of ``target_sae`` from each regressor (see the module docstring).

    ``probe = (W [d, d], b [d])`` is the target SAE's error probe, fitted on the train split of the same
    ``split_seed``/``train_fraction`` so that every test number is out of sample.
    """
    t0 = time.perf_counter()
    for reserved in (SELF, JOINT):
        if reserved in regressor_saes:
            raise ConfigError(f"Regressor name {reserved!r} is reserved; rename that SAE.")
    target_site = _check_store_sae(store, "target", target_sae)
    d = store.d[target_site]
    w, b = (t.to(device) for t in check_probe("target", probe, d))
    reg_sites = {n: _check_store_sae(store, n, s) for n, s in regressor_saes.items()}
    blocks = [(n, reg_sites[n], store.d[reg_sites[n]]) for n in regressor_saes] + [(SELF, target_site, d)]
    spans: dict[str, slice] = {}
    offset = 0
    for n, _s, width in blocks:
        spans[n] = slice(offset, offset + width)
        offset += width
    spans[JOINT] = slice(0, offset)
    dims = dict.fromkeys(TARGETS, d)
    mom = {part: Moments(offset, dims) for part in ("train", "test")}
    x_test = Moments(d)
    sites = list(dict.fromkeys([target_site, *reg_sites.values()]))
    ticker = Ticker(
        progress, store.n_contexts * (store.ctx_len - int(store.identity.get("skip_positions", 0)))
    )
    for batch in store.iter_batches(sites, batch_tokens=batch_tokens, device=device):
        ticker.advance(len(batch))
        train = _split(batch, split_seed, train_fraction)
        x = batch.acts[target_site]
        if not bool(torch.isfinite(x).all()):
            raise DataError(f"The store holds NaN or inf activations at {target_site}; re-harvest in fp32.")
        sae_x = _recon(target_sae, x)
        error = x - sae_x
        linear = torch.addmm(b, x, w)
        ys = {"nonlinear": error - linear, "error": error, "linear": linear}
        z = _regressors(blocks, sae_x, batch.acts, regressor_saes)
        for part, mask in (("train", train), ("test", ~train)):
            if bool(mask.any()):
                mom[part].update(z[mask], {k: v[mask] for k, v in ys.items()})
        if bool((~train).any()):
            x_test.update(x[~train])
    n_train, n_test = mom["train"].n, mom["test"].n
    if n_train <= offset + 1 or n_test < 2:
        raise DataError(
            f"The split has {n_train} train and {n_test} test tokens; the joint regression has {offset} "
            f"inputs, so it needs more than {offset + 1} train and at least 2 test tokens. Harvest more "
            "contexts or use fewer regressors."
        )
    var_x = x_test.total_variance_x()
    names = [*regressor_saes, SELF, JOINT]
    r2: dict[str, dict[str, float]] = {}
    r2_w: dict[str, dict[str, float]] = {}
    r2_tr: dict[str, dict[str, float]] = {}
    fvu_with: dict[str, float] = {}
    ridge: dict[str, float] = {}
    joint_fits = None
    for name in names:
        tr = mom["train"] if name == JOINT else _sub_moments(mom["train"], spans[name])
        te = mom["test"] if name == JOINT else _sub_moments(mom["test"], spans[name])
        fits = fit_ridge_many(tr, list(TARGETS), bias=True)
        ev = {t: evaluate(fits[t], te, t) for t in TARGETS}
        r2[name] = {t: ev[t].r2_mean_over_dims for t in TARGETS}
        r2_w[name] = {t: ev[t].r2_variance_weighted for t in TARGETS}
        r2_tr[name] = {t: evaluate(fits[t], tr, t).r2_mean_over_dims for t in TARGETS}
        fvu_with[name] = fvu_with_prediction(ev["error"], var_x)
        ridge[name] = fits["error"].ridge
        if name == JOINT:
            joint_fits, joint_ev = fits, ev
    assert joint_fits is not None
    err_sum_sq = float(mom["test"].target_sum_sq("error").sum())
    nl_sum_sq = float(mom["test"].target_sum_sq("nonlinear").sum())
    jf = joint_fits["error"]
    assert jf.bias is not None
    config = {
        "split_seed": split_seed,
        "train_fraction": train_fraction,
        "store": store_summary(store),
        "target": sae_identity(target_sae),
        "regressors": {n: sae_identity(s) for n, s in regressor_saes.items()},
        "probe_sha": config_hash([float(w.double().sum()), float(b.double().sum())]),
    }
    result = EarlierLayersResult(
        config_hash=config_hash(config),
        seed=split_seed,
        config=config,
        target_site=target_site,
        regressors=names,
        regressor_sites={n: s for n, s, _ in blocks},
        targets=list(TARGETS),
        r2=r2,
        r2_variance_weighted=r2_w,
        r2_train=r2_tr,
        fvu_sae=err_sum_sq / var_x,
        fvu_sae_linear=nl_sum_sq / var_x,
        fvu_with=fvu_with,
        fvu_sae_linear_joint=fvu_with_prediction(joint_ev["nonlinear"], var_x),
        ridge=ridge,
        n_train=n_train,
        n_test=n_test,
        seconds=time.perf_counter() - t0,
    )
    result._joint_map = JointMap(
        target_site=target_site,
        blocks=blocks,
        weights=jf.weights.float().cpu(),
        bias=jf.bias.float().cpu(),
    )
    return result


# --------------------------------------------------------------------------- CE with the joint map


class JointCEResult(Result):
    """CE of splicing x̂' = Sae(x) + J(regressor reconstructions) at the target site."""

    experiment: str = "downstream_ce_joint"
    target_site: str
    blocks: list[tuple[str, str, int]] = Field(description="(name, site, width) of the joint map's inputs.")
    n_contexts: int
    ctx_len: int
    start: int
    scored_tokens: int
    ce: dict[str, float] = Field(description="Mean CE per setting: clean, sae, sae+joint, zero, ...")
    kl: dict[str, float] = Field(description="Mean KL(clean ‖ setting) per spliced setting.")
    ce_recovered_joint: float | None = Field(description="(L_sae − L_sae+joint) / (L_sae − L_clean).")
    ce_recovered_linear: float | None = Field(
        None, description="(L_sae − L_sae+linear) / (L_sae − L_clean), when a probe is given."
    )
    ce_loss_score: float | None = Field(description="(L_zero − L_sae) / (L_zero − L_clean).")
    ce_loss_score_joint: float | None = Field(description="(L_zero − L_sae+joint) / (L_zero − L_clean).")
    both_max_abs_ce_diff: float = Field(description="Max |CE(x̂' + (x − x̂')) − CE(clean)| per token.")
    both_mean_ce_diff: float
    fvu_sae: float = Field(description="FVU(x, Sae(x)) on the scored positions.")
    fvu_sae_joint: float = Field(description="FVU(x, x̂') on the scored positions.")
    fvu_sae_linear: float | None = Field(None, description="FVU(x, Sae(x) + LinearError), with a probe.")
    prefix_cache: bool
    forward_passes: int
    seconds: float


def downstream_ce_with_joint(
    lm: Any,
    tokens: np.ndarray,
    target_sae: SAE,
    regressor_saes: Mapping[str, SAE],
    joint_map: JointMap,
    *,
    start: int,
    batch_size: int = 4,
    probe: tuple[Tensor, Tensor] | None = None,
    prefix_cache: bool = True,
    both_tolerance: float = 1e-3,
    seed: int = 0,
    progress: Progress | None = None,
) -> JointCEResult:
    """Mean CE on held-out contexts of splicing x̂' at the target site for positions ``>= start``.

    The regressor sites must run before the target site in the forward pass (layer L−1 resid_post, layer L
    attn_out and mlp_out all precede layer L resid_post); a splice at the target leaves them unchanged.
    Without ``prefix_cache`` each spliced pass captures them live in the same forward and the splice hook
    at the target reads them; with it (the default) they come from the batch's clean pass, which holds
    the same values, and the unchanged layers are replayed (``downstream``'s engine). Settings: ``sae``,
    ``sae+joint`` (x̂'), ``sae+joint+rest`` (x̂' + (x − x̂') = x, the exactness check), ``zero``, and
    ``sae+linear`` when the target's ``probe`` is given, for comparison with the linear probe.
    """
    t0 = time.perf_counter()
    model = model_of(lm)
    arr = check_tokens(tokens, model, start)
    target = check_sae_site(model, "target", target_sae)
    blocks = _check_joint_map(joint_map, target_sae, regressor_saes)
    d = model_width(model)
    upstream: list[str] = []
    for name, _site, _w in blocks:
        if name == SELF:
            continue
        site = check_sae_site(model, name, regressor_saes[name])
        if site_order(site) >= site_order(target):
            raise HookSiteError(
                f"Regressor {name!r} reads {site.name}, which does not run before the target site "
                f"{target.name}; a splice at the target needs its regressors computed earlier in the pass."
            )
        if site.name not in upstream:
            upstream.append(site.name)
    pr = None if probe is None else check_probe("target", probe, d)
    fvu = {k: FVU(d) for k in ("sae", "sae+joint", "sae+linear")}
    w_j, b_j = joint_map.weights, joint_map.bias

    def compute(x: Tensor, ups: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        xf = x.float()
        sae_x = _recon(target_sae, x)
        z = _regressors(blocks, sae_x, ups, regressor_saes)
        x_joint = sae_x + torch.addmm(b_j.to(z), z, w_j.to(z))
        reps = {
            "sae": sae_x,
            "sae+joint": x_joint,
            "sae+joint+rest": x_joint + (xf - x_joint),
            "zero": torch.zeros_like(xf),
        }
        extras = {"sae": sae_x, "sae+joint": x_joint}
        if pr is not None:
            reps["sae+linear"] = extras["sae+linear"] = sae_x + torch.addmm(pr[1].to(xf), xf, pr[0].to(xf))
        return reps, extras

    def observe(x: Tensor, extras: Mapping[str, Tensor]) -> None:
        for k, v in extras.items():
            fvu[k].update(x.float(), v)

    unit = SpliceUnit("joint", target, compute, upstream=tuple(upstream), observe=observe)
    out = run_splices(
        model, arr, [unit], start=start, batch_size=batch_size, prefix_cache=prefix_cache, progress=progress
    )
    tally = out.tallies["joint"]
    n = out.n_scored
    clean = out.clean_ce_sum / n
    ce = {"clean": clean} | {k: tally.mean("ce", k) for k in tally.ce}
    kl = {k: tally.mean("kl", k) for k in tally.kl}
    both = check_both("joint", ce["sae+joint+rest"], tally.mean("clean", "sae+joint+rest"), both_tolerance)
    gap = ce["sae"] - clean
    config = {
        "start": int(start),
        "batch_size": batch_size,
        "prefix_cache": prefix_cache,
        "model": lm.identity if isinstance(lm, LoadedLM) else {"name": type(model).__name__},
        "contexts": {"n": int(arr.shape[0]), "ctx_len": int(arr.shape[1])},
        "target": sae_identity(target_sae),
        "regressors": {n: sae_identity(s) for n, s in regressor_saes.items()},
        "blocks": blocks,
        "joint_sha": config_hash([float(w_j.double().sum()), float(b_j.double().sum())]),
    }
    return JointCEResult(
        config_hash=config_hash(config),
        seed=seed,
        config=config,
        target_site=target.name,
        blocks=blocks,
        n_contexts=int(arr.shape[0]),
        ctx_len=int(arr.shape[1]),
        start=int(start),
        scored_tokens=n,
        ce=ce,
        kl=kl,
        ce_recovered_joint=ratio(ce["sae"] - ce["sae+joint"], gap),
        ce_recovered_linear=ratio(ce["sae"] - ce["sae+linear"], gap) if pr is not None else None,
        ce_loss_score=ratio(ce["zero"] - ce["sae"], ce["zero"] - clean),
        ce_loss_score_joint=ratio(ce["zero"] - ce["sae+joint"], ce["zero"] - clean),
        both_max_abs_ce_diff=tally.max_abs_ce_diff["sae+joint+rest"],
        both_mean_ce_diff=both,
        fvu_sae=fvu["sae"].compute(),
        fvu_sae_joint=fvu["sae+joint"].compute(),
        fvu_sae_linear=fvu["sae+linear"].compute() if pr is not None else None,
        prefix_cache=prefix_cache,
        forward_passes=out.forward_passes,
        seconds=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------- nonlinear probe


class _DimSums:
    """Float64 per-dimension count, shifted sum and sum of squares (for SS_tot about the mean)."""

    def __init__(self) -> None:
        self.n = 0
        self.ref: Tensor | None = None
        self.s: Tensor | None = None
        self.ss: Tensor | None = None

    def add(self, t: Tensor) -> None:
        t = t.double()
        if self.ref is None:
            self.ref = t.mean(0)
            self.s, self.ss = torch.zeros_like(self.ref), torch.zeros_like(self.ref)
        assert self.s is not None and self.ss is not None
        ts = t - self.ref
        self.s += ts.sum(0)
        self.ss += (ts * ts).sum(0)
        self.n += t.shape[0]

    def mean(self) -> Tensor:
        assert self.ref is not None and self.s is not None
        return self.ref + self.s / self.n

    def ss_tot(self) -> Tensor:
        assert self.s is not None and self.ss is not None
        return (self.ss - self.s * self.s / self.n).clamp_min(0)

    def sum_sq(self) -> Tensor:
        """Uncentred Σ t² per dimension."""
        m = self.mean()
        return self.ss_tot() + self.n * m * m


def _r2(ss_res: Tensor, sums: _DimSums) -> tuple[float, float]:
    """(mean over non-constant dims, variance-weighted) R²."""
    ss_tot = sums.ss_tot()
    constant = ss_tot <= CONSTANT_TARGET_TOL * sums.sum_sq()
    if bool(constant.all()):
        raise DataError("mlp_probe: every target dimension is constant on the test tokens; R² is undefined.")
    per_dim = 1 - ss_res[~constant] / ss_tot[~constant]
    return float(per_dim.mean()), float(1 - ss_res.sum() / ss_tot.sum())


class _ProbeMLP(torch.nn.Module):
    """pred(x) = [x @ W + b if on_probe] + W2 relu(W1 (x − μ)/σ + b1) + b2."""

    w: Tensor
    b: Tensor
    mu: Tensor
    sigma: Tensor

    def __init__(
        self, d: int, hidden: int, probe: tuple[Tensor, Tensor], mu: Tensor, sigma: Tensor, on: bool
    ):
        super().__init__()
        self.register_buffer("w", probe[0].clone())
        self.register_buffer("b", probe[1].clone())
        self.register_buffer("mu", mu)
        self.register_buffer("sigma", sigma)
        self.on_probe = on
        self.inner = torch.nn.Linear(d, hidden)
        self.outer = torch.nn.Linear(hidden, d)
        if on:  # start exactly at the linear probe
            torch.nn.init.zeros_(self.outer.weight)
            torch.nn.init.zeros_(self.outer.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.outer(torch.relu(self.inner((x - self.mu) / self.sigma)))
        return out + torch.addmm(self.b, x, self.w) if self.on_probe else out


def mlp_probe(
    store: ActivationStore,
    sae: SAE,
    probe: tuple[Tensor, Tensor],
    *,
    hidden: int = 256,
    epochs: int = 4,
    lr: float = 1e-3,
    minibatch: int = 256,
    on_probe: bool = True,
    split_seed: int,
    train_fraction: float,
    seed: int = 0,
    batch_tokens: int = 4096,
    device: str = "cpu",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train a one-hidden-layer MLP on train tokens to predict SaeError from x; score it on test tokens.

    With ``on_probe`` (default) the MLP is added to the frozen linear probe and its output layer starts at
    zero, so training starts from the probe and ``r2_nonlinear_*`` measures how much of NonlinearError the
    nonlinear part recovers; ``on_probe=False`` trains a plain MLP x → hidden → d. Inputs are standardised
    with the train mean and std of x. Adam with ``lr``, minibatches of ``minibatch`` tokens shuffled within
    each store chunk of ``batch_tokens``, ``epochs`` passes over the train tokens (a fixed budget), all
    seeded by ``seed``. Returns held-out R² (mean over dims and variance-weighted) for SaeError and
    NonlinearError, those of the linear probe, and FVU(x, Sae(x)), FVU(x, Sae(x) + LinearError) (the
    probe's FVU_nonlinear) and FVU(x, Sae(x) + MLP(x)).
    """
    t0 = time.perf_counter()
    for label, v in (("hidden", hidden), ("epochs", epochs), ("minibatch", minibatch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"mlp_probe: {label} must be a positive integer, found {v!r}.")
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"mlp_probe: lr must be a positive number, found {lr}.")
    site = _check_store_sae(store, "sae", sae)
    d = store.d[site]
    w, b = (t.to(device) for t in check_probe("sae", probe, d))

    def chunks(train: bool) -> Iterator[Tensor]:
        for batch in store.iter_batches([site], batch_tokens=batch_tokens, device=device):
            mask = _split(batch, split_seed, train_fraction)
            x = batch.acts[site][mask if train else ~mask]
            if x.shape[0]:
                yield x

    ticker = Ticker(progress, epochs + 2)  # one statistics pass, the epochs, one evaluation pass
    x_train = _DimSums()
    for x in chunks(True):
        x_train.add(x)
    ticker.advance(1)
    if x_train.n < 2 * d:
        raise DataError(
            f"mlp_probe: {x_train.n} train tokens for a d={d} input; harvest more contexts (>= {2 * d})."
        )
    mu = x_train.mean().float()
    sigma = (x_train.ss_tot() / (x_train.n - 1)).sqrt().float().clamp_min(1e-6)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _ProbeMLP(d, hidden, (w, b), mu.to(device), sigma.to(device), on_probe).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    history: list[float] = []
    for _epoch in range(epochs):
        total, count = 0.0, 0
        for x in chunks(True):
            with torch.no_grad():
                err = x - _recon(sae, x)
            order = torch.randperm(x.shape[0], generator=gen).to(device)
            for i in range(0, x.shape[0], minibatch):
                idx = order[i : i + minibatch]
                loss = torch.nn.functional.mse_loss(net(x[idx]), err[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
        history.append(total / max(count, 1))
        ticker.advance(1)

    sums = {k: _DimSums() for k in ("x", "error", "nonlinear")}
    ss_res = {k: torch.zeros(d, dtype=torch.float64) for k in ("mlp", "probe")}
    with torch.no_grad():
        for x in chunks(False):
            err = x - _recon(sae, x)
            lin = torch.addmm(b, x, w)
            nl = err - lin
            resid = err - net(x)
            for k, t in (("x", x), ("error", err), ("nonlinear", nl)):
                sums[k].add(t)
            ss_res["mlp"] += resid.double().pow(2).sum(0).cpu()
            ss_res["probe"] += nl.double().pow(2).sum(0).cpu()
    if sums["x"].n < 2:
        raise DataError(f"mlp_probe: {sums['x'].n} test token(s); at least 2 are needed.")
    ticker.advance(1)
    sums = {k: _cpu(v) for k, v in sums.items()}
    var_x = float(sums["x"].ss_tot().sum())
    r2_e, r2_e_w = _r2(ss_res["mlp"], sums["error"])
    r2_nl, r2_nl_w = _r2(ss_res["mlp"], sums["nonlinear"])  # nl − (MLP − Lin) = e − MLP
    p_e, p_e_w = _r2(ss_res["probe"], sums["error"])
    return {
        "hidden": hidden,
        "epochs": epochs,
        "lr": lr,
        "minibatch": minibatch,
        "on_probe": on_probe,
        "seed": seed,
        "split_seed": split_seed,
        "train_fraction": train_fraction,
        "n_train": x_train.n,
        "n_test": sums["x"].n,
        "train_loss": history,
        "r2_error_mean_over_dims": r2_e,
        "r2_error_variance_weighted": r2_e_w,
        "r2_nonlinear_mean_over_dims": r2_nl,
        "r2_nonlinear_variance_weighted": r2_nl_w,
        "probe_r2_error_mean_over_dims": p_e,
        "probe_r2_error_variance_weighted": p_e_w,
        "fvu_sae": float(sums["error"].sum_sq().sum()) / var_x,
        "fvu_sae_linear": float(ss_res["probe"].sum()) / var_x,
        "fvu_sae_mlp": float(ss_res["mlp"].sum()) / var_x,
        "seconds": time.perf_counter() - t0,
    }


def _cpu(s: _DimSums) -> _DimSums:
    for k in ("ref", "s", "ss"):
        v = getattr(s, k)
        if v is not None:
            setattr(s, k, v.cpu())
    return s
