"""Pass 2's per-token values on disk, so SAEs can be streamed in groups with exact results.

The norm Grams multiply per-token norms of *every* SAE of a site with each other, and the per-token table
has one row per token with every SAE's columns: neither can be finished by a group that sees only some of
the SAEs. Each group therefore writes its per-token float32 values (exactly those pass 2 computed) to
memory-mapped files in store order, and `merge_spills` reads every group's files back batch by batch,
builds the Grams with the same operations on the same batches as an all-at-once pass, and writes the
table. Memory stays one batch; disk is 6 float32 per token and SAE.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from darkmatter.experiments.decomposition.outputs import NormGram
from darkmatter.experiments.decomposition.table import TABLE_COLUMNS, TokenTableWriter

Tensor = torch.Tensor
GRAM_QUANTITIES = ("e2", "nl2", "en", "nln")
"""Per-token scalars of each SAE in the norm Gram: ‖e‖², ‖NonlinearError‖², ‖e‖, ‖NonlinearError‖."""


@dataclass
class _Meta:
    """A batch's ids as the table writer reads them."""

    context: Tensor
    position: Tensor
    token: Tensor
    loss: Tensor | None

    def __len__(self) -> int:
        return int(self.context.shape[0])


@dataclass
class GroupSpill:
    """One group's pass-2 values for ``n_tokens`` rows: per site [tokens, 2·SAEs] of ‖e‖², ‖nonlinear‖²
    (rows train-first within each batch, as the Gram reads them) and [tokens, 4·SAEs] table columns (rows in
    store order). The first group also keeps the rows' ids, split and loss, and every batch's shape."""

    folder: Path
    names: dict[str, list[str]]  # site -> this group's SAE names there, in family order
    n_tokens: int
    with_meta: bool
    norms: dict[str, np.ndarray] = field(init=False)
    table: np.ndarray = field(init=False)
    meta: dict[str, np.ndarray] = field(init=False)
    batches: list[tuple[int, int, dict[str, int]]] = field(default_factory=list)  # (rows, n_train, blocks)
    rows: int = 0

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        mm = np.lib.format.open_memmap
        n = max(self.n_tokens, 1)
        self.norms = {
            site: mm(self.folder / f"norms{i}.npy", "w+", np.float32, (n, 2 * len(names)))
            for i, (site, names) in enumerate(self.names.items())
        }
        total = sum(len(v) for v in self.names.values())
        self.table = mm(self.folder / "table.npy", "w+", np.float32, (n, len(TABLE_COLUMNS) * total))
        self.meta = {}
        if self.with_meta:
            kinds = {"context": np.int32, "position": np.int32, "token": np.int32, "loss": np.float32}
            self.meta = {k: mm(self.folder / f"{k}.npy", "w+", t, (n,)) for k, t in kinds.items()}
            self.meta["train"] = mm(self.folder / "train.npy", "w+", np.bool_, (n,))

    @property
    def table_names(self) -> list[str]:
        return [n for names in self.names.values() for n in names]

    def add(
        self,
        batch: object,
        train: Tensor,
        norms: dict[str, Tensor],
        table_cols: dict[str, Tensor],
        n_train: int,
        blocks: dict[str, int],
    ) -> None:
        """A batch: ``train [n]`` in store order, ``norms[site]`` [n, 2·SAEs] train-first, table columns
        ``{sae}:{column}`` [n] in store order."""
        a = self.rows
        b = a + len(train)
        for site, values in norms.items():
            self.norms[site][a:b] = values.cpu().numpy()
        cols = [table_cols[f"{n}:{c}"] for n in self.table_names for c in TABLE_COLUMNS]
        if cols:
            self.table[a:b] = torch.stack(cols, 1).cpu().numpy()
        if self.with_meta:
            ids = {"context": batch.context, "position": batch.position, "token": batch.token}  # type: ignore[attr-defined]
            for k, v in ids.items():
                self.meta[k][a:b] = v.cpu().numpy()
            loss = batch.loss  # type: ignore[attr-defined]
            self.meta["loss"][a:b] = np.nan if loss is None else loss.cpu().numpy()
            self.meta["train"][a:b] = train.cpu().numpy()
        self.batches.append((b - a, n_train, dict(blocks)))
        self.rows = b

    def close(self) -> None:
        """Flush to disk and drop the maps (the files stay until the spill folder goes)."""
        for arr in [*self.norms.values(), self.table, *self.meta.values()]:
            if isinstance(arr, np.memmap):
                arr.flush()
        self.norms, self.meta = {}, {}
        self.table = np.empty((0, 0), np.float32)

    def reopen(self) -> None:
        """Map the files again, read-only."""

        def load(name: str) -> np.ndarray:
            return np.load(self.folder / name, mmap_mode="r")

        self.norms = {site: load(f"norms{i}.npy") for i, site in enumerate(self.names)}
        self.table = load("table.npy")
        if self.with_meta:
            self.meta = {k: load(f"{k}.npy") for k in ("context", "position", "token", "loss", "train")}


@contextlib.contextmanager
def spill_folder(near: Path | None) -> Iterator[Path]:
    """A scratch folder beside ``near`` (the table's folder) or in the system's temp dir; removed after."""
    parent = None if near is None else Path(near).parent
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".engine-spill-", dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def gram_columns(names: Sequence[str]) -> list[str]:
    return [f"{n}:{q}" for q in GRAM_QUANTITIES for n in names]


def merge_spills(
    spills: Sequence[GroupSpill], n_blocks: dict[str, int], table_path: Path | None, order: Sequence[str]
) -> dict[str, NormGram]:
    """Every group's values, batch by batch: the norm Gram of each site (float64) and the per-token table
    (SAE columns in ``order``)."""
    for s in spills:
        s.reopen()
    first = spills[0]
    if any([bt[:2] for bt in s.batches] != [bt[:2] for bt in first.batches] for s in spills):
        raise RuntimeError("engine groups saw different batches; the store changed during the run")
    sites = list(dict.fromkeys(site for s in spills for site in s.names))
    names = {site: [n for s in spills for n in s.names.get(site, [])] for site in sites}
    columns = {site: gram_columns(names[site]) for site in sites}
    grams = {
        site: {
            part: [np.zeros((len(columns[site]) + 1,) * 2) for _ in range(n_blocks[site])]
            for part in ("train", "test")
        }
        for site in sites
    }
    with contextlib.ExitStack() as stack:
        writer = (
            None if table_path is None else stack.enter_context(TokenTableWriter(table_path, list(order)))
        )
        a = 0
        for i, (rows, n_train, _) in enumerate(first.batches):
            b = a + rows
            blocks = {site: blk for s in spills for site, blk in s.batches[i][2].items()}
            for site in sites:
                parts = [(s.norms[site][a:b], len(s.names[site])) for s in spills if site in s.names]
                err_sq = torch.from_numpy(np.concatenate([p[:, :k] for p, k in parts], 1))
                nonlin_sq = torch.from_numpy(np.concatenate([p[:, k:] for p, k in parts], 1))
                ones = torch.ones_like(err_sq[:, :1])
                z = torch.cat([err_sq, nonlin_sq, err_sq.sqrt(), nonlin_sq.sqrt(), ones], 1).double()
                for part, sel in (("train", slice(0, n_train)), ("test", slice(n_train, None))):
                    z_part = z[sel]
                    grams[site][part][blocks[site]] += (z_part.T @ z_part).numpy()
            if writer is not None:
                ids = {k: torch.from_numpy(np.array(v[a:b])) for k, v in first.meta.items()}
                meta = _Meta(ids["context"], ids["position"], ids["token"], ids["loss"])
                train = ids["train"]
                cols: dict[str, Tensor] = {}
                for s in spills:
                    block = torch.from_numpy(np.array(s.table[a:b]))
                    for i, (n, c) in enumerate((n, c) for n in s.table_names for c in TABLE_COLUMNS):
                        cols[f"{n}:{c}"] = block[:, i]
                writer.write(meta, train, cols)
            a = b
    return {
        site: NormGram(
            columns[site],
            np.sum(grams[site]["train"], axis=0),
            np.sum(grams[site]["test"], axis=0),
            blocks=list(zip(grams[site]["train"], grams[site]["test"], strict=True))
            if n_blocks[site] > 1
            else [],
        )
        for site in sites
    }
