"""Collect per-latent example windows from an activation store in two streaming passes.

Each context is cut into a fixed grid of windows of ``window`` tokens over the streamed positions
(``skip_positions .. ctx_len``; the last window may be shorter), as the paper's max-activation windows do
(there 128-token windows of 128-token contexts). A window's activation is its max over its tokens.

Pass 1 keeps, per latent, the ``max_examples`` windows with the highest activation (values and ids only),
counts activating tokens and windows, and draws up to ``n_negatives`` contexts where the latent never fired
by reservoir sampling. The kept windows, sorted descending, are split into 10 equal groups: the deciles of
the paper (over its top 2000 windows). Pass 2 reads only the contexts of the chosen windows and records
their per-token activations. Memory is O(latents x max_examples) plus one store batch, whatever the token
count; ``activations_fn`` must return the same values in both passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, Field

from darkmatter.errors import ConfigError, DataError
from darkmatter.interp.scoring import N_DECILES
from darkmatter.store import ActivationStore, Batch

Tensor = torch.Tensor
ActivationsFn = Callable[[Batch], Tensor]  # batch -> [n, len(latents)] activations of the chosen latents


class Example(BaseModel):
    """One window of a context: its token ids and the latent's activation on each token."""

    context: int = Field(description="Context index in the store.")
    start: int = Field(description="Position of the window's first token in its context.")
    tokens: list[int] = Field(description="Token ids.")
    acts: list[float] = Field(description="The latent's activation per token.")
    max_act: float = Field(description="Max activation over the window.")
    decile: int | None = Field(default=None, description="1 (lowest) .. 10 (highest) for decile samples.")


class LatentExamples(BaseModel):
    """What was collected for one latent; ``skip_reason`` is set when it fired too rarely to score."""

    latent: int
    n_active_tokens: int = Field(description="Streamed tokens where the latent is > 0.")
    n_active_windows: int = Field(description="Windows where the latent is > 0 somewhere.")
    top: list[Example] = Field(default_factory=list, description="Highest-activation windows, descending.")
    deciles: dict[int, list[Example]] = Field(
        default_factory=dict, description="Samples per decile of the kept activating windows, 1 = lowest."
    )
    negatives: list[Example] = Field(default_factory=list, description="Windows of never-firing contexts.")
    skip_reason: str | None = Field(default=None, description="Why the latent cannot be scored, if so.")


class _GroupMax:
    """Column maxima per group id of a stream sorted by id; the last group stays open across batches."""

    def __init__(self) -> None:
        self.open_id: int | None = None
        self.open_vals: Tensor | None = None

    def update(self, ids: Tensor, vals: Tensor) -> tuple[Tensor, Tensor]:
        """Add rows ``vals [n, L]`` with group ``ids [n]``; return the groups that are now complete."""
        if len(ids) > 1 and bool((ids[1:] < ids[:-1]).any()):
            raise DataError("Store batches are not in (context, position) order; cannot group windows.")
        if self.open_id is not None and int(ids[0]) < self.open_id:
            raise DataError("Store batches are not in (context, position) order; cannot group windows.")
        uniq, inv = torch.unique_consecutive(ids, return_inverse=True)
        m = torch.full((len(uniq), vals.shape[1]), -torch.inf, dtype=vals.dtype)
        m.scatter_reduce_(0, inv[:, None].expand_as(vals), vals, reduce="amax")
        done_ids, done = uniq[:-1], m[:-1]
        if self.open_id is not None and self.open_vals is not None:
            if int(uniq[0]) == self.open_id:
                m[0] = torch.maximum(m[0], self.open_vals)
            else:
                done_ids = torch.cat([torch.tensor([self.open_id]), done_ids])
                done = torch.cat([self.open_vals[None], done])
        self.open_id, self.open_vals = int(uniq[-1]), m[-1].clone()
        return done_ids, done

    def flush(self) -> tuple[Tensor, Tensor] | None:
        if self.open_id is None or self.open_vals is None:
            return None
        out = torch.tensor([self.open_id]), self.open_vals[None]
        self.open_id, self.open_vals = None, None
        return out


class _Pass1:
    """Top windows, activation counts and a never-fired context reservoir for every latent."""

    def __init__(self, n_latents: int, keep: int, n_negatives: int, n_win: int, seed: int) -> None:
        self.n_win = n_win
        self.top_vals = torch.full((n_latents, keep), -torch.inf)
        self.top_ids = torch.full((n_latents, keep), -1, dtype=torch.int64)
        self.active_tokens = torch.zeros(n_latents, dtype=torch.int64)
        self.active_windows = torch.zeros(n_latents, dtype=torch.int64)
        self.windows = _GroupMax()
        self.contexts = _GroupMax()
        self.reservoir = np.full((n_latents, n_negatives), -1, dtype=np.int64)
        self.seen = np.zeros(n_latents, dtype=np.int64)
        self.rng = np.random.default_rng(seed)

    def update(self, window_ids: Tensor, acts: Tensor) -> None:
        self.active_tokens += (acts > 0).sum(0)
        self._windows_done(*self.windows.update(window_ids, acts))

    def finish(self) -> None:
        last = self.windows.flush()
        if last is not None:
            self._windows_done(*last)
        ctx = self.contexts.flush()
        if ctx is not None:
            self._contexts_done(*ctx)

    def _windows_done(self, ids: Tensor, wmax: Tensor) -> None:
        if len(ids) == 0:
            return
        active = wmax > 0  # [g, L]
        self.active_windows += active.sum(0)
        cand = torch.where(active, wmax, -torch.inf).T  # [L, g]
        if bool((cand > self.top_vals[:, -1:]).any()):
            vals = torch.cat([self.top_vals, cand], dim=1)
            cids = torch.cat([self.top_ids, ids[None].expand(cand.shape[0], -1)], dim=1)
            self.top_vals, order = vals.topk(self.top_vals.shape[1], dim=1)
            self.top_ids = cids.gather(1, order)
        self._contexts_done(*self.contexts.update(ids // self.n_win, wmax))

    def _contexts_done(self, ids: Tensor, cmax: Tensor) -> None:
        """Reservoir-sample (algorithm R) contexts where each latent never fired."""
        size = self.reservoir.shape[1]
        if size == 0 or len(ids) == 0:
            return
        quiet = (cmax <= 0).numpy()
        for c, row in zip(ids.tolist(), quiet, strict=True):
            idx = np.flatnonzero(row)
            if idx.size == 0:
                continue
            self.seen[idx] += 1
            s = self.seen[idx]
            fill = s <= size
            self.reservoir[idx[fill], s[fill] - 1] = c
            rest = idx[~fill]
            if rest.size:
                j = self.rng.integers(0, self.seen[rest])
                keep = j < size
                self.reservoir[rest[keep], j[keep]] = c


def _check_latents(latents: Sequence[int], d_sae: int) -> list[int]:
    ids = [int(i) for i in latents]
    if not ids:
        raise ConfigError("No latents to collect examples for; pass at least one latent id.")
    if len(set(ids)) != len(ids):
        raise ConfigError("The latent ids contain duplicates; pass each latent once.")
    bad = [i for i in ids if not 0 <= i < d_sae]
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        raise ConfigError(
            f"Asked for {len(bad)} latent(s) outside the SAE ({shown}), but the SAE has {d_sae} latents "
            f"(valid ids 0..{d_sae - 1})."
        )
    return ids


def _acts(activations_fn: ActivationsFn, batch: Batch, n_latents: int) -> Tensor:
    a = activations_fn(batch)
    if tuple(a.shape) != (len(batch), n_latents):
        raise DataError(
            f"activations_fn returned shape {tuple(a.shape)}, expected [{len(batch)}, {n_latents}] "
            "(one column per requested latent)."
        )
    a = a.detach().to(device="cpu", dtype=torch.float32)
    if not bool(torch.isfinite(a).all()):
        raise DataError("activations_fn returned NaN or inf activations.")
    return a


def _check_sizes(
    n_top: int, n_per_decile: int, window: int, n_negatives: int, min_activations: int, max_examples: int
) -> None:
    for name, v, low in [
        ("n_top", n_top, 1),
        ("n_per_decile", n_per_decile, 1),
        ("window", window, 1),
        ("n_negatives", n_negatives, 0),
        ("min_activations", min_activations, 1),
    ]:
        if v < low:
            raise ConfigError(f"{name} must be >= {low}, found {v}.")
    if max_examples < max(n_top, N_DECILES):
        raise ConfigError(
            f"max_examples must be >= max(n_top, 10) = {max(n_top, N_DECILES)}, found {max_examples}."
        )


@dataclass(frozen=True)
class _Grid:
    """The windows: each context's streamed positions ``skip .. ctx_len`` cut every ``window`` tokens.

    Window id ``context · n_win + index``; the last window of a context may be shorter.
    """

    skip: int
    window: int
    n_win: int
    ctx_len: int

    @classmethod
    def of(cls, store: ActivationStore, window: int, skip_positions: int | None) -> _Grid:
        skip = int(store.identity.get("skip_positions", 0)) if skip_positions is None else skip_positions
        span = store.ctx_len - skip
        if skip < 0 or span < 1:
            raise ConfigError(
                f"skip_positions={skip} leaves no positions in contexts of {store.ctx_len} tokens."
            )
        window = min(window, span)
        return cls(skip, window, -(-span // window), store.ctx_len)

    def ids(self, b: Batch) -> Tensor:
        """The window id of each row of ``b``."""
        return b.context.cpu() * self.n_win + (b.position.cpu() - self.skip) // self.window

    def place(self, w: int) -> tuple[int, int]:
        """(context, first position) of window ``w``."""
        return w // self.n_win, self.skip + (w % self.n_win) * self.window


Picks = list[tuple[int, int | None]]
"""Chosen windows of one latent: (window id, decile, or None for a top window)."""


def _choose(
    p1: _Pass1,
    col: int,
    le: LatentExamples,
    tokens: np.ndarray,
    grid: _Grid,
    *,
    n_top: int,
    n_per_decile: int,
    min_activations: int,
    seed: int,
) -> Picks | None:
    """Pick the top and decile windows of one latent and fill its negatives; None (and skip) if too rare."""
    n_tok = le.n_active_tokens
    kept = p1.top_ids[col][p1.top_vals[col] > -torch.inf].tolist()
    if n_tok < min_activations:
        le.skip_reason = f"fired on {n_tok} tokens, fewer than min_activations={min_activations}"
        return None
    if len(kept) < N_DECILES:
        le.skip_reason = f"fired in only {len(kept)} windows; deciles need at least {N_DECILES}"
        return None
    rng = np.random.default_rng([seed, le.latent])
    picks: Picks = [(w, None) for w in kept[:n_top]]
    for g, group in enumerate(np.array_split(np.asarray(kept), N_DECILES)):
        chosen = np.sort(rng.choice(len(group), size=min(n_per_decile, len(group)), replace=False))
        picks += [(int(group[i]), N_DECILES - g) for i in chosen]
    for c in p1.reservoir[col][p1.reservoir[col] >= 0].tolist():
        start = grid.skip + int(rng.integers(grid.n_win)) * grid.window
        toks = tokens[c, start : min(start + grid.window, grid.ctx_len)].astype(int).tolist()
        le.negatives.append(Example(context=c, start=start, tokens=toks, acts=[0.0] * len(toks), max_act=0.0))
    return picks


def _fill(
    le: LatentExamples,
    picks: Picks,
    acts: dict[tuple[int, int], np.ndarray],
    col: int,
    grid: _Grid,
    tokens: np.ndarray,
) -> None:
    """Add the chosen windows of one latent, with their per-token activations, to its top and deciles."""
    for w, decile in picks:
        c, start = grid.place(w)
        a = acts[(col, w)]
        toks = tokens[c, start : start + len(a)].astype(int).tolist()
        ex = Example(
            context=c, start=start, tokens=toks, acts=a.tolist(), max_act=float(a.max()), decile=decile
        )
        if decile is None:
            le.top.append(ex)
        else:
            le.deciles.setdefault(decile, []).append(ex)
    le.deciles = {d: le.deciles.get(d, []) for d in range(1, N_DECILES + 1)}


def collect_examples(
    store: ActivationStore,
    activations_fn: ActivationsFn,
    latents: Sequence[int],
    *,
    d_sae: int,
    n_top: int = 20,
    n_per_decile: int = 10,
    n_negatives: int = 50,
    window: int = 64,
    max_examples: int = 2000,
    min_activations: int = 200,
    sites: list[str] | None = None,
    batch_tokens: int = 4096,
    skip_positions: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[int, LatentExamples]:
    """Top windows, decile samples and never-firing negatives for each latent, in two streaming passes.

    ``activations_fn(batch)`` gives ``[n, len(latents)]`` activations of ``latents`` (in that order).
    Latents with fewer than ``min_activations`` activating tokens, or fewer than 10 activating windows,
    come back with ``skip_reason`` set. ``sites`` limits which store sites are loaded. Batches are loaded
    on ``device`` (where ``activations_fn`` computes); the window bookkeeping is on the host, and the
    activations are moved there explicitly.
    """
    ids = _check_latents(latents, d_sae)
    _check_sizes(n_top, n_per_decile, window, n_negatives, min_activations, max_examples)
    grid = _Grid.of(store, window, skip_positions)
    L = len(ids)
    p1 = _Pass1(L, max_examples, n_negatives, grid.n_win, seed)
    for b in store.iter_batches(sites, batch_tokens=batch_tokens, skip_positions=grid.skip, device=device):
        p1.update(grid.ids(b), _acts(activations_fn, b, L))
    p1.finish()

    tokens = store.tokens
    out: dict[int, LatentExamples] = {}
    wanted: dict[int, Picks] = {}  # column -> chosen windows
    for col, latent in enumerate(ids):
        n_tok, n_w = int(p1.active_tokens[col]), int(p1.active_windows[col])
        out[latent] = LatentExamples(latent=latent, n_active_tokens=n_tok, n_active_windows=n_w)
        picks = _choose(
            p1,
            col,
            out[latent],
            tokens,
            grid,
            n_top=n_top,
            n_per_decile=n_per_decile,
            min_activations=min_activations,
            seed=seed,
        )
        if picks is not None:
            wanted[col] = picks

    acts = _pass2(
        store,
        activations_fn,
        wanted,
        grid.ids,
        n_win=grid.n_win,
        sites=sites,
        batch_tokens=batch_tokens,
        skip=grid.skip,
        n_latents=L,
        device=device,
    )
    for col, picks in wanted.items():
        _fill(out[ids[col]], picks, acts, col, grid, tokens)
    return out


def _pass2(
    store: ActivationStore,
    activations_fn: ActivationsFn,
    wanted: dict[int, list[tuple[int, int | None]]],
    window_ids: Callable[[Batch], Tensor],
    *,
    n_win: int,
    sites: list[str] | None,
    batch_tokens: int,
    skip: int,
    n_latents: int,
    device: str | torch.device,
) -> dict[tuple[int, int], np.ndarray]:
    """Per-token activations ``{(column, window id): [window length]}`` of the chosen windows."""
    need: dict[int, set[int]] = {}
    for col, picks in wanted.items():
        for w, _ in picks:
            need.setdefault(w, set()).add(col)
    if not need:
        return {}
    sel = torch.tensor(sorted(need), dtype=torch.int64)
    contexts = np.unique(sel.numpy() // n_win)
    parts: dict[tuple[int, int], list[np.ndarray]] = {}
    batches = store.iter_batches(
        sites, batch_tokens=batch_tokens, skip_positions=skip, contexts=contexts, device=device
    )
    for b in batches:
        wid = window_ids(b)
        idx = torch.isin(wid, sel).nonzero().squeeze(1)
        if len(idx) == 0:
            continue
        sub = Batch(
            acts={s: v[idx.to(v.device)] for s, v in b.acts.items()},
            context=b.context[idx.to(b.context.device)],
            position=b.position[idx.to(b.position.device)],
            token=b.token[idx.to(b.token.device)],
            loss=None if b.loss is None else b.loss[idx.to(b.loss.device)],
        )
        a = _acts(activations_fn, sub, n_latents).numpy()
        uniq, counts = torch.unique_consecutive(wid[idx], return_counts=True)
        row = 0
        for w, n in zip(uniq.tolist(), counts.tolist(), strict=True):
            for col in need[w]:
                parts.setdefault((col, w), []).append(a[row : row + n, col])
            row += n
    return {k: np.concatenate(v) for k, v in parts.items()}
