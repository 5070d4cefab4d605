"""Which SAE of the family plays which part in the experiments, decided once per study."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from darkmatter.config.schema import StudyConfig
from darkmatter.errors import ConfigError
from darkmatter.sae.model import SAE
from darkmatter.study.family_saes import SAEShape, shape_of


@dataclass(frozen=True)
class FamilyRoles:
    """The SAEs of each experiment, by name.

    - ``width_sweep``: main-site SAEs at the family's k, by width (power law, pursuit, per-token, CE);
      for an external family the first main-site SAE of each width, in family order;
    - ``k_sweep``: main-site SAEs at ``width_for_ks``, by k (external: every main-site SAE, by k);
    - ``target``: the single-SAE experiments' default (synthetic, error SAEs, earlier layers): the
      main-site SAE at ``width_for_ks`` and the family's k, else the narrowest of the width sweep;
    - ``widest``: the widest SAE of the width sweep (the norm probe of Fig 14);
    - ``regressors``: SAEs at layer L−1 resid_post, L mlp_out and L attn_out (earlier-layer predictors).
    """

    main_site: str
    names: tuple[str, ...]
    width_sweep: list[str]
    k_sweep: list[str]
    target: str
    widest: str
    regressors: list[str]

    def chosen(self, name: str | None, setting: str) -> str:
        """``name`` if given (checked against the family), else ``target``."""
        if name is None:
            return self.target
        if name not in self.names:
            raise ConfigError(f"{setting} {name!r} is not in the family ({', '.join(self.names)}).")
        return name


def family_roles(cfg: StudyConfig, family: Mapping[str, SAE | SAEShape]) -> FamilyRoles:
    """The roles of the SAEs in the study ``cfg`` (a trained family has known k and widths)."""
    fam, layer, main_site = cfg.family, cfg.layer, cfg.main_site
    saes = {n: s if isinstance(s, SAEShape) else shape_of(s) for n, s in family.items()}
    main = {n: s for n, s in saes.items() if s.site == main_site}
    if fam.external:
        first_of_width: dict[int, str] = {}
        for n, s in main.items():
            first_of_width.setdefault(s.d_sae, n)
        width_sweep = sorted(first_of_width.values(), key=lambda n: main[n].d_sae)
        k_sweep = sorted(main, key=lambda n: (main[n].k or 0, n))
    else:
        width_sweep = sorted((n for n, s in main.items() if s.k == fam.k), key=lambda n: main[n].d_sae)
        k_sweep = sorted(
            (n for n, s in main.items() if s.d_sae == fam.width_for_ks),
            key=lambda n: (main[n].k or 0, n),
        )
    preferred = [n for n, s in main.items() if s.d_sae == fam.width_for_ks and s.k == fam.k]
    target = (preferred or width_sweep or list(main) or list(saes))[0]
    aux_sites = {
        f"blocks.{layer - 1}.hook_resid_post",
        f"blocks.{layer}.hook_mlp_out",
        f"blocks.{layer}.hook_attn_out",
    }
    return FamilyRoles(
        main_site=main_site,
        names=tuple(saes),
        width_sweep=width_sweep,
        k_sweep=k_sweep,
        target=target,
        widest=width_sweep[-1] if width_sweep else next(iter(saes)),
        regressors=[n for n, s in saes.items() if s.site in aux_sites],
    )
