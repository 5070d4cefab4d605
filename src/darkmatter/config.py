"""Study configuration: presets, config files (TOML or YAML), and dotted overrides.

A study is fully described by a ``StudyConfig``; every step's output records the hash of the part of the
config it depends on, so ``darkmatter run`` can skip finished steps and redo changed ones.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from darkmatter.errors import ConfigError
from darkmatter.harvest import HarvestConfig
from darkmatter.sae.train import SAESpec, TrainConfig
from darkmatter.text import TextConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ModelConfig(BaseModel):
    """Which language model to run, where, and in what precision."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    name: str = Field(
        "embedded", description="'embedded' (SmolLM2-135M-Instruct), a local folder, or a hub id."
    )
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto.")
    dtype: str = Field("fp32", description="fp32, bf16 or fp16.")
    online: bool = Field(False, description="Allow downloads from the Hugging Face hub.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub (off unless asked).")


class ExternalSAE(BaseModel):
    """An SAE loaded from disk (or the hub when online) instead of being trained."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Name used in results and figures.")
    path: str = Field(description="Local folder/file, or a hub 'repo_id:subfolder' when online.")
    format: str | None = Field(None, description="Format name; auto-detected when empty.")
    hookpoint: str | None = Field(None, description="Sub-folder for multi-hookpoint sparsify folders.")
    site: str | None = Field(None, description="Hook site; overrides what the SAE's config says.")


class FamilyConfig(BaseModel):
    """The SAE family under study: trained here (default) or loaded (``external``)."""

    model_config = ConfigDict(extra="forbid")
    kind: str = Field("topk", description="topk or batchtopk for trained SAEs.")
    widths: list[int] = Field(
        default_factory=lambda: [512, 1024, 2048, 4096], description="Width sweep at k."
    )
    k: int = Field(32, ge=1, description="k of the width sweep.")
    ks: list[int] = Field(default_factory=lambda: [8, 16, 64], description="Extra k values at width_for_ks.")
    width_for_ks: int = Field(2048, ge=1, description="Width of the k sweep and of the auxiliary SAEs.")
    aux_sites: bool = Field(
        True, description="Also train SAEs on layer L-1 resid_post, L mlp_out, L attn_out."
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    external: list[ExternalSAE] = Field(default_factory=list, description="Load these instead of training.")

    def specs(self, layer: int) -> list[SAESpec]:
        """The trained family: a width sweep at ``k``, a k sweep at ``width_for_ks``, auxiliary sites."""
        main = f"blocks.{layer}.hook_resid_post"
        pairs = [(w, self.k) for w in self.widths] + [(self.width_for_ks, k) for k in self.ks]
        seen: list[tuple[int, int]] = []
        for p in pairs:
            if p not in seen:
                seen.append(p)
        kind = "topk" if self.kind == "topk" else "batchtopk"
        specs = [
            SAESpec(name=f"L{layer}.resid.w{w}.k{k}", site=main, d_sae=w, k=k, kind=kind) for w, k in seen
        ]
        if self.aux_sites:
            w, k = self.width_for_ks, self.k
            aux = [
                (f"L{layer - 1}.resid", f"blocks.{layer - 1}.hook_resid_post"),
                (f"L{layer}.mlp", f"blocks.{layer}.hook_mlp_out"),
                (f"L{layer}.attn", f"blocks.{layer}.hook_attn_out"),
            ]
            specs += [
                SAESpec(name=f"{n}.w{w}.k{k}", site=s, d_sae=w, k=k, kind=kind) for n, s in aux if layer > 0
            ]
        return specs


class LayerSweepConfig(BaseModel):
    """One small SAE per layer for the across-layer experiments (paper Figs 3 and 13)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="Run the layer sweep.")
    layers: list[int] = Field(
        default_factory=list, description="Layers; empty means every `stride`-th layer."
    )
    stride: int = Field(
        2, ge=1, description="Layer step when `layers` is empty (the last layer is included)."
    )
    n_contexts: int = Field(
        64, ge=1, description="Contexts for the layer store (a subset of the study's text)."
    )
    d_sae: int = Field(1024, ge=1, description="Latents per layer SAE.")
    k: int = Field(32, ge=1, description="k of the layer SAEs.")
    kind: str = Field("batchtopk", description="batchtopk gives a per-token L0 for the L0 baseline; or topk.")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=4, batch_size=512, lr=1e-3, dead_tokens=5000)
    )

    def resolve(self, n_layers: int) -> list[int]:
        if self.layers:
            return sorted(set(self.layers))
        return sorted(set(range(0, n_layers, self.stride)) | {n_layers - 1})


class SyntheticConfig(BaseModel):
    """The synthetic simulation (paper Table 1, Fig 15, App. D)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="Run the synthetic simulation.")
    sae: str | None = Field(None, description="SAE name; default: the k-sweep width at the family's k.")
    n_tokens: int = Field(20_000, ge=100, description="Tokens of x' = Sae(x) to simulate with.")


class PursuitConfig(BaseModel):
    """Gradient pursuit over the width sweep's decoders (paper §6.1, Figs 1 and 10a)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="Run gradient pursuit.")
    n_contexts: int = Field(
        32, ge=1, description="Contexts (from the start of the store) pursued; pursuit is costly."
    )


class NonlinearConfig(BaseModel):
    """Downstream CE (Figs 8/9), earlier-layer predictors (Figs 9b/10b) and an MLP probe on the error."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="Run these experiments.")
    ce_contexts: int = Field(8, ge=1, description="Held-out contexts (never harvested) for the CE splices.")
    mlp_hidden: int = Field(256, ge=1, description="Hidden width of the MLP probe.")
    mlp_epochs: int = Field(4, ge=1, description="Epochs of the MLP probe over the train split.")


class StudyConfig(BaseModel):
    """A whole study: model, text, harvest and the analysis layer."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    preset: str = Field("demo", description="Name of the preset this config started from.")
    seed: int = Field(0, description="Global seed; experiments derive their own seeds from it.")
    split_seed: int = Field(0, description="Seed of the per-token train/test split shared by every step.")
    train_fraction: float = Field(0.8, gt=0, lt=1, description="Share of tokens in the train split.")
    layer: int = Field(15, ge=0, description="Layer of the SAE family under study.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    harvest: HarvestConfig = Field(default_factory=HarvestConfig)
    family: FamilyConfig = Field(default_factory=FamilyConfig)
    layer_sweep: LayerSweepConfig = Field(default_factory=LayerSweepConfig)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    pursuit: PursuitConfig = Field(default_factory=PursuitConfig)
    nonlinear: NonlinearConfig = Field(default_factory=NonlinearConfig)

    def sites(self) -> list[str]:
        """Sites to harvest: what the family reads (or the external SAEs' sites) plus harvest.sites."""
        needed: list[str] = []
        if self.family.external:
            needed += [e.site for e in self.family.external if e.site]
        else:
            needed += [s.site for s in self.family.specs(self.layer)]
        needed += self.harvest.sites
        return list(dict.fromkeys(needed))

    def section_hash(self, *sections: str) -> str:
        """Hash of the named sections (for step skipping)."""
        data = {
            s: getattr(self, s).model_dump() if hasattr(getattr(self, s), "model_dump") else getattr(self, s)
            for s in sections
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _demo() -> dict[str, Any]:
    layer = 15
    return {
        "preset": "demo",
        "layer": layer,
        "model": {"name": "embedded", "device": "auto", "dtype": "fp32"},
        "text": {
            "source": "austen",
            "ctx_len": 256,
            "n_contexts": 256,
            "skip_positions": 16,
            "packing": "chunk",
        },
        "harvest": {
            "dtype": "fp32",
            "with_loss": True,
            "batch_size": 8,
            "shard_contexts": 32,
        },
        "family": {
            "kind": "topk",
            "widths": [512, 1024, 2048, 4096],
            "k": 32,
            "ks": [8, 16, 64],
            "width_for_ks": 1024,
            "aux_sites": True,
            "train": {"epochs": 4, "batch_size": 512, "lr": 1e-3, "dead_tokens": 5_000},
        },
    }


def _tiny() -> dict[str, Any]:
    """A seconds-long smoke study on the embedded model (used by tests and for trying things out)."""
    cfg = _demo()
    cfg["preset"] = "tiny"
    cfg["text"].update({"ctx_len": 64, "n_contexts": 16, "skip_positions": 4})
    cfg["harvest"].update({"batch_size": 4, "shard_contexts": 4})
    cfg["layer_sweep"] = {
        "layers": [0, 15, 29],
        "n_contexts": 16,
        "d_sae": 64,
        "k": 8,
        "train": {"batch_size": 128, "epochs": 1, "lr": 1e-3},
    }
    cfg["family"] = {
        "widths": [64, 128],
        "k": 8,
        "ks": [4],
        "width_for_ks": 128,
        "train": {"batch_size": 128, "epochs": 2, "lr": 1e-3},
    }
    return cfg


PRESETS = {"demo": _demo, "tiny": _tiny}


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or YAML config file into a dict."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Config file {p} does not exist.")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".toml":
            data = tomllib.loads(text)
        elif p.suffix in {".yaml", ".yml"}:
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"Config file {p} must end in .toml, .yaml or .yml.")
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise ConfigError(f"Config file {p} cannot be parsed: {exc}") from exc
    except Exception as exc:  # yaml.YAMLError without importing yaml at module level
        raise ConfigError(f"Config file {p} cannot be parsed: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {p} must hold a table/mapping at the top level.")
    return data


def parse_override(item: str) -> dict[str, Any]:
    """``a.b=value`` to ``{"a": {"b": value}}``; the value is parsed as JSON when possible."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(
            f"Override {item!r} must look like section.key=value (for example text.n_contexts=64)."
        )
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    out: dict[str, Any] = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def resolve_config(
    preset: str | None = None, config_file: str | Path | None = None, overrides: list[str] | None = None
) -> StudyConfig:
    """Preset, then config file, then ``key=value`` overrides; validated."""
    data: dict[str, Any] = {}
    file_data = read_config_file(config_file) if config_file else {}
    name = preset or file_data.get("preset") or "demo"
    if name not in PRESETS:
        raise ConfigError(f"Unknown preset {name!r}; known presets: {', '.join(PRESETS)}.")
    data = PRESETS[name]()
    _deep_update(data, file_data)
    data["preset"] = name
    for item in overrides or []:
        _deep_update(data, parse_override(item))
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        raise ConfigError(f"Invalid configuration: {problems}.") from None
