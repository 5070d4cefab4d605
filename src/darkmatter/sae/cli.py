"""``darkmatter sae``: inspect and convert SAEs (mounted by the main CLI)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from darkmatter.errors import ConfigError
from darkmatter.lm.loading import network_allowed
from darkmatter.sae import releases
from darkmatter.sae.formats import canonical_hook_site, load_sae, save_sae
from darkmatter.sae.model import parse_dtype
from darkmatter.sae.releases import ReleaseSAE

app = typer.Typer(help="Inspect and convert sparse autoencoders.", no_args_is_help=True)

FormatOption = Annotated[
    str | None, typer.Option("--format", help="Source format (default: auto-detect), e.g. sparsify.")
]
HookpointOption = Annotated[
    str | None, typer.Option("--hookpoint", help="Sub-folder of a multi-SAE folder, e.g. layers.10.")
]
OnlineOption = Annotated[
    bool,
    typer.Option("--online", help="Allow downloading from the Hugging Face Hub (also DARKMATTER_ONLINE=1)."),
]


def _spread(value: dict[str, float]) -> str:
    return f"min {value['min']:.6g}  median {value['median']:.6g}  max {value['max']:.6g}"


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable ``inspect`` report."""
    arch = summary["architecture"] + (f" (k={summary['k']})" if summary["k"] is not None else "")
    scaling = f"x * {summary['input_scale']:.6g}, normalize={summary['normalize']}, "
    scaling += f"subtract b_dec={'yes' if summary['apply_b_dec_to_input'] else 'no'}"
    rows = [
        ("format", summary["format"]),
        ("architecture", arch),
        ("d_in", summary["d_in"]),
        ("d_sae", summary["d_sae"]),
        ("threshold", _spread(summary["threshold"]) if summary["threshold"] else "-"),
        ("hook site", summary["hook_site"] or "unknown"),
        ("model", summary["model_name"] or "unknown"),
        ("input scaling", scaling),
        ("decoder norms", _spread(summary["decoder_norm"])),
        ("dtype", summary["dtype"]),
    ]
    return "\n".join(f"{name + ':':<15} {value}" for name, value in rows)


def _release_lines(named: ReleaseSAE, local: Path | None) -> str:
    where = str(local) if local else "none in the Hugging Face cache; --online downloads it"
    rows = [
        ("release", named.release),
        ("sae_id", named.sae_id),
        ("repo", named.repo_id),
        ("folder", named.folder),
        ("model", named.model or "unknown"),
        ("local copy", where),
    ]
    return "\n".join(f"{name + ':':<15} {value}" for name, value in rows)


def _named(spec: str) -> ReleaseSAE | None:
    """The SAELens release a CLI argument names (``RELEASE/SAE_ID``), unless it is a path on disk."""
    return None if Path(spec).expanduser().exists() else releases.parse(spec)


@app.command("inspect")
def inspect(
    path: Annotated[
        str,
        typer.Argument(
            help="SAE folder or file, a SAELens RELEASE/SAE_ID, or owner/name[:subfolder] (with --online)."
        ),
    ],
    fmt: FormatOption = None,
    hookpoint: HookpointOption = None,
    online: OnlineOption = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Print an SAE's format, architecture, widths, threshold summary, hook site, input scaling and dtype.

    A SAELens name (RELEASE/SAE_ID) is resolved offline to its hub repo and folder; the SAE itself is
    inspected when the Hugging Face cache holds it (or with --online).
    """
    online = online or network_allowed()
    named = _named(path)
    local = releases.hub_copy(named.hub_spec) if named else None
    if named is not None and local is None and not online:
        out: dict[str, Any] = {"release": named.describe(), "local_copy": None}
        typer.echo(json.dumps(out, indent=2) if as_json else _release_lines(named, None))
        return
    summary = load_sae(path, format=fmt, hookpoint=hookpoint, online=online).summary()
    if as_json:
        if named is not None:
            summary = {"release": named.describe(), "local_copy": str(local) if local else None, **summary}
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    text = format_summary(summary)
    typer.echo(f"{_release_lines(named, local)}\n\n{text}" if named is not None else text)


@app.command("convert")
def convert(
    src: Annotated[
        str, typer.Argument(help="SAE to read (any supported format, or a SAELens RELEASE/SAE_ID).")
    ],
    dst: Annotated[str, typer.Argument(help="Folder to write in the SAELens layout.")],
    fmt: FormatOption = None,
    hookpoint: HookpointOption = None,
    online: OnlineOption = False,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Save as float32, bfloat16, ...")] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="Model name to record when the source does not say (e.g. sparsify)."),
    ] = None,
    site: Annotated[
        str | None,
        typer.Option("--site", help="Hook site to record when the source does not say (blocks.L.hook_...)."),
    ] = None,
) -> None:
    """Convert an SAE to the SAELens layout (cfg.json + sae_weights.safetensors), names included."""
    online = online or network_allowed()
    sae = load_sae(src, format=fmt, hookpoint=hookpoint, online=online, dtype=parse_dtype(dtype))
    if model and not sae.cfg.model_name:
        sae.cfg.model_name = model
    if site and not sae.cfg.hook_site:
        sae.cfg.hook_site = canonical_hook_site(site)
        if sae.cfg.hook_site is None:
            raise ConfigError(
                f"--site {site!r} is not a TransformerLens hook name; use e.g. blocks.3.hook_resid_post."
            )
    out = save_sae(sae, dst)
    names = f"model {sae.cfg.model_name or 'unknown'}, hook {sae.cfg.hook_site or 'unknown'}"
    typer.echo(f"Wrote {out} (SAELens layout; {names}) from {src} ({sae.cfg.source_format}).")
