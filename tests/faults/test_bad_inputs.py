"""Input a user can type, wrong in every way we could think of: each exits 2 within 5 s with one line on
stderr, no traceback and no internal error, mostly before any model is loaded.

Each case is a function of an ``Inputs`` (a fresh folder, the tiny study's arguments) returning the command
line; it runs in a forked child of the suite's zygote, with its real stderr. A few cases run again in a
fresh interpreter (``python -m darkmatter``) so the 5 s include the imports.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faultlib
import pytest
from fault_fixtures import suite_fixture, table_fixture  # noqa: F401  (the session fixtures)
from faultlib import Collector, Suite

from sae_helpers import write_saelens

pytestmark = pytest.mark.slow

LIMIT_S = 5.0


@dataclass
class Inputs:
    """What a case builds its command line from."""

    suite: Suite
    tmp: Path

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def run(self, *sets: str, extra: tuple[str, ...] = ()) -> list[str]:
        """The tiny study's ``run`` with these ``--set`` items after its own (so they win)."""
        return self.suite.args(self.out, *[a for s in sets for a in ("--set", s)], *extra)

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def folder(self, name: str, files: dict[str, str] | None = None) -> Path:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        for rel, text in (files or {}).items():
            self.file(f"{name}/{rel}", text)
        return path

    def config(self, name: str, content: str | bytes) -> list[str]:
        return self.run(extra=("--config", str(self.file(name, content))))

    def text(self, path: Path | str) -> list[str]:
        return self.run(f"text.source={path}")

    def external(self, name: str, path: Path | str, site: str = "blocks.1.hook_resid_post") -> list[str]:
        return self.run("family.external=" + json.dumps([{"name": name, "path": str(path), "site": site}]))


@dataclass(frozen=True)
class Case:
    name: str
    argv: Callable[[Inputs], list[str]]
    says: str = ""  # a piece of the one line that must be there
    code: int = 2
    xfail: str = ""  # a known bug: why


BINARY = bytes(range(256)) * 64
LATIN1 = "Elle était très fâchée; à bientôt, garçon. ".encode("latin-1") * 50
JUNK_SAE = {"cfg.json": "{not json", "sae_weights.safetensors": "garbage"}

CASES = [
    # --set overrides: unknown keys, wrong types, values out of range
    Case("unknown key", lambda i: i.run("text.bogus=1"), "Invalid configuration"),
    Case("unknown section", lambda i: i.run("nosuch.thing=1"), "Invalid configuration"),
    Case("layer not a number", lambda i: i.run("layer=abc"), "layer"),
    Case("layer negative", lambda i: i.run("layer=-1"), "layer"),
    Case("layer fractional", lambda i: i.run("layer=1.5"), "layer"),
    Case("layer beyond the model", lambda i: i.run("layer=7"), "out of range"),
    Case("zero contexts", lambda i: i.run("text.n_contexts=0"), "n_contexts"),
    Case("negative contexts", lambda i: i.run("text.n_contexts=-5"), "n_contexts"),
    Case("more contexts than the text holds", lambda i: i.run("text.n_contexts=100000"), "requested"),
    Case("context of one token", lambda i: i.run("text.ctx_len=1"), "ctx_len"),
    Case("context length not a number", lambda i: i.run("text.ctx_len=abc"), "ctx_len"),
    Case("skip every position", lambda i: i.run("text.skip_positions=40"), "skip_positions"),
    Case("unknown packing", lambda i: i.run("text.packing=zip"), "packing"),
    Case("unknown BOS mode", lambda i: i.run("text.bos=sometimes"), "bos"),
    Case("unknown device", lambda i: i.run("model.device=tpu"), "device"),
    Case("malformed CUDA device", lambda i: i.run("model.device=cuda:x"), "device"),
    Case("CUDA device that is not there", lambda i: i.run("model.device=cuda:99"), "cuda:99"),
    Case("unknown dtype", lambda i: i.run("model.dtype=fp64"), "dtype"),
    Case("unknown hook site", lambda i: i.run('harvest.sites=["blocks.1.hook_zzz"]'), "hook"),
    Case("hook site beyond the model", lambda i: i.run('harvest.sites=["blocks.9.hook_resid_post"]'), "9"),
    Case("sites not a list", lambda i: i.run("harvest.sites=notalist"), "sites"),
    Case("zero batch size", lambda i: i.run("harvest.batch_size=0"), "batch_size"),
    Case("zero shard size", lambda i: i.run("harvest.shard_contexts=0"), "shard_contexts"),
    Case("no SAE widths", lambda i: i.run("family.widths=[]"), "widths"),
    Case("SAE width zero", lambda i: i.run("family.widths=[0]"), "widths"),
    Case("k zero", lambda i: i.run("family.k=0"), "k"),
    Case("k above the width", lambda i: i.run("family.k=1000"), "k"),
    Case("zero epochs", lambda i: i.run("family.train.epochs=0"), "epochs"),
    Case("train fraction above 1", lambda i: i.run("train_fraction=1.5"), "train_fraction"),
    Case("seed not a number", lambda i: i.run("seed=abc"), "seed"),
    Case("unknown figure format", lambda i: i.run('report.formats=["svg"]'), "formats"),
    Case("override without '='", lambda i: i.run("layer"), "section.key=value"),
    Case("override without a key", lambda i: i.run("=5"), "section.key=value"),
    Case("unknown step", lambda i: i.run(extra=("--steps", "nope")), "Unknown step"),
    Case("one unknown step of two", lambda i: i.run(extra=("--steps", "harvest,bogus")), "bogus"),
    Case("unknown preset", lambda i: i.run(extra=("--preset", "nope")), "Unknown preset"),
    Case("preset that is a path", lambda i: i.run(extra=("--preset", "../../etc/passwd")), "Unknown preset"),
    # text sources
    Case("text file missing", lambda i: i.text(i.tmp / "none.txt"), "none.txt"),
    Case("text source empty string", lambda i: i.run("text.source="), "text.source"),
    Case("text file empty", lambda i: i.text(i.file("empty.txt", "")), "empty"),
    Case("text file binary", lambda i: i.text(i.file("binary.txt", BINARY)), "binary.txt"),
    Case("text file not UTF-8", lambda i: i.text(i.file("latin1.txt", LATIN1)), "UTF-8"),
    Case("text too short", lambda i: i.text(i.file("short.txt", "too short")), "short"),
    Case("text folder empty", lambda i: i.text(i.folder("emptydir")), "emptydir"),
    Case("text folder of binary files", lambda i: i.text(i.folder("bins", {"a.txt": "\0\0\0\0"})), "bins"),
    Case("JSONL malformed", lambda i: i.text(i.file("bad.jsonl", '{"text": "a"}\n{oops\n')), "bad.jsonl"),
    Case(
        "JSONL without the text field",
        lambda i: i.text(i.file("f.jsonl", '{"body": "a b c"}\n' * 50)),
        "text",
    ),
    Case("JSONL.gz not gzip", lambda i: i.text(i.file("x.jsonl.gz", "plain text")), "x.jsonl.gz"),
    Case("JSONL.gz empty", lambda i: i.text(i.file("e.jsonl.gz", gzip.compress(b""))), "e.jsonl.gz"),
    Case("unknown text extension", lambda i: i.text(i.file("data.csv", "a,b\n1,2\n")), "data.csv"),
    Case("hub dataset offline", lambda i: i.text("hf:nobody/nothing"), "online"),
    # models
    Case("model folder missing", lambda i: i.run("model.name=/no/such/model"), "/no/such/model"),
    Case("model folder empty", lambda i: i.run(f"model.name={i.folder('nomodel')}"), "nomodel"),
    Case(
        "model config garbage", lambda i: i.run(f"model.name={i.folder('m1', {'config.json': '{x'})}"), "m1"
    ),
    Case(
        "model of unknown architecture",
        lambda i: i.run(
            f"model.name={i.folder('m2', {'config.json': json.dumps({'model_type': 'nonsense'})})}"
        ),
        "m2",
    ),
    Case(
        "model name a plain file", lambda i: i.run(f"model.name={i.file('model.bin', BINARY)}"), "model.bin"
    ),
    Case("hub model offline", lambda i: i.run("model.name=nobody/no-model"), "nobody/no-model"),
    # SAEs and names
    Case("external SAE missing", lambda i: i.external("ext", i.tmp / "nosae"), "nosae"),
    Case("external SAE garbage", lambda i: i.external("ext", i.folder("junk", JUNK_SAE)), "junk"),
    Case("external SAE of another width", lambda i: i.external("ext", _small_sae(i)), "small"),
    Case(
        "external SAE at a site beyond the model",
        lambda i: i.external("e", _small_sae(i), "blocks.9.hook_resid_post"),
        "9",
    ),
    Case("SAE name with a separator", lambda i: i.external("a/b", i.tmp / "sae"), "family.external"),
    Case("SAE name climbing out", lambda i: i.external("../x", i.tmp / "sae"), "family.external"),
    Case("SAE name empty", lambda i: i.external("", i.tmp / "sae"), "family.external"),
    Case("synthetic SAE name a path", lambda i: i.run("synthetic.sae=../escape"), "synthetic.sae"),
    Case("error-SAE name a path", lambda i: i.run("error_saes.sae=a/b"), "error_saes.sae"),
    Case("external path for a name not listed", lambda i: i.run("family.external_paths.nope=/x"), "nope"),
    Case(
        "external root missing",
        lambda i: i.run(f"family.external_root={i.tmp / 'none'}", *_hub_sae()),
        "none",
    ),
    Case("external list not a list", lambda i: i.run("family.external=5"), "family.external"),
    # config files
    Case("TOML malformed", lambda i: i.config("bad.toml", "layer = = 3\n[text\n"), "bad.toml"),
    Case("YAML malformed", lambda i: i.config("bad.yaml", "text: [1, 2\n  - : :\n"), "bad.yaml"),
    Case("YAML with a tab", lambda i: i.config("tab.yaml", "text:\n\tn_contexts: 3\n"), "tab.yaml"),
    Case("TOML wrong type", lambda i: i.config("type.toml", 'seed = "one"\n'), "seed"),
    Case("TOML unknown key", lambda i: i.config("key.toml", "[text]\nnope = 1\n"), "nope"),
    Case("YAML wrong type", lambda i: i.config("type.yaml", "synthetic: 5\n"), "synthetic"),
    Case(
        "YAML wrong type in a section an override also sets",
        lambda i: [
            "config",
            "show",
            "--config",
            str(i.file("t.yaml", "text: 5\n")),
            "--set",
            "text.ctx_len=32",
        ],
        "text is a section of settings",
    ),
    Case("YAML list at the top", lambda i: i.config("list.yaml", "- 1\n- 2\n"), "list.yaml"),
    Case("config file missing", lambda i: i.run(extra=("--config", str(i.tmp / "none.toml"))), "none.toml"),
    Case("config file of unknown kind", lambda i: i.config("study.ini", "[x]\ny=1\n"), "study.ini"),
    Case("config file a folder", lambda i: i.run(extra=("--config", str(i.folder("cfg.toml")))), "cfg.toml"),
    Case("config file not UTF-8", lambda i: i.config("latin.toml", b'name = "\xe9t\xe9"\n'), "latin.toml"),
    Case("config file binary", lambda i: i.config("bin.yaml", BINARY), "bin.yaml"),
    # command-line usage
    Case("unknown command", lambda i: ["nosuchcmd"], "nosuchcmd"),
    Case("unknown option", lambda i: ["run", "--bogus"], "--bogus"),
    Case("--set without a value", lambda i: ["run", "--set"], "--set"),
    Case("--out without a value", lambda i: ["run", "--out"], "--out"),
    Case("store info without a folder", lambda i: ["store", "info"], "path"),
    Case("unknown store command", lambda i: ["store", "nosuch"], "nosuch"),
    Case("config show with an extra argument", lambda i: ["config", "show", "extra"], "extra"),
    Case("report without a folder", lambda i: ["report"], "out"),
    Case("unknown sae command", lambda i: ["sae", "nosuch"], "nosuch"),
    Case("flag given a value", lambda i: ["run", "--quiet=maybe"], "--quiet"),
    # commands on the wrong folders
    Case("store info on a missing folder", lambda i: ["store", "info", str(i.tmp / "none")], "none"),
    Case(
        "store info on an empty folder",
        lambda i: ["store", "info", str(i.folder("e"))],
        "not an activation store",
    ),
    Case(
        "store verify on an empty folder",
        lambda i: ["store", "verify", str(i.folder("e"))],
        "not an activation store",
    ),
    Case("store verify on a file", lambda i: ["store", "verify", str(i.file("f.txt", "x"))], "f.txt"),
    Case(
        "store info on a corrupt manifest",
        lambda i: ["store", "info", str(i.folder("s", {"manifest.json": "{oops"}))],
        "corrupt",
    ),
    Case(
        "store info on a foreign manifest",
        lambda i: ["store", "info", str(i.folder("s", {"manifest.json": '{"format": "other"}'}))],
        "not a darkmatter",
    ),
    Case(
        "store verify on a damaged store", lambda i: ["store", "verify", str(_damaged_store(i))], "checksum"
    ),
    Case("report on a missing folder", lambda i: ["report", str(i.tmp / "none")], "no results"),
    Case("report on an empty folder", lambda i: ["report", str(i.folder("e"))], "no results"),
    Case(
        "report on a corrupt result",
        lambda i: ["report", str(i.folder("r", {"results/engine.json": "{oops"}))],
        "engine.json",
    ),
    Case("sae inspect on a missing path", lambda i: ["sae", "inspect", str(i.tmp / "none")], "none"),
    Case("sae inspect on garbage", lambda i: ["sae", "inspect", str(i.folder("junk", JUNK_SAE))], "junk"),
    Case(
        "sae convert from a missing path",
        lambda i: ["sae", "convert", str(i.tmp / "none"), str(i.tmp / "d")],
        "none",
    ),
    Case("run into a file", lambda i: i.suite.args(i.file("taken", "x")), "is a file"),
    Case("run into a foreign store", lambda i: _foreign_store(i), "different configuration"),
]
FRESH = ["TOML malformed", "store info on an empty folder"]  # the imports of a real start count too


def _hub_sae() -> list[str]:
    """An external SAE named by hub id, which ``family.external_root`` maps to a local folder."""
    sae = {"name": "hub", "path": "owner/repo:layer_1/width_16", "site": "blocks.1.hook_resid_post"}
    return [f"family.external={json.dumps([sae])}"]


def _small_sae(i: Inputs) -> Path:
    folder = i.tmp / "small"
    write_saelens(folder, architecture="topk", k=2, hook_name="blocks.1.hook_resid_post")
    return folder


def _damaged_store(i: Inputs) -> Path:
    folder = faultlib.copy_run(i.suite.clean / "store", i.tmp / "store")
    (folder / "shards" / "00000.safetensors").write_bytes(b"\0" * 64)
    return folder


def _foreign_store(i: Inputs) -> list[str]:
    faultlib.copy_run(i.suite.clean / "store", i.out / "store")
    return i.run("text.ctx_len=16")


def _params(cases: list[Case]) -> list[object]:
    return [
        pytest.param(c, id=c.name, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else [])
        for c in cases
    ]


def _check(table: Collector, case: Case, name: str, code: int, err: str, seconds: float) -> None:
    problems = faultlib.stderr_problems(err)
    problems += [] if code == case.code else [f"exit {code}"]
    problems += [] if case.says.lower() in err.lower() else [f"no {case.says!r}"]
    problems += [] if seconds < LIMIT_S else [f"{seconds:.1f} s"]
    line = err.strip().splitlines()[0] if err.strip() else "(nothing)"
    table.add(
        name,
        "bad input",
        f"exit {case.code}, one line, < {LIMIT_S:.0f} s",
        f"exit {code} in {seconds:.2f} s: {line[:130]}" + (f" [{'; '.join(problems)}]" if problems else ""),
        not problems,
        case.xfail,
    )
    assert not problems, (problems, err)


@pytest.mark.parametrize("case", _params(CASES))
def test_bad_input_is_one_line_and_fast(suite: Suite, table: Collector, case: Case, tmp_path: Path) -> None:
    argv = case.argv(Inputs(suite, tmp_path))
    done = suite.zygote.run(argv, timeout=30)
    _check(table, case, case.name, done.code, done.stderr, done.seconds)


@pytest.mark.parametrize("name", FRESH)
def test_bad_input_in_a_fresh_interpreter(suite: Suite, table: Collector, name: str, tmp_path: Path) -> None:
    case = next(c for c in CASES if c.name == name)
    argv = case.argv(Inputs(suite, tmp_path))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "darkmatter", *argv], capture_output=True, text=True, env=suite.env, timeout=60
    )
    _check(table, case, f"{name} (fresh interpreter)", proc.returncode, proc.stderr, time.perf_counter() - t0)
