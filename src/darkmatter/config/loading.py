"""Resolve a study's configuration: a preset file, then a user's config file, then ``--set`` overrides.

Presets are TOML files in ``darkmatter/config/presets/`` (one per preset, each complete on its own, so two
presets diff line by line); a user's file (TOML or YAML) and the overrides change only what they name.
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from darkmatter.config.schema import StudyConfig
from darkmatter.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def preset_names() -> list[str]:
    """The presets shipped with the package, by file name."""
    folder = resources.files("darkmatter.config") / "presets"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> dict[str, Any]:
    """A preset's settings as plain data."""
    if name not in preset_names():
        raise ConfigError(f"Unknown preset {name!r}; known presets: {', '.join(preset_names())}.")
    text = (resources.files("darkmatter.config") / "presets" / f"{name}.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def _deep_update(base: dict[str, Any], new: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Merge ``new`` into ``base``; a section (a table of settings) is never replaced by a plain value."""
    for k, v in new.items():
        name = f"{where}.{k}" if where else str(k)
        if isinstance(base.get(k), dict) and not isinstance(v, dict):
            raise ConfigError(
                f"Invalid configuration: {name} is a section of settings, not a value (found {v!r}); set its "
                f"keys instead, for example {name}.<key>=<value>."
            )
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v, name)
        else:
            base[k] = v
    return base


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or YAML config file into a dict."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"Config file {p} is a folder; pass a .toml, .yaml or .yml file.")
    if not p.is_file():
        raise ConfigError(f"Config file {p} does not exist.")
    if p.suffix not in {".toml", ".yaml", ".yml"}:
        raise ConfigError(f"Config file {p} must end in .toml, .yaml or .yml.")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"Config file {p} is not UTF-8 text ({exc.reason}).") from exc
    except Exception as exc:  # TOMLDecodeError, yaml.YAMLError (yaml is imported lazily)
        raise ConfigError(f"Config file {p} cannot be parsed: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {p} must hold a table/mapping at the top level.")
    return data


def parse_override(item: str) -> dict[str, Any]:
    """``a.b=value`` to ``{"a": {"b": value}}``; the value is parsed as JSON when possible."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(
            f"Override {item!r} must look like section.key=value (for example text.n_contexts=64)."
        )
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    out: dict[str, Any] = {}
    cur = out
    parts = key.split(".")
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = value
    return out


def resolve_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
) -> StudyConfig:
    """Preset, then config file, then ``key=value`` overrides; validated."""
    file_data = read_config_file(config_file) if config_file else {}
    name = preset or file_data.get("preset") or "demo"
    data = load_preset(name)
    _deep_update(data, file_data)
    data["preset"] = name
    for item in overrides or []:
        _deep_update(data, parse_override(item))
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise ConfigError(f"Invalid configuration: {problems}.") from None
