"""Activation store: token ids once, activations in checksummed shards, a manifest, resumable writes.

Layout of a store directory::

    manifest.json              identity (model, sites, dtype, context length, tokens) + finished shards
    tokens.npy                 int32 [n_contexts, ctx_len]
    shards/00000.safetensors   one tensor per site [contexts, ctx_len, d] (+ "loss" [contexts, ctx_len])

Every file is written to a temporary name, flushed and renamed, and the manifest lists a shard (with
its sha256) only after the shard is in place. A shard file that the manifest does not list is never
read; it is removed when a harvest resumes. Readers verify each shard's checksum before using it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from darkmatter import atomic
from darkmatter.errors import DataError, StoreError
from darkmatter.hashing import sha256_hex, stable_hash

MANIFEST = "manifest.json"
TOKENS = "tokens.npy"
SHARD_DIR = "shards"
RANK_DIR = "ranks"
"""Under ``torchrun`` each rank lists the shards it finished in ``ranks/<rank>.json`` (rank 0 folds them
into the manifest after the harvest, or when a killed run resumes)."""
FORMAT = "darkmatter-activation-store"
FORMAT_VERSION = 1
STORE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Batch:
    """A chunk of token rows from the store: ``acts[site]`` is ``[n, d]`` (float32 unless asked)."""

    acts: dict[str, torch.Tensor]
    context: torch.Tensor  # [n] int64 context index
    position: torch.Tensor  # [n] int64 position in the context
    token: torch.Tensor  # [n] int64 token id
    loss: torch.Tensor | None  # [n] float32 CE of predicting the next token (NaN at the last position)

    def __len__(self) -> int:
        return int(self.context.shape[0])


def identity_hash(identity: dict[str, Any]) -> str:
    """Hash of everything that determines a store's content."""
    return stable_hash(identity)


class ActivationStore:
    """Read side of a store directory (and the bookkeeping the harvester uses to extend it)."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = root
        self.manifest = manifest
        self._verified: set[str] = set()
        self._tokens: np.ndarray | None = None
        self._rank_entries: list[dict[str, Any]] = []  # shards this rank wrote (distributed harvest)

    # -- creation and opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path) -> ActivationStore:
        """Open an existing store; a missing or malformed manifest is a StoreError."""
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise StoreError(
                f"{root} is not an activation store (no {MANIFEST}). Run 'darkmatter harvest' first."
            )
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreError(
                f"{path} is corrupt ({exc}). Delete the store directory and harvest again."
            ) from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise StoreError(f"{path} is not a darkmatter activation-store manifest.")
        if manifest.get("version") != FORMAT_VERSION:
            raise StoreError(
                f"{path} has store format version {manifest.get('version')}; expected {FORMAT_VERSION}."
            )
        return cls(root, manifest)

    @classmethod
    def create_or_resume(
        cls, root: str | Path, identity: dict[str, Any], tokens: np.ndarray
    ) -> ActivationStore:
        """Start a new store, or reopen one with the same identity to resume; never touch a different one."""
        root = Path(root)
        key = identity_hash(identity)
        if (root / MANIFEST).is_file():
            store = cls.open(root)
            if store.manifest["identity_hash"] != key:
                raise StoreError(_mismatch_message(root, store.manifest["identity"], identity))
            store.adopt_rank_records()
            store._remove_unlisted_shards()
            store._forget_missing_shards()
            return store
        if root.exists() and not _unfinished_start(root):
            raise StoreError(
                f"{root} exists, is not empty and holds no {MANIFEST}; refusing to write a store into it. "
                "Choose an empty or new directory."
            )
        root.mkdir(parents=True, exist_ok=True)
        (root / SHARD_DIR).mkdir(exist_ok=True)
        buf = _npy_bytes(tokens.astype(np.int32))
        atomic.write_bytes(root / TOKENS, buf)
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "identity": identity,
            "identity_hash": key,
            "tokens_sha256": sha256_hex(buf),
            "shards": [],
            "complete": False,
        }
        atomic.write_json(root / MANIFEST, manifest)
        return cls(root, manifest)

    def _remove_unlisted_shards(self) -> None:
        """Drop temporary files and shard files the manifest does not list (a killed writer's leftovers)."""
        for stale in self.root.glob(".*.tmp"):
            stale.unlink()
        listed = {s["file"] for s in self.manifest["shards"]}
        shard_dir = self.root / SHARD_DIR
        if not shard_dir.is_dir():
            return
        for p in shard_dir.iterdir():
            if f"{SHARD_DIR}/{p.name}" not in listed:
                p.unlink()

    def _forget_missing_shards(self) -> None:
        """Drop manifest entries whose shard file is gone, so the harvest recomputes exactly those."""
        missing = set(self.missing_shards())
        if missing:
            self.manifest["shards"] = [s for s in self.manifest["shards"] if s["file"] not in missing]
            self.manifest["complete"] = False
            atomic.write_json(self.root / MANIFEST, self.manifest)

    # -- identity -------------------------------------------------------------------------------------
    @property
    def identity(self) -> dict[str, Any]:
        return self.manifest["identity"]

    @property
    def sites(self) -> list[str]:
        return list(self.identity["sites"])

    @property
    def d(self) -> dict[str, int]:
        return dict(self.identity["d"])

    @property
    def ctx_len(self) -> int:
        return int(self.identity["ctx_len"])

    @property
    def n_contexts(self) -> int:
        return int(self.identity["n_contexts"])

    @property
    def shard_contexts(self) -> int:
        return int(self.identity["shard_contexts"])

    @property
    def n_shards(self) -> int:
        return -(-self.n_contexts // self.shard_contexts)

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def has_loss(self) -> bool:
        return bool(self.identity.get("with_loss"))

    def shard_contexts_of(self, shards: Sequence[int]) -> np.ndarray:
        """The context indices of ``shards``."""
        ranges = [np.arange(*self.shard_range(i)) for i in sorted(set(shards))]
        return np.concatenate(ranges) if ranges else np.zeros(0, dtype=np.int64)

    def shard_range(self, index: int) -> tuple[int, int]:
        start = index * self.shard_contexts
        return start, min(start + self.shard_contexts, self.n_contexts)

    def done_shards(self) -> set[int]:
        return {int(s["index"]) for s in self.manifest["shards"]}

    # -- token ids ------------------------------------------------------------------------------------
    @property
    def tokens(self) -> np.ndarray:
        """``[n_contexts, ctx_len]`` int32 token ids (checksum verified on first access)."""
        if self._tokens is None:
            path = self.root / TOKENS
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise StoreError(f"{path} is missing: the store is damaged. {self._start_over}") from exc
            if sha256_hex(data) != self.manifest["tokens_sha256"]:
                raise StoreError(f"{path} fails its checksum: the store is damaged. {self._start_over}")
            self._tokens = np.load(path, allow_pickle=False)
        return self._tokens

    @property
    def _start_over(self) -> str:
        """What to do about damage a resumed harvest cannot repair (the token ids are written only once)."""
        return f"Delete the folder {self.root} and run the same command again to harvest it anew."

    # -- writing --------------------------------------------------------------------------------------
    def write_shard(self, index: int, tensors: dict[str, torch.Tensor], *, rank: int | None = None) -> None:
        """Write one shard atomically, then record it (atomically): in the manifest, or, for one rank of a
        distributed harvest, in that rank's record (``adopt_rank_records`` folds those in)."""
        start, stop = self.shard_range(index)
        data = st_save({k: v.contiguous() for k, v in tensors.items()})
        rel = f"{SHARD_DIR}/{index:05d}.safetensors"
        atomic.write_bytes(self.root / rel, data)
        entry = {"index": index, "file": rel, "contexts": [start, stop], "sha256": sha256_hex(data)}
        self._verified.add(rel)
        if rank is not None:
            self._rank_entries.append(entry)
            (self.root / RANK_DIR).mkdir(exist_ok=True)
            atomic.write_json(self.root / RANK_DIR / f"{rank:05d}.json", {"shards": self._rank_entries})
            return
        self._record([entry])

    def _record(self, entries: list[dict[str, Any]]) -> None:
        new = {int(e["index"]): e for e in entries}  # one entry per shard (the last one written)
        self.manifest["shards"] = sorted(
            [s for s in self.manifest["shards"] if s["index"] not in new] + list(new.values()),
            key=lambda s: s["index"],
        )
        self.manifest["complete"] = len(self.manifest["shards"]) == self.n_shards
        atomic.write_json(self.root / MANIFEST, self.manifest)

    def adopt_rank_records(self) -> None:
        """Fold the ranks' records of finished shards (whose files are in place) into the manifest, then
        drop the records. Only one process (rank 0) may call this, while no rank writes."""
        folder = self.root / RANK_DIR
        if not folder.is_dir():
            return
        entries: list[dict[str, Any]] = []
        for path in sorted(folder.glob("*.json")):
            try:
                record = json.loads(path.read_text())
                found = [e for e in record["shards"] if (self.root / e["file"]).is_file()]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a record cut short: its shards are redone
            entries += [
                {k: e[k] for k in ("index", "file", "contexts", "sha256")}
                for e in found
                if 0 <= int(e["index"]) < self.n_shards
            ]
        if entries:
            self._record(entries)
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()

    # -- reading --------------------------------------------------------------------------------------
    def require_complete(self) -> None:
        if not self.complete:
            raise StoreError(
                f"Store {self.root} is incomplete ({len(self.manifest['shards'])}/{self.n_shards} shards). "
                "Run the same harvest again to finish it."
            )

    def load_shard(self, index: int) -> dict[str, torch.Tensor]:
        """Load one shard, verifying its checksum."""
        entry = next((s for s in self.manifest["shards"] if s["index"] == index), None)
        if entry is None:
            raise StoreError(f"Shard {index} of {self.root} has not been written; finish the harvest first.")
        path = self.root / entry["file"]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise StoreError(f"Shard file {path} is missing: the store is damaged; harvest again.") from exc
        if entry["file"] not in self._verified:
            if sha256_hex(data) != entry["sha256"]:
                raise StoreError(
                    f"Shard {path} fails its checksum (corrupt or modified). Delete it and run the same "
                    "harvest again: only the missing shard is recomputed."
                )
            self._verified.add(entry["file"])
        try:
            return st_load(data)
        except Exception as exc:  # safetensors raises its own error types
            raise StoreError(f"Shard {path} cannot be decoded: {exc}") from exc

    def iter_batches(
        self,
        sites: list[str] | None = None,
        *,
        batch_tokens: int = 4096,
        skip_positions: int | None = None,
        contexts: np.ndarray | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        drop_last_position: bool = False,
        shards: Sequence[int] | None = None,
    ) -> Iterator[Batch]:
        """Stream token rows shard by shard, ``batch_tokens`` rows at a time; memory is one shard.

        ``skip_positions`` defaults to the store's setting; ``contexts`` restricts to a subset of
        context indices; ``drop_last_position`` drops the final position (which has no next-token loss);
        ``shards`` restricts to those shards (one rank's share), in store order.
        """
        self.require_complete()
        sites = self.sites if sites is None else sites
        missing = [s for s in sites if s not in self.sites]
        if missing:
            raise StoreError(f"Store {self.root} has no site(s) {missing}; it holds {self.sites}.")
        skip = int(self.identity.get("skip_positions", 0)) if skip_positions is None else skip_positions
        stop_pos = self.ctx_len - (1 if drop_last_position else 0)
        if skip >= stop_pos:
            raise DataError(
                f"skip_positions={skip} leaves no positions in contexts of {self.ctx_len} tokens."
            )
        wanted = None if contexts is None else set(int(c) for c in contexts)
        tokens = self.tokens
        chosen = range(self.n_shards) if shards is None else sorted(set(shards))
        for index in chosen:
            start, stop = self.shard_range(index)
            ctx_ids = np.arange(start, stop)
            if wanted is not None:
                ctx_ids = np.asarray([c for c in ctx_ids if c in wanted], dtype=np.int64)
                if len(ctx_ids) == 0:
                    continue
            shard = self.load_shard(index)
            local = torch.as_tensor(ctx_ids - start)
            pos = torch.arange(skip, stop_pos)
            n_pos = len(pos)
            ctx_col = torch.as_tensor(ctx_ids).repeat_interleave(n_pos)
            pos_col = pos.repeat(len(ctx_ids))
            tok = torch.as_tensor(tokens[ctx_ids][:, skip:stop_pos].astype(np.int64)).reshape(-1)
            flat = {s: shard[s][local, skip:stop_pos].reshape(-1, shard[s].shape[-1]) for s in sites}
            loss = shard["loss"][local, skip:stop_pos].reshape(-1) if "loss" in shard else None
            n = len(ctx_col)
            for a in range(0, n, batch_tokens):
                b = min(a + batch_tokens, n)
                yield Batch(
                    acts={s: flat[s][a:b].to(device=device, dtype=dtype) for s in sites},
                    context=ctx_col[a:b].to(device),
                    position=pos_col[a:b].to(device),
                    token=tok[a:b].to(device),
                    loss=None if loss is None else loss[a:b].to(device),
                )

    def missing_shards(self) -> list[str]:
        """Shard files the manifest lists that are not on disk (cheap: no file is read)."""
        return [s["file"] for s in self.manifest["shards"] if not (self.root / s["file"]).is_file()]

    def verify(self) -> list[str]:
        """Every problem of the store, reading each file in full: missing or corrupt shards, a corrupt token
        file, shards not yet written. Empty when the store is complete and every checksum matches."""
        problems: list[str] = []
        try:
            if sha256_hex((self.root / TOKENS).read_bytes()) != self.manifest["tokens_sha256"]:
                problems.append(f"{TOKENS}: fails its checksum")
        except OSError:
            problems.append(f"{TOKENS}: missing")
        for entry in self.manifest["shards"]:
            path = self.root / entry["file"]
            try:
                if sha256_hex(path.read_bytes()) != entry["sha256"]:
                    problems.append(f"{entry['file']}: fails its checksum")
            except OSError:
                problems.append(f"{entry['file']}: missing")
        if not self.complete:
            problems.append(f"incomplete: {len(self.manifest['shards'])} of {self.n_shards} shards written")
        return problems

    def info(self) -> dict[str, Any]:
        """A summary for ``darkmatter store info``."""
        ident = self.identity
        size = sum(
            (self.root / s["file"]).stat().st_size
            for s in self.manifest["shards"]
            if (self.root / s["file"]).exists()
        )
        return {
            "path": str(self.root),
            "model": ident["model"]["name"],
            "sites": ident["sites"],
            "d": ident["d"],
            "dtype": ident["dtype"],
            "ctx_len": ident["ctx_len"],
            "n_contexts": ident["n_contexts"],
            "tokens": ident["ctx_len"] * ident["n_contexts"],
            "skip_positions": ident.get("skip_positions", 0),
            "with_loss": ident.get("with_loss", False),
            "shards_done": len(self.manifest["shards"]),
            "shards_total": self.n_shards,
            "complete": self.complete,
            "bytes": size,
            "identity_hash": self.manifest["identity_hash"],
        }


def _unfinished_start(root: Path) -> bool:
    """Whether ``root`` (holding no manifest) is empty or holds only what a store's creation writes before
    its manifest (an empty shard folder, the token ids, temporary files): a killed or failed start."""
    for p in root.iterdir():
        empty_shards = p.name in (SHARD_DIR, RANK_DIR) and p.is_dir() and not any(p.iterdir())
        if not (empty_shards or p.name == TOKENS or (p.name.startswith(".") and p.name.endswith(".tmp"))):
            return False
    return True


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _mismatch_message(root: Path, old: dict[str, Any], new: dict[str, Any]) -> str:
    diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    detail = "; ".join(f"{k}: store has {old.get(k)!r}, requested {new.get(k)!r}" for k in diffs[:4])
    return (
        f"{root} already holds an activation store for a different configuration ({detail}). It was left "
        "untouched. Use another output directory, or delete this one to start over."
    )
