"""The dark-matter engine: two streaming passes over the store for every SAE of a family.

Pass 1 accumulates, per site and split, float64 moments of x against each SAE's error e = x − Sae(x)
(vector) and its norms, plus held-out reconstruction metrics and per-context sums for bootstraps. The
error probes b* are then fitted on the train split and evaluated exactly on the test split:
- ``vector_r2``: R² of e from x̃ = [x, 1], unweighted mean over output dimensions (the paper's number);
- ``fvu_nonlinear`` = FVU(x, Sae(x) + b*x̃) on test tokens; ``fvu − fvu_nonlinear`` is the linear share;
- ``norm_r2``: R² of ‖e‖² from x̃ (Eq. 10), and ``norm_r2_plain`` for ‖e‖.
Every number is also computed without the bias column (``*_nobias``), the original code's choice.
Pass 2 applies b* to every token: LinearError = b*x̃, NonlinearError = e − b*x̃. It gives the cosine of
b*x̃ with x, the norm-prediction test (R² of ‖q‖² from x̃ for q in x, Sae(x), e, linear, nonlinear), the
moment matrix of per-token norms behind the per-token scaling regressions, and the per-token table.
Memory is O(d² · SAEs) whatever the number of tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from darkmatter.errors import DataError, StoreError
from darkmatter.heap import HeapReleaser
from darkmatter.progress import Progress, Ticker
from darkmatter.sae.model import SAE
from darkmatter.stats import L0, Cosine, Moments, evaluate, fit_ridge, fit_ridge_many
from darkmatter.stats import fvu_with_prediction as fvu_with_pred
from darkmatter.stats.split import is_train
from darkmatter.store import ActivationStore

Tensor = torch.Tensor
NORM_TEST_QUANTITIES = ("x", "sae", "error", "linear", "nonlinear")


@dataclass
class SAEStats:
    """Everything the engine measures for one SAE (all on held-out tokens unless named otherwise)."""

    name: str
    site: str
    d_sae: int
    k: int | None
    fvu: float = float("nan")
    nmse: float = float("nan")
    l0: float = float("nan")
    dead_fraction: float = float("nan")
    norm_ratio: float = float("nan")
    vector_r2: float = float("nan")
    vector_r2_weighted: float = float("nan")
    vector_r2_nobias: float = float("nan")
    fvu_nonlinear: float = float("nan")
    fvu_nonlinear_nobias: float = float("nan")
    fvu_nonlinear_pass2: float = float("nan")
    norm_r2: float = float("nan")
    norm_r2_plain: float = float("nan")
    norm_r2_nobias: float = float("nan")
    cos_linear_x: float = float("nan")
    ridge: float = float("nan")
    constant_dims: int = 0
    mean_error_norm: float = float("nan")
    mean_linear_norm: float = float("nan")
    mean_nonlinear_norm: float = float("nan")
    norm_test: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class ContextSums:
    """Per-context float64 sums over test tokens (for bootstraps over contexts)."""

    n: np.ndarray  # [n_ctx]
    sum_x: np.ndarray  # [n_ctx, d]
    sum_sq_x: np.ndarray  # [n_ctx]
    sse: dict[str, np.ndarray]  # name -> [n_ctx] Σ‖e‖²
    sse_nonlinear: dict[str, np.ndarray]  # name -> [n_ctx] Σ‖NonlinearError‖²


class _ContextAccumulator:
    """Builds ``ContextSums`` with ``index_add_`` on float64 tensors (np.add.at is far slower)."""

    def __init__(self, n_ctx: int, d: int, names: list[str]):
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        self.n, self.sum_x, self.sum_sq_x = z(n_ctx), z(n_ctx, d), z(n_ctx)
        self.sse = {n: z(n_ctx) for n in names}
        self.sse_nonlinear = {n: z(n_ctx) for n in names}

    def add_x(self, ctx: Tensor, x: Tensor, x2: Tensor) -> None:
        """x [n, d] and its squared norms x2 [n] of test tokens in contexts ``ctx``."""
        self.n.index_add_(0, ctx, torch.ones(len(ctx), dtype=torch.float64))
        self.sum_x.index_add_(0, ctx, x.double().cpu())
        self.sum_sq_x.index_add_(0, ctx, x2.double().cpu())

    def freeze(self) -> ContextSums:
        return ContextSums(
            self.n.numpy(),
            self.sum_x.numpy(),
            self.sum_sq_x.numpy(),
            {k: v.numpy() for k, v in self.sse.items()},
            {k: v.numpy() for k, v in self.sse_nonlinear.items()},
        )


@dataclass
class NormGram:
    """Raw float64 Gram of per-token scalars z = [columns..., 1] per split (per-token scaling)."""

    columns: list[str]
    train: np.ndarray
    test: np.ndarray


@dataclass
class Decomposition:
    """Output of ``decompose``: per-SAE statistics, bootstrap sums per site, per-token norm Grams."""

    stats: dict[str, SAEStats]
    contexts: dict[str, ContextSums]  # site -> sums
    norm_grams: dict[str, NormGram]  # site -> Gram
    n_train: int
    n_test: int
    probes: dict[str, tuple[Tensor, Tensor]]  # name -> (weights [d, d], bias [d]) of b*
    table: Path | None = None


def _group_by_site(saes: Mapping[str, SAE], store: ActivationStore) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name, sae in saes.items():
        site = sae.cfg.hook_site
        if site is None or site not in store.sites:
            raise StoreError(
                f"SAE {name!r} reads site {site!r}, which the store lacks (it has {store.sites})."
            )
        sae.check_input_width(store.d[site], site)
        groups.setdefault(site, []).append(name)
    return groups


class _Splitter:
    def __init__(self, seed: int, fraction: float):
        self.seed, self.fraction = seed, fraction

    def __call__(self, context: Tensor, position: Tensor) -> Tensor:
        return is_train(context.cpu(), position.cpu(), self.seed, self.fraction).to(context.device)


def _check_finite(x: Tensor, site: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"The store holds NaN or inf activations at {site}; re-harvest in fp32.")


def decompose(
    store: ActivationStore,
    saes: Mapping[str, SAE],
    *,
    split_seed: int = 0,
    train_fraction: float = 0.8,
    batch_tokens: int | None = None,
    device: str = "cpu",
    table_path: Path | None = None,
    second_pass: bool = True,
    contexts: np.ndarray | None = None,
    progress: Progress | None = None,
) -> Decomposition:
    """Run both passes for every SAE (``second_pass=False``: probes and FVU_nonlinear only).

    ``contexts`` restricts everything to a subset of context indices (for costly reconstructions);
    ``progress`` gets (tokens done, tokens of both passes, tokens/s). ``batch_tokens`` defaults to 1024
    on the CPU (smaller temporaries: at 4 SAEs, peak RSS ~130 MiB lower than with 4096, at the same
    speed) and 8192 on an accelerator.
    """
    if batch_tokens is None:
        batch_tokens = 1024 if torch.device(device).type == "cpu" else 8192
    if not saes:
        raise DataError("decompose needs at least one SAE.")
    groups = _group_by_site(saes, store)
    split = _Splitter(split_seed, train_fraction)
    d = {site: store.d[site] for site in groups}
    stats = {n: SAEStats(n, str(s.cfg.hook_site), s.cfg.d_sae, s.cfg.k) for n, s in saes.items()}
    n_ctx = store.n_contexts
    per_pass = (n_ctx if contexts is None else len(np.unique(contexts))) * (
        store.ctx_len - int(store.identity.get("skip_positions", 0))
    )
    ticker = Ticker(progress, per_pass * (2 if second_pass else 1))
    heap = HeapReleaser()  # freed batch temporaries would otherwise fragment and grow the heap
    buffer_rows = min(batch_tokens, per_pass)

    def packed_storage(moments: dict[tuple[str, str], Moments]) -> dict[str, Tensor]:
        """A float64 packed buffer per site for every batch of a pass (no pages faulted per batch)."""
        return {
            site: torch.empty(
                buffer_rows, moments[(site, "train")].packed_width, dtype=torch.float64, device=device
            )
            for site in groups
        }

    # ---------------------------------------------------------------- pass 1
    # Rows of each batch are ordered train-first, so every split is a view (no masked copies), and each
    # site's x, errors and norms go into one float64 buffer that feeds both splits' moments: one GEMM
    # per chunk and split for the Gram and every SAE's cross products.
    mom: dict[tuple[str, str], Moments] = {}
    for site, names in groups.items():
        targets: dict[str, int] = {}
        for n in names:
            targets.update({f"{n}:e": d[site], f"{n}:e2": 1, f"{n}:en": 1})
        for part in ("train", "test"):
            mom[(site, part)] = Moments(d[site], targets)
    held = {n: _HeldOut(saes[n].cfg.d_sae) for n in saes}
    ctx = {site: _ContextAccumulator(n_ctx, d[site], names) for site, names in groups.items()}
    n_train = n_test = 0
    storage = packed_storage(mom)
    for batch in _batches(store, list(groups), batch_tokens, device, contexts):
        order, n_tr = _train_first(split(batch.context, batch.position))
        n_train += n_tr
        n_test += len(order) - n_tr
        ctx_test = batch.context[order[n_tr:]].cpu()
        for site, names in groups.items():
            x = batch.acts[site][order]
            _check_finite(x, site)
            packed = _SplitBuffer(mom[(site, "train")], mom[(site, "test")], n_tr, storage[site][: len(x)])
            packed.put("x", x)
            x_norm = _row_norms(x)
            ctx[site].add_x(ctx_test, x[n_tr:], x_norm[n_tr:].square())
            for n in names:
                sae = saes[n]
                x_hat, codes = sae.reconstruct(x.to(sae.dtype), chunk_size=RECONSTRUCT_CHUNK)
                e = x - x_hat.to(x.dtype)  # the error as the SAE's consumers see it; float64 from here on
                packed.put(f"{n}:e", e)
                en = _row_norms(e)[:, None]
                e2 = en.square()
                packed.put(f"{n}:en", en)
                packed.put(f"{n}:e2", e2)
                e2_test = e2[n_tr:, 0]
                held[n].update(
                    e2_test,
                    x_norm[n_tr:],
                    _row_norms(x_hat[n_tr:]),
                    codes.indices[n_tr:],
                    codes.values[n_tr:],
                )
                ctx[site].sse[n].index_add_(0, ctx_test, e2_test.cpu())
            packed.commit()
        heap.tick(len(order))
        ticker.advance(len(order))
    if n_train <= max(d.values()) + 1 or n_test < 2:
        raise DataError(
            f"The split has {n_train} train and {n_test} test tokens; the regressions need more than "
            f"{max(d.values()) + 1} train and at least 2 test tokens. Harvest more contexts."
        )

    # ---------------------------------------------------------------- fits
    probes: dict[str, tuple[Tensor, Tensor]] = {}
    for site, names in groups.items():
        tr, te = mom[(site, "train")], mom[(site, "test")]
        var_x = te.total_variance_x()
        if not var_x > 0:
            raise DataError(f"x at {site} is constant over the {te.n} test tokens; FVU is undefined.")
        fits = fit_ridge_many(tr, [f"{n}:e" for n in names], bias=True)
        fits_nb = fit_ridge_many(tr, [f"{n}:e" for n in names], bias=False)
        for n in names:
            st = stats[n]
            ev = evaluate(fits[f"{n}:e"], te, f"{n}:e")
            ev_nb = evaluate(fits_nb[f"{n}:e"], te, f"{n}:e")
            st.vector_r2, st.vector_r2_weighted = ev.r2_mean_over_dims, ev.r2_variance_weighted
            st.vector_r2_nobias = ev_nb.r2_mean_over_dims
            st.constant_dims = int(ev.constant_dims)
            st.fvu_nonlinear = fvu_with_pred(ev, var_x)
            st.fvu_nonlinear_nobias = fvu_with_pred(ev_nb, var_x)
            st.ridge = float(fits[f"{n}:e"].ridge)
            st.norm_r2 = evaluate(fit_ridge(tr, f"{n}:e2", bias=True), te, f"{n}:e2").r2
            st.norm_r2_nobias = evaluate(fit_ridge(tr, f"{n}:e2", bias=False), te, f"{n}:e2").r2
            st.norm_r2_plain = evaluate(fit_ridge(tr, f"{n}:en", bias=True), te, f"{n}:en").r2
            f = fits[f"{n}:e"]
            assert f.bias is not None
            probes[n] = (
                f.weights.to(device=device, dtype=torch.float32),
                f.bias.to(device=device, dtype=torch.float32),
            )
            h = held[n]
            st.fvu, st.nmse, st.norm_ratio = h.sse / var_x, h.nmse_sum / h.n, h.ratio_sum / h.n
            st.l0, st.dead_fraction = h.l0.compute(), h.l0.dead_fraction()
    del mom, storage
    if not second_pass:
        return Decomposition(
            stats=stats,
            contexts={s: c.freeze() for s, c in ctx.items()},
            norm_grams={},
            n_train=n_train,
            n_test=n_test,
            probes=probes,
        )

    # ---------------------------------------------------------------- pass 2
    mom2: dict[tuple[str, str], Moments] = {}
    gram_cols: dict[str, list[str]] = {}
    grams: dict[str, dict[str, np.ndarray]] = {}
    for site, names in groups.items():
        targets2 = {"x2": 1} | {f"{n}:{q}": 1 for n in names for q in NORM_TEST_QUANTITIES[1:]}
        for part in ("train", "test"):
            mom2[(site, part)] = Moments(d[site], targets2)
        gram_cols[site] = [f"{n}:{q}" for q in ("e2", "nl2", "en", "nln") for n in names]
        size = len(gram_cols[site]) + 1
        grams[site] = {"train": np.zeros((size, size)), "test": np.zeros((size, size))}
    storage = packed_storage(mom2)
    cos = {n: Cosine(saes[n].cfg.d_in) for n in saes}
    sse_nl = dict.fromkeys(saes, 0.0)
    norm_sums = {n: np.zeros(3) for n in saes}
    writer = _TableWriter(table_path, list(saes)) if table_path is not None else None
    completed = False
    try:
        for batch in _batches(store, list(groups), batch_tokens, device, contexts):
            order, n_tr = _train_first(split(batch.context, batch.position))
            ctx_test = batch.context[order[n_tr:]].cpu()
            cols: dict[str, Tensor] = {}
            for site, names in groups.items():
                x = batch.acts[site][order]
                buf = storage[site][: len(x)]
                packed = _SplitBuffer(mom2[(site, "train")], mom2[(site, "test")], n_tr, buf)
                packed.put("x", x)
                packed.put("x2", x.pow(2).sum(1, keepdim=True))
                zcols = []
                for n in names:
                    sae = saes[n]
                    x_hat, codes = sae.reconstruct(x.to(sae.dtype), chunk_size=RECONSTRUCT_CHUNK)
                    x_hat = x_hat.to(x.dtype)
                    e = x - x_hat
                    w, b = probes[n]
                    lin = torch.addmm(b, x, w)
                    nl = e - lin
                    q = {"sae": x_hat, "error": e, "linear": lin, "nonlinear": nl}
                    sq = {k: v.pow(2).sum(1, keepdim=True) for k, v in q.items()}
                    for k, v in sq.items():
                        packed.put(f"{n}:{k}", v)
                    if n_tr < len(x):
                        cos[n].update(lin[n_tr:], x[n_tr:])
                        nl2_test = sq["nonlinear"][n_tr:, 0].double().cpu()
                        sse_nl[n] += float(nl2_test.sum())
                        ctx[site].sse_nonlinear[n].index_add_(0, ctx_test, nl2_test)
                        norm_sums[n] += np.array(
                            [float(sq[k][n_tr:].sqrt().sum()) for k in ("error", "linear", "nonlinear")]
                        )
                    zcols.append((sq["error"], sq["nonlinear"]))
                    cols[f"{n}:l0"] = (codes.values != 0).sum(-1).to(torch.float32)
                    cols[f"{n}:error_norm"] = sq["error"][:, 0].sqrt().float()
                    cols[f"{n}:linear_norm"] = sq["linear"][:, 0].sqrt().float()
                    cols[f"{n}:nonlinear_norm"] = sq["nonlinear"][:, 0].sqrt().float()
                e2s = torch.cat([z[0] for z in zcols], 1)
                nl2s = torch.cat([z[1] for z in zcols], 1)
                z = torch.cat([e2s, nl2s, e2s.sqrt(), nl2s.sqrt(), torch.ones_like(e2s[:, :1])], 1).double()
                for part, rows in (("train", slice(0, n_tr)), ("test", slice(n_tr, None))):
                    zm = z[rows]
                    grams[site][part] += (zm.T @ zm).cpu().numpy()
                packed.commit()
            heap.tick(len(order))
            ticker.advance(len(order))
            if writer is not None:
                inverse = torch.argsort(order)
                train = torch.zeros(len(order), dtype=torch.bool, device=order.device)
                train[:n_tr] = True
                writer.write(batch, train[inverse], {k: v[inverse] for k, v in cols.items()})
        completed = True
    finally:
        if writer is not None:
            writer.finish(completed)

    for site, names in groups.items():
        tr, te = mom2[(site, "train")], mom2[(site, "test")]
        x_fit = evaluate(fit_ridge(tr, "x2", bias=True), te, "x2").r2
        var_x = te.total_variance_x()
        for n in names:
            st = stats[n]
            st.norm_test = {"x": x_fit} | {
                q: evaluate(fit_ridge(tr, f"{n}:{q}", bias=True), te, f"{n}:{q}").r2
                for q in NORM_TEST_QUANTITIES[1:]
            }
            st.cos_linear_x = cos[n].compute()
            st.fvu_nonlinear_pass2 = sse_nl[n] / var_x
            m = norm_sums[n] / max(n_test, 1)
            st.mean_error_norm, st.mean_linear_norm, st.mean_nonlinear_norm = (float(v) for v in m)
    return Decomposition(
        stats=stats,
        contexts={s: c.freeze() for s, c in ctx.items()},
        norm_grams={s: NormGram(gram_cols[s], grams[s]["train"], grams[s]["test"]) for s in groups},
        n_train=n_train,
        n_test=n_test,
        probes=probes,
        table=table_path,
    )


RECONSTRUCT_CHUNK = 1024
"""Tokens per SAE encode inside a batch: keeps the [tokens, d_sae] pre-activations small and reused."""


def _row_norms(t: Tensor) -> Tensor:
    """Euclidean norms of the rows, as float64 [n], computed in at least float32.

    A float32 norm has a relative error of ~3e-7; computing it in float64 would first copy every row.
    """
    low = t.dtype in (torch.float16, torch.bfloat16)
    return torch.linalg.vector_norm(t, dim=1, dtype=torch.float32 if low else None).double()


class _SplitBuffer:
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


def _train_first(train: Tensor) -> tuple[Tensor, int]:
    """A row order that puts the train tokens first (stable), and how many there are."""
    order = torch.argsort((~train).to(torch.uint8), stable=True)
    return order, int(train.sum())


class _HeldOut:
    """Held-out reconstruction metrics from per-token norms, with the definitions of
    ``darkmatter.stats.metrics`` (FVU, NMSE, NormRatio, L0): one norm per token and SAE, no [n, d] copies."""

    def __init__(self, d_sae: int):
        self.sse = self.nmse_sum = self.ratio_sum = 0.0
        self.n = 0
        self.l0 = L0(d_sae)

    def update(self, e2: Tensor, x_norm: Tensor, x_hat_norm: Tensor, indices: Tensor, values: Tensor) -> None:
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


def _batches(
    store: ActivationStore, sites: list[str], batch_tokens: int, device: str, contexts: np.ndarray | None
) -> Iterator[Any]:
    yield from store.iter_batches(sites, batch_tokens=batch_tokens, device=device, contexts=contexts)


class _TableWriter:
    """Streams the per-token table to Parquet, renamed into place when complete.

    Rows are copied into preallocated numpy columns of ``ROW_GROUP`` rows and written a row group at a
    time: few large row groups, a fixed buffer whatever the number of tokens, and no per-batch
    allocations that would stay alive between the engine's large temporaries (those fragment the heap:
    with a list of per-batch arrays, peak RSS grew by ~200 MiB over 200k tokens).
    """

    ROW_GROUP = 16_384

    def __init__(self, path: Path, names: list[str]):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        fields = [
            pa.field("context", pa.int32()),
            pa.field("position", pa.int32()),
            pa.field("token", pa.int32()),
            pa.field("split", pa.string()),
            pa.field("loss", pa.float32()),
        ]
        for n in names:
            fields += [
                pa.field(f"{n}:{c}", pa.float32())
                for c in ("l0", "error_norm", "linear_norm", "nonlinear_norm")
            ]
        self.schema = pa.schema(fields)
        self.pa = pa
        self.writer = pq.ParquetWriter(str(self.tmp), self.schema, compression="zstd")
        kinds = {"context": np.int32, "position": np.int32, "token": np.int32, "split": np.bool_}
        self.columns = {f.name: np.empty(self.ROW_GROUP, kinds.get(f.name, np.float32)) for f in self.schema}
        self.buffered = 0

    def write(self, batch: Any, train: Tensor, cols: dict[str, Tensor]) -> None:
        values: dict[str, Tensor | None] = {
            "context": batch.context,
            "position": batch.position,
            "token": batch.token,
            "split": train,
            "loss": batch.loss,
        }
        values |= cols
        n, done = len(batch), 0
        while done < n:
            take = min(n - done, self.ROW_GROUP - self.buffered)
            for name, column in self.columns.items():
                dst = column[self.buffered : self.buffered + take]
                src = values[name]
                if src is None:  # a store harvested without the model's loss
                    dst[:] = np.nan
                else:
                    dst[:] = src[done : done + take].cpu().numpy()
            self.buffered += take
            done += take
            if self.buffered == self.ROW_GROUP:
                self._flush()

    def _flush(self) -> None:
        if not self.buffered:
            return
        pa, n = self.pa, self.buffered
        arrays = []
        for f in self.schema:
            col = self.columns[f.name][:n]
            if f.name == "split":
                arrays.append(
                    pa.DictionaryArray.from_arrays(
                        pa.array(np.where(col, 0, 1).astype(np.int8)), ["train", "test"]
                    ).cast(pa.string())
                )
            else:
                arrays.append(pa.array(col))
        self.writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))
        self.buffered = 0

    def finish(self, ok: bool) -> None:
        """Close the file; move it into place when complete, delete it otherwise."""
        if ok:
            self._flush()
        self.writer.close()
        if ok:
            self.tmp.replace(self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def ols_from_gram(
    g_train: np.ndarray, g_test: np.ndarray, x_cols: list[int], y_col: int, *, intercept: bool
) -> tuple[np.ndarray, float, float]:
    """Least squares of column ``y_col`` on ``x_cols`` (+ the last column as intercept) from raw Grams.

    Returns (coefficients, held-out R², held-out SS_res). ``g_*`` are Grams of [z..., 1].
    """
    one = g_train.shape[0] - 1
    cols = list(x_cols) + ([one] if intercept else [])
    a = g_train[np.ix_(cols, cols)]
    b = g_train[cols, y_col]
    coef = np.linalg.solve(a + 1e-12 * np.trace(a) / len(cols) * np.eye(len(cols)), b)
    gt = g_test
    ss_res = gt[y_col, y_col] - 2 * coef @ gt[cols, y_col] + coef @ gt[np.ix_(cols, cols)] @ coef
    n = gt[one, one]
    ss_tot = gt[y_col, y_col] - gt[one, y_col] ** 2 / n
    if ss_tot <= 0:
        raise DataError("A per-token norm is constant on the test split; its R² is undefined.")
    return coef, float(1 - ss_res / ss_tot), float(ss_res)
