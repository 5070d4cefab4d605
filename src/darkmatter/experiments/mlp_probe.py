"""Does a nonlinear map of x predict what the linear error probe could not?

``mlp_probe`` trains a one-hidden-layer MLP with Adam on train tokens to predict SaeError from x and
scores it on test tokens, next to the linear probe it starts from.

Under ``torchrun`` the statistics and evaluation passes are dealt by shards (float64 sums added across
ranks) and training is data-parallel: every rank walks the same global minibatches, takes the loss and
gradients of a contiguous share of each one's rows, and the gradients are summed before every rank's
identical Adam step (as ``sae.data_parallel``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from darkmatter.errors import ConfigError, DataError
from darkmatter.experiments.inputs import check_probe, check_store_sae, on_device, sae_recon
from darkmatter.progress import Progress, Ticker
from darkmatter.ranks import SINGLE, Ranks
from darkmatter.sae.model import SAE
from darkmatter.stats import CONSTANT_TARGET_TOL, Split
from darkmatter.store import ActivationStore

Tensor = torch.Tensor
Chunks = Callable[[bool], Iterator[Tensor]]
"""``chunks(train)``: the store's x rows of the train (or test) split, one store batch at a time."""


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

    def all_reduce_(self, ranks: Ranks, d: int, device: str | torch.device) -> None:
        """Every rank's sums added in place (each must call this), about the reference of the first rank
        with rows: that rank's sums are added unchanged, the others' moved to its reference first."""
        counts = ranks.gather(self.n)
        if not sum(counts):
            return
        first = next(r for r, c in enumerate(counts) if c)
        dev = ranks.collective_device
        zeros = torch.zeros(d, dtype=torch.float64, device=dev)
        ref = self.ref.to(dev, copy=True) if ranks.rank == first and self.ref is not None else zeros.clone()
        ranks.sum_([ref])
        s, ss = zeros.clone(), zeros.clone()
        if self.n:
            assert self.ref is not None and self.s is not None and self.ss is not None
            dx = self.ref.to(dev) - ref  # t − ref = (t − own ref) + dx
            s, ss = self.s.to(dev) + self.n * dx, self.ss.to(dev) + 2 * dx * self.s.to(dev) + self.n * dx * dx
        packed = torch.cat([s, ss])
        ranks.sum_([packed])
        self.ref, self.s, self.ss = (t.to(device) for t in (ref, packed[:d], packed[d:]))
        self.n = sum(counts)

    def cpu(self) -> _DimSums:
        """Move the sums to the CPU in place (for the final float64 arithmetic)."""
        for k in ("ref", "s", "ss"):
            v = getattr(self, k)
            if v is not None:
                setattr(self, k, v.cpu())
        return self


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


def _check_hparams(hidden: int, epochs: int, minibatch: int, lr: float) -> None:
    for label, v in (("hidden", hidden), ("epochs", epochs), ("minibatch", minibatch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"mlp_probe: {label} must be a positive integer, found {v!r}.")
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"mlp_probe: lr must be a positive number, found {lr}.")


def _split_chunks(
    store: ActivationStore,
    site: str,
    split: Split,
    batch_tokens: int,
    device: str | torch.device,
    shards: list[int] | None = None,
) -> Chunks:
    """The ``Chunks`` of ``site`` (of ``shards``; None: every shard): each store batch's train (or test)
    rows, empty ones skipped."""

    def chunks(train: bool) -> Iterator[Tensor]:
        for batch in store.iter_batches([site], batch_tokens=batch_tokens, device=device, shards=shards):
            mask = split.mask(batch.context.cpu(), batch.position.cpu()).to(batch.context.device)
            x = batch.acts[site][mask if train else ~mask]
            if x.shape[0]:
                yield x

    return chunks


def _input_stats(
    chunks: Chunks, d: int, ranks: Ranks, device: str | torch.device
) -> tuple[_DimSums, Tensor, Tensor]:
    """Train sums of x and the float32 mean and std (clamped at 1e-6) that standardise the MLP's input."""
    x_train = _DimSums()
    for x in chunks(True):
        x_train.add(x)
    if ranks.active:
        x_train.all_reduce_(ranks, d, device)
    if x_train.n < 2 * d:
        raise DataError(
            f"mlp_probe: {x_train.n} train tokens for a d={d} input; harvest more contexts (>= {2 * d})."
        )
    mu = x_train.mean().float()
    sigma = (x_train.ss_tot() / (x_train.n - 1)).sqrt().float().clamp_min(1e-6)
    return x_train, mu, sigma


def _train_epoch(
    net: _ProbeMLP,
    opt: torch.optim.Optimizer,
    chunks: Chunks,
    sae: SAE,
    minibatch: int,
    gen: torch.Generator,
    device: str | torch.device,
) -> float:
    """One Adam pass over the train tokens (minibatches shuffled within each chunk); mean MSE."""
    total, count = 0.0, 0
    for x in chunks(True):
        with torch.no_grad():
            err = x - sae_recon(sae, x)
        order = torch.randperm(x.shape[0], generator=gen).to(device)
        for i in range(0, x.shape[0], minibatch):
            idx = order[i : i + minibatch]
            loss = torch.nn.functional.mse_loss(net(x[idx]), err[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
    return total / max(count, 1)


def _shared_epoch(
    net: _ProbeMLP,
    opt: torch.optim.Optimizer,
    chunks: Chunks,
    sae: SAE,
    minibatch: int,
    gen: torch.Generator,
    ranks: Ranks,
) -> float:
    """``_train_epoch`` for one rank of a data-parallel run: the same chunks and shuffled minibatches, the
    SAE and the MLP on this rank's contiguous share of each minibatch's rows, the minibatch's gradient and
    loss summed across ranks before the step; mean MSE (one process's up to float32 summation order)."""
    total, count = 0.0, 0
    params = list(net.parameters())
    for x in chunks(True):
        order = torch.randperm(x.shape[0], generator=gen).to(x.device)
        batches = [order[i : i + minibatch] for i in range(0, x.shape[0], minibatch)]
        mine = [idx[slice(*ranks.bounds(len(idx)))] for idx in batches]
        x_mine = x[torch.cat(mine)]
        with torch.no_grad():  # (a chunk of one row leaves rank 1 none)
            err_mine = x_mine - sae_recon(sae, x_mine) if len(x_mine) else x_mine
        start = 0
        for idx, part in zip(batches, mine, strict=True):
            rows = slice(start, start + len(part))
            start += len(part)
            loss = (net(x_mine[rows]) - err_mine[rows]).pow(2).sum() / (len(idx) * x.shape[1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            summed = loss.detach().reshape(1)
            ranks.sum_([*(p.grad for p in params if p.grad is not None), summed])
            opt.step()
            total += float(summed) * len(idx)
            count += len(idx)
    return total / max(count, 1)


def _evaluate(
    net: _ProbeMLP, chunks: Chunks, sae: SAE, probe: tuple[Tensor, Tensor], d: int, ranks: Ranks
) -> tuple[dict[str, _DimSums], dict[str, Tensor]]:
    """Test sums of x, SaeError and NonlinearError, and SS_res per dim of the MLP and the linear probe."""
    w, b = probe
    sums = {k: _DimSums() for k in ("x", "error", "nonlinear")}
    ss_res = {k: torch.zeros(d, dtype=torch.float64, device=w.device) for k in ("mlp", "probe")}
    with torch.no_grad():
        for x in chunks(False):
            err = x - sae_recon(sae, x)
            lin = torch.addmm(b, x, w)
            nl = err - lin
            resid = err - net(x)
            for k, t in (("x", x), ("error", err), ("nonlinear", nl)):
                sums[k].add(t)
            ss_res["mlp"] += resid.double().pow(2).sum(0)
            ss_res["probe"] += nl.double().pow(2).sum(0)
    if ranks.active:
        for v in sums.values():
            v.all_reduce_(ranks, d, w.device)
        packed = torch.cat([ss_res["mlp"], ss_res["probe"]])
        ranks.sum_([packed])
        ss_res = {"mlp": packed[:d], "probe": packed[d:]}
    if sums["x"].n < 2:
        raise DataError(f"mlp_probe: {sums['x'].n} test token(s); at least 2 are needed.")
    return {k: v.cpu() for k, v in sums.items()}, {k: v.cpu() for k, v in ss_res.items()}


def _scores(sums: dict[str, _DimSums], ss_res: dict[str, Tensor]) -> dict[str, float]:
    """Held-out R² of the MLP (SaeError, NonlinearError) and the linear probe (SaeError), and the FVUs."""
    var_x = float(sums["x"].ss_tot().sum())
    r2_e, r2_e_w = _r2(ss_res["mlp"], sums["error"])
    r2_nl, r2_nl_w = _r2(ss_res["mlp"], sums["nonlinear"])  # nl − (MLP − Lin) = e − MLP
    p_e, p_e_w = _r2(ss_res["probe"], sums["error"])
    return {
        "r2_error_mean_over_dims": r2_e,
        "r2_error_variance_weighted": r2_e_w,
        "r2_nonlinear_mean_over_dims": r2_nl,
        "r2_nonlinear_variance_weighted": r2_nl_w,
        "probe_r2_error_mean_over_dims": p_e,
        "probe_r2_error_variance_weighted": p_e_w,
        "fvu_sae": float(sums["error"].sum_sq().sum()) / var_x,
        "fvu_sae_linear": float(ss_res["probe"].sum()) / var_x,
        "fvu_sae_mlp": float(ss_res["mlp"].sum()) / var_x,
    }


def mlp_probe(
    store: ActivationStore,
    sae: SAE,
    probe: tuple[Tensor, Tensor],
    *,
    split: Split,
    hidden: int = 256,
    epochs: int = 4,
    lr: float = 1e-3,
    minibatch: int = 256,
    on_probe: bool = True,
    seed: int = 0,
    batch_tokens: int = 4096,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    progress: Progress | None = None,
    ranks: Ranks = SINGLE,
) -> dict[str, Any]:
    """Train a one-hidden-layer MLP on ``split``'s train tokens to predict SaeError from x; score on test.

    With ``on_probe`` (default) the MLP is added to the frozen linear probe and its output layer starts at
    zero, so training starts from the probe and ``r2_nonlinear_*`` measures how much of NonlinearError the
    nonlinear part recovers; ``on_probe=False`` trains a plain MLP x → hidden → d. Inputs are standardised
    with the train mean and std of x. Adam with ``lr``, minibatches of ``minibatch`` tokens shuffled within
    each store chunk of ``batch_tokens``, ``epochs`` passes over the train tokens (a fixed budget), all
    seeded by ``seed``. Returns held-out R² (mean over dims and variance-weighted) for SaeError and
    NonlinearError, those of the linear probe, and FVU(x, Sae(x)), FVU(x, Sae(x) + LinearError) (the
    probe's FVU_nonlinear) and FVU(x, Sae(x) + MLP(x)). The SAE (in ``dtype``, None: its own), the probe,
    the MLP, the batches and the float64 sums are on ``device``; the sums come back to the host at the end.
    ``ranks``: under ``torchrun`` every rank (each must call this) trains the same MLP data-parallel (see
    the module docstring) and returns the same numbers.
    """
    t0 = time.perf_counter()
    _check_hparams(hidden, epochs, minibatch, lr)
    site = check_store_sae(store, "sae", sae)
    sae = on_device(sae, device, dtype)
    d = store.d[site]
    w, b = (t.to(device) for t in check_probe("sae", probe, d))
    chunks = _split_chunks(store, site, split, batch_tokens, device)  # training: every shard on every rank
    mine = chunks
    if ranks.active:
        mine = _split_chunks(store, site, split, batch_tokens, device, ranks.share(range(store.n_shards)))
    ticker = Ticker(progress, epochs + 2)  # one statistics pass, the epochs, one evaluation pass
    x_train, mu, sigma = _input_stats(mine, d, ranks, device)
    ticker.advance(1)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _ProbeMLP(d, hidden, (w, b), mu.to(device), sigma.to(device), on_probe).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    history: list[float] = []
    for _epoch in range(epochs):
        if ranks.active:
            history.append(_shared_epoch(net, opt, chunks, sae, minibatch, gen, ranks))
        else:
            history.append(_train_epoch(net, opt, chunks, sae, minibatch, gen, device))
        ticker.advance(1)
    sums, ss_res = _evaluate(net, mine, sae, (w, b), d, ranks)
    ticker.advance(1)
    return {
        "hidden": hidden,
        "epochs": epochs,
        "lr": lr,
        "minibatch": minibatch,
        "on_probe": on_probe,
        "seed": seed,
        "split_seed": split.seed,
        "train_fraction": split.fraction,
        "n_train": x_train.n,
        "n_test": sums["x"].n,
        "train_loss": history,
        **_scores(sums, ss_res),
        "seconds": time.perf_counter() - t0,
    }
