"""Delete-one-block jackknife intervals for the earlier-layer regressions (``earlier_layers``).

As in the engine, blocks are contiguous groups of whole store shards and the train and test moments are
kept per block (moments are additive, so the totals are their sum). Replicate b refits every (regressor,
target) pair on the train moments of every block but b and scores it on the test moments of every block but
b, so each interval includes the fits' own variance. Fewer than 3 blocks, or blocks too big to leave out
(too few tokens would remain for the joint fit), give no intervals.

Under ``torchrun`` each rank holds the blocks of its shards; ``BlockMoments.all_reduce_`` sums them onto
the reference of the first rank holding each block, so a block inside one rank's shards arrives bit for
bit and every rank ends with the same blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from darkmatter.errors import DataError
from darkmatter.experiments.decomposition.accumulators import merged, replicates_fit
from darkmatter.experiments.joint_map import JOINT
from darkmatter.ranks import Ranks
from darkmatter.stats import Moments, evaluate, fit_ridge_many, fvu_with_prediction
from darkmatter.stats.jackknife import finite_interval

Tensor = torch.Tensor
Table = dict[str, dict[str, float]]
"""regressor -> target -> number."""


def sub_moments(m: Moments, cols: slice) -> Moments:
    """The moments of a column block of x (same targets): exact, as shifted sums slice per column."""
    state = m.state_dict()
    sub = Moments(cols.stop - cols.start, m.target_dims, device=m.device)
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


@dataclass
class BlockMoments:
    """Per block: train and test moments of (joint input, targets) and the test moments of x alone."""

    train: list[Moments]
    test: list[Moments]
    x_test: list[Moments]

    @classmethod
    def empty(
        cls,
        blocks: int,
        width: int,
        targets: dict[str, int],
        d: int,
        *,
        device: str | torch.device | None = None,
    ) -> BlockMoments:
        """``blocks`` empty accumulators per part on ``device``: inputs of ``width`` with ``targets``; x of
        width ``d``."""
        return cls(
            [Moments(width, targets, device=device) for _ in range(blocks)],
            [Moments(width, targets, device=device) for _ in range(blocks)],
            [Moments(d, device=device) for _ in range(blocks)],
        )

    def total(self, part: str, without: int | None = None) -> Moments:
        """``part`` ('train', 'test' or 'x_test') merged over every block (or every block but ``without``)."""
        blocks: list[Moments] = getattr(self, part)
        return merged(blocks, without)

    def all_reduce_(self, ranks: Ranks) -> None:
        """Every rank's blocks summed, in place (every rank must call this)."""
        every = [*self.train, *self.test, *self.x_test]
        counts = ranks.gather([m.n for m in every])
        for i, m in enumerate(every):
            all_reduce_moments_(m, [c[i] for c in counts], ranks)


def all_reduce_moments_(m: Moments, counts: list[int], ranks: Ranks) -> None:
    """``m`` summed across ranks in place (``counts``: its tokens on each rank), about the reference of the
    first rank with tokens: that rank's sums are added unchanged (a part held by one rank arrives exactly),
    the others' moved to that reference first (exact algebra, as ``Moments.merge``)."""
    total = sum(counts)
    if total == 0:
        return
    first = next(r for r, c in enumerate(counts) if c)
    dev = ranks.collective_device
    state = {k: v.to(dev) for k, v in m.state_dict().items() if k != "n"}
    ref_keys = [k for k in state if k.endswith(".ref")]
    ref = torch.cat([state[k] for k in ref_keys])
    if ranks.rank != first:
        ref.zero_()
    ranks.sum_([ref])
    new_refs, offset = {}, 0
    for k in ref_keys:
        new_refs[k] = ref[offset : offset + len(state[k])]
        offset += len(state[k])
    if m.n and ranks.rank != first:
        state = _rebased(state, m.n, new_refs, list(m.target_dims))
    state |= new_refs
    ranks.sum_([v for k, v in state.items() if not k.endswith(".ref")])
    m.load_state_dict({**state, "n": torch.tensor(total, dtype=torch.int64)})


def _rebased(
    state: dict[str, Tensor], n: int, ref: dict[str, Tensor], targets: list[str]
) -> dict[str, Tensor]:
    """A ``Moments.state_dict`` of ``n`` tokens re-expressed about the references ``ref`` (same keys)."""
    sx = state["x.sum"]
    dx = state["x.ref"] - ref["x.ref"]  # x − new_ref = (x − old_ref) + dx
    out = {
        "x.sum": sx + n * dx,
        "x.gram": state["x.gram"] + torch.outer(sx, dx) + torch.outer(dx, sx) + n * torch.outer(dx, dx),
    }
    for name in targets:
        sy = state[f"y.{name}.sum"]
        dy = state[f"y.{name}.ref"] - ref[f"y.{name}.ref"]
        out[f"y.{name}.sum"] = sy + n * dy
        out[f"y.{name}.sumsq"] = state[f"y.{name}.sumsq"] + 2 * dy * sy + n * dy * dy
        out[f"y.{name}.cross"] = (
            state[f"y.{name}.cross"] + torch.outer(sx, dy) + torch.outer(dx, sy) + n * torch.outer(dx, dy)
        )
    return out


@dataclass
class Replicates:
    """One value per block left out: R² (mean over dims) per regressor and target; FVU of Sae(x) ('sae')
    and of Sae(x) + the joint prediction of SaeError ('joint')."""

    r2: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    fvu: dict[str, list[float]] = field(default_factory=dict)


def _replicate(
    blocks: BlockMoments, b: int, spans: dict[str, slice], targets: Sequence[str]
) -> tuple[Table, dict[str, float]]:
    """Every fit refitted and scored without block ``b``."""
    train, test = blocks.total("train", b), blocks.total("test", b)
    var_x = blocks.total("x_test", b).total_variance_x()
    if not var_x > 0:
        raise DataError(f"x is constant on the test tokens without block {b}.")
    r2: Table = {}
    fvu = {"sae": float(test.target_sum_sq("error").sum()) / var_x}
    for name, cols in spans.items():
        tr = train if name == JOINT else sub_moments(train, cols)
        te = test if name == JOINT else sub_moments(test, cols)
        fits = fit_ridge_many(tr, list(targets), bias=True)
        ev = {t: evaluate(fits[t], te, t) for t in targets}
        r2[name] = {t: ev[t].r2_mean_over_dims for t in targets}
        if name == JOINT:
            fvu[JOINT] = fvu_with_prediction(ev["error"], var_x)
    return r2, fvu


def jackknife_replicates(
    blocks: BlockMoments, spans: dict[str, slice], targets: Sequence[str]
) -> Replicates | None:
    """The delete-one-block replicates of every regressor in ``spans``, or None when there are fewer than
    3 blocks, a block leaves too few tokens for the joint fit, or a refit fails."""
    n = len(blocks.train)
    if n < 3 or not replicates_fit(blocks.train, blocks.test):
        return None
    out = Replicates({name: {t: [] for t in targets} for name in spans}, {"sae": [], JOINT: []})
    try:
        for b in range(n):
            r2, fvu = _replicate(blocks, b, spans, targets)
            for name, row in r2.items():
                for t, v in row.items():
                    out.r2[name][t].append(v)
            for key, v in fvu.items():
                out.fvu[key].append(v)
    except DataError:
        return None
    return out


def r2_intervals(r2: Table, reps: Replicates) -> dict[str, dict[str, list[float]]]:
    """regressor -> target -> 95% jackknife interval of its R² (pairs without a finite one left out)."""
    out: dict[str, dict[str, list[float]]] = {}
    for name, row in r2.items():
        found = {t: finite_interval(v, reps.r2[name][t]) for t, v in row.items()}
        kept = {t: ci for t, ci in found.items() if ci is not None}
        if kept:
            out[name] = kept
    return out


def gap_intervals(r2: Table, reps: Replicates) -> dict[str, list[float]]:
    """regressor -> interval of R²(LinearError) − R²(NonlinearError), from the paired replicates."""
    out: dict[str, list[float]] = {}
    for name, row in r2.items():
        lin, nl = reps.r2[name]["linear"], reps.r2[name]["nonlinear"]
        diffs = [a - b for a, b in zip(lin, nl, strict=True)]
        ci = finite_interval(row["linear"] - row["nonlinear"], diffs)
        if ci is not None:
            out[name] = ci
    return out


def fvu_intervals(point: dict[str, float], reps: Replicates) -> dict[str, list[float]]:
    """'sae' / 'joint' -> interval of FVU(x, Sae(x)) / FVU(x, x̂') on the test tokens."""
    found = {k: finite_interval(point[k], reps.fvu[k]) for k in point}
    return {k: ci for k, ci in found.items() if ci is not None}
