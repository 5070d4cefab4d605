"""What a study will handle, settled from its config before any work: tokens, sites, the SAE family (names,
sites, widths, k) and the parts each SAE plays, as ``family_roles`` will decide them once the SAEs load."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from darkmatter.config.schema import StudyConfig
from darkmatter.study.plan.shapes import ModelDims, external_width

_L0 = re.compile(r"average_l0_(\d+)")


@dataclass(frozen=True)
class PlannedSAE:
    """One SAE of the family as the planner sees it."""

    name: str
    site: str
    d_in: int
    d_sae: int
    k: int
    width_source: str = "config"
    """'config' (trained here), 'files' (read from its files), 'path' (told by its path) or 'guess'."""


@dataclass
class StudyInputs:
    """The sizes every cost model reads."""

    cfg: StudyConfig
    dims: ModelDims
    saes: list[PlannedSAE]
    width_sweep: list[str]
    target: str
    regressors: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def d(self) -> int:
        return self.dims.d_model

    @property
    def ctx_len(self) -> int:
        return self.cfg.text.ctx_len

    @property
    def tokens(self) -> int:
        """Tokens in the store: every position of every context."""
        return self.cfg.text.n_contexts * self.cfg.text.ctx_len

    @property
    def jackknife_blocks(self) -> int:
        """Blocks the main site's moments are kept in: ``engine.interval_blocks``, at most one per shard."""
        shards = ceil_div(self.cfg.text.n_contexts, self.cfg.harvest.shard_contexts)
        return max(1, min(self.cfg.engine.interval_blocks, shards))

    @property
    def used_tokens(self) -> int:
        """Tokens the analysis reads (positions before ``skip_positions`` are left out)."""
        t = self.cfg.text
        return t.n_contexts * max(t.ctx_len - t.skip_positions, 1)

    @property
    def train_tokens(self) -> int:
        return int(self.used_tokens * self.cfg.train_fraction)

    @property
    def test_tokens(self) -> int:
        return self.used_tokens - self.train_tokens

    def sae(self, name: str) -> PlannedSAE:
        return next(s for s in self.saes if s.name == name)

    def chosen(self, name: str | None) -> PlannedSAE:
        """``synthetic.sae`` / ``error_saes.sae`` when set (and known), else the target."""
        names = {s.name for s in self.saes}
        return self.sae(name if name in names else self.target)

    @property
    def sites(self) -> list[str]:
        return self.cfg.sites()

    @property
    def last_site_layer(self) -> int:
        from darkmatter.lm.sites import parse_site

        return max([parse_site(s).layer for s in self.sites] or [self.cfg.layer])


def family_saes(cfg: StudyConfig, dims: ModelDims) -> list[PlannedSAE]:
    """The family's SAEs: the trained specs, or the external SAEs with widths from their files or paths."""
    d = dims.d_model
    if not cfg.family.external:
        return [
            PlannedSAE(s.name, s.site, d, s.d_sae, s.k or cfg.family.k) for s in cfg.family.specs(cfg.layer)
        ]
    out = []
    for e in cfg.family.external:
        width, source = external_width(e.location, d, e.hookpoint)
        m = _L0.search(e.location)
        k = int(m.group(1)) if m else cfg.family.k
        site = e.site or cfg.main_site
        out.append(PlannedSAE(e.name, site, d, width, k, source))
    return out


def study_inputs(cfg: StudyConfig, dims: ModelDims) -> StudyInputs:
    """The family and its roles, as ``darkmatter.study.roles.family_roles`` will settle them."""
    saes = family_saes(cfg, dims)
    fam, main_site = cfg.family, cfg.main_site
    main = [s for s in saes if s.site == main_site]
    if fam.external:
        first: dict[int, PlannedSAE] = {}
        for s in main:
            first.setdefault(s.d_sae, s)
        width_sweep = [s.name for s in sorted(first.values(), key=lambda s: s.d_sae)]
    else:
        width_sweep = [s.name for s in sorted((s for s in main if s.k == fam.k), key=lambda s: s.d_sae)]
    preferred = [s.name for s in main if s.d_sae == fam.width_for_ks and s.k == fam.k]
    target = (preferred or width_sweep or [s.name for s in main] or [s.name for s in saes])[0]
    layer = cfg.layer
    aux = {
        f"blocks.{layer - 1}.hook_resid_post",
        f"blocks.{layer}.hook_mlp_out",
        f"blocks.{layer}.hook_attn_out",
    }
    regressors = [s.name for s in saes if s.site in aux]
    notes = []
    if dims.source == "table":
        notes.append(
            f"model dimensions of {cfg.model.name!r} from the planner's table (its config file is not on "
            "disk)"
        )
    told = [s.name for s in saes if s.width_source in ("path", "guess")]
    if told:
        notes.append(
            f"{len(told)} external SAE width(s) from their paths (files not on disk): "
            + ", ".join(f"{s.name}={s.d_sae:,}" for s in saes if s.name in told[:3])
            + (", ..." if len(told) > 3 else "")
        )
    return StudyInputs(cfg, dims, saes, width_sweep, target, regressors, notes)


def ceil_div(a: int, b: int) -> int:
    return -(-a // max(b, 1))


def log2(x: float) -> float:
    return math.log2(max(x, 1.0))
