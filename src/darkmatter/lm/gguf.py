"""GGUF files as models: read once with transformers' GGUF loader, dequantized to fp32, saved as a plain
Hugging Face folder that later loads in about a second.

transformers refuses to ``save_pretrained`` a GGUF-loaded model, so its weights are moved into a fresh model
of the class its config names (built on ``meta``, so no second copy of the weights is allocated) and that
model is saved. The fresh model must give the GGUF model's logits exactly before anything is written.
Any architecture transformers' GGUF loader reads works; what it cannot read is one ``ModelLoadError``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from darkmatter.errors import ModelLoadError
from darkmatter.hashing import sha256_file

SUFFIX = ".gguf"
MAGIC = b"GGUF"
SOURCE_FILE = "darkmatter_source.json"
"""Written into every converted folder: the GGUF file's name, its sha256 and the identity it stands for."""

_DIGESTS: dict[tuple[str, int, int], str] = {}


def looks_like_gguf(path: Path) -> bool:
    """A ``.gguf`` name, or any file that starts with the GGUF magic bytes."""
    if path.suffix.lower() == SUFFIX:
        return True
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == MAGIC


def file_sha256(path: Path) -> str:
    """sha256 of a file, computed once per process for each (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]


def supported_architectures() -> list[str]:
    """The GGUF ``general.architecture`` values transformers' GGUF loader reads."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(str(a) for a in GGUF_SUPPORTED_ARCHITECTURES)


def check_magic(path: Path) -> None:
    """The file exists and starts with the GGUF magic bytes (reads four bytes)."""
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist.")
    with path.open("rb") as f:
        head = f.read(4)
    if head != MAGIC:
        raise ModelLoadError(
            f"{path} is not a GGUF file: it starts with {head!r}, a GGUF file with {MAGIC!r}. Point "
            "model.name at a .gguf file, a Hugging Face model folder, or a hub id."
        )


def _read_architecture(path: Path) -> str | None:
    try:  # transformers' own metadata reader skips the vocabulary arrays: milliseconds instead of seconds
        from transformers.integrations.gguf.reader import read_gguf_metadata
    except ImportError:  # older transformers: the gguf package's reader parses every array
        from gguf import GGUFReader

        field = GGUFReader(str(path), "r").fields.get("general.architecture")
        return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")
    arch = read_gguf_metadata(str(path))[0].get("general.architecture")
    return None if arch is None else str(arch)


def architecture(path: Path) -> str:
    """The file's ``general.architecture``, after checking that it is a readable GGUF file that
    transformers can load (its metadata is read, no tensor)."""
    check_magic(path)
    try:
        arch = _read_architecture(path)
    except Exception as exc:  # the readers fail in many ways on a damaged file (struct, numpy, index, EOF)
        raise ModelLoadError(
            f"{path} is a damaged GGUF file ({type(exc).__name__}: {exc}); download it again (compare its "
            "sha256 with the published one)."
        ) from exc
    if arch is None:
        raise ModelLoadError(f"{path} has no general.architecture entry; it is not a model GGUF file.")
    known = supported_architectures()
    if arch not in known:
        raise ModelLoadError(
            f"{path} holds a {arch!r} model, an architecture transformers' GGUF loader does not read "
            f"(it reads {', '.join(known)}). Convert the original checkpoint to a Hugging Face folder "
            "instead and point model.name at it."
        )
    return arch


def gguf_config(path: Path) -> Any:
    """The model config a GGUF file describes, from its metadata alone (no tensor is read)."""
    from transformers import AutoConfig

    architecture(path)
    try:
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"Could not read the model config of {path}: {exc}") from exc


def read_source(folder: Path) -> dict[str, Any] | None:
    """The ``SOURCE_FILE`` record of a converted folder, or None (not a converted folder)."""
    try:
        record = json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_converted(folder: Path, digest: str) -> bool:
    """A complete converted folder of the file with this sha256."""
    record = read_source(folder)
    return (
        record is not None
        and record.get("gguf_sha256") == digest
        and (folder / "config.json").is_file()
        and any(folder.glob("*.safetensors"))
    )


def convert(path: Path, target: Path, *, digest: str, identity: str) -> Path:
    """Dequantize ``path`` to an fp32 Hugging Face folder at ``target`` (atomic: a temporary folder renamed
    into place; a concurrent conversion of the same file leaves one complete folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    architecture(path)
    where = {"gguf_file": path.name, "local_files_only": True}
    try:
        src = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **where)
        tok = AutoTokenizer.from_pretrained(str(path.parent), **where)
    except Exception as exc:  # the loader's errors have no common type (ValueError, KeyError, NotImplemented)
        raise ModelLoadError(
            f"transformers could not load {path} ({type(exc).__name__}: {exc}). The file may be damaged or "
            "use a tensor type or layout this transformers version does not read."
        ) from exc
    src.eval()
    model = _fresh_copy(src, path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        record = {"gguf": path.name, "gguf_sha256": digest, "id": identity}
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
        if target.exists() and not is_converted(target, digest):
            shutil.rmtree(target)  # a folder left half-written by a process that died before renaming
        try:
            tmp.rename(target)
        except OSError:
            if not is_converted(target, digest):  # another process finished first: keep its folder
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _fresh_copy(src: Any, path: Path) -> Any:
    """A plain model of the class ``src``'s config names, holding ``src``'s tensors (not copies)."""
    from transformers import AutoModelForCausalLM

    config = type(src.config).from_dict(
        {k: v for k, v in src.config.to_dict().items() if k != "quantization_config"}
    )
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(src.state_dict(), assign=True)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(
            f"{path}: the weights transformers read do not fit a fresh {config.model_type!r} model ({exc})."
        ) from exc
    for name, buffer in src.named_buffers():  # non-persistent buffers (rotary tables, embedding scales)
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, buffer)
    model.tie_weights()
    model.eval()
    ids = torch.arange(8).remainder(int(config.vocab_size)).unsqueeze(0)
    with torch.no_grad():
        same = torch.equal(model(input_ids=ids).logits, src(input_ids=ids).logits)
    if not same:
        raise ModelLoadError(
            f"{path}: a plain {type(model).__name__} holding the GGUF weights does not reproduce the GGUF "
            "model's logits; the file cannot be converted faithfully by this transformers version."
        )
    return model
