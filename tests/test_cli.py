"""The CLI runs a tiny study end to end and turns bad input into one-paragraph errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from darkmatter.cli import main

from conftest import tiny_study_overrides


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


@pytest.mark.slow
def test_run_writes_store_results_and_report(
    tmp_path: Path, tiny_model_dir: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = ["run", "--out", str(out), "--quiet", *_sets(tiny_study_overrides(tiny_model_dir, corpus_file))]
    assert main(args) == 0
    assert (out / "report.html").is_file() and (out / "store" / "manifest.json").is_file()
    res = json.loads((out / "results" / "harvest.json").read_text())
    assert res["store"]["tokens"] == 12 * 32 and res["store"]["complete"]
    report = (out / "report.html").read_text()
    for section in (
        "Activations",
        "The SAE family",
        "Predicting SAE error",
        "Per-token scaling",
        "Norm-prediction test",
        "Norm probe",
        "across layers",
        "Claims: what reproduces here",
    ):
        assert section in report
    claims = json.loads((out / "results" / "claims.json").read_text())
    assert len(claims["claims"]) >= 15 and sum(claims["counts"].values()) == len(claims["claims"])
    for name in ("family", "engine", "per_token", "layer_sweep", "synthetic", "pursuit"):
        assert json.loads((out / "results" / f"{name}.json").read_text())["experiment"] == name
    assert report.count("<img") >= 8
    assert (out / "tables" / "tokens.parquet").is_file()
    stamp = (out / "store" / "manifest.json").stat().st_mtime_ns
    results = {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}
    assert main(args) == 0  # a second run skips every step
    assert (out / "store" / "manifest.json").stat().st_mtime_ns == stamp
    assert {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")} == results
    assert main([*args, "--steps", "pursuit"]) == 0  # reruns pursuit and nothing else
    after = {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}
    assert {n for n in results if after[n] != results[n]} == {"pursuit.json"}
    assert main(["store", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_contexts"] == 12 and info["sites"] == [
        "blocks.1.hook_resid_post",
        "blocks.0.hook_resid_post",
    ]
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.html").is_file()


def test_config_show_and_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "study.toml"
    cfg.write_text("layer = 3\n[text]\nn_contexts = 7\n")
    assert main(["config", "show", "--config", str(cfg), "--set", "text.ctx_len=99"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["layer"] == 3 and shown["text"]["n_contexts"] == 7 and shown["text"]["ctx_len"] == 99
    yml = tmp_path / "study.yaml"
    yml.write_text("text:\n  seed: 5\n")
    assert main(["config", "show", "--config", str(yml)]) == 0
    assert json.loads(capsys.readouterr().out)["text"]["seed"] == 5


BAD_INPUTS = [
    (["--set", "model.name=/no/such/model"], "model.name '/no/such/model'"),
    (["--set", "layer=1", "--set", 'harvest.sites=["blocks.9.hook_resid_post"]'], "asks for layer 9"),
    (["--set", "layer=7"], "layer=7 is out of range"),
    (["--set", 'harvest.sites=["blocks.1.hook_zzz"]'], "Unknown hook site"),
    (["--set", "text.n_contexts=100000"], "requested"),
    (["--set", "text.bogus=1"], "Invalid configuration"),
    (["--preset", "nope"], "Unknown preset"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_INPUTS)
def test_bad_input_is_one_paragraph_error(
    tmp_path: Path,
    tiny_model_dir: Path,
    corpus_file: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    base = _sets(tiny_study_overrides(tiny_model_dir, corpus_file))
    code = main(["run", "--out", str(tmp_path / "o"), "--quiet", *base, *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert err.startswith("darkmatter: error:") and err.count("\n") == 1


@pytest.mark.slow
def test_empty_text_and_foreign_store(
    tmp_path: Path, tiny_model_dir: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = _sets(tiny_study_overrides(tiny_model_dir, corpus_file))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert (
        main(["harvest", "--out", str(tmp_path / "e"), "--quiet", *base, "--set", f"text.source={empty}"])
        == 2
    )
    assert "empty" in capsys.readouterr().err
    out = tmp_path / "o"
    assert main(["harvest", "--out", str(out), "--quiet", *base]) == 0
    manifest = (out / "store" / "manifest.json").read_bytes()
    assert main(["harvest", "--out", str(out), "--quiet", *base, "--set", "text.ctx_len=16"]) == 2
    assert "different configuration" in capsys.readouterr().err
    assert (out / "store" / "manifest.json").read_bytes() == manifest
    assert main(["store", "info", str(tmp_path)]) == 2
    assert "not an activation store" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_unknown_command_exits_nonzero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) != 0
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.slow
def test_endpoint_down_keeps_every_other_result(
    tmp_path: Path, tiny_model_dir: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    base = _sets(tiny_study_overrides(tiny_model_dir, corpus_file))
    down = _sets(
        [
            "error_saes.interp.judge=endpoint",
            "error_saes.interp.endpoint_url=http://127.0.0.1:9/v1",
            "error_saes.interp.endpoint_model=judge",
            "error_saes.interp.retries=0",
            "error_saes.interp.timeout=2",
        ]
    )
    code = main(["run", "--out", str(out), "--quiet", *base, *down])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1
    assert "127.0.0.1:9" in err and "run again" in err
    assert (out / "report.html").is_file()
    for name in ("family", "engine", "downstream_ce", "error_saes"):
        assert (out / "results" / f"{name}.json").is_file()
    failed = json.loads((out / "results" / "autointerp.json").read_text())
    assert failed["error"] and failed["components"] == {}
    assert "Stopped early" in (out / "report.html").read_text()
    # a working judge afterwards finishes the step; nothing else is recomputed
    stamp = (out / "results" / "error_saes.json").stat().st_mtime_ns
    assert main(["run", "--out", str(out), "--quiet", *base]) == 0
    done = json.loads((out / "results" / "autointerp.json").read_text())
    assert done["error"] is None and set(done["components"]) == {"linear", "nonlinear"}
    for component in ("linear", "nonlinear"):
        records = json.loads((out / "interp" / f"latents-{component}.json").read_text())
        assert records["format"] == "darkmatter-latents" and records["meta"]["component"] == component
        assert records["fuzzing"] is not None and done["components"][component]["fuzzing"] is not None
        assert len(records["latents"]) == len(done["components"][component]["latents"])
    assert (out / "results" / "error_saes.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_more_latents_than_the_sae_is_a_clear_error(
    tmp_path: Path, tiny_model_dir: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = _sets(tiny_study_overrides(tiny_model_dir, corpus_file))
    code = main(
        ["run", "--out", str(tmp_path / "o"), "--quiet", *base, "--set", "error_saes.interp.n_latents=1000"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "n_latents=1000" in err and "(32)" in err and err.count("\n") == 1
