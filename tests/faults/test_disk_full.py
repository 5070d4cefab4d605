"""A full disk at each kind of write: exit 3, one line naming the file, nothing already written changed, and
the same command resumes to the clean results once there is space.

The injected variant fails the n-th write through ``darkmatter.atomic`` whose path matches a pattern with
``OSError(ENOSPC)``, after the writer has started its temporary file. The real variant runs the study on a
small tmpfs in a private mount namespace (skipped where ``unshare``/``mount`` are not permitted): the plan
refuses it before any work; with a disk budget above the disk's size it starts and fills the disk; then the
tmpfs grows and the same command resumes.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import faultlib
import pytest
from fault_fixtures import suite_fixture, table_fixture  # noqa: F401  (the session fixtures)
from faultlib import Collector, Suite, Zygote

pytestmark = pytest.mark.slow

# (site, where the run starts, path pattern, n-th matching write, extra arguments); "clean": a finished run
SITES = [
    ("store shard", "harvest", "store/shards/", 2, ()),
    ("store manifest", "harvest", "store/manifest.json", 3, ()),
    ("store token ids", "harvest", "store/tokens.npy", 1, ()),
    ("SAE training checkpoint", "family", "saes/.training/checkpoint.pt", 1, ()),
    ("SAE weights", "family", "sae_weights.safetensors", 2, ()),
    ("error probe", "engine", "probes/", 2, ()),
    ("per-token Parquet table", "engine", "tables/tokens.parquet", 1, ()),
    ("layer-sweep store shard", "layer_sweep", "layers/store_layers/shards/", 2, ()),
    ("error-SAE weights", "error_saes", "error_saes/nonlinear/sae_weights", 1, ()),
    ("auto-interp cache", "autointerp", "autointerp-linear.json", 1, ()),
    ("result JSON over an old one", "clean", "results/pursuit.json", 1, ("--steps", "pursuit")),
    ("figure over an old one", "clean", "figures/scaling_pursuit.png", 1, ("--steps", "pursuit")),
    ("report HTML over an old one", "clean", "report.html", 1, ()),
]
MESSAGE = re.compile(r"^darkmatter: error: Disk full while writing (\S+)\. .*run the same command again")


def _changed(before: dict[str, str], out: Path, rewritten: set[str]) -> list[str]:
    """Files that existed before the failed run and changed without being atomically rewritten by it."""
    after = faultlib.digests(out)
    return [p for p, digest in before.items() if p not in rewritten and after.get(p) != digest]


@pytest.mark.parametrize(("site", "start", "pattern", "nth", "extra"), SITES, ids=[s[0] for s in SITES])
def test_disk_full_at_a_write_is_one_line_and_resumes(
    suite: Suite, table: Collector, site: str, start: str, pattern: str, nth: int, extra: tuple[str, ...]
) -> None:
    out = suite.case_dir("enospc", suite.clean if start == "clean" else suite.before(start))
    before = faultlib.digests(out)
    failed = suite.zygote.run(suite.args(out, *extra), enospc={"pattern": pattern, "nth": nth})
    match = MESSAGE.match(failed.stderr)
    path = Path(match.group(1)) if match else None
    rewritten = {str(Path(p).relative_to(out)) for p in failed.record.get("written", [])}
    changed = _changed(before, out, rewritten)
    rel = str(path.relative_to(out)) if path else ""
    existed = rel in before or rel in rewritten  # then its last complete version must still be there
    target_ok = path is not None and path.exists() == existed
    leftovers = faultlib.temporaries(out)
    resumed = suite.zygote.run(suite.args(out))
    diffs = faultlib.result_diffs(suite.want, out) if resumed.code == 0 else []
    problems = faultlib.stderr_problems(failed.stderr) + (
        [] if match and pattern in str(path) else ["no 'Disk full while writing <path>' line"]
    )
    ok = (
        (failed.code == 3 and not problems and target_ok and not changed and not leftovers)
        and resumed.code == 0
        and not diffs
        and not faultlib.temporaries(out)
    )
    table.add(
        f"ENOSPC at {site} ({pattern}, write {nth})",
        "disk full",
        "exit 3, one line naming the file, old files intact; rerun exit 0, results equal",
        f"exit {failed.code}, 'Disk full while writing {rel or '?'}'; {len(changed)} old files changed, "
        f"{len(leftovers)} .tmp; rerun exit {resumed.code}, {len(diffs)} differing values",
        ok,
    )
    assert failed.code == 3 and not problems, failed.stderr
    assert target_ok and not changed and not leftovers, (rel, changed, leftovers)
    assert resumed.code == 0, resumed.stderr[-3000:]
    assert not diffs, diffs[:10]


def _namespace_prefix(probe: Path) -> tuple[str, ...] | None:
    """A command prefix giving a private mount namespace in which tmpfs can be mounted, or None."""
    if not shutil.which("unshare") or not shutil.which("mount"):
        return None
    probe.mkdir(exist_ok=True)
    for prefix in (("unshare", "-rm"), ("unshare", "-m")):
        cmd = [*prefix, "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(probe))}"]
        try:
            if subprocess.run(cmd, capture_output=True, timeout=20, check=False).returncode == 0:
                return prefix
        except (OSError, subprocess.SubprocessError):
            continue
    return None


TMPFS_SIZES = ["40k", "300k", "800k"]  # full at the store, the SAE checkpoint, the layer sweep (roughly)


@pytest.fixture(scope="module")
def namespace_zygote(suite: Suite) -> Iterator[Zygote]:
    prefix = _namespace_prefix(suite.root / "mount-probe")
    if prefix is None:
        pytest.skip("no private mount namespace here (unshare/mount not permitted)")
    zygote = Zygote(suite.root / "ns-zygote", suite.env, prefix)
    yield zygote
    zygote.close()


@pytest.mark.parametrize("size", TMPFS_SIZES)
def test_a_real_full_tmpfs_stops_cleanly_and_resumes(
    suite: Suite, table: Collector, namespace_zygote: Zygote, size: str
) -> None:
    z, want = namespace_zygote, suite.want
    mnt, kept = suite.root / f"tmpfs-{size}", suite.root / f"tmpfs-{size}-copies"
    mnt.mkdir()
    kept.mkdir()
    out = mnt / "out"
    assert z.shell(f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(mnt))}").code == 0
    # the plan sees the free space first: the study stops before any work, naming the disk budget
    refused = z.run(suite.args(out))
    refused_ok = refused.code not in (0, 3) and "disk" in refused.stderr and not (out / "store").exists()
    # a disk budget larger than the disk lets it start, so the disk fills during a write
    over = ("--set", "resources.disk_gb=1")
    failed = z.run(suite.args(out, *over))
    assert z.shell(f"cp -a {shlex.quote(str(out))} {shlex.quote(str(kept / 'failed'))}").code == 0
    assert z.shell(f"mount -o remount,size=64m {shlex.quote(str(mnt))}").code == 0
    resumed = z.run(suite.args(out, *over))
    assert z.shell(f"cp -a {shlex.quote(str(out))} {shlex.quote(str(kept / 'final'))}").code == 0
    z.shell(f"umount {shlex.quote(str(mnt))}")
    match = MESSAGE.match(failed.stderr)
    problems = faultlib.stderr_problems(failed.stderr) + ([] if match else ["no 'Disk full' line"])
    leftovers = faultlib.temporaries(kept / "failed")
    store_ok, verify = True, None
    if (kept / "failed" / "store" / "manifest.json").exists():  # every shard listed is whole
        verify = z.run(["store", "verify", str(kept / "failed")])
        store_ok = all("incomplete" in line for line in verify.stderr.splitlines())
    diffs = faultlib.result_diffs(want, kept / "final") if resumed.code == 0 else []
    where = str(Path(match.group(1)).relative_to(out)) if match else "?"
    ok = failed.code == 3 and not problems and not leftovers and store_ok and resumed.code == 0 and not diffs
    table.add(
        f"real tmpfs of {size}: full at {where}",
        "disk full",
        "the plan refuses it before any work; with a larger disk budget: exit 3, one line naming the file, "
        "no .tmp, store verifies; rerun on 64m exit 0, results equal",
        f"plan exit {refused.code}; exit {failed.code}; {len(leftovers)} .tmp; store "
        f"{'ok' if store_ok else 'damaged'}; rerun exit {resumed.code}, {len(diffs)} differing values",
        ok and refused_ok,
    )
    assert refused_ok, (refused.code, refused.stderr[-2000:])
    assert failed.code == 3 and not problems, failed.stderr
    assert not leftovers and store_ok, (leftovers, verify and verify.stderr)
    assert resumed.code == 0, resumed.stderr[-3000:]
    assert not diffs, diffs[:10]
