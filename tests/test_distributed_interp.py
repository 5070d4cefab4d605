"""Auto-interp under ``torchrun``, in process: 2 gloo ranks share the latents for the judge and give the
result, the latent records and the cache of one process; a run killed part-way resumes the latents finished
on every rank; a judge that fails on one rank ends the step on both, with the error recorded by rank 0."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from darkmatter.config.schema import InterpConfig
from darkmatter.errors import EndpointError
from darkmatter.interp import LatentExamples, LocalJudge, collect_examples, run_autointerp
from darkmatter.interp.cache import LatentCache, read_cache
from darkmatter.interp.prompts import EXPLAIN_SYSTEM
from darkmatter.ranks import SINGLE, Ranks
from darkmatter.store import ActivationStore, Batch
from darkmatter.study.context import RunPaths
from darkmatter.study.steps import autointerp as step
from test_interp import COLLECT, SITE, VOCAB, D, make_store

from conftest import tiny_model, tiny_tokenizer

LATENTS = [2, 3, 5, 7, 11, 12, 15]  # 15 never fires (skipped); ranks share the other 6, 3 each
SILENT = 15
INTERP = InterpConfig(latents=LATENTS, sae_latents=3, min_activations=20, window=8, n_examples_explain=6,
                      n_per_decile=2, n_negatives=3, batch_size=4, explain_max_tokens=20)  # fmt: skip


Runs = tuple[Path, dict[str, Any], list[dict[str, Any]]]
"""The runs' folder, one process's result, and what each of the 2 ranks returned."""


class Killed(BaseException):
    """Stands for SIGKILL: unwinds past every handler, so nothing more is written."""


class HashJudge:
    """A deterministic judge: every reply is a hash of its prompt (greedy decoding is a function of the
    prompt too). ``fail_from``: the n-th latent (1-based, by explanation requests) it is asked about fails."""

    def __init__(self, fail_from: int | None = None) -> None:
        self.fail_from, self.explained = fail_from, 0

    def describe(self) -> dict[str, Any]:
        return {"kind": "fake", "model": "hash", "weak": False}

    def chat(self, messages: list[dict[str, str]], *, max_tokens: int) -> str:
        prompt = messages[-1]["content"]
        digest = hashlib.sha256(prompt.encode()).digest()
        if messages[0]["content"] == EXPLAIN_SYSTEM:
            self.explained += 1
            if self.fail_from is not None and self.explained >= self.fail_from:
                raise EndpointError("Judge endpoint http://judge.test/v1 is down (test).")
            return f"[EXPLANATION]: pattern {digest.hex()[:6]}"
        n = len(re.findall(r"^Example \d+:", prompt, flags=re.MULTILINE))
        return str([b & 1 for b in digest[:n]])


def _fires_on(latent: int) -> int:
    return VOCAB + 1 if latent == SILENT else latent % VOCAB


def _acts_fn(latents: list[int], shift: int) -> Any:
    """Latent ``l`` fires on its token, as much as one of the site's dimensions (``shift``: per component)."""

    def acts(b: Batch) -> torch.Tensor:
        x = b.acts[SITE]
        cols = [
            (b.token == _fires_on(lat)).float() * (x[:, (lat + shift) % D].abs() + 0.1) for lat in latents
        ]
        return torch.stack(cols, dim=1)

    return acts


def _patch(setattr_: Any, judge: HashJudge) -> None:
    """The step's SAEs, activations and judge replaced by the fakes above."""
    fake_sae = SimpleNamespace(cfg=SimpleNamespace(d_sae=16, hook_site=SITE))
    setattr_(step, "load_error_saes", lambda ctx: {"linear": fake_sae, "nonlinear": fake_sae})
    setattr_(step, "make_judge", lambda ctx: judge)
    shifts = {"linear": 0, "nonlinear": 1}
    setattr_(
        step, "component_activations_fn", lambda sae, probe, e, c, latents, **kw: _acts_fn(latents, shifts[c])
    )
    setattr_(step, "sae_activations_fn", lambda sae, latents: _acts_fn(latents, 2))


def _context(root: Path, store_path: Path, ranks: Ranks) -> Any:
    """What the step reads of a study context."""
    tok = SimpleNamespace(decode=lambda ids: f" w{ids[0]}")
    return SimpleNamespace(
        cfg=SimpleNamespace(seed=0, error_saes=SimpleNamespace(interp=INTERP)),
        ranks=ranks,
        paths=RunPaths(root),
        store=ActivationStore.open(store_path),
        device=torch.device("cpu"),
        sae_dtype=torch.float32,
        tokenizer=(tok, None),
        result=lambda name, cls: SimpleNamespace(sae_name="split"),
        saes={"split": SimpleNamespace(cfg=SimpleNamespace(d_sae=16, hook_site=SITE))},
        probe=lambda name: None,
        progress=lambda *args: None,
        log=lambda message: None,
    )


def _run_step(root: Path, store_path: Path, ranks: Ranks) -> dict[str, Any]:
    res = step.AutoInterpStep().run(_context(root, store_path, ranks))
    return res.model_dump(mode="json", exclude={"provenance"})


def _files(root: Path) -> dict[str, Any]:
    """The step's files under ``root``: latent records and caches, by relative path."""
    found = sorted([*root.glob("interp/*.json"), *root.glob("error_saes/*.json")])
    return {str(p.relative_to(root)): json.loads(p.read_text()) for p in found}


def _rank_main(rank: int, store_path: Path, root: Path, init: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=60))
    ranks = Ranks(rank=rank, world=2, backend="gloo")
    out: dict[str, Any] = {}
    _patch(setattr, HashJudge())
    out["fresh"] = _run_step(root / "fresh", store_path, ranks)

    # killed after each rank saved two latents of the first component, then run again
    save, saved = LatentCache.save, []

    def save_then_die(self: LatentCache, li: Any) -> None:
        save(self, li)
        saved.append(li.latent)
        if len(saved) == 2:
            raise Killed

    LatentCache.save = save_then_die  # type: ignore[method-assign]
    with contextlib.suppress(Killed):
        _run_step(root / "killed", store_path, ranks)
    LatentCache.save = save  # type: ignore[method-assign]
    ranks.barrier()
    if rank == 0:  # what the kill left, and a copy for one process to resume
        left = (root / "killed" / "error_saes").glob("*.json")
        out["left_by_kill"] = {p.name: sorted(read_cache(p)) for p in left}
        shutil.copytree(root / "killed", root / "killed-then-alone")
    ranks.barrier()
    out["resumed"] = _run_step(root / "killed", store_path, ranks)

    # the judge fails on rank 1 at its second latent
    _patch(setattr, HashJudge(fail_from=2 if rank == 1 else None))
    out["failed"] = _run_step(root / "failed", store_path, ranks)
    (root / f"rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()  # no rank leaves while another still talks to it (gloo can abort at exit otherwise)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Runs]:
    """One process's run (``one``) and the 2 ranks' runs (every rank's returned results)."""
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("interp-ranks")
    make_store(root / "store")
    init = f"file://{root / 'rendezvous'}"
    mp.spawn(_rank_main, args=(root / "store", root, init), nprocs=2, join=True)
    with pytest.MonkeyPatch.context() as mpatch:
        _patch(mpatch.setattr, HashJudge())
        one = _run_step(root / "one", root / "store", SINGLE)
    yield root, one, [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]


def _without_cached(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` as a run without a cache gives it."""
    out = json.loads(json.dumps(result))
    for scored in [*out["components"].values(), out["sae_scores"]]:
        scored["n_cached"] = 0
    return out


def test_two_ranks_score_as_one_process(runs: Runs) -> None:
    root, one, ranks = runs
    assert one["error"] is None and set(one["components"]) == {"linear", "nonlinear"}
    linear = one["components"]["linear"]
    assert [li["latent"] for li in linear["latents"]] == [2, 3, 5, 7, 11, 12] and list(linear["skipped"]) == [
        "15"
    ]
    assert 0 < linear["summary"]["balanced_accuracy"] < 1  # the hash judge is neither always right nor wrong
    assert ranks[0]["fresh"] == one  # every latent record, count, accuracy and interval, exactly
    assert ranks[1]["fresh"]["components"] == {}  # rank 1 returns a placeholder
    assert _files(root / "fresh") == _files(root / "one")  # latent records and caches, no part files left
    assert "error_saes/autointerp-linear.json" in _files(root / "one")


def test_a_killed_run_resumes_the_latents_finished_on_every_rank(
    runs: Runs,
) -> None:
    root, one, ranks = runs
    left = ranks[0]["left_by_kill"]
    assert left == {"autointerp-linear.json": [2, 3], "autointerp-linear.part-1.json": [7, 11]}
    resumed = ranks[0]["resumed"]
    assert resumed["components"]["linear"]["n_cached"] == 4
    assert resumed["components"]["nonlinear"]["n_cached"] == 0
    assert _without_cached(resumed) == one
    assert _files(root / "killed") == _files(root / "one")  # the parts are folded into the main cache
    with pytest.MonkeyPatch.context() as mpatch:  # one process resumes them alike
        _patch(mpatch.setattr, HashJudge())
        alone = _run_step(root / "killed-then-alone", root / "store", SINGLE)
    assert alone["components"]["linear"]["n_cached"] == 4 and _without_cached(alone) == one
    assert _files(root / "killed-then-alone") == _files(root / "one")


def test_a_judge_failing_on_one_rank_stops_both_and_rank_0_records_it(
    runs: Runs,
) -> None:
    root, one, ranks = runs
    failed = ranks[0]["failed"]
    assert failed["components"] == {} and failed["sae_scores"] is None
    assert "judge.test" in failed["error"] and "4 of 6 latents are finished" in failed["error"]
    assert "run again" in failed["error"]
    assert ranks[1]["failed"]["components"] == {}  # rank 1 left the step too (no collective left waiting)
    cached = _files(root / "failed")
    assert list(cached) == ["error_saes/autointerp-linear.json"]  # no part file left behind
    assert sorted(int(k) for k in cached["error_saes/autointerp-linear.json"]["latents"]) == [2, 3, 5, 7]
    # one process resumes the partial cache to the result of an uninterrupted run
    with pytest.MonkeyPatch.context() as mpatch:
        _patch(mpatch.setattr, HashJudge())
        again = _run_step(root / "failed", root / "store", SINGLE)
    assert again["error"] is None and again["components"]["linear"]["n_cached"] == 4
    assert _without_cached(again) == one


def test_a_latents_local_judge_answers_do_not_depend_on_its_rank_fellows(tmp_path: Path) -> None:
    """The local judge answers one prompt at a time, unpadded: a latent scored beside others or alone (as
    on another rank) gets the same explanation and answers."""
    store = make_store(tmp_path / "store")
    lats = [3, 7]
    examples: dict[int, LatentExamples] = collect_examples(store, _acts_fn(lats, 0), lats, **COLLECT)
    tok = tiny_tokenizer()
    judge = LocalJudge(tiny_model("llama", n_layers=1), tok)

    def decode(ids: list[int]) -> list[str]:
        return [str(t) for t in tok.convert_ids_to_tokens(ids)]

    kw: dict[str, Any] = {"seed": 0, "n_examples_explain": 1, "n_per_decile": 1, "n_negatives": 1,
                          "batch_size": 11, "explain_max_tokens": 2}  # fmt: skip
    together = run_autointerp(examples, judge, decode, **kw).latents
    alone = [run_autointerp({lat: examples[lat]}, judge, decode, **kw).latents[0] for lat in reversed(lats)]
    assert together == alone[::-1]
