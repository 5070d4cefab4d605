"""Shared machinery of the fault-injection suite: a fork server, fault hooks, result comparison, the table.

Every run of the study goes through a *zygote*: one Python process that imports darkmatter, torch,
transformers, matplotlib and pyarrow once and then forks a fresh child per run, so a run costs its own work
and not the seconds of imports. A child runs ``darkmatter.cli.main(argv)`` with its stdout and stderr in
files, after installing the faults a request asks for:

- ``kill``: SIGKILL itself at the n-th *event* of a stage (a step, or ``report``). Events are counted
  per stage from step progress, not wall time: each atomic commit (before and after the rename of a
  ``.NAME.*.tmp`` file onto its target) and each progress callback of the step's loops.
- ``kill_at_rename``: SIGKILL itself at the n-th rename (``Path.replace``/``Path.rename``) whose target
  contains a pattern, before or after performing it.
- ``hold``: at such an event, create a marker file and wait until a gate file appears.
- ``enospc``: the n-th write through ``darkmatter.atomic`` whose path contains a pattern fails with
  ``OSError(ENOSPC)`` after the writer has started (a partial temporary file exists), as a full disk would.
- ``record``: write the number of events per stage and every file committed to a JSON file.
- ``snapshots``: after each step, copy the run folder to ``snapshots/<step>``.

The zygote does no computation before forking, so no thread pool is ever copied into a child.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from darkmatter.study.steps import STEPS

FAULTS = Path(__file__).resolve().parent
TESTS = FAULTS.parent
REPO = TESTS.parent
STAGES = (*(step.name for step in STEPS), "report")
"""The study's steps in run order, then the report stage."""
LOCK = ".darkmatter.lock"
WORDS = [  # the words of tests/conftest.py's corpus_file
    *("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"),
    *("while", "seven", "wizards", "quietly", "hex", "jovial", "bankers"),
]


# -- the tiny study ---------------------------------------------------------------------------------------
def _tests_conftest() -> Any:
    """``tests/conftest.py`` loaded under a private name (a ``conftest`` in this folder may shadow it)."""
    name = "_darkmatter_tests_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TESTS / "conftest.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def write_corpus(path: Path) -> Path:
    """The text of ``tests/conftest.py``'s ``corpus_file`` (800 seeded words) at ``path``."""
    import torch

    rng = torch.Generator().manual_seed(0)
    path.write_text(" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (800,), generator=rng)))
    return path


def study_args(out: Path, model_dir: Path, corpus: Path, *extra: str) -> list[str]:
    """``run --out OUT --quiet`` with the tiny study's overrides (PNG figures only, to keep it fast)."""
    items = [*_tests_conftest().tiny_study_overrides(model_dir, corpus), 'report.formats=["png"]']
    return ["run", "--out", str(out), "--quiet", *[a for item in items for a in ("--set", item)], *extra]


# -- comparing runs ---------------------------------------------------------------------------------------
def results(out: Path) -> dict[str, Any]:
    """Every result JSON of a run folder, timings and provenance left out (an unreadable one as a string)."""
    found: dict[str, Any] = {}
    for p in sorted((out / "results").glob("*.json")):
        try:
            found[p.stem] = _tests_conftest().strip_volatile(json.loads(p.read_text()))
        except (ValueError, UnicodeDecodeError) as exc:
            found[p.stem] = f"unreadable: {exc}"
    return found


def result_diffs(want: dict[str, Any], out: Path) -> list[str]:
    """How ``out``'s results differ from ``want`` (a clean run's ``results``); empty when equal."""
    got = results(out)
    if set(got) != set(want):
        return [f"result files differ: {sorted(set(got) ^ set(want))}"]
    return [d for name in want for d in _tests_conftest().json_diffs(want[name], got[name], name)]


def temporaries(out: Path) -> list[Path]:
    """Temporary files a writer left behind."""
    return sorted(out.rglob(".*.tmp"))


def digests(out: Path) -> dict[str, str]:
    """sha256 of every file under ``out`` (the lock file left out), by relative path."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != LOCK
    }


def copy_run(src: Path | None, dst: Path) -> Path:
    """A copy of run folder ``src`` at ``dst`` (an empty folder for None), without its lock file."""
    if src is None:
        dst.mkdir(parents=True)
    else:
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(LOCK))
    return dst


def stderr_problems(err: str) -> list[str]:
    """What is wrong with a failed command's stderr: not exactly one line, a traceback, an internal error."""
    lines = err.splitlines()
    problems = [] if len(lines) == 1 and lines[0].strip() else [f"{len(lines)} lines on stderr"]
    if "Traceback" in err:
        problems.append("traceback")
    if "internal error" in err:
        problems.append("internal error")
    return problems


# -- the zygote (client side) -----------------------------------------------------------------------------
@dataclass
class Outcome:
    """How a child ended: its exit code (negative: the signal that killed it), stderr, wall seconds."""

    code: int
    stderr: str
    stdout: str
    seconds: float
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def killed(self) -> bool:
        return self.code == -signal.SIGKILL


class Zygote:
    """Client of the fork server (see the module docstring); one per test session."""

    def __init__(self, workdir: Path, env: dict[str, str], prefix: tuple[str, ...] = ()):
        """``prefix``: a command the server runs under (``unshare -rm``: its own mount namespace)."""
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.n = 0
        code = f"import sys; sys.path.insert(0, {str(FAULTS)!r}); import faultlib; faultlib.serve()"
        self._log = (workdir / "server.err").open("w")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
            cwd=workdir,
        )
        ready = self._reply(120)
        assert ready.get("ready"), ready

    def _send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def _reply(self, timeout: float) -> dict[str, Any]:
        """The next reply line (at most one is ever outstanding, so nothing waits in the read buffer)."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return {"timeout": True}
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the zygote died")
        return json.loads(line)

    def start(self, argv: list[str], **faults: Any) -> dict[str, Any]:
        """Fork a child running ``main(argv)`` with ``faults``; returns its request (with ``pid``)."""
        self.n += 1
        req = {
            "op": "start",
            "argv": argv,
            "stdout": str(self.workdir / f"{self.n}.out"),
            "stderr": str(self.workdir / f"{self.n}.err"),
            "record": str(self.workdir / f"{self.n}.json"),
            **faults,
        }
        self._send(req)
        req["pid"] = self._reply(30)["pid"]
        req["t0"] = time.perf_counter()
        return req

    def wait(self, req: dict[str, Any], timeout: float = 300) -> Outcome:
        """Wait for a started child (SIGKILLed after ``timeout`` seconds) and collect what it left."""
        self._send({"op": "wait", "pid": req["pid"]})
        reply = self._reply(timeout)
        if reply.get("timeout"):
            os.kill(req["pid"], signal.SIGKILL)
            reply = self._reply(30)
        seconds = time.perf_counter() - req["t0"]
        rec = Path(req["record"])
        record = json.loads(rec.read_text()) if rec.is_file() else {}
        return Outcome(
            int(reply["status"]),
            Path(req["stderr"]).read_text(errors="replace"),
            Path(req["stdout"]).read_text(errors="replace"),
            seconds,
            record,
        )

    def run(self, argv: list[str], timeout: float = 300, **faults: Any) -> Outcome:
        """Run ``main(argv)`` in a fresh child with ``faults`` and wait for it."""
        return self.wait(self.start(argv, **faults), timeout)

    def shell(self, command: str, timeout: float = 60) -> Outcome:
        """Run a shell command in a child (in the server's namespaces)."""
        return self.run([], timeout, shell=command)

    def close(self) -> None:
        self._log.close()
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the zygote (server side) -----------------------------------------------------------------------------
def serve() -> None:
    """The fork server's loop: ``start`` forks a child and answers its PID, ``wait`` answers its status."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot
    import pyarrow.parquet  # noqa: F401
    import transformers  # noqa: F401
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: F401

    import darkmatter.cli
    import darkmatter.report.build
    import darkmatter.runner
    import darkmatter.sae.cli  # noqa: F401

    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "wait":
            _, status = os.waitpid(req["pid"], 0)
            out.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n")
            out.flush()
            continue
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                code = _child(req)
            finally:
                os._exit(code)
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()


def _child(req: dict[str, Any]) -> int:
    """In the forked child: redirect the standard streams, install the faults, run the command."""
    import traceback

    write = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    for fd, name, flags in (
        (0, os.devnull, os.O_RDONLY),
        (1, req["stdout"], write),
        (2, req["stderr"], write),
    ):
        opened = os.open(name, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    if req.get("cwd"):
        os.chdir(req["cwd"])
    os.environ.update(req.get("env") or {})
    if req.get("shell"):
        return subprocess.run(req["shell"], shell=True, check=False).returncode
    try:
        state = _install(req)
        from darkmatter.cli import main

        code = main(req["argv"])
        sys.stdout.flush()
        sys.stderr.flush()
        Path(req["record"]).write_text(json.dumps(state.record()))
        return code
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        return 71


@dataclass
class _State:
    stage: str | None = None
    events: Counter[str] = field(default_factory=Counter)
    labels: dict[str, list[str]] = field(default_factory=dict)
    written: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        return {"events": dict(self.events), "labels": self.labels, "written": self.written}


def _install(req: dict[str, Any]) -> _State:
    """Patch the child's darkmatter: stage tracking, event counting, and the requested faults."""
    from darkmatter import atomic, runner
    from darkmatter.study import context

    state = _State()
    kill, hold, enospc, snapshots = req.get("kill"), req.get("hold"), req.get("enospc"), req.get("snapshots")

    def event(label: str) -> None:
        stage = state.stage
        if stage is None:
            return
        index = state.events[stage]
        state.events[stage] += 1
        state.labels.setdefault(stage, []).append(label)
        if kill and kill["stage"] == stage and kill["event"] == index:
            os.kill(os.getpid(), signal.SIGKILL)
        if hold and hold["stage"] == stage and hold["event"] == index:
            Path(hold["held"]).touch()
            deadline = time.monotonic() + 60
            while not Path(hold["gate"]).exists() and time.monotonic() < deadline:
                time.sleep(0.02)

    visit = runner.Runner._visit

    def visit_step(self: Any, step: Any, forced: bool, unavailable: set[str]) -> Any:
        state.stage = step.name
        outcome = visit(self, step, forced, unavailable)
        state.stage = None
        if snapshots:
            copy_run(self.ctx.paths.root, Path(snapshots) / step.name)
        return outcome

    write_report = runner.write_report

    def report(*args: Any, **kwargs: Any) -> Any:
        state.stage = "report"
        return write_report(*args, **kwargs)

    replace = Path.replace

    def commit(self: Path, target: Any) -> Any:
        atomic_tmp = self.name.startswith(".") and self.name.endswith(".tmp")
        name = "/".join(Path(target).parts[-2:])
        if atomic_tmp:
            event(f"before renaming {name}")
        done = replace(self, target)
        if atomic_tmp:
            state.written.append(str(target))
            event(f"after renaming {name}")
        return done

    def counting_progress(name: str, _unit: str = "tok") -> Any:
        return lambda done, total, _rate: event(f"progress {name!r} {done}/{total}")

    runner.Runner._visit = visit_step  # type: ignore[method-assign]
    runner.write_report = report  # type: ignore[assignment]
    Path.replace = commit  # type: ignore[method-assign]
    context.no_progress = counting_progress  # type: ignore[assignment]
    if enospc:
        _fill_disk_at(atomic, enospc["pattern"], int(enospc["nth"]))
    if req.get("kill_at_rename"):
        _kill_at_rename(**req["kill_at_rename"])
    return state


def _kill_at_rename(pattern: str, nth: int, when: str) -> None:
    """SIGKILL at the ``nth`` rename whose target contains ``pattern``, ``when`` "before" or "after" it."""
    seen = [0]

    def wrap(method: str) -> None:
        original = getattr(Path, method)

        def renaming(self: Path, target: Any) -> Any:
            hit = pattern in str(target) and seen[0] + 1 == nth
            seen[0] += pattern in str(target)
            if hit and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            done = original(self, target)
            if hit and when == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            return done

        setattr(Path, method, renaming)

    wrap("replace")
    wrap("rename")


def _fill_disk_at(atomic: Any, pattern: str, nth: int) -> None:
    """Make the ``nth`` atomic write whose path contains ``pattern`` fail as on a full disk."""
    target = atomic.target
    seen = [0]

    @contextlib.contextmanager
    def full(path: Any) -> Any:
        hit = False
        if pattern in str(path):
            seen[0] += 1
            hit = seen[0] == nth
        with target(path) as tmp:
            if hit:
                tmp.write_bytes(b"\0" * 512)  # the writer got this far before the disk filled
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
            yield tmp

    atomic.target = full


# -- the session's shared state -------------------------------------------------------------------------
class Suite:
    """One per session: the zygote, the tiny study's inputs, and (on first use) a clean reference run with a
    snapshot of its folder after each step and the number of events of each stage."""

    def __init__(self, root: Path, model_dir: Path):
        self.root = root
        self.model_dir = model_dir
        self.corpus = write_corpus(root / "corpus.txt")
        env = {k: v for k, v in os.environ.items() if k not in ("DARKMATTER_ONLINE", "DARKMATTER_DEBUG")}
        env.update(
            DARKMATTER_CACHE=str(root / "cache"),
            TOKENIZERS_PARALLELISM="false",
            MPLBACKEND="Agg",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            OMP_NUM_THREADS="1",  # tiny tensors: threads only contend with each other on a busy machine
            MKL_NUM_THREADS="1",
        )
        self.env = env
        self.zygote = Zygote(root / "zygote", env)
        self._clean: Outcome | None = None
        self._want: dict[str, Any] = {}
        self.cases = 0

    def args(self, out: Path, *extra: str) -> list[str]:
        return study_args(out, self.model_dir, self.corpus, *extra)

    @property
    def clean(self) -> Path:
        """The folder of an uninterrupted run of the tiny study."""
        if self._clean is None:
            done = self.zygote.run(self.args(self.root / "clean"), snapshots=str(self.root / "snapshots"))
            assert done.code == 0, done.stderr[-3000:]
            self._clean, self._want = done, results(self.root / "clean")
        return self.root / "clean"

    @property
    def want(self) -> dict[str, Any]:
        """The clean run's results, compared the way ``tests/test_run_resume.py`` compares them."""
        assert self.clean
        return self._want

    @property
    def events(self) -> dict[str, int]:
        """Events per stage in the clean run (each stage has some)."""
        assert self.clean and self._clean is not None
        return self._clean.record["events"]

    @property
    def labels(self) -> dict[str, list[str]]:
        """What each event of each stage was in the clean run."""
        assert self.clean and self._clean is not None
        return self._clean.record["labels"]

    def before(self, stage: str) -> Path | None:
        """The clean run's folder as it was when every stage before ``stage`` was done (None: empty)."""
        i = STAGES.index(stage)
        return None if i == 0 else self.clean.parent / "snapshots" / STAGES[i - 1]

    def case_dir(self, name: str, start: Path | None) -> Path:
        """A fresh run folder for one case, copied from ``start``."""
        self.cases += 1
        return copy_run(start, self.root / "cases" / f"{self.cases:03d}-{name}")


_SUITE: list[Suite] = []


def suite(tmp_path_factory: Any, model_dir: Path) -> Suite:
    """The session's ``Suite`` (created on first use; the zygote stops when the interpreter exits)."""
    if not _SUITE:
        import atexit

        _SUITE.append(Suite(tmp_path_factory.mktemp("faults"), model_dir))
        atexit.register(_SUITE[0].zygote.close)
    return _SUITE[0]


def collector(request: Any) -> Collector:
    """The session's row collector; the table is written when the session ends."""
    if not COLLECTOR.finalizer_added:
        COLLECTOR.finalizer_added = True
        request.session.config.add_cleanup(lambda: COLLECTOR.rows and COLLECTOR.write())
    return COLLECTOR


# -- the table --------------------------------------------------------------------------------------------
@dataclass
class Row:
    case: str
    kind: str
    expected: str
    observed: str
    ok: bool
    known: str = ""  # a known bug (the test is xfail): why

    @property
    def result(self) -> str:
        return "pass" if self.ok else f"known bug (xfail): {self.known}" if self.known else "FAIL"


@dataclass
class Collector:
    """Rows of the reliability table, gathered over the session and written as Markdown."""

    rows: list[Row] = field(default_factory=list)
    finalizer_added: bool = False

    def add(self, case: str, kind: str, expected: str, observed: str, ok: bool, known: str = "") -> bool:
        observed = re.sub(r"/\S*?/pytest-\d+/", "TMP/", observed)  # the session's temporary folders
        observed = observed.replace("|", "\\|").replace("\n", " ")
        self.rows.append(Row(case, kind, expected, observed, ok, known))
        return ok

    def count(self, kind: str) -> int:
        return sum(r.kind == kind for r in self.rows)

    def failed(self) -> list[Row]:
        """Rows that did not pass and are not known bugs."""
        return [r for r in self.rows if not r.ok and not r.known]

    def summary(self) -> str:
        disk = [r for r in self.rows if r.kind == "disk full"]
        real = sum(r.case.startswith("real tmpfs") for r in disk)
        lost = sum(not r.ok for r in self.rows if r.kind != "bad input")
        known = sum(bool(r.known) for r in self.rows)
        return (
            f"**Summary:** {self.count('bad input')} bad inputs, {self.count('kill')} kills, "
            f"{len(disk)} disk-full sites ({len(disk) - real} injected, {real} on a real tmpfs), "
            f"{self.count('corruption')} corruptions, {self.count('concurrency')} concurrent runs: "
            f"{len(self.rows)} cases, {len(self.failed())} failed, {known} known bugs (xfail); "
            f"{lost} lost or different results."
        )

    def markdown(self) -> str:
        lines = [
            "# Reliability: fault-injection results",
            "",
            "Generated by `tests/faults/` on the tiny study (a random 3-layer Llama, 12 contexts of 32 "
            "tokens).",
            "",
            "| case | kind | expected | observed | result |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [f"| {r.case} | {r.kind} | {r.expected} | {r.observed} | {r.result} |" for r in self.rows]
        return "\n".join([*lines, "", self.summary(), ""])

    def write(self) -> Path:
        folder = Path(os.environ.get("DARKMATTER_ARTIFACTS") or REPO / "artifacts")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "reliability.md"
        path.write_text(self.markdown())
        return path


COLLECTOR = Collector()
