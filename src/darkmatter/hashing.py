"""The one stable hash of the project: configs, store identities and checkpoints are named by it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hex sha256 of ``obj`` as canonical JSON (sorted keys; non-JSON values by ``str``), ``length`` chars.

    Equal JSON-able data gives equal hashes on every platform and Python version.
    """
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(", ", ": "))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Full hex sha256 of a file, read in chunks (large model files)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_hex(data: bytes) -> str:
    """Full hex sha256 of raw bytes (checksums of files)."""
    return hashlib.sha256(data).hexdigest()
