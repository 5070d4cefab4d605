"""The engine's streaming accumulators: packed float64 moment buffers, held-out metrics, context sums."""

from __future__ import annotations

import torch

from darkmatter.errors import DataError
from darkmatter.experiments.decomposition.outputs import ContextSums
from darkmatter.stats import L0, Moments
from darkmatter.store import ActivationStore

Tensor = torch.Tensor


def row_norms(rows: Tensor) -> Tensor:
    """Euclidean norms of the rows, as float64 [n], computed in at least float32.

    A float32 norm has a relative error of ~3e-7; computing it in float64 would first copy every row.
    """
    low = rows.dtype in (torch.float16, torch.bfloat16)
    return torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32 if low else None).double()


def check_finite(x: Tensor, site: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"The store holds NaN or inf activations at {site}; re-harvest in fp32.")


class ContextAccumulator:
    """Builds ``ContextSums`` with ``index_add_`` on float64 tensors (np.add.at is far slower)."""

    def __init__(self, n_ctx: int, d: int, names: list[str]):
        def zeros(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=torch.float64)

        self.n, self.sum_x, self.sum_sq_x = zeros(n_ctx), zeros(n_ctx, d), zeros(n_ctx)
        self.sse = {n: zeros(n_ctx) for n in names}
        self.sse_nonlinear = {n: zeros(n_ctx) for n in names}

    def add_x(self, ctx: Tensor, x_test: Tensor, x2_test: Tensor) -> None:
        """Test rows ``x_test [n, d]`` and their squared norms ``x2_test [n]``, from contexts ``ctx [n]``."""
        self.n.index_add_(0, ctx, torch.ones(len(ctx), dtype=torch.float64))
        self.sum_x.index_add_(0, ctx, x_test.double().cpu())
        self.sum_sq_x.index_add_(0, ctx, x2_test.double().cpu())

    def freeze(self) -> ContextSums:
        return ContextSums(
            self.n.numpy(),
            self.sum_x.numpy(),
            self.sum_sq_x.numpy(),
            {k: v.numpy() for k, v in self.sse.items()},
            {k: v.numpy() for k, v in self.sse_nonlinear.items()},
        )


class SplitBuffer:
    """One chunk's float64 packed buffer for the train and test moments of a site (rows train-first).

    `put` converts a block of columns to float64 and subtracts each split's reference while the block is
    in cache, so `commit` hands both accumulators a buffer that needs no further pass.
    """

    def __init__(self, train: Moments, test: Moments, n_train: int, buf: Tensor):
        """``buf`` [n, packed_width] float64: rows of the chunk, train first (may be reused storage)."""
        self.parts = ((train, slice(0, n_train)), (test, slice(n_train, buf.shape[0])))
        self.layout = train.packed_layout
        self.buf = buf

    def put(self, name: str, values: Tensor) -> None:
        """Write ``values [n, d_name]`` (any float dtype) into the columns of ``name``."""
        cols = self.layout[name]
        for mom, rows in self.parts:
            ref = mom.packed_reference
            out = self.buf[rows, cols].copy_(values[rows])  # (a mixed-dtype sub with out= is 3x slower)
            if ref is not None:
                out.sub_(ref[cols])

    def commit(self) -> None:
        for mom, rows in self.parts:
            if rows.stop > rows.start:
                mom.update_packed(self.buf[rows], shifted=mom.packed_reference is not None)


class HeldOut:
    """Held-out reconstruction metrics from per-token norms, with the definitions of
    ``darkmatter.stats.metrics`` (FVU, NMSE, NormRatio, L0): one norm per token and SAE, no [n, d] copies."""

    def __init__(self, d_sae: int):
        self.sse = self.nmse_sum = self.ratio_sum = 0.0
        self.n = 0
        self.l0 = L0(d_sae)

    def update(self, e2: Tensor, x_norm: Tensor, x_hat_norm: Tensor, indices: Tensor, values: Tensor) -> None:
        """Test tokens: squared error norms ``e2 [n]``, ‖x‖ and ‖Sae(x)‖ ``[n]``, the sparse codes."""
        if len(e2) == 0:
            return
        x2 = x_norm.square()
        if bool((x2 == 0).any()):
            raise DataError(
                f"{int((x2 == 0).sum())} test token(s) have ‖x‖ = 0, so the normalised error is undefined; "
                "drop those tokens (for example BOS or padding) before evaluating."
            )
        self.sse += float(e2.sum())
        self.nmse_sum += float((e2 / x2).sum())
        self.ratio_sum += float((x_hat_norm.to(x_norm.device) / x_norm).sum())
        self.n += len(e2)
        self.l0.update_sparse(indices, values)


def n_blocks(store: ActivationStore, interval_blocks: int) -> int:
    """Blocks the moments are kept in: ``interval_blocks``, at most one per shard, at least one."""
    return max(1, min(interval_blocks, store.n_shards))


def block_of(store: ActivationStore, blocks: int, context: int) -> int:
    """The block of a context: whole shards, in order (a batch never spans two shards)."""
    if blocks == 1:
        return 0
    return (context // store.shard_contexts) * blocks // store.n_shards


def merged(blocks: list[Moments], without: int | None = None) -> Moments:
    """The moments of every block (or every block but ``without``) merged into one."""
    if len(blocks) == 1 and without is None:
        return blocks[0]
    total = Moments(blocks[0].d_x, blocks[0].target_dims)
    for b, block in enumerate(blocks):
        if b != without:
            total.merge(block)
    return total


def replicates_fit(blocks_train: list[Moments], blocks_test: list[Moments]) -> bool:
    """Whether every delete-one-block replicate keeps enough tokens for a probe with bias (more train
    tokens than coefficients, at least two test tokens)."""
    n_train, n_test = sum(m.n for m in blocks_train), sum(m.n for m in blocks_test)
    d = blocks_train[0].d_x
    return all(
        n_train - tr.n > d + 1 and n_test - te.n >= 2
        for tr, te in zip(blocks_train, blocks_test, strict=True)
    )
