"""The ``darkmatter`` command: thin wrappers over library calls, one function per sub-command."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from darkmatter.errors import DarkMatterError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Measure, decompose and reduce the dark matter of sparse autoencoders.",
)
store_app = typer.Typer(no_args_is_help=True, help="Inspect activation stores.")
config_app = typer.Typer(no_args_is_help=True, help="Show resolved study configurations.")
app.add_typer(store_app, name="store")
app.add_typer(config_app, name="config")

PresetOpt = Annotated[str | None, typer.Option("--preset", "-p", help="Preset name (demo, tiny, ...).")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML or YAML config file.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override, e.g. text.n_contexts=64.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output directory.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or step messages.")]
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"
OnlineOpt = Annotated[bool, typer.Option("--online", help="Allow downloads from the Hugging Face hub.")]


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


class _Bars:
    """The progress factory of the command line: one tqdm bar per long part of a step, on stderr.

    A new bar closes the previous one, and ``close`` closes the last, so no bar is redrawn after the
    end-of-run summary.
    """

    def __init__(self) -> None:
        self.bars: dict[str, Any] = {}

    def __call__(self, name: str, unit: str = "tok") -> Any:
        def update(done: int, total: int, rate: float) -> None:
            bar = self.bars.get(name)
            if bar is None or bar.total != total:
                self.close()
                from tqdm import tqdm

                bar = self.bars[name] = tqdm(
                    total=total,
                    desc=name,
                    unit=unit,
                    unit_scale=unit == "tok",
                    file=sys.stderr,
                    bar_format=BAR_FORMAT,
                )
            bar.n = done
            speed = f"{rate:,.0f} {unit}/s" if rate >= 10 else f"{rate:.2f} {unit}/s"
            bar.set_postfix_str(speed, refresh=False)
            bar.refresh()
            if done >= total:
                bar.close()

        return update

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def _resolve(
    preset: str | None, config: Path | None, overrides: list[str] | None, online: bool = False
) -> Any:
    from darkmatter.config import resolve_config

    cfg = resolve_config(preset, config, overrides)
    if online:
        cfg.model.online = True
        os.environ["DARKMATTER_ONLINE"] = "1"
    return cfg


StepsOpt = Annotated[
    str | None,
    typer.Option(
        "--steps", help="Rerun only these steps (comma-separated, e.g. engine,pursuit) and what they need."
    ),
]


@app.command()
def run(
    out: OutOpt = Path("darkmatter-out"),
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    steps: StepsOpt = None,
    online: OnlineOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run a whole study (default: the embedded demo) and write OUT/report.html."""
    _quiet_libraries()
    cfg = _resolve(preset, config, set_, online)
    only = [s.strip() for s in steps.split(",") if s.strip()] if steps is not None else None
    _run_steps(cfg, out, quiet, only)


def _run_steps(
    cfg: Any, out: Path, quiet: bool, only: list[str] | None, *, force: bool = True, report: bool = True
) -> None:
    from darkmatter.ranks import from_environment, shutdown
    from darkmatter.runner import Runner
    from darkmatter.study.context import StudyContext

    ranks = from_environment(cfg.analysis_device)  # one process, or one of torchrun's ranks
    bars = None if quiet else _Bars()

    def log(message: str) -> None:
        if bars is not None:
            bars.close()  # a finished bar is not redrawn below the message
            _log(message)

    ctx = StudyContext(cfg, out, log=log, progress=bars, ranks=ranks)
    runner = Runner(ctx)
    try:
        runner.run(only, force=force, report=report)
    finally:
        if bars is not None:
            bars.close()
        if not quiet and runner.outcomes and ranks.leader:
            _log(_summary_table(runner.outcomes))
    shutdown(ranks)
    if not quiet and report and ranks.leader:
        _log(f"done: {ctx.paths.report}")


def _summary_table(outcomes: list[Any]) -> str:
    """The end-of-run table: step, status, seconds and headline numbers."""
    w = max(len(o.name) for o in outcomes)
    lines = [f"{'step':<{w}}  {'status':<13}  {'seconds':>8}  headline"]
    lines += [f"{o.name:<{w}}  {o.status:<13}  {o.seconds:8.1f}  {o.headline}" for o in outcomes]
    lines.append(f"{'total':<{w}}  {'':<13}  {sum(o.seconds for o in outcomes):8.1f}")
    return "\n".join(lines)


@app.command()
def plan(
    out: OutOpt = Path("darkmatter-out"),
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    recalibrate: Annotated[
        bool, typer.Option("--recalibrate", help="Measure this machine's throughputs again.")
    ] = False,
) -> None:
    """Estimate a study before running it: per step, tokens, FLOPs, disk, SAE groups, peak memory and time.

    Reads only config files and SAE headers (no weights, no downloads). Exits non-zero when the study
    does not fit its memory or disk budget, naming the setting to change.
    """
    _quiet_libraries()
    from darkmatter.study.plan import calibrate, format_plan, plan_study
    from darkmatter.study.plan.planner import planned_device

    cfg = _resolve(preset, config, set_)
    calibration = None
    if recalibrate:
        device, absent = planned_device(cfg.analysis_device)
        if not absent:
            calibration = calibrate(device, out, recalibrate=True)
    study_plan = plan_study(cfg, out, calibration=calibration)
    typer.echo(format_plan(study_plan))
    if study_plan.problems():
        raise typer.Exit(4)


@app.command()
def harvest(
    out: OutOpt = Path("darkmatter-out"),
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    online: OnlineOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Harvest activations into OUT/store (resumes an interrupted harvest; skipped when complete)."""
    _quiet_libraries()
    cfg = _resolve(preset, config, set_, online)
    _run_steps(cfg, out, quiet, ["harvest"], force=False, report=False)


def _store_root(path: Path) -> Path:
    """A store folder, or a run folder holding one in ``store/``."""
    from darkmatter.store import MANIFEST

    nested = path / "store"
    return nested if not (path / MANIFEST).exists() and (nested / MANIFEST).exists() else path


@store_app.command("info")
def store_info(
    path: Annotated[Path, typer.Argument(help="Store directory (or a run's output directory).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Summarise an activation store (checksums are not read: see 'darkmatter store verify')."""
    from darkmatter.store import ActivationStore

    store = ActivationStore.open(_store_root(path))
    info = store.info()
    warnings = [f"missing shard file {f}" for f in store.missing_shards()]
    if not store.complete:
        warnings.append(f"incomplete: {info['shards_done']} of {info['shards_total']} shards written")
    info["warnings"] = warnings
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            if k != "warnings":
                typer.echo(f"{k:>16}: {v}")
    for w in warnings:
        _log(f"darkmatter: warning: {w}")
    _log("darkmatter: checksums not verified here; 'darkmatter store verify' reads every shard.")


@store_app.command("verify")
def store_verify(
    path: Annotated[Path, typer.Argument(help="Store directory (or a run's output directory).")],
) -> None:
    """Read every shard and check its checksum; exit non-zero naming each bad or missing one."""
    from darkmatter.store import ActivationStore

    store = ActivationStore.open(_store_root(path))
    problems = store.verify()
    if problems:
        for problem in problems:
            _log(f"darkmatter: {store.root}: {problem}")
        raise typer.Exit(2)
    typer.echo(f"{store.root}: {len(store.manifest['shards'])} shards, every checksum matches")


@config_app.command("show")
def config_show(preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved configuration as JSON."""
    cfg = _resolve(preset, config, set_)
    typer.echo(cfg.model_dump_json(indent=2))


@app.command()
def report(out: Annotated[Path, typer.Argument(help="A run's output directory.")]) -> None:
    """Redraw every figure and rebuild OUT/report.html from the results alone (no model, no store)."""
    from darkmatter.lock import run_lock
    from darkmatter.report.build import write_report

    if not (out / "results").is_dir():
        raise DarkMatterError(f"{out} has no results/ directory; run 'darkmatter run --out {out}' first.")
    with run_lock(out):
        typer.echo(str(write_report(out, redraw=True)))


def _mount_optional() -> None:
    try:
        from darkmatter.sae.cli import app as sae_app
    except ImportError:  # the SAE sub-commands are optional during development
        return
    app.add_typer(sae_app, name="sae", help="Inspect and convert SAEs.")


def _one_line(message: str) -> str:
    """A message on one line (a library's multi-line error text, a YAML parser's context, joined)."""
    return " ".join(message.split())


def _log(msg: str) -> None:
    typer.echo(msg, err=True)


def _cli_exception_types() -> tuple[
    tuple[type[BaseException], ...], tuple[type[BaseException], ...], tuple[type[BaseException], ...]
]:
    """(exit, abort, usage-error) classes of typer and of whichever click it runs on."""
    exits: list[type[BaseException]] = [typer.Exit]
    aborts: list[type[BaseException]] = [typer.Abort]
    usage: list[type[BaseException]] = []
    for mod_name in ("click.exceptions", "typer._click.exceptions"):
        try:
            mod = __import__(mod_name, fromlist=["ClickException"])
        except ImportError:
            continue
        for attr, bucket in (("Exit", exits), ("Abort", aborts), ("ClickException", usage)):
            cls = getattr(mod, attr, None)
            if isinstance(cls, type):
                bucket.append(cls)
    return tuple(exits), tuple(aborts), tuple(usage)


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app and turns known failures into one-paragraph errors and exit codes."""
    _mount_optional()
    exits, aborts, usage = _cli_exception_types()
    try:
        code = app(args=argv, standalone_mode=False, prog_name="darkmatter")
        if isinstance(code, int) and code:  # typer.Exit(code) comes back as the return value here
            return code
    except DarkMatterError as exc:
        typer.echo(f"darkmatter: error: {_one_line(str(exc))}", err=True)
        return exc.exit_code
    except exits as exc:
        return int(getattr(exc, "exit_code", 0) or 0)
    except aborts:
        typer.echo("darkmatter: aborted", err=True)
        return 130
    except usage as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            return 0
        ctx = getattr(exc, "ctx", None)
        message = _one_line(exc.format_message())  # type: ignore[attr-defined]
        if ctx is not None:
            message += f"{'' if message.endswith('.') else '.'} See '{ctx.command_path} --help'."
        typer.echo(f"darkmatter: error: {message}", err=True)
        return int(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        typer.echo("darkmatter: interrupted; run the same command again to resume.", err=True)
        return 130
    except MemoryError:
        typer.echo("darkmatter: error: out of memory; lower batch sizes or the number of tokens.", err=True)
        return 3
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            typer.echo(
                "darkmatter: error: disk full; free space and run the same command to resume.", err=True
            )
        else:
            typer.echo(f"darkmatter: error: {exc}", err=True)
        return 3
    except Exception as exc:
        if os.environ.get("DARKMATTER_DEBUG") == "1":
            raise
        typer.echo(
            f"darkmatter: internal error: {type(exc).__name__}: {exc}. Finished steps are kept; rerun with "
            "DARKMATTER_DEBUG=1 for the traceback and report it.",
            err=True,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
