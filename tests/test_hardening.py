"""Hostile but realistic input: names that would escape the run folder, a second run on a busy folder,
settings a model cannot satisfy, file modes. Each is refused in seconds with one line, or handled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from darkmatter import atomic
from darkmatter.cli import main
from darkmatter.errors import RunLockedError
from darkmatter.lock import LOCK_FILE, run_lock

from conftest import tiny_study_overrides

BAD_NAMES = ["../../../x", "/abs/x", "a/b", "..", ".hidden", "nul\x00byte", "new\nline", ""]


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_name_that_is_a_path_is_refused_before_any_work(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "deep" / "out"
    external = json.dumps([{"name": name, "path": str(tmp_path / "sae"), "site": "blocks.1.hook_resid_post"}])
    t0 = time.perf_counter()
    code = main(["run", "--out", str(out), "--quiet", "--set", f"family.external={external}"])
    err = capsys.readouterr().err
    assert code == 2 and "Invalid configuration" in err and "family.external" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert time.perf_counter() - t0 < 5
    assert list(tmp_path.rglob("*")) == []  # nothing written anywhere, not even the output folder


@pytest.mark.parametrize("setting", ["synthetic.sae", "error_saes.sae"])
def test_chosen_sae_names_are_names_too(setting: str) -> None:
    assert main(["config", "show", "--set", f"{setting}=../escape"]) == 2


def test_a_run_folder_is_locked_and_a_dead_holder_is_taken_over(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom darkmatter.lock import run_lock\n"
         f"with run_lock({str(tmp_path)!r}):\n    print('locked', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        busy = rf"in use by another darkmatter run \(PID {holder.pid}\)"
        with pytest.raises(RunLockedError, match=busy), run_lock(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / LOCK_FILE).read_text().strip() == str(holder.pid)  # the killed run left its lock file
    with run_lock(tmp_path):  # ... which the next run simply takes over
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
        with run_lock(tmp_path):  # re-entrant in one process
            pass


def test_a_second_run_on_a_busy_folder_exits_at_once(
    tmp_path: Path, tiny_model_dir: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = ["run", "--out", str(out), "--quiet", *_sets(tiny_study_overrides(tiny_model_dir, corpus_file))]
    lock_fd_holder = subprocess.Popen(  # another process holds the folder's lock
        [sys.executable, "-c", "import time\nfrom darkmatter.lock import run_lock\n"
         f"with run_lock({str(out)!r}):\n    print('locked', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert lock_fd_holder.stdout is not None and lock_fd_holder.stdout.readline().strip() == "locked"
        t0 = time.perf_counter()
        assert main(args) == 2
        assert time.perf_counter() - t0 < 10
        err = capsys.readouterr().err
        assert f"PID {lock_fd_holder.pid}" in err and err.count("\n") == 1
        assert not (out / "results").exists()  # nothing was cleaned up or written under another's lock
    finally:
        lock_fd_holder.kill()
        lock_fd_holder.wait()


BAD_SETTINGS = [
    ("family.widths=[]", "family.widths"),
    ("family.widths=[-64]", "family.widths"),
    ("family.ks=[0]", "family.ks"),
    ("model.device=tpu", "model.device"),
    ("text.skip_positions=40", "skip_positions"),
    ("layer=7", "layer=7 is out of range"),
    ('harvest.sites=["blocks.9.hook_resid_post"]', "asks for layer 9"),
    ('harvest.sites=["blocks.1.hook_zzz"]', "Unknown hook site"),
    ("layer_sweep.layers=[0,12]", "layer_sweep.layers [12]"),
    ("layer_sweep.layers=[-1]", "layer_sweep.layers"),
]


@pytest.mark.parametrize(("setting", "message"), BAD_SETTINGS)
def test_settings_the_model_cannot_satisfy_fail_in_seconds(
    tmp_path: Path,
    tiny_model_dir: Path,
    corpus_file: Path,
    capsys: pytest.CaptureFixture[str],
    setting: str,
    message: str,
) -> None:
    out = tmp_path / "out"
    args = [
        "run",
        "--out",
        str(out),
        "--quiet",
        *_sets([*tiny_study_overrides(tiny_model_dir, corpus_file), setting]),
    ]
    t0 = time.perf_counter()
    assert main(args) == 2
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "internal error" not in err
    assert not (out / "store").exists()  # refused before the harvest


def test_cuda_asked_without_cuda_is_a_clear_error(
    tiny_model_dir: Path, corpus_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    base = tiny_study_overrides(tiny_model_dir, corpus_file)
    for setting in ("model.device=cuda", "family.train.device=cuda:1"):
        assert main(["run", "--out", str(tmp_path / "o"), "--quiet", *_sets([*base, setting])]) == 2
        err = capsys.readouterr().err
        assert setting.split("=")[0] in err and "CUDA is not available" in err


def test_an_sae_of_another_model_is_refused_from_its_header(
    tmp_path: Path, tiny_model_dir: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    sae = tmp_path / "gemma" / "params.npz"
    sae.parent.mkdir()
    np.savez(sae, W_enc=np.zeros((32, 128), np.float32), W_dec=np.zeros((128, 32), np.float32),
             b_enc=np.zeros(128, np.float32), b_dec=np.zeros(32, np.float32),
             threshold=np.zeros(128, np.float32))  # fmt: skip
    external = json.dumps([{"name": "other", "path": str(sae.parent), "site": "blocks.1.hook_resid_post"}])
    base = tiny_study_overrides(tiny_model_dir, corpus_file)
    t0 = time.perf_counter()
    code = main(
        ["run", "--out", str(tmp_path / "o"), "--quiet", *_sets([*base, f"family.external={external}"])]
    )
    err = capsys.readouterr().err
    assert code == 2 and "width 32" in err and "width 64" in err and "another model" in err
    assert time.perf_counter() - t0 < 5 and not (tmp_path / "o" / "store").exists()


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_follow_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        atomic._file_mode.cache_clear()
        atomic.write_text(tmp_path / "report.html", "<html></html>")
        with atomic.target(tmp_path / "figure.png") as tmp:
            tmp.write_bytes(b"png")
    finally:
        os.umask(old)
        atomic._file_mode.cache_clear()
    for name in ("report.html", "figure.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode
