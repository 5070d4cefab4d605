"""The study's configuration schema: one validated section per part of the study.

Every closed set of values is a ``Literal`` (or a pattern), so a typo is an error at load time, never a
silent fallback. Each step's output records the hash of the sections it depends on (see ``section_hash``),
so ``darkmatter run`` skips finished steps and redoes changed ones.

Local copies of hub files (for offline runs of the paper presets):
- ``--set model.name=DIR``: a local Hugging Face model folder (config.json, weights, tokenizer).
- ``--set text.source=PATH``: a .jsonl file (one ``{"text": ...}`` per line; .jsonl.gz and .jsonl.zst too),
  a folder of them, or plain text (see ``darkmatter.text``).
- ``--set family.external_root=DIR``: an external SAE ``owner/repo:sub/folder`` (or a SAELens release id
  naming that folder) is read from ``DIR/repo/sub/folder`` (the layout of a hub download into ``DIR/repo``).
  Without it, a copy in the Hugging Face cache is used when there is one.
- ``--set family.external_paths.NAME=PATH``: one SAE, by name, from anywhere; wins over the root.
- ``--set 'family.external_only=["NAME", ...]'``: load only some of the SAEs (e.g. leave out the widest).
Offline (no ``--online``), a study that still names something to download stops with an error listing it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    model_validator,
)

from darkmatter.config.family import ExternalSAE, FamilyConfig
from darkmatter.config.types import (
    DEVICE_PATTERN,
    SAFE_NAME,
    Dtype,
    ErrorComponent,
    NonNegativeInt,
    PositiveInt,
    SAEFormatName,
    SAEKind,
    SafeName,
    SiteName,
)
from darkmatter.errors import ConfigError
from darkmatter.harvest import HarvestConfig
from darkmatter.hashing import stable_hash
from darkmatter.lm.discover import HookModules
from darkmatter.sae.train import TrainConfig
from darkmatter.sae.train_logs import LoggingConfig
from darkmatter.stats.split import Split
from darkmatter.text import TextConfig

__all__ = [
    "DEVICE_PATTERN",
    "SAFE_NAME",
    "Dtype",
    "ErrorComponent",
    "ExternalSAE",
    "FamilyConfig",
    "NonNegativeInt",
    "PositiveInt",
    "SAEFormatName",
    "SAEKind",
    "SafeName",
    "SiteName",
    "StudyConfig",
]


class ModelConfig(BaseModel):
    """Which language model to run, where, and in what precision."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    name: str = Field(
        "embedded", description="'embedded' (SmolLM2-135M-Instruct), a .gguf file, a folder or a hub id."
    )
    device: str = Field("auto", pattern=DEVICE_PATTERN, description="auto, cpu, cuda, cuda:N or mps.")
    dtype: Dtype = Field("fp32", description="Weights and compute precision: fp32, bf16 or fp16.")
    online: bool = Field(False, description="Allow downloads from the Hugging Face hub.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub (off unless asked).")
    hook_modules: HookModules = Field(default_factory=HookModules, description="Modules discovery misses.")


class EngineConfig(BaseModel):
    """The engine's two passes over the store (error prediction, Figs 1-6, 14)."""

    model_config = ConfigDict(extra="forbid")
    interval_blocks: int = Field(
        8,
        ge=0,
        description="Blocks of whole shards for the delete-one-block jackknife intervals of the main site's "
        "numbers (probes refitted per replicate); 0 or fewer than 3 shards: no intervals. Memory grows "
        "with the blocks.",
    )
    power_law_boot: int = Field(
        200, ge=10, description="Context resamples of the scaling law's bootstrap (one refit each)."
    )


class LayerSweepConfig(BaseModel):
    """One small SAE per layer for the across-layer experiments (paper Figs 3 and 13)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="Run the layer sweep.")
    layers: list[NonNegativeInt] = Field(
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
    kind: Literal["topk", "batchtopk"] = Field(
        "batchtopk", description="batchtopk gives a per-token L0 for the L0 baseline; or topk."
    )
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
    sae: SafeName | None = Field(None, description="SAE name; default: the k-sweep width at the family's k.")
    n_tokens: int = Field(20_000, ge=100, description="Tokens of x' = Sae(x) to simulate with.")
    random_control: bool = Field(True, description="Also run the App. D control on random directions.")


class PursuitConfig(BaseModel):
    """Gradient pursuit over the width sweep's decoders (paper §6.1, Figs 1 and 10a)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="Run gradient pursuit.")
    n_contexts: int = Field(
        32, ge=1, description="Contexts (from the start of the store) pursued; pursuit is costly."
    )


class DownstreamCEConfig(BaseModel):
    """Downstream cross-entropy with spliced reconstructions (paper Figs 8/9) on held-out contexts."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="Run the splices.")
    n_contexts: int = Field(
        8,
        ge=1,
        description="Held-out contexts (never harvested) for the CE splices; also used by the "
        "earlier-layer step's joint-map CE.",
    )


class EarlierLayersConfig(BaseModel):
    """Error components regressed on earlier SAEs' outputs (Figs 9b/10b), the joint map's CE, an MLP probe."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="Run the earlier-layer predictors and the MLP probe.")
    mlp_hidden: int = Field(256, ge=1, description="Hidden width of the MLP probe.")
    mlp_epochs: int = Field(4, ge=1, description="Epochs of the MLP probe over the train split.")
    ce_contexts: int | None = Field(
        None,
        ge=1,
        description="Held-out contexts for the joint map's CE (the first of downstream_ce's); None: as many "
        "as downstream_ce.n_contexts.",
    )


class InterpConfig(BaseModel):
    """Auto-interpretability of the error-component SAEs' latents (paper Fig 8)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="Explain and score latents.")
    judge: Literal["local", "endpoint", "none"] = Field(
        "local",
        description="'local' (an in-process model), 'endpoint' (OpenAI-compatible chat API) or 'none'.",
    )
    local_model: str = Field(
        "embedded", description="Judge model for 'local': 'embedded' (SmolLM2-135M-Instruct) or a folder."
    )
    local_dtype: Dtype | None = Field(
        None, description="'local': the judge's precision; empty: the study model's (bf16: faster on CPU)."
    )
    constrained: bool = Field(
        True, description="'local': decode detection answers under a 0/1 constraint (they always parse)."
    )
    endpoint_url: str | None = Field(
        None, description="Base URL for 'endpoint', e.g. http://127.0.0.1:8000/v1."
    )
    endpoint_model: str | None = Field(None, description="Model name the endpoint serves.")
    timeout: float = Field(120.0, gt=0, description="Seconds per endpoint request.")
    retries: int = Field(3, ge=0, description="Endpoint retries before giving up.")
    concurrency: int = Field(
        8, ge=1, description="'endpoint': latents scored at a time (same results); 'local': one at a time."
    )
    n_latents: int = Field(4, ge=1, description="Latents scored per error SAE (chosen at random, seeded).")
    latents: list[NonNegativeInt] = Field(
        default_factory=list, description="Score these latents instead of a sample."
    )
    sae_latents: int = Field(
        2,
        ge=0,
        description="Also explain and score this many latents of the split SAE itself (seeded sample), "
        "shown beside the error SAEs' in the report's latent cards; 0: none.",
    )
    min_activations: int = Field(20, ge=1, description="Skip latents active on fewer tokens.")
    window: int = Field(16, ge=2, description="Tokens per example window.")
    n_examples_explain: int = Field(8, ge=1, description="Top examples shown to the explainer.")
    explain_max_tokens: int = Field(40, ge=1, description="Longest explanation the judge may write.")
    n_per_decile: int = Field(1, ge=1, description="Test examples per activation decile.")
    n_negatives: int = Field(4, ge=1, description="Non-activating test examples per latent.")
    batch_size: int = Field(7, ge=1, description="Examples per detection (and fuzzing) prompt.")
    fuzzing: bool = Field(
        True, description="Also score by fuzzing (marked tokens: the latent's or random); extra requests."
    )


class ErrorSAEsConfig(BaseModel):
    """TopK SAEs trained on LinearError and NonlinearError of one SAE (paper Figs 7/8)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="Train the error-component SAEs.")
    sae: SafeName | None = Field(
        None, description="SAE whose error is split; default: as for the synthetic step."
    )
    components: list[ErrorComponent] = Field(
        default_factory=lambda: list[ErrorComponent](["linear", "nonlinear"]),
        description="linear, nonlinear and/or error.",
    )
    d_sae: int | None = Field(None, ge=1, description="Width; default: the chosen SAE's width.")
    k: int | None = Field(None, ge=1, description="k; default: the chosen SAE's k (or the family's k).")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=4, batch_size=512, lr=1e-3, dead_tokens=5000)
    )
    interp: InterpConfig = Field(default_factory=InterpConfig)


class AnalysisConfig(BaseModel):
    """Where the analysis steps compute, and the precision SAEs run in there."""

    model_config = ConfigDict(extra="forbid")
    device: str | None = Field(
        None,
        pattern=DEVICE_PATTERN,
        description="Device of every step's tensors (SAEs, batches, accumulators, training); empty: "
        "model.device.",
    )
    sae_dtype: Dtype = Field(
        "fp32",
        description="Precision of the SAEs' weights on the device (bf16/fp16: faster encoder GEMMs); "
        "moments stay float64.",
    )


class ResourcesConfig(BaseModel):
    """Memory and disk a study may use: SAEs are streamed in groups that fit, and `darkmatter run` stops
    before any work when the plan cannot fit. Not part of any result (streamed results equal
    all-at-once results)."""

    model_config = ConfigDict(extra="forbid")
    device_memory_gb: float | None = Field(
        None, gt=0, description="Accelerator memory budget in GB; empty: 90% of the device's memory."
    )
    host_memory_gb: float | None = Field(
        None, gt=0, description="Host memory budget in GB; empty: 80% of the memory available at start."
    )
    disk_gb: float | None = Field(
        None, gt=0, description="Disk budget for the run folder in GB; empty: the free space there."
    )
    sae_memory_gb: float | None = Field(
        None,
        gt=0,
        description="Device memory in GB for the SAEs a step holds at once (weights, their moments and "
        "scratch); empty: the device budget less the step's fixed part. Smaller: more groups, more passes.",
    )


class ReportConfig(BaseModel):
    """The report stage: figures drawn from the results, then the HTML page."""

    model_config = ConfigDict(extra="forbid")
    formats: list[Literal["png", "pdf"]] = Field(
        default_factory=lambda: list[Literal["png", "pdf"]](["png", "pdf"]),
        min_length=1,
        description="Figure files written: png (embedded in the report) and/or pdf (for papers).",
    )
    dpi: int = Field(150, ge=10, le=1200, description="Resolution of the PNG figures.")


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
    engine: EngineConfig = Field(default_factory=EngineConfig)
    layer_sweep: LayerSweepConfig = Field(default_factory=LayerSweepConfig)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    pursuit: PursuitConfig = Field(default_factory=PursuitConfig)
    downstream_ce: DownstreamCEConfig = Field(default_factory=DownstreamCEConfig)
    earlier_layers: EarlierLayersConfig = Field(default_factory=EarlierLayersConfig)
    error_saes: ErrorSAEsConfig = Field(default_factory=ErrorSAEsConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    logging: LoggingConfig = Field(
        default_factory=LoggingConfig,
        description="TensorBoard / W&B logs of SAE training under the run folder's logs/; part of no result.",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed_sections(cls, data: Any) -> Any:
        if isinstance(data, dict) and "nonlinear" in data:
            raise ValueError(
                "the 'nonlinear' section was split: use downstream_ce.n_contexts (was ce_contexts) and "
                "earlier_layers.mlp_hidden / earlier_layers.mlp_epochs"
            )
        return data

    @property
    def split(self) -> Split:
        """The train/test split of tokens every step shares."""
        return Split(self.split_seed, self.train_fraction)

    @property
    def analysis_device(self) -> str:
        """The device name every analysis step computes on: ``analysis.device``, else ``model.device``."""
        return self.analysis.device or self.model.device

    def train_device(self, train: TrainConfig) -> str:
        """Where an SAE trainer runs: its own ``device`` if set, else the analysis device."""
        return train.device or self.analysis_device

    @property
    def main_site(self) -> str:
        """The hook site of the SAE family under study: ``blocks.{layer}.hook_resid_post``."""
        return f"blocks.{self.layer}.hook_resid_post"

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
        saes = [e for e in self.family.external if not Path(e.location).expanduser().exists()]
        if saes:
            missing.append(
                f"{len(saes)} of family.external ({', '.join(repr(e.location) for e in saes[:2])}"
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
            "<repo name>/<subfolder> folders) or --set family.external_paths.NAME=DIR; a copy in the "
            "Hugging Face cache is found without either."
        )

    def section(self, name: str) -> Any:
        """A section (or top-level value) as plain JSON-able data; dotted names reach into sections.

        A section's ``enabled`` flag is left out: whether a step runs is not part of what it computes, so
        turning a step off and on again keeps its result.
        """
        value: Any = self
        for part in name.split("."):
            value = getattr(value, part)
        if isinstance(value, BaseModel):
            unused = isinstance(value, ModelConfig) and not value.hook_modules.given()  # earlier hashes stay
            return value.model_dump(mode="json", exclude={"enabled", *(["hook_modules"] if unused else [])})
        return value

    def section_hash(self, *sections: str) -> str:
        """Hash of the named sections (for step skipping)."""
        return stable_hash({s: self.section(s) for s in sections})
