"""The auto-interp cache: every finished latent, so a stopped run resumes without asking the judge again.

One process, or rank 0 of a ``torchrun`` run, keeps the main file (``autointerp-<component>.json`` in a
study). Every other rank writes the latents it finishes to a part file of its own beside it
(``autointerp-<component>.part-<rank>.json``), so no two processes ever write one file. Opening the cache
as its owner (rank 0) reads the main file and every part file left by an earlier run of any world size
(parts over the main file), folds them into the main file and removes them; rank 0 folds the other ranks'
latents in again when they arrive (``absorb``). Each file is rewritten whole and atomically after every
latent, so a killed run keeps every latent it finished.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable
from pathlib import Path

from pydantic import ValidationError

from darkmatter import atomic
from darkmatter.errors import StoreError
from darkmatter.interp.results import LatentInterp

CACHE_FORMAT = "darkmatter-autointerp-cache"
CACHE_VERSION = 1
PART = ".part-"


def part_path(path: Path, rank: int) -> Path:
    """Where rank ``rank`` (> 0) keeps its finished latents of the cache ``path``."""
    return path.with_name(f"{path.stem}{PART}{rank}{path.suffix}")


def part_paths(path: Path) -> list[Path]:
    """The part files of the cache ``path`` on disk, by rank."""
    found: list[tuple[int, Path]] = []
    for p in path.parent.glob(f"{glob.escape(path.stem)}{PART}*{glob.escape(path.suffix)}"):
        rank = p.name[len(path.stem) + len(PART) : len(p.name) - len(path.suffix)]
        if rank.isdigit():
            found.append((int(rank), p))
    return [p for _, p in sorted(found)]


def read_cache(path: Path) -> dict[int, LatentInterp]:
    """The latents cached in the file ``path`` ({} when it does not exist)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("format") != CACHE_FORMAT or data.get("version") != CACHE_VERSION:
            raise ValueError("not an auto-interp cache of this version")
        return {int(k): LatentInterp.model_validate(v) for k, v in data["latents"].items()}
    except (ValueError, KeyError, AttributeError, TypeError, ValidationError) as exc:
        raise StoreError(
            f"Auto-interp cache {path} is unreadable ({exc.__class__.__name__}); delete it to start over."
        ) from exc


def write_cache(path: Path, done: dict[int, LatentInterp]) -> None:
    atomic.write_json(
        path,
        {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "latents": {str(k): v.model_dump(mode="json") for k, v in sorted(done.items())},
        },
    )


class LatentCache:
    """Finished latents by id, saved after each one: by rank 0 (the owner) to ``main`` with what earlier
    runs left, by any other rank to its own part file with what it finished in this run. ``main`` None:
    nothing is read or saved."""

    def __init__(self, main: Path | None, *, rank: int = 0) -> None:
        self.main = main
        self.path = main if main is None or rank == 0 else part_path(main, rank)
        self.done: dict[int, LatentInterp] = {}
        if main is not None and rank == 0:
            self.done = read_cache(main)
            parts = part_paths(main)
            for p in parts:
                self.done.update(read_cache(p))
            if parts:
                self._fold(parts)

    def hit(self, latent: int, key: str) -> LatentInterp | None:
        """The cached result of ``latent`` when its key still matches, else None."""
        hit = self.done.get(latent)
        return hit if hit is not None and hit.key == key else None

    def save(self, li: LatentInterp) -> None:
        if self.path is not None:
            self.done[li.latent] = li
            write_cache(self.path, self.done)

    def absorb(self, latents: Iterable[LatentInterp]) -> None:
        """Owner only: add the latents the other ranks finished, then drop their part files."""
        if self.main is None or self.path != self.main:
            return
        added = False
        for li in latents:
            if self.done.get(li.latent) != li:
                self.done[li.latent], added = li, True
        parts = part_paths(self.main)
        if added or parts:  # nothing new: the main file stays as one process leaves it
            self._fold(parts)

    def _fold(self, parts: list[Path]) -> None:
        """Save everything held to the main file, then remove ``parts`` (their latents are in it now)."""
        assert self.main is not None
        write_cache(self.main, self.done)
        for p in parts:
            p.unlink(missing_ok=True)

    def resume_hint(self, finished: int, total: int) -> str:
        """What a failed run leaves behind, for its error message."""
        return f"{finished} of {total} latents are finished and saved in {self.main}; run again to resume."
