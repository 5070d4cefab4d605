"""Checks that need no weights, run before any work: a bad setting fails in the first seconds.

The model's config file (not its weights) gives its architecture, depth and width; its skeleton, built on
the ``meta`` device from that config, shows where the hook sites are. With the study's config that settles
devices, sites, layer ranges and the widths of external SAEs whose headers can be read without their
tensors. The text is checked by the harvest step before the model's weights load.
"""

from __future__ import annotations

from darkmatter.config.schema import StudyConfig
from darkmatter.errors import ConfigError, HookSiteError, ShapeError
from darkmatter.lm.discover import discover_from_config
from darkmatter.lm.loading import ModelShape, model_config, resolve_device, shape_of
from darkmatter.lm.sites import parse_site
from darkmatter.sae.peek import peek_width


def preflight(cfg: StudyConfig) -> ModelShape:
    """Raise the first problem found as a one-line error; return what the model's config says."""
    _check_devices(cfg)
    m = cfg.model
    config = model_config(m.name, online=m.online or None, trust_remote_code=m.trust_remote_code)
    shape = shape_of(config)
    try:
        discover_from_config(config, trust_remote_code=m.trust_remote_code, overrides=m.hook_modules.given())
    except HookSiteError as exc:
        given = m.hook_modules.given()
        raise HookSiteError(
            f"Model {m.name!r}{f' with model.hook_modules {given}' if given else ''}: {exc}"
        ) from None
    _check_layers(cfg, shape)
    _check_external_widths(cfg, shape)
    return shape


def _check_devices(cfg: StudyConfig) -> None:
    devices = {"model.device": cfg.model.device, "analysis.device": cfg.analysis_device}
    trainers = {
        "family.train.device": (not cfg.family.external, cfg.family.train),
        "layer_sweep.train.device": (cfg.layer_sweep.enabled, cfg.layer_sweep.train),
        "error_saes.train.device": (cfg.error_saes.enabled, cfg.error_saes.train),
    }
    devices |= {setting: cfg.train_device(train) for setting, (used, train) in trainers.items() if used}
    for setting, device in devices.items():
        try:
            resolve_device(device)
        except ConfigError as exc:
            raise ConfigError(f"{setting}: {exc}") from None


def _check_layers(cfg: StudyConfig, shape: ModelShape) -> None:
    n = shape.n_layers
    if not 0 <= cfg.layer < n:
        raise HookSiteError(f"layer={cfg.layer} is out of range: the model has {n} layers (0..{n - 1}).")
    for site in cfg.sites():
        layer = parse_site(site).layer
        if not 0 <= layer < n:
            raise HookSiteError(
                f"Hook site {site!r} asks for layer {layer}, but the model has {n} layers (0..{n - 1})."
            )
    if cfg.layer_sweep.enabled:
        bad = [la for la in cfg.layer_sweep.resolve(n) if la >= n]
        if bad:
            raise HookSiteError(f"layer_sweep.layers {bad} are out of range: the model has {n} layers.")


def _check_external_widths(cfg: StudyConfig, shape: ModelShape) -> None:
    for ext in cfg.family.external:
        width = peek_width(ext.location, hookpoint=ext.hookpoint)
        if width is not None and width != shape.d_model:
            raise ShapeError(
                f"SAE {ext.name!r} ({ext.location}) reads vectors of width {width}, but the model "
                f"{cfg.model.name!r} has width {shape.d_model}: the SAE belongs to another model; check "
                "model.name and the SAE's path."
            )
