"""The dark-matter engine: two streaming passes over the store for every SAE of a family.

1. ``error_moments``: float64 moments of x against each SAE's error e = x − Sae(x) and its norms, per site
   and split, with held-out reconstruction metrics and per-context sums for bootstraps;
2. ``fits``: the error probes b* fitted on the train split and evaluated exactly on the test split
   (vector R², FVU_nonlinear, norm R²);
3. ``component_norms``: b* applied to every token, splitting e into LinearError and NonlinearError, for
   the norm-prediction test, the per-token norm Grams and the per-token table.
Memory is O(d² · SAEs) whatever the number of tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from darkmatter.errors import DataError
from darkmatter.experiments.decomposition.component_norms import ComponentNorms
from darkmatter.experiments.decomposition.error_moments import accumulate_error_moments
from darkmatter.experiments.decomposition.fits import fit_error_probes, jackknife_error_stats
from darkmatter.experiments.decomposition.gram import ols_from_gram
from darkmatter.experiments.decomposition.outputs import (
    NORM_TEST_QUANTITIES,
    ContextSums,
    Decomposition,
    NormGram,
    Probe,
    SAEStats,
)
from darkmatter.experiments.decomposition.plan import RECONSTRUCT_CHUNK, EnginePlan
from darkmatter.experiments.decomposition.spill import GroupSpill, merge_spills, spill_folder
from darkmatter.experiments.decomposition.table import finish_table, prepare_table, table_part
from darkmatter.progress import Progress
from darkmatter.ranks import SINGLE, Ranks
from darkmatter.sae.model import SAE
from darkmatter.stats.split import Split
from darkmatter.store import ActivationStore

__all__ = [
    "NORM_TEST_QUANTITIES",
    "RECONSTRUCT_CHUNK",
    "ContextSums",
    "Decomposition",
    "NormGram",
    "Probe",
    "SAEStats",
    "decompose",
    "ols_from_gram",
]


def decompose(
    store: ActivationStore,
    saes: Mapping[str, SAE],
    *,
    split: Split,
    batch_tokens: int | None = None,
    device: str | torch.device = "cpu",
    table_path: Path | None = None,
    second_pass: bool = True,
    contexts: np.ndarray | None = None,
    progress: Progress | None = None,
    interval_site: str | None = None,
    interval_blocks: int = 8,
    groups: Sequence[Sequence[str]] | None = None,
    release: Callable[[Sequence[str]], None] | None = None,
    ranks: Ranks = SINGLE,
) -> Decomposition:
    """Run both passes for every SAE (``second_pass=False``: probes and FVU_nonlinear only).

    ``contexts`` restricts everything to a subset of context indices (for costly reconstructions);
    ``progress`` gets (tokens done, tokens of every pass, tokens/s). ``batch_tokens`` defaults to 1024
    on the CPU (smaller temporaries: at 4 SAEs, peak RSS ~130 MiB lower than with 4096, at the same
    speed) and 8192 on an accelerator. ``interval_site``: keep that site's moments in ``interval_blocks``
    blocks of whole shards and add delete-one-block jackknife intervals to its SAEs' statistics (memory
    grows with the blocks: about ``2·blocks·(d + 1)·(d + 1 + 3·d·SAEs)`` float64 values).

    ``groups``: the SAEs (names of ``saes``, each once) in groups that each get their own passes, so only
    one group's SAEs and moments are held at a time (``saes`` may load lazily; ``release(group)`` is called
    after each). Every result equals the one-group run: per-SAE sums do not depend on the other SAEs, and
    what mixes SAEs (the norm Grams, the per-token table) is built from every group's per-token values on
    disk (``spill``) with the same operations on the same batches.

    ``ranks``: under ``torchrun`` every rank (each must call this) passes over its share of the shards, the
    sums meet after each pass, and each rank writes its rows as one part of the table (``table_part``).
    """
    if batch_tokens is None:
        batch_tokens = 1024 if torch.device(device).type == "cpu" else 8192
    order = [list(g) for g in groups] if groups is not None else [list(saes)]
    flat = [n for g in order for n in g]
    if not flat:
        raise DataError("decompose needs at least one SAE.")
    if len(set(flat)) != len(flat) or any(n not in saes for n in flat):
        raise DataError(f"decompose: groups must name each SAE once, found {order}.")
    total_groups = len(order)
    parts: list[_GroupResult] = []
    if table_path is not None and second_pass:
        prepare_table(table_path, ranks)
    with spill_folder(table_path) as scratch:
        for g, names in enumerate(order):
            members = {n: saes[n] for n in names}
            sites = {s.cfg.hook_site for s in members.values()}
            plan = EnginePlan(
                store,
                members,
                split,
                batch_tokens,
                str(device),
                contexts,
                passes=2 if second_pass else 1,
                progress=_offset(progress, g, total_groups),
                interval_site=interval_site if interval_site in sites else None,
                interval_blocks=interval_blocks,
                ranks=ranks,
            )
            spill = (
                GroupSpill(scratch / f"group{g}", plan.groups, plan.tokens_per_pass, with_meta=g == 0)
                if second_pass
                else None
            )
            parts.append(_decompose_group(plan, spill))
            del members, plan
            if release is not None:
                release(names)
        if interval_site is not None and not any(interval_site in p.contexts for p in parts):
            raise DataError(f"interval_site {interval_site!r} is not a site of the SAEs.")
        grams: dict[str, NormGram] = {}
        if second_pass:
            spills = [p.spill for p in parts if p.spill is not None]
            grams = _grams_and_table(spills, _blocks_by_site(parts), table_path, flat, ranks)
    return _merged(parts, grams, table_path if second_pass else None)


def _grams_and_table(
    spills: list[GroupSpill], blocks: dict[str, int], table: Path | None, order: list[str], ranks: Ranks
) -> dict[str, NormGram]:
    """The norm Grams (summed across ranks) and this rank's part of the per-token table."""
    grams = merge_spills(spills, blocks, None if table is None else table_part(table, ranks), order)
    ranks.sum_(
        torch.from_numpy(m)  # in place, through the shared memory
        for g in grams.values()
        for m in [g.train, g.test, *(x for pair in g.blocks for x in pair)]
    )
    if table is not None:
        finish_table(table, ranks)
    return grams


@dataclass
class _GroupResult:
    stats: dict[str, SAEStats]
    contexts: dict[str, ContextSums]
    probes: dict[str, Probe]
    n_train: int
    n_test: int
    blocks: dict[str, int]
    spill: GroupSpill | None


def _merged(parts: Sequence[_GroupResult], grams: dict[str, NormGram], table: Path | None) -> Decomposition:
    """The groups' results as one: per-SAE entries joined, per-site sums of x taken from the first group
    that read the site (every group computes them identically)."""
    contexts_by_site: dict[str, ContextSums] = {}
    for p in parts:
        for site, sums in p.contexts.items():
            if site not in contexts_by_site:
                contexts_by_site[site] = sums
            else:
                contexts_by_site[site].sse.update(sums.sse)
                contexts_by_site[site].sse_nonlinear.update(sums.sse_nonlinear)
    return Decomposition(
        stats={n: s for p in parts for n, s in p.stats.items()},
        contexts=contexts_by_site,
        norm_grams=grams,
        n_train=parts[0].n_train,
        n_test=parts[0].n_test,
        probes={n: pr for p in parts for n, pr in p.probes.items()},
        table=table,
    )


def _decompose_group(plan: EnginePlan, spill: GroupSpill | None) -> _GroupResult:
    """Both passes for one group's SAEs."""
    stats = {n: SAEStats(n, str(s.cfg.hook_site), s.cfg.d_sae, s.cfg.k) for n, s in plan.saes.items()}
    sums = accumulate_error_moments(plan)
    probes = fit_error_probes(plan, sums, stats)
    jackknife_error_stats(plan, sums, stats)
    n_train, n_test = sums.n_train, sums.n_test
    contexts_by_site = sums.contexts
    del sums  # pass 1's moments: O(d²) per SAE, freed before pass 2 allocates its own
    if spill is not None:
        norms = ComponentNorms(plan, probes, contexts_by_site)
        norms.run(spill)
        norms.finish(stats, n_test)
        spill.close()
    return _GroupResult(
        stats,
        {site: acc.freeze() for site, acc in contexts_by_site.items()},
        probes,
        n_train,
        n_test,
        {site: plan.blocks(site) for site in plan.groups},
        spill,
    )


def _blocks_by_site(parts: Sequence[_GroupResult]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in parts:
        out.update(p.blocks)
    return out


def _offset(progress: Progress | None, group: int, groups: int) -> Progress | None:
    """``progress`` for one of ``groups`` groups: done and total counted over every group."""
    if progress is None or groups == 1:
        return progress
    inner = progress

    def update(done: int, total: int, rate: float) -> None:
        inner(group * total + done, groups * total, rate)

    return update
