"""Format registry, auto-detection, ``load_sae`` and ``save_sae``.

Each format lives in its own module with one typed loader (``Path -> Converted``) and a cheap ``detect``;
``FORMATS`` lists them in detection order. Everything crosses the border through ``SAE.from_tensors``, which
checks shapes against the config and that every value is finite.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from darkmatter.errors import DarkMatterError, SAEFormatError
from darkmatter.sae import releases
from darkmatter.sae.formats import dictionary_learning, gemma_scope, llama_scope, openai, saelens, sparsify
from darkmatter.sae.formats._common import (
    LLAMA_SCOPE_WEIGHTS,
    MEMBER_FILES,
    Converted,
    SAEFormat,
    canonical_hook_site,
    check_plausible,
    one_line,
)
from darkmatter.sae.model import SAE, SAEConfig, parse_dtype
from darkmatter.sae.releases import ReleaseSAE

FORMATS: dict[str, SAEFormat] = {
    fmt.name: fmt
    for fmt in (
        saelens.FORMAT,
        llama_scope.FORMAT_V1,
        llama_scope.FORMAT_V2,
        gemma_scope.FORMAT_V2,
        gemma_scope.FORMAT_V1,
        sparsify.FORMAT,
        dictionary_learning.FORMAT,
        openai.FORMAT,
    )
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:.+)?$")
_MAX_LISTED = 20


def known_layouts() -> str:
    """One line per format, for error messages."""
    return "\n".join(f"  - {fmt.name}: {fmt.layout}" for fmt in FORMATS.values())


def _layouts_inline() -> str:
    """All layouts on one line, for one-line error messages."""
    return "; ".join(f"{fmt.name}: {fmt.layout}" for fmt in FORMATS.values())


def detect_format(path: str | Path) -> SAEFormat | None:
    """The first registered format whose ``detect`` accepts ``path`` (after member-file resolution)."""
    target = _as_target(Path(path))
    return next((fmt for fmt in FORMATS.values() if fmt.detect(target)), None)


def _as_target(path: Path) -> Path:
    """A file that stands for its folder (``cfg.json``, ``checkpoints/final.safetensors``) -> the folder."""
    if path.is_file() and path.name in MEMBER_FILES:
        return path.parent
    if path.is_file() and path.as_posix().endswith(LLAMA_SCOPE_WEIGHTS):
        return path.parent.parent
    return path


def _children(path: Path) -> dict[str, Path]:
    """Loadable entries directly under a folder (sparsify hookpoints, OpenAI layer files), by name."""
    if not path.is_dir():
        return {}
    found: dict[str, Path] = {}
    for entry in sorted(path.iterdir()):
        if entry.name.startswith("."):
            continue
        if detect_format(entry) is not None:
            found[entry.stem if entry.is_file() else entry.name] = entry
    return found


def _listing(path: Path) -> str:
    if not path.is_dir():
        return f"{path.name} (a file)"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    more = f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
    return (", ".join(names[:_MAX_LISTED]) + more) if names else "nothing (empty folder)"


def _select(path: Path, fmt_name: str | None, hookpoint: str | None) -> Path:
    """Descend into the ``hookpoint`` child, or into the only loadable child of a folder with no layout."""
    if hookpoint is None and (fmt_name is not None or detect_format(path) is not None):
        return path
    if hookpoint is not None and path.is_dir() and (path / hookpoint).exists():
        return path / hookpoint  # also nested ones, e.g. layer_5/width_16k/average_l0_40
    children = _children(path)
    if hookpoint is not None:
        if hookpoint not in children:
            choices = ", ".join(children) or "none"
            raise SAEFormatError(
                f"{path}: no SAE for hookpoint {hookpoint!r}; available hookpoints: {choices}."
            )
        return children[hookpoint]
    if len(children) > 1:
        raise SAEFormatError(
            f"{path} holds several SAEs; choose one with hookpoint= (CLI: --hookpoint). "
            f"Available: {', '.join(children)}."
        )
    return next(iter(children.values()), path)


def _pick(path: Path, fmt_name: str | None, hookpoint: str | None) -> tuple[Path, SAEFormat]:
    """The file or folder to load and its format."""
    target = _as_target(_select(path, fmt_name, hookpoint))
    if fmt_name is not None:
        if fmt_name not in FORMATS:
            raise SAEFormatError(f"Unknown SAE format {fmt_name!r}; known formats: {', '.join(FORMATS)}.")
        return target, FORMATS[fmt_name]
    fmt = detect_format(target)
    if fmt is None:
        found = f"{target}: no known SAE layout. Found: {_listing(target)}."
        raise SAEFormatError(one_line(f"{found} Known layouts: {_layouts_inline()}.", 2000))
    return target, fmt


def _resolve(spec: str | Path, online: bool) -> tuple[Path, ReleaseSAE | None]:
    """A local path; else ``RELEASE/SAE_ID`` or ``owner/name[:subfolder]`` from the Hugging Face cache, or
    downloaded when ``online``. Also returns the release the spec named, if any."""
    path = Path(spec).expanduser()
    if path.exists():
        return path, None
    text = str(spec)
    named = releases.parse(text)
    hub = named.hub_spec if named else text
    if named is None and not _REPO_ID.match(text):
        near = releases.near_release(text)
        hint = f" Did you mean a SAELens release: {near}? (RELEASE/SAE_ID)" if near else ""
        raise SAEFormatError(f"{text}: no such file or folder.{hint}")
    cached = releases.hub_copy(hub)
    if cached is not None:
        return cached, named
    if online:
        return _download(hub), named
    repo_id, _, folder = hub.partition(":")
    where = releases.cache_folder(repo_id) / "snapshots" / "<revision>" / folder
    what = f"{text} is not a local path"
    if named:
        what = f"{text} names folder {folder!r} of hub repo {repo_id!r}"
    raise SAEFormatError(
        f"{what}, and the Hugging Face cache holds no copy ({where}). Pass online=True (CLI: --online, or "
        f"DARKMATTER_ONLINE=1) to download it from the Hugging Face Hub, put a copy there, or pass the path "
        f"of a local copy; darkmatter stays offline unless asked."
    )


def _download(text: str) -> Path:
    import huggingface_hub

    repo_id, _, subfolder = text.partition(":")
    patterns = [f"{subfolder.strip('/')}/*"] if subfolder else None
    try:
        root = huggingface_hub.snapshot_download(repo_id=repo_id, allow_patterns=patterns)
    except (OSError, ValueError) as err:
        raise SAEFormatError(f"Could not download {text} from the Hugging Face Hub: {err}") from err
    local = Path(root) / subfolder if subfolder else Path(root)
    if not local.exists():
        raise SAEFormatError(f"{repo_id} has no folder {subfolder!r}.")
    return local


def _build(converted: Converted, dtype: torch.dtype | None, device: Any) -> SAE:
    sae = SAE.from_tensors(converted.cfg, converted.tensors, dtype=dtype or converted.dtype)
    check_plausible(sae)
    return sae.to(device) if device is not None else sae


def load_sae(
    path: str | Path,
    *,
    format: str | None = None,
    device: Any = "cpu",
    dtype: torch.dtype | str | None = None,
    hookpoint: str | None = None,
    online: bool = False,
) -> SAE:
    """Load any supported SAE as the canonical ``SAE``.

    ``format=None`` auto-detects; ``hookpoint`` picks a sub-folder of a multi-SAE folder (sparsify runs,
    OpenAI ``autoencoders/``); ``dtype=None`` keeps the stored dtype. A path that does not exist is read as a
    SAELens name ``RELEASE/SAE_ID`` (``darkmatter.sae.releases``) or a Hugging Face repo id
    (``owner/name[:subfolder]``): from the Hugging Face cache when it holds a copy, else downloaded only
    when ``online=True``.
    """
    local, named = _resolve(path, online)
    target, fmt = _pick(local, format or (named.format if named else None), hookpoint)
    try:
        converted = fmt.load(target)
        if named is not None:
            _name_release(converted.cfg, named)
        return _build(converted, parse_dtype(dtype), device)
    except DarkMatterError as err:
        raise type(err)(one_line(f"Cannot load {target} as {fmt.name}: {err}", 2000)) from err


def _name_release(cfg: SAEConfig, named: ReleaseSAE) -> None:
    """Record the SAELens name the SAE was loaded by (kept through saves), and its model when unknown."""
    cfg.metadata.update(release=named.release, sae_id=named.sae_id)
    if cfg.model_name is None:
        cfg.model_name = named.model


def save_sae(sae: SAE, path: str | Path) -> Path:
    """Save ``sae`` as SAELens v6 (``cfg.json`` + ``sae_weights.safetensors``); return the folder."""
    return saelens.save(sae, Path(path).expanduser())


__all__ = [
    "FORMATS",
    "SAEFormat",
    "canonical_hook_site",
    "detect_format",
    "known_layouts",
    "load_sae",
    "save_sae",
]
