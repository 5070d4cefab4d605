"""The ``family`` section: the SAE family trained here, or loaded from files or SAELens release ids."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from darkmatter.config.types import PositiveInt, SAEFormatName, SAEKind, SafeName, SiteName
from darkmatter.errors import ConfigError
from darkmatter.sae import releases
from darkmatter.sae.releases import ReleaseSAE
from darkmatter.sae.train import SAESpec, TrainConfig


class ExternalSAE(BaseModel):
    """An SAE loaded from disk (or the hub when online) instead of being trained: by ``path``, or by its
    SAELens name (``release`` + ``sae_id``, see ``darkmatter.sae.releases``)."""

    model_config = ConfigDict(extra="forbid")
    name: SafeName = Field(description="Name used in results, figures and file names.")
    path: str | None = Field(
        None, description="Local folder/file, or a hub 'repo_id:subfolder'; or give release and sae_id."
    )
    release: str | None = Field(
        None, description="SAELens release, e.g. gemma-scope-2b-pt-res-canonical (with sae_id, not path)."
    )
    sae_id: str | None = Field(None, description="SAE id in the release, e.g. layer_12/width_16k/canonical.")
    format: SAEFormatName | None = Field(None, description="Format name; auto-detected when empty.")
    hookpoint: str | None = Field(None, description="Sub-folder for multi-hookpoint sparsify folders.")
    site: SiteName | None = Field(None, description="Hook site; overrides what the SAE's config says.")
    _local: str | None = PrivateAttr(None)  # a release's local copy named by external_paths / external_root

    @model_validator(mode="after")
    def _one_form(self) -> ExternalSAE:
        named = self.release is not None or self.sae_id is not None
        if self.path is not None and named:
            raise ValueError(
                f"external SAE {self.name!r} gives both path and release/sae_id; give one of the two forms"
            )
        if self.path is None and not (self.release and self.sae_id):
            raise ValueError(
                f"external SAE {self.name!r} needs path, or release and sae_id together (e.g. release="
                "'gemma-scope-2b-pt-res-canonical', sae_id='layer_12/width_16k/canonical')"
            )
        if named:
            try:
                self.named()
            except ConfigError as err:
                raise ValueError(str(err)) from None
        return self

    @model_serializer(mode="wrap")
    def _dump_one_form(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Leave out the unused form's empty fields, so path-form entries dump (and hash) as before."""
        data: dict[str, Any] = handler(self)
        for key in ("path", "release", "sae_id"):
            if data.get(key, "") is None:
                del data[key]
        return data

    def named(self) -> ReleaseSAE | None:
        """The release entry this SAE is named by (None for the path form)."""
        if self.release is None or self.sae_id is None:
            return None
        return releases.resolve(self.release, self.sae_id)

    @property
    def location(self) -> str:
        """Where to load it from: the path (or, for a release, its local copy from external_paths or
        external_root, else ``repo:folder``), replaced by the Hugging Face cache's copy of a hub path."""
        named = self.named()
        spec = self.path or self._local or (named.hub_spec if named else "")
        return releases.local_path(spec)


_HUB_SUBFOLDER = re.compile(r"^[A-Za-z0-9][\w.-]*/(?P<repo>[\w.-]+):(?P<sub>.+)$")


class FamilyConfig(BaseModel):
    """The SAE family under study: trained here (default) or loaded (``external``)."""

    model_config = ConfigDict(extra="forbid")
    kind: SAEKind = Field(
        "topk", description="Activation of trained SAEs: topk, batchtopk or jumprelu (k: its target mean L0)."
    )
    widths: list[PositiveInt] = Field(
        min_length=1, default_factory=lambda: [512, 1024, 2048, 4096], description="Width sweep at k."
    )
    k: int = Field(32, ge=1, description="k of the width sweep.")
    ks: list[PositiveInt] = Field(
        default_factory=lambda: [8, 16, 64], description="Extra k values at width_for_ks."
    )
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
        "'owner/repo:subfolder' (or release naming one) is read from <external_root>/repo/subfolder instead.",
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
            named = e.named()
            spec = named.hub_spec if named else e.path
            local = paths.get(e.name)
            if local is None and self.external_root and spec and (m := _HUB_SUBFOLDER.match(spec)):
                local = str(Path(self.external_root).expanduser() / m.group("repo") / m.group("sub"))
            if local is not None and named:
                e._local = local
            elif local is not None:
                e.path = local
        return self

    def specs(self, layer: int) -> list[SAESpec]:
        """The trained family: a width sweep at ``k``, a k sweep at ``width_for_ks``, auxiliary sites."""
        main = f"blocks.{layer}.hook_resid_post"
        pairs = [(w, self.k) for w in self.widths] + [(self.width_for_ks, k) for k in self.ks]
        seen: list[tuple[int, int]] = []
        for p in pairs:
            if p not in seen:
                seen.append(p)
        kind = self.kind
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
