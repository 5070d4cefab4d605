"""Study configuration: presets, config files (TOML or YAML), and dotted overrides.

A study is fully described by a ``StudyConfig``; every step's output records the hash of the part of the
config it depends on, so ``darkmatter run`` can skip finished steps and redo changed ones.

Presets: ``demo`` and ``tiny`` (embedded model, trained family); ``paper-gemma-2-2b``, ``paper-gemma-2-9b``
and ``llama-scope-8b`` (hub model, Pile text and a loaded SAE family, sized for one GPU).

Local copies: every hub id of a preset can be replaced by a local copy without editing code.
- ``--set model.name=DIR``: a local Hugging Face model folder (config.json, weights, tokenizer).
- ``--set text.source=PATH``: a .jsonl file (one ``{"text": ...}`` per line; .jsonl.gz and .jsonl.zst too), a
  folder of them, or plain text (see ``darkmatter.text``).
- ``--set family.external_root=DIR``: an external SAE ``owner/repo:sub/folder`` is read from
  ``DIR/repo/sub/folder`` (the layout of a hub download of the repo into ``DIR/repo``).
- ``--set family.external_paths.NAME=PATH``: one SAE, by name, from anywhere; wins over the root.
- ``--set 'family.external_only=["NAME", ...]'``: load only some of the SAEs (e.g. leave out the widest).
``darkmatter config show --preset NAME --set ...`` prints the resolved paths. Offline (no ``--online``), a
study that still names something to download stops with an error that lists it.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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


_HUB_SUBFOLDER = re.compile(r"^[A-Za-z0-9][\w.-]*/(?P<repo>[\w.-]+):(?P<sub>.+)$")


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
    external: list[ExternalSAE] = Field(
        default_factory=list,
        description="Load these instead of training; the width sweep is the first SAE of each width at "
        "the study's layer (resid_post), in list order.",
    )
    external_root: str | None = Field(
        None,
        description="Local folder holding hub SAEs as <repo name>/<subfolder>: every external path "
        "'owner/repo:subfolder' is read from <external_root>/repo/subfolder instead.",
    )
    external_paths: dict[str, str] = Field(
        default_factory=dict, description="External SAE name -> local path; wins over external_root."
    )
    external_only: list[str] = Field(
        default_factory=list, description="Keep only these external SAEs (by name); empty keeps all."
    )

    @model_validator(mode="after")
    def _localize_external(self) -> FamilyConfig:
        """Apply ``external_only``, ``external_paths`` and ``external_root`` to ``external`` (idempotent)."""
        names = [e.name for e in self.external]
        if len(set(names)) != len(names):
            raise ValueError(f"external SAE names must be unique, found {names}")
        kept = self.external_only or names
        paths = {n: p for n, p in self.external_paths.items() if not self.external_only or n in kept}
        for option, wanted in (("external_only", self.external_only), ("external_paths", paths)):
            unknown = [n for n in wanted if n not in names]
            if unknown:
                raise ValueError(f"{option} names {unknown} are not external SAEs; known: {names}")
        self.external = [e for e in self.external if e.name in kept]
        for e in self.external:
            if e.name in paths:
                e.path = paths[e.name]
            elif self.external_root and (m := _HUB_SUBFOLDER.match(e.path)):
                e.path = str(Path(self.external_root).expanduser() / m.group("repo") / m.group("sub"))
        return self

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


class InterpConfig(BaseModel):
    """Auto-interpretability of the error-component SAEs' latents (paper Fig 8)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="Explain and score latents.")
    judge: str = Field(
        "local",
        description="'local' (an in-process model), 'endpoint' (OpenAI-compatible chat API) or 'none'.",
    )
    local_model: str = Field(
        "embedded", description="Judge model for 'local': 'embedded' (SmolLM2-135M-Instruct) or a folder."
    )
    endpoint_url: str | None = Field(
        None, description="Base URL for 'endpoint', e.g. http://127.0.0.1:8000/v1."
    )
    endpoint_model: str | None = Field(None, description="Model name the endpoint serves.")
    timeout: float = Field(120.0, gt=0, description="Seconds per endpoint request.")
    retries: int = Field(3, ge=0, description="Endpoint retries before giving up.")
    n_latents: int = Field(4, ge=1, description="Latents scored per error SAE (chosen at random, seeded).")
    latents: list[int] = Field(default_factory=list, description="Score these latents instead of a sample.")
    min_activations: int = Field(20, ge=1, description="Skip latents active on fewer tokens.")
    window: int = Field(16, ge=2, description="Tokens per example window.")
    n_examples_explain: int = Field(8, ge=1, description="Top examples shown to the explainer.")
    explain_max_tokens: int = Field(40, ge=1, description="Longest explanation the judge may write.")
    n_per_decile: int = Field(1, ge=1, description="Test examples per activation decile.")
    n_negatives: int = Field(4, ge=1, description="Non-activating test examples per latent.")
    batch_size: int = Field(7, ge=1, description="Examples per detection prompt.")


class ErrorSAEsConfig(BaseModel):
    """TopK SAEs trained on LinearError and NonlinearError of one SAE (paper Figs 7/8)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="Train the error-component SAEs.")
    sae: str | None = Field(None, description="SAE whose error is split; default: as for the synthetic step.")
    components: list[str] = Field(
        default_factory=lambda: ["linear", "nonlinear"], description="linear, nonlinear and/or error."
    )
    d_sae: int | None = Field(None, ge=1, description="Width; default: the chosen SAE's width.")
    k: int | None = Field(None, ge=1, description="k; default: the chosen SAE's k (or the family's k).")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=4, batch_size=512, lr=1e-3, dead_tokens=5000)
    )
    interp: InterpConfig = Field(default_factory=InterpConfig)


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
    error_saes: ErrorSAEsConfig = Field(default_factory=ErrorSAEsConfig)

    def sites(self) -> list[str]:
        """Sites to harvest: what the family reads (or the external SAEs' sites) plus harvest.sites."""
        needed: list[str] = []
        if self.family.external:
            needed += [e.site for e in self.family.external if e.site]
        else:
            needed += [s.site for s in self.family.specs(self.layer)]
        needed += self.harvest.sites
        return list(dict.fromkeys(needed))

    def missing_locally(self) -> list[str]:
        """What this study would have to download: a hub model, an ``hf:`` text source, hub SAEs."""
        from darkmatter.lm.loading import EMBEDDED_NAMES

        missing: list[str] = []
        name = self.model.name
        if name.lower() not in EMBEDDED_NAMES and not Path(name).expanduser().exists():
            missing.append(f"model.name {name!r}")
        if self.text.source.startswith("hf:"):
            missing.append(f"text.source {self.text.source!r}")
        saes = [e for e in self.family.external if not Path(e.path).expanduser().exists()]
        if saes:
            missing.append(
                f"{len(saes)} of family.external ({', '.join(repr(e.path) for e in saes[:2])}"
                + (", ...)" if len(saes) > 2 else ")")
            )
        return missing

    def require_local(self) -> None:
        """Offline (no ``model.online`` and no DARKMATTER_ONLINE=1), fail early on anything not on disk."""
        from darkmatter.lm.loading import network_allowed

        missing = self.missing_locally()
        if not missing or self.model.online or network_allowed():
            return
        raise ConfigError(
            f"Study {self.preset!r} needs files that are not on disk, and the network is off: "
            f"{'; '.join(missing)}. Pass "
            "--online to download them, or point at local copies: --set model.name=DIR, --set "
            "text.source=FILE_OR_DIR (.jsonl or .txt), --set family.external_root=DIR (holding "
            "<repo name>/<subfolder> folders) or --set family.external_paths.NAME=DIR."
        )

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
    cfg["error_saes"] = {
        "train": {"batch_size": 128, "epochs": 1, "lr": 1e-3},
        "interp": {"n_latents": 2, "min_activations": 2, "window": 8, "n_examples_explain": 4},
    }
    return cfg


# --------------------------------------------------------------------------- paper presets

PILE = "hf:monology/pile-uncopyrighted"

# Gemma Scope residual-stream SAEs per width whose published average_l0 is closest to 60 (ties: the lower),
# as the paper picks them (§3.2/§3.5): width label -> average_l0 of the hub folder.
GEMMA_2_9B_L20_RES = {"16k": 58, "32k": 57, "65k": 55, "131k": 62, "262k": 64, "524k": 48, "1m": 57}
GEMMA_2_2B_L12_RES = {"16k": 41, "32k": 76, "65k": 72, "131k": 67, "262k": 67, "524k": 65, "1m": 58}


def _paper_text() -> dict[str, Any]:
    """The paper's token set (§1.2): 300 Pile documents of at least 1024 tokens in seed-42 shuffled stream
    order, each truncated to 1024 tokens with BOS; the first 200 positions are left out of analyses."""
    return {
        "source": PILE,
        "ctx_len": 1024,
        "n_contexts": 300,
        "skip_positions": 200,
        "packing": "truncate",
        "bos": "auto",
        "seed": 42,
        "shuffle_buffer": 10_000,
        "hf_split": "train",
        "text_field": "text",
    }


def _gemma_scope(size: str, site: str, layer: int, width: str, l0: int, name: str = "") -> dict[str, Any]:
    """One Gemma Scope (Gemma 2, pretrained) SAE from ``google/gemma-scope-{size}-pt-{site}``."""
    hook = {"res": "hook_resid_post", "mlp": "hook_mlp_out"}[site]
    return {
        "name": name or f"L{layer}-{site}-{width}",
        "path": f"google/gemma-scope-{size}-pt-{site}:layer_{layer}/width_{width}/average_l0_{l0}",
        "format": "gemma_scope",
        "site": f"blocks.{layer}.{hook}",
    }


def _llama_scope(site: str, layer: int, expansion: str) -> dict[str, Any]:
    """One Llama Scope (Llama-3.1-8B base) SAE; 8x = 32k latents, 32x = 128k latents."""
    letter, hook = {
        "res": ("R", "hook_resid_post"),
        "mlp": ("M", "hook_mlp_out"),
        "attn": ("A", "hook_attn_out"),
    }[site]
    width = {"8x": "32k", "32x": "128k"}[expansion]
    return {
        "name": f"L{layer}-{site}-{width}",
        "path": f"fnlp/Llama3_1-8B-Base-LX{letter}-{expansion}:Llama3_1-8B-Base-L{layer}{letter}-{expansion}",
        "format": "llama_scope",
        "site": f"blocks.{layer}.{hook}",
    }


def _paper_study(
    preset: str,
    model: str,
    dtype: str,
    layer: int,
    external: list[dict[str, Any]],
    *,
    single_sae: str,
    error_sae_width: int,
    layer_stride: int,
    harvest_batch: int,
) -> dict[str, Any]:
    """A GPU-sized study of an external SAE family on the paper's token set; ``single_sae`` is the SAE of
    the synthetic simulation and of the error-component SAEs (TopK k = 32 of ``error_sae_width``, §6.2)."""
    return {
        "preset": preset,
        "seed": 0,
        "layer": layer,
        "model": {"name": model, "device": "cuda", "dtype": dtype},
        "text": _paper_text(),
        "harvest": {"dtype": "fp32", "with_loss": True, "batch_size": harvest_batch, "shard_contexts": 20},
        "family": {"external": external},
        "layer_sweep": {
            "stride": layer_stride,
            "n_contexts": 64,
            "d_sae": 8192,
            "k": 64,
            "kind": "batchtopk",
            "train": {
                "epochs": 16,
                "batch_size": 2048,
                "lr": 1e-3,
                "dead_tokens": 50_000,
                "device": "cuda",
            },
        },
        "synthetic": {"sae": single_sae, "n_tokens": 50_000},
        "pursuit": {"n_contexts": 32},
        "nonlinear": {"ce_contexts": 32, "mlp_hidden": 1024, "mlp_epochs": 8},
        "error_saes": {
            "sae": single_sae,
            "d_sae": error_sae_width,
            "k": 32,
            "train": {"epochs": 16, "batch_size": 4096, "lr": 2e-4, "device": "cuda"},
        },
    }


def _paper_gemma_2_9b() -> dict[str, Any]:
    """The paper's main study: Gemma 2 9B layer 20 with Gemma Scope residual SAEs, 16k to 1M latents.

    Family (``google/gemma-scope-9b-pt-*``, loaded, not trained):
    - width sweep ``L20-res-{16k,32k,65k,131k,262k,524k,1m}``: ``res:layer_20/width_W/average_l0_N`` with
      N the published L0 closest to 60 (58, 57, 55, 62, 64, 48, 57); the 16k one is the target of the
      earlier-layer predictors and the MLP probe, the 1m one of the norm-probe experiment (Fig 14);
    - earlier-layer predictors (Fig 10b): ``L19-res-16k`` (L0 67) and ``L20-mlp-16k`` (mlp, L0 41). Gemma
      Scope's attention SAEs read ``attn.hook_z`` (per-head outputs before W_O), which the store does not
      harvest, so the attention predictor is skipped;
    - ``L20-res-16k-l0_68``: the SAE of the synthetic simulation (16k, L0 closest to 100, as in the paper)
      and of the error-component SAEs (57,344 latents = 16 x d_model, k = 32, as the paper's §6.2).
    Text: 300 x 1024 tokens of Pile (uncopyrighted), streamed with ``--online``; 200 positions skipped.
    The model runs in bf16 on CUDA; activations are stored in fp32 (about 13 GB for the three sites).
    The across-layer baselines (Fig 13) use small BatchTopK SAEs trained here on every 4th layer.

    Local copies (see the module docstring): ``--set model.name=GEMMA_2_9B_DIR --set text.source=PILE.jsonl
    --set family.external_root=ROOT`` with ``ROOT/gemma-scope-9b-pt-res/layer_20/width_16k/average_l0_58/
    params.npz`` and so on (``ROOT/gemma-scope-9b-pt-mlp/...`` for the mlp SAE).
    """
    res = [_gemma_scope("9b", "res", 20, w, l0) for w, l0 in GEMMA_2_9B_L20_RES.items()]
    extra = [
        _gemma_scope("9b", "res", 19, "16k", 67),
        _gemma_scope("9b", "mlp", 20, "16k", 41),
        _gemma_scope("9b", "res", 20, "16k", 68, name="L20-res-16k-l0_68"),
    ]
    return _paper_study(
        "paper-gemma-2-9b",
        "google/gemma-2-9b",
        "bf16",
        20,
        res + extra,
        single_sae="L20-res-16k-l0_68",
        error_sae_width=16 * 3584,
        layer_stride=4,
        harvest_batch=4,
    )


def _paper_gemma_2_2b() -> dict[str, Any]:
    """The paper's Gemma 2 2B study: layer 12 with Gemma Scope residual SAEs, 16k to 1M latents.

    Family (``google/gemma-scope-2b-pt-*``, loaded, not trained):
    - width sweep ``L12-res-{16k,32k,65k,131k,262k,524k,1m}``: ``res:layer_12/width_W/average_l0_N`` with
      N the published L0 closest to 60 (41, 76, 72, 67, 67, 65, 58); the 16k one is the target of the
      earlier-layer predictors and the MLP probe, the 1m one of the norm-probe experiment (Fig 14);
    - earlier-layer predictors (Fig 10b): ``L11-res-16k`` (L0 41) and ``L12-mlp-16k`` (mlp, L0 44); the
      attention predictor is skipped (Gemma Scope's attention SAEs read ``attn.hook_z``, not harvested);
    - ``L12-res-16k-l0_82``: the SAE of the synthetic simulation (16k, L0 closest to 100) and of the
      error-component SAEs (36,864 latents, k = 32: the paper's Fig 8 setting).
    Text: 300 x 1024 tokens of Pile (uncopyrighted), streamed with ``--online``; 200 positions skipped.
    The model runs in fp32 on CUDA; the across-layer baselines use SAEs trained here on every 2nd layer.

    Local copies (see the module docstring): ``--set model.name=GEMMA_2_2B_DIR --set text.source=PILE.jsonl
    --set family.external_root=ROOT`` with ``ROOT/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_41/
    params.npz`` and so on (``ROOT/gemma-scope-2b-pt-mlp/...`` for the mlp SAE).
    """
    res = [_gemma_scope("2b", "res", 12, w, l0) for w, l0 in GEMMA_2_2B_L12_RES.items()]
    extra = [
        _gemma_scope("2b", "res", 11, "16k", 41),
        _gemma_scope("2b", "mlp", 12, "16k", 44),
        _gemma_scope("2b", "res", 12, "16k", 82, name="L12-res-16k-l0_82"),
    ]
    return _paper_study(
        "paper-gemma-2-2b",
        "google/gemma-2-2b",
        "fp32",
        12,
        res + extra,
        single_sae="L12-res-16k-l0_82",
        error_sae_width=16 * 2304,
        layer_stride=2,
        harvest_batch=4,
    )


def _llama_scope_8b() -> dict[str, Any]:
    """Llama-3.1-8B (base) layer 15 with Llama Scope SAEs, on the paper's Pile token set.

    Family (``fnlp/Llama3_1-8B-Base-LX{R,M,A}-{8x,32x}``, loaded, not trained; TopK-trained with k = 50,
    served as JumpReLU):
    - width sweep ``L15-res-32k`` (8x) and ``L15-res-128k`` (32x), folders ``Llama3_1-8B-Base-L15R-{8x,32x}``;
      two widths, so the power-law fit is skipped; the 32k one is the target of the single-SAE experiments
      (error-component SAEs: 65,536 latents, k = 32);
    - earlier-layer predictors (Fig 10b): ``L14-res-32k``, ``L15-mlp-32k`` and ``L15-attn-32k`` (Llama
      Scope's attention SAEs read ``hook_attn_out``, so all three predictors run).
    The model runs in bf16 on CUDA; the across-layer baselines use SAEs trained here on every 4th layer.

    Local copies (see the module docstring): ``--set model.name=LLAMA_DIR --set text.source=PILE.jsonl
    --set family.external_root=ROOT`` with ``ROOT/Llama3_1-8B-Base-LXR-8x/Llama3_1-8B-Base-L15R-8x/
    {hyperparams.json,checkpoints/final.safetensors}`` and so on.
    """
    external = [
        _llama_scope("res", 15, "8x"),
        _llama_scope("res", 15, "32x"),
        _llama_scope("res", 14, "8x"),
        _llama_scope("mlp", 15, "8x"),
        _llama_scope("attn", 15, "8x"),
    ]
    return _paper_study(
        "llama-scope-8b",
        "meta-llama/Llama-3.1-8B",
        "bf16",
        15,
        external,
        single_sae="L15-res-32k",
        error_sae_width=16 * 4096,
        layer_stride=4,
        harvest_batch=8,
    )


PRESETS = {
    "demo": _demo,
    "tiny": _tiny,
    "paper-gemma-2-2b": _paper_gemma_2_2b,
    "paper-gemma-2-9b": _paper_gemma_2_9b,
    "llama-scope-8b": _llama_scope_8b,
}


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
