"""``darkmatter sae``: inspect and convert SAEs (mounted by the main CLI)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from darkmatter.sae.formats import load_sae, save_sae
from darkmatter.sae.model import parse_dtype

app = typer.Typer(help="Inspect and convert sparse autoencoders.", no_args_is_help=True)

FormatOption = Annotated[
    str | None, typer.Option("--format", help="Source format (default: auto-detect), e.g. sparsify.")
]
HookpointOption = Annotated[
    str | None, typer.Option("--hookpoint", help="Sub-folder of a multi-SAE folder, e.g. layers.10.")
]
OnlineOption = Annotated[
    bool, typer.Option("--online", help="Allow downloading owner/name[:subfolder] from the Hugging Face Hub.")
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


@app.command("inspect")
def inspect(
    path: Annotated[
        str, typer.Argument(help="SAE folder or file (or owner/name[:subfolder] with --online).")
    ],
    fmt: FormatOption = None,
    hookpoint: HookpointOption = None,
    online: OnlineOption = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Print an SAE's format, architecture, widths, threshold summary, hook site, input scaling and dtype."""
    summary = load_sae(path, format=fmt, hookpoint=hookpoint, online=online).summary()
    typer.echo(json.dumps(summary, indent=2, default=str) if as_json else format_summary(summary))


@app.command("convert")
def convert(
    src: Annotated[str, typer.Argument(help="SAE to read (any supported format).")],
    dst: Annotated[str, typer.Argument(help="Folder to write in the SAELens layout.")],
    fmt: FormatOption = None,
    hookpoint: HookpointOption = None,
    online: OnlineOption = False,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Save as float32, bfloat16, ...")] = None,
) -> None:
    """Convert an SAE to the SAELens layout (cfg.json + sae_weights.safetensors)."""
    sae = load_sae(src, format=fmt, hookpoint=hookpoint, online=online, dtype=parse_dtype(dtype))
    out = save_sae(sae, dst)
    typer.echo(f"Wrote {out} (SAELens layout) from {src} ({sae.cfg.source_format}).")
