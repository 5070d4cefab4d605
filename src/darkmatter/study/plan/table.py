"""The plan as a table: one row per step, the totals, the budget, the SAE groups and any problems."""

from __future__ import annotations

from darkmatter.study.budget import GB, describe_groups
from darkmatter.study.plan.planner import StudyPlan

COLUMNS = (
    ("step", "<"),
    ("tokens", ">"),
    ("GFLOP", ">"),
    ("disk GB", ">"),
    ("groups", ">"),
    ("passes", ">"),
    ("device GB", ">"),
    ("host GB", ">"),
    ("seconds", ">"),
)
LEGEND = (
    "tokens: activations the step reads or computes (epochs and passes counted once per token and epoch); "
    "GFLOP: its arithmetic; disk GB: what it writes; groups: SAE groups that fit the device budget "
    "together (each its own pass(es) over the store); passes: passes over its data; device/host GB: its "
    "peak memory (the process and the resident model included); seconds: FLOPs over this machine's "
    "calibrated throughput, with measured per-step efficiencies."
)


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(
        f"{c:{align}{w}}" for c, w, (_, align) in zip(cells, widths, COLUMNS, strict=True)
    ).rstrip()


def format_plan(plan: StudyPlan, *, legend: bool = True) -> str:
    """The whole plan, for ``darkmatter plan``."""
    rows = [
        [
            s.name,
            f"{s.tokens:,}",
            f"{s.flops / 1e9:,.1f}",
            f"{s.disk_bytes / GB:,.3f}",
            str(len(s.groups)),
            str(s.passes),
            f"{s.peak_device_bytes / GB:,.2f}",
            f"{s.peak_host_bytes / GB:,.2f}",
            f"{s.seconds:,.1f}",
        ]
        for s in plan.steps
    ]
    total = [
        "total",
        "",
        f"{sum(s.flops for s in plan.steps) / 1e9:,.1f}",
        f"{plan.disk_bytes / GB:,.3f}",
        "",
        "",
        f"{plan.peak_device_bytes / GB:,.2f}",
        f"{plan.peak_host_bytes / GB:,.2f}",
        f"{plan.total_seconds:,.1f}",
    ]
    header = [c for c, _ in COLUMNS]
    widths = [max(len(r[i]) for r in [header, *rows, total]) for i in range(len(COLUMNS))]
    lines = [_row(header, widths), *(_row(r, widths) for r in rows), _row(total, widths)]
    b = plan.budget
    device = "shared with the host" if b.shared else f"{b.device_bytes / GB:,.2f} GB"
    lines += [
        "",
        f"budget: device {b.device} {device}; host {b.host_bytes / GB:,.2f} GB; "
        f"disk {b.disk_bytes / GB:,.2f} GB",
        f"calibration: {plan.calibration.describe()}",
        f"model: {plan.dims.name} ({plan.dims.n_layers} layers, d {plan.dims.d_model}, "
        f"{plan.dims.params() / 1e9:,.2f} B parameters; dimensions from "
        + ("the planner's table" if plan.dims.source == "table" else "its config file")
        + ")",
    ]
    for s in plan.steps:
        if len(s.groups) > 1 or (s.groups and len(s.groups[0]) > 1):
            names = "; ".join(", ".join(g) for g in s.groups)
            lines.append(f"groups of {s.name}: {describe_groups(s.groups)}: {names}")
    lines += [f"note: {n}" for n in plan.notes]
    lines.append(plan.summary())
    if legend:
        lines += ["", LEGEND]
    problems = plan.problems()
    if problems:
        lines.append("")
        lines += [f"problem: {p}" for p in problems]
    return "\n".join(lines)
