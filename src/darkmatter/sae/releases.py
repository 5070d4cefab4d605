"""SAELens release ids (``release`` + ``sae_id``) -> hub repo and folder, and local copies of hub folders.

The catalogue is ``releases.json`` (bundled: the releases the presets use, taken from sae-lens's
``pretrained_saes.yaml``) plus, when the ``sae_lens`` package is installed, its ``pretrained_saes.yaml`` read
as data (the package is located, never imported). Bundled entries come first; sae-lens's add the releases
and ids the bundle lacks. Canonical ids are aliases: ``gemma-scope-2b-pt-res-canonical`` +
``layer_12/width_16k/canonical`` is folder ``layer_12/width_16k/average_l0_82`` of the same repo as
``gemma-scope-2b-pt-res``.

A hub folder (``owner/name:folder``) is read from the Hugging Face cache when a snapshot there holds it
(``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``).
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import os
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from darkmatter.errors import ConfigError

BUNDLED = "releases.json"
SAELENS_CATALOGUE = "pretrained_saes.yaml"
# sae-lens conversion functions whose layout one of our formats reads (others are auto-detected).
_FORMATS = {
    None: "saelens",
    "gemma_2": "gemma_scope",
    "llama_scope": "llama_scope",
    "sparsify": "sparsify",
    "dictionary_learning_1": "dictionary_learning",
}
_SUGGESTED = 5


@dataclass(frozen=True)
class Release:
    """One release: a hub repo and its SAEs by id."""

    name: str
    repo_id: str
    model: str | None
    format: str | None
    """Our format name for its folders, when known (else auto-detected)."""
    saes: dict[str, str]
    """sae_id -> folder in the repo."""


@dataclass(frozen=True)
class ReleaseSAE:
    """One SAE named by release and id, and where it lives on the hub."""

    release: str
    sae_id: str
    repo_id: str
    folder: str
    model: str | None
    format: str | None

    @property
    def name(self) -> str:
        """``release/sae_id``, the form the command line takes."""
        return f"{self.release}/{self.sae_id}"

    @property
    def hub_spec(self) -> str:
        """``owner/name:folder``, the form ``load_sae`` downloads with ``online=True``."""
        return f"{self.repo_id}:{self.folder}"

    def describe(self) -> dict[str, Any]:
        """What ``darkmatter sae inspect`` prints about the name."""
        return {
            "release": self.release,
            "sae_id": self.sae_id,
            "repo_id": self.repo_id,
            "folder": self.folder,
            "model": self.model,
        }


# --------------------------------------------------------------------------- the catalogue


@functools.cache
def bundled() -> dict[str, Release]:
    """The bundled catalogue."""
    data = json.loads(files("darkmatter.sae").joinpath(BUNDLED).read_text(encoding="utf-8"))
    out: dict[str, Release] = {}
    for name, entry in data["releases"].items():
        saes = {sae_id: sae_id for sae_id in entry.get("ids", [])}
        saes.update(entry.get("paths", {}))
        out[name] = Release(name, entry["repo_id"], entry.get("model"), entry.get("format"), saes)
    return out


def saelens_catalogue_path() -> Path | None:
    """sae-lens's ``pretrained_saes.yaml`` when the package is installed here (found, not imported)."""
    try:
        spec = importlib.util.find_spec("sae_lens")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        if (Path(root) / SAELENS_CATALOGUE).is_file():
            return Path(root) / SAELENS_CATALOGUE
    return None


def saelens_catalogue() -> dict[str, Release]:
    """sae-lens's catalogue as data, or ``{}`` when sae-lens is not installed."""
    path = saelens_catalogue_path()
    if path is None:
        return {}
    return _read_saelens(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_saelens(path: str, mtime_ns: int) -> dict[str, Release]:
    """Parse one version of the file (``mtime_ns`` keys the cache)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the file is large; libyaml is ~5x faster
    try:
        with Path(path).open(encoding="utf-8") as f:
            data = yaml.load(f, Loader=loader)
        return {name: _release(name, entry) for name, entry in data.items()}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError, KeyError, TypeError) as err:
        raise ConfigError(
            f"{path}: sae-lens's catalogue of releases cannot be read ({type(err).__name__}: {err}); "
            f"reinstall sae-lens, or uninstall it to use darkmatter's bundled catalogue alone."
        ) from err


def _release(name: str, entry: dict[str, Any]) -> Release:
    convert = entry.get("conversion_func")
    saes = {str(s["id"]): str(s["path"]) for s in entry["saes"]}
    return Release(str(name), str(entry["repo_id"]), entry.get("model"), _FORMATS.get(convert), saes)


def find_release(name: str) -> Release | None:
    """A release by name: the bundled one, else sae-lens's (when installed)."""
    return bundled().get(name) or saelens_catalogue().get(name)


def release_names() -> list[str]:
    """Every known release name, bundled ones first."""
    return list(dict.fromkeys([*bundled(), *saelens_catalogue()]))


def _nearest(word: str, choices: list[str]) -> str:
    near = difflib.get_close_matches(word, choices, n=_SUGGESTED, cutoff=0.5)
    return ", ".join(near) if near else "none close"


def resolve(release: str, sae_id: str) -> ReleaseSAE:
    """The repo and folder of ``sae_id`` in ``release``; ConfigError naming the nearest ids when unknown."""
    entry = find_release(release)
    if entry is None:
        raise ConfigError(
            f"Unknown SAELens release {release!r}. Nearest releases: {_nearest(release, release_names())}. "
            f"darkmatter knows {len(bundled())} releases of its own"
            + ("" if saelens_catalogue_path() else " (install sae-lens to use its whole catalogue)")
            + "; a local folder or 'owner/name:folder' hub path works too."
        )
    folder = entry.saes.get(sae_id)
    if folder is None and release in bundled():
        extra = saelens_catalogue().get(release)  # a newer sae-lens may list more ids
        folder = extra.saes.get(sae_id) if extra else None
    if folder is None:
        raise ConfigError(
            f"Release {release!r} has no sae_id {sae_id!r}. Nearest ids: "
            f"{_nearest(sae_id, list(entry.saes))} ({len(entry.saes)} ids in all)."
        )
    return ReleaseSAE(release, sae_id, entry.repo_id, folder, entry.model, entry.format)


def parse(text: str) -> ReleaseSAE | None:
    """``RELEASE/SAE_ID`` (split at the first '/': release names have none) when RELEASE is a known release.

    Returns None when the first part names no release; a known release with an unknown id is a ConfigError.
    """
    release, sep, sae_id = text.partition("/")
    if not sep or not sae_id or find_release(release) is None:
        return None
    return resolve(release, sae_id)


def near_release(text: str) -> str | None:
    """Nearest release names to ``text``'s first part, when some are close (for 'no such file' errors)."""
    release = text.partition("/")[0]
    near = difflib.get_close_matches(release, release_names(), n=_SUGGESTED, cutoff=0.8)
    return ", ".join(near) if near else None


# --------------------------------------------------------------------------- the Hugging Face cache


def hub_cache() -> Path:
    """The Hugging Face hub cache folder, as the hub client resolves it."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache / "huggingface" / "hub"


def cache_folder(repo_id: str) -> Path:
    """Where the cache keeps ``repo_id``: ``<cache>/models--owner--name``."""
    return hub_cache() / f"models--{repo_id.replace('/', '--')}"


def cached_copy(repo_id: str, folder: str = "") -> Path | None:
    """``folder`` of ``repo_id`` in a cached snapshot (the ``main`` one first), or None."""
    snapshots = cache_folder(repo_id) / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = cache_folder(repo_id) / "refs" / "main"
    main = ref.read_text(encoding="utf-8").strip() if ref.is_file() else ""
    found = sorted(snapshots.iterdir(), key=lambda p: (p.name != main, -p.stat().st_mtime))
    for snapshot in found:
        candidate = snapshot / folder if folder else snapshot
        if candidate.is_file() or (candidate.is_dir() and any(candidate.iterdir())):
            return candidate
    return None


def hub_copy(spec: str) -> Path | None:
    """The cached copy of a hub path ``owner/name[:folder]``, or None (also for anything else)."""
    repo_id, _, folder = spec.partition(":")
    if repo_id.count("/") != 1 or Path(spec).expanduser().exists():
        return None
    return cached_copy(repo_id, folder.strip("/"))


def local_path(spec: str) -> str:
    """``spec`` itself when it exists or has no cached copy; else the cached copy of the hub path."""
    copy = hub_copy(spec)
    return str(copy) if copy is not None else spec
