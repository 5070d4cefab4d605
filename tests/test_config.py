"""Configuration: closed sets are checked at load time, presets are TOML data, renamed sections say so."""

from __future__ import annotations

from pathlib import Path

import pytest

from darkmatter.config import load_preset, preset_names, resolve_config
from darkmatter.errors import ConfigError


@pytest.mark.parametrize(
    ("override", "where"),
    [
        ("family.kind=relu", "family.kind"),
        ("layer_sweep.kind=jumprelu", "layer_sweep.kind"),
        ("model.device=tpu", "model.device"),
        ("model.dtype=fp8", "model.dtype"),
        ("harvest.dtype=int8", "harvest.dtype"),
        ("text.packing=shuffle", "text.packing"),
        ("text.bos=sometimes", "text.bos"),
        ("error_saes.interp.judge=oracle", "error_saes.interp.judge"),
        ('error_saes.components=["linear","bogus"]', "error_saes.components"),
        ("family.train.device=gpu", "family.train.device"),
        ('family.external=[{"name":"a","path":"/x","format":"pickle"}]', "family.external"),
    ],
)
def test_a_value_outside_a_closed_set_is_refused_at_load(override: str, where: str) -> None:
    with pytest.raises(ConfigError, match=f"Invalid configuration: {where}"):
        resolve_config("tiny", overrides=[override])


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_devices_that_torch_knows_are_accepted(device: str) -> None:
    assert resolve_config("tiny", overrides=[f"model.device={device}"]).model.device == device


def test_the_old_nonlinear_section_names_its_replacements() -> None:
    with pytest.raises(ConfigError, match=r"downstream_ce\.n_contexts.*earlier_layers\.mlp_hidden"):
        resolve_config("tiny", overrides=["nonlinear.ce_contexts=4"])


def test_presets_are_toml_files_and_a_user_file_overrides_them(tmp_path: Path) -> None:
    assert {"demo", "tiny", "paper-gemma-2-2b", "paper-gemma-2-9b", "llama-scope-8b"} <= set(preset_names())
    raw = load_preset("demo")
    cfg = resolve_config("demo")
    assert cfg.family.widths == raw["family"]["widths"] == [512, 1024, 2048, 4096]
    assert cfg.text.n_contexts == raw["text"]["n_contexts"] == 256
    study = tmp_path / "study.toml"
    study.write_text('preset = "tiny"\n[pursuit]\nn_contexts = 3\n')
    mine = resolve_config(config_file=study, overrides=["pursuit.n_contexts=5"])
    assert mine.preset == "tiny" and mine.pursuit.n_contexts == 5 and mine.text.ctx_len == 64
    with pytest.raises(ConfigError, match="Unknown preset 'nope'"):
        resolve_config("nope")


def test_section_data_leaves_out_enabled_and_the_split_is_built_once() -> None:
    cfg = resolve_config("tiny", overrides=["split_seed=3", "train_fraction=0.7"])
    assert "enabled" not in cfg.section("pursuit") and cfg.section("pursuit")["n_contexts"] == 32
    assert cfg.section("error_saes.interp")["judge"] == "local"
    assert (cfg.split.seed, cfg.split.fraction) == (3, 0.7)
    assert cfg.main_site == "blocks.15.hook_resid_post"
