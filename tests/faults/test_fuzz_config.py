"""Fuzzing the config loader: any override value, any config file text, only ConfigError escapes."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from darkmatter.config import StudyConfig, read_config_file, resolve_config
from darkmatter.errors import ConfigError

pytestmark = pytest.mark.slow

KEYS = [
    "layer", "seed", "split_seed", "train_fraction", "model", "model.name", "model.device", "model.dtype",
    "text", "text.source", "text.ctx_len", "text.n_contexts", "text.skip_positions", "text.packing",
    "text.bos",
    "harvest.sites", "harvest.dtype", "harvest.batch_size", "family", "family.kind", "family.widths",
    "family.k", "family.ks", "family.external", "family.external_paths", "family.external_only",
    "family.train.lr", "family.train.epochs", "family.train.device", "layer_sweep.layers", "synthetic.sae",
    "pursuit.n_contexts", "downstream_ce.n_contexts", "earlier_layers.mlp_hidden", "error_saes.components",
    "error_saes.interp.judge", "error_saes.interp.latents", "report.formats", "report.dpi", "nonlinear.x",
    "bogus", "text.bogus.deeper", "", ".", "a..b",
]  # fmt: skip
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
FAST = settings(
    max_examples=300, deadline=2000, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@FAST
@given(st.lists(st.tuples(st.sampled_from(KEYS), JSON | st.text(max_size=20)), max_size=4))
def test_any_override_is_a_config_or_a_config_error(overrides: list[tuple[str, object]]) -> None:
    items = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides]
    try:
        cfg = resolve_config("tiny", overrides=items)
    except ConfigError as exc:
        assert str(exc).strip() and "Traceback" not in str(exc)
        return
    assert isinstance(cfg, StudyConfig)
    cfg.sites()  # a resolved config answers its own questions without raising
    cfg.section_hash("family", "text")


@FAST
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_config_file_is_a_mapping_or_a_config_error(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    folder = tmp_path_factory.mktemp("cfg", numbered=True)
    for name in ("study.toml", "study.yaml"):
        path = Path(folder) / name
        path.write_bytes(data)
        try:
            loaded = read_config_file(path)
        except ConfigError:
            continue
        assert isinstance(loaded, dict)
        with contextlib.suppress(ConfigError):
            resolve_config(config_file=path)
