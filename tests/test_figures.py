"""Every figure renders to a real PNG and PDF, with few points, many points and NaNs, and saves atomically."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib import cbook
from matplotlib.figure import Figure
from matplotlib.image import imread

from darkmatter.errors import ShapeError
from darkmatter.report import figures as F

NAN = math.nan
DEMO_W = [256, 512, 1024, 2048]
DEMO_K = [8.0, 16.0, 32.0, 64.0]


def check_outputs(paths: dict[str, Path], out_dir: Path) -> None:
    """Both files exist, the PNG is a non-trivial, non-flat image, the PDF is a PDF, no temp files remain."""
    assert set(paths) == {"png", "pdf"}
    img = imread(paths["png"])
    assert img.shape[0] > 150 and img.shape[1] > 200, img.shape
    assert float(np.std(img[..., :3])) > 0
    assert paths["pdf"].read_bytes()[:4] == b"%PDF"
    assert not [p.name for p in out_dir.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def demo_family() -> tuple[list[int], list[float]]:
    """The embedded demo's shape: a width sweep at one k plus a k sweep at one width (7 SAEs).

    The width sweep's measured L0s scatter around k = 32, as for JumpReLU SAEs (close y ticks).
    """
    widths = [*DEMO_W, 1024, 1024, 1024]
    l0s = [31.6, 32.3, 32.0, 31.8, 8.0, 16.0, 64.0]
    return widths, l0s


def full_grid() -> tuple[list[int], list[float]]:
    """Paper scale: 7 widths × 10 L0s."""
    ws = [2**e for e in range(14, 21)]
    ks = [float(round(10 * 1.5**i)) for i in range(10)]
    return [w for w in ws for _ in ks], [k for _ in ws for k in ks]


def _maps(widths: list[int], l0s: list[float], out: Path, nan_at: int | None = None) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    n = len(widths)
    fvu = list(0.2 + 0.1 * rng.random(n))
    vec = list(0.3 + 0.3 * rng.random(n))
    norm = list(0.8 + 0.1 * rng.random(n))
    nl = list(0.1 + 0.05 * rng.random(n))
    if nan_at is not None:
        fvu[nan_at] = vec[nan_at] = norm[nan_at] = nl[nan_at] = NAN
    return F.plot_error_prediction_maps(widths, l0s, fvu, vec, norm, nl, out)


def count_contourf(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = F.Axes.contourf

    def spy(self: Any, *a: Any, **k: Any) -> Any:
        calls.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(F.Axes, "contourf", spy)
    return calls


def saved_figures(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """The figures Fig 2's module saves, kept for inspection."""
    from darkmatter.report.figures import error_prediction

    figs: list[Figure] = []
    original = error_prediction.save

    def keep(fig: Figure, out_dir: Path, stem: str) -> dict[str, Path]:
        figs.append(fig)
        return original(fig, out_dir, stem)

    monkeypatch.setattr(error_prediction, "save", keep)
    return figs


def map_titles(fig: Figure) -> list[str]:
    """The titles of the figure's panels (colour bars left out)."""
    return [ax.get_title() for ax in fig.axes if ax.get_label() != "<colorbar>"]


FOUR_MAPS = ["FVU", "Vector probe", "Norm probe", "FVU$_"]


def test_error_prediction_maps_sparse_family_with_nan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls, figs = count_contourf(monkeypatch), saved_figures(monkeypatch)
    check_outputs(_maps(*demo_family(), tmp_path, nan_at=2), tmp_path)
    # 4 widths and 6 L0s with finite values, not on one line: each map is interpolated over their hull
    assert len(calls) == 4
    titles = map_titles(figs[0])
    assert len(titles) == 4 and all(t.startswith(s) for t, s in zip(titles, FOUR_MAPS, strict=True))


def test_error_prediction_maps_full_grid_draws_contours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_contourf(monkeypatch)
    check_outputs(_maps(*full_grid(), tmp_path, nan_at=5), tmp_path)
    assert len(calls) == 4  # one filled contour per map


def paper_grid() -> tuple[list[int], list[float]]:
    """The published Gemma Scope 9B layer-20 residual grid: 60 SAEs scattered over width × L0, with the
    measured L0s off the nominal ones by up to 10%."""
    nominal = {
        14: [11, 20, 36, 57, 58, 68, 138, 310, 393, 408, 427],
        15: [11, 55, 57, 334, 344, 357],
        16: [11, 54, 55, 292, 298, 309],
        17: [10, 11, 12, 19, 34, 51, 53, 54, 62, 114, 221, 269, 276, 288],
        18: [10, 11, 13, 49, 50, 64, 249, 259, 276],
        19: [10, 24, 46, 48, 78, 229, 241, 298],
        20: [11, 19, 34, 57, 101, 193],
    }
    rng = np.random.default_rng(1)
    widths = [2**e for e, l0s in nominal.items() for _ in l0s]
    l0s = [float(n * rng.uniform(0.9, 1.1)) for l0s in nominal.values() for n in l0s]
    return widths, l0s


def test_error_prediction_maps_paper_grid_four_contoured_maps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls, figs = count_contourf(monkeypatch), saved_figures(monkeypatch)
    widths, l0s = paper_grid()
    assert len(widths) == 60 and len(set(zip(widths, l0s, strict=True))) == 60
    # smooth metrics, as measured: FVU falls with width and L0, the probes' R² moves the other way
    lw, ll = np.log2(widths), np.log(l0s)
    fvu = 1.0 - 0.03 * lw - 0.05 * ll
    vec, norm, nl = 0.2 + 0.05 * ll, 0.95 - 0.01 * lw, 0.12 + 0.002 * lw
    check_outputs(F.plot_error_prediction_maps(widths, l0s, fvu, vec, norm, nl, tmp_path), tmp_path)
    assert len(calls) == 4
    (fig,) = figs
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 4 and [ax.get_xscale() for ax in panels] == ["log"] * 4
    assert [ax.get_yscale() for ax in panels] == ["log"] * 4
    for ax in panels:
        (filled,) = [c for c in ax.collections if hasattr(c, "levels")]
        assert len(filled.levels) == 16  # 15 filled levels
        dots = [c for c in ax.collections if not hasattr(c, "levels") and len(c.get_offsets())]
        assert sum(len(c.get_offsets()) for c in dots) == 60  # a dot at every SAE


@pytest.mark.parametrize(
    ("widths", "l0s"),
    [
        ([256, 512, 256, 512], [8.0, 16.0, 32.0, 64.0]),  # two widths
        ([256, 512, 1024, 2048], [16.0, 16.0, 32.0, 32.0]),  # two L0s
        ([256, 512, 768, 1024], [10.0, 20.0, 30.0, 40.0]),  # collinear in raw coordinates
    ],
    ids=["two-widths", "two-l0s", "collinear"],
)
def test_error_prediction_maps_fall_back_to_markers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, widths: list[int], l0s: list[float]
) -> None:
    calls = count_contourf(monkeypatch)
    check_outputs(_maps(widths, l0s, tmp_path), tmp_path)
    assert calls == []


def test_error_prediction_maps_nans_leave_too_few_points_for_contours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_contourf(monkeypatch)
    widths, l0s = [256, 512, 1024, 2048], [8.0, 16.0, 32.0, 64.0]
    fvu = [0.3, NAN, 0.2, NAN]  # two finite values: markers only
    check_outputs(F.plot_error_prediction_maps(widths, l0s, fvu, fvu, fvu, fvu, tmp_path), tmp_path)
    assert calls == []


def test_error_prediction_maps_without_a_positive_width(tmp_path: Path) -> None:
    """Nothing can be placed on the log axes: every map says so instead of failing to draw."""
    bad = [0, -1, 0]
    check_outputs(_maps(bad, [8.0, 16.0, 32.0], tmp_path), tmp_path)
    check_outputs(_maps([], [], tmp_path), tmp_path)
    check_outputs(_maps([256, 512], [NAN, -3.0], tmp_path), tmp_path)


PAPER_W = [16384, 32768, 65536, 131072, 262144, 524288, 1048576]
PAPER_FVU = [0.312, 0.285, 0.264, 0.249, 0.242, 0.233, 0.215]
PAPER_NL = [0.118, 0.121, 0.122, 0.123, 0.122, 0.125, 0.117]
PAPER_FIT = {"c": 0.186, "a": 2.708, "m": 0.317}


def test_scaling_decomposition_paper_scale_with_pursuit_and_ci(tmp_path: Path) -> None:
    ci = {k: {"low": v * 0.95, "high": v * 1.05} for k, v in PAPER_FIT.items()}
    paths = F.plot_scaling_decomposition(
        PAPER_W,
        PAPER_FVU,
        PAPER_NL,
        PAPER_FIT,
        ci,
        float(np.mean(PAPER_NL)),
        tmp_path,
        pursuit_fvu=[v - 0.01 for v in PAPER_FVU],
        pursuit_fit={"c": 0.18, "a": 2.6, "m": 0.32},
        pursuit_nonlinear=[0.117, 0.120, 0.119, 0.115, 0.120, 0.115, 0.109],
    )
    check_outputs(paths, tmp_path)


def test_scaling_decomposition_asymptote_below_nonlinear_and_nans(tmp_path: Path) -> None:
    fvu = [0.5, 0.4, NAN, 0.3]
    nl = [0.35, NAN, 0.33, 0.34]
    fit = {"c": 0.1, "a": 3.0, "m": 0.4}  # c < FVU_nonlinear: bands must clip, not go negative
    check_outputs(F.plot_scaling_decomposition(DEMO_W, fvu, nl, fit, None, NAN, tmp_path), tmp_path)


def test_scaling_decomposition_without_fit(tmp_path: Path) -> None:
    paths = F.plot_scaling_decomposition(DEMO_W, [0.5, 0.4, 0.35, 0.3], [0.2] * 4, None, None, 0.2, tmp_path)
    check_outputs(paths, tmp_path)


def test_decomposition_bands_stack_and_never_go_negative() -> None:
    xs = np.geomspace(100, 1e5, 50)
    curve = 0.2 + 3.0 * xs**-0.4
    # normal case: bands tile [0, curve] in order nonlinear < encoder < linear < absent
    bands = {
        k: (lo, hi) for k, lo, hi in F.decomposition_bands(xs.shape, curve, 0.2, 0.12, np.full(50, 0.11))
    }
    assert list(bands) == ["absent", "linear", "encoder", "nonlinear"]
    np.testing.assert_allclose(bands["nonlinear"][1], 0.11)
    np.testing.assert_allclose(bands["linear"][0], 0.12)
    np.testing.assert_allclose(bands["linear"][1], 0.2)
    np.testing.assert_allclose(bands["absent"][1], curve)
    # c below the nonlinear level, pursuit above it: every band keeps a non-negative height
    for c, nl, p in [(0.1, 0.35, 0.4), (0.3, 0.1, np.nan), (0.05, 0.5, 0.0)]:
        for _, lo, hi in F.decomposition_bands(xs.shape, curve, c, nl, np.full(50, p)):
            assert np.all(hi[np.isfinite(hi)] >= lo[np.isfinite(hi)])
    linear = next(b for b in F.decomposition_bands(xs.shape, curve, 0.1, 0.35, None) if b[0] == "linear")
    assert np.all(linear[2] == linear[1])  # c < FVU_nonlinear: the linear band is empty
    assert [b[0] for b in F.decomposition_bands(xs.shape, curve, np.nan, np.nan, None)] == []


def test_per_token_matrix_upper_triangle_and_percent_variant(tmp_path: Path) -> None:
    names = ["16k", "32k", "65k", "131k", "262k", "524k", "1M"]
    n = len(names)
    m = np.full((n, n), NAN)
    for i in range(n):
        for j in range(i + 1, n):
            m[i, j] = 0.97 - 0.03 * (j - i)
    check_outputs(F.plot_per_token_matrix(names, m, tmp_path), tmp_path)
    paths = F.plot_per_token_matrix(
        names, m * 6, tmp_path, stem="per_token_pct", title="App. E", cmap_label="% reduction", fmt=".1f"
    )
    check_outputs(paths, tmp_path)
    with pytest.raises(ShapeError):
        F.plot_per_token_matrix(names[:3], m, tmp_path)


def test_token_trace_escapes_special_tokens(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    tokens = [
        "The",
        " $",
        "5",
        "\n",
        "\t",
        "",
        " ",
        "a$b$c",
        "\\alpha",
        "^_{}",
        "日本",
        *[f" w{i}" for i in range(89)],
    ]
    base = 60 + 40 * rng.random(len(tokens))
    series = {f"{w}": list(base * (1 - 0.1 * i)) for i, w in enumerate(["16k", "65k", "262k", "1M"])}
    series["1M"][3] = NAN
    check_outputs(F.plot_token_trace(tokens, series, tmp_path), tmp_path)
    assert F._escape_token("a$b$c") == r"a\$b\$c"
    assert F._escape_token("\\alpha") == "\\alpha"
    assert not any(cbook.is_math_text(F._escape_token(t)) for t in [*tokens, "$x$", "\\$", "$$"])
    assert F._escape_token("\n") == "\\n"
    assert F._escape_token(" ") == "␣"
    with pytest.raises(ShapeError):
        F.plot_token_trace(tokens[:5], series, tmp_path)


def test_linear_vs_nonlinear_norms_handles_tiny_and_nan_samples(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    lin = [list(rng.gamma(4, 15 / (i + 1), 3000)) for i in range(len(DEMO_W))]
    non = [list(rng.normal(60, 10, 3000)) for _ in DEMO_W]
    lin[1] = [5.0]  # one sample: no density, drawn as a point
    non[2] = [NAN, NAN]  # nothing finite
    non[3][:10] = [NAN] * 10
    check_outputs(F.plot_linear_vs_nonlinear_norms(DEMO_W, lin, non, tmp_path), tmp_path)


def test_norm_prediction_violins(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    qs = ["x", "Sae(x)", "SaeError", "LinearError", "NonlinearError"]
    data = {q: list(0.99 - 0.05 * i - 0.05 * rng.random(10)) for i, q in enumerate(qs)}
    data["LinearError"][0] = NAN
    data["NonlinearError"] = [0.8]
    check_outputs(F.plot_norm_prediction_violins(qs, data, tmp_path), tmp_path)
    with pytest.raises(ShapeError):
        F.plot_norm_prediction_violins([*qs, "missing"], data, tmp_path)


def test_layer_baselines_with_negative_and_nan(tmp_path: Path) -> None:
    layers = list(range(12))
    r2 = {
        "Activations": [0.6, *[0.9] * 11],
        "Token identity": [0.98 - 0.06 * i for i in range(12)],
        "L0": [NAN, *[0.5] * 11],
        "Activation norm": [0.3] * 12,
        "Model loss": [-0.05, *[0.0] * 11],
    }
    check_outputs(F.plot_layer_baselines(layers, r2, tmp_path), tmp_path)


def test_probe_vs_latents_many_points(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    x = rng.gamma(2.0, 20.0, 16384)
    y = x + rng.normal(0, 10, x.size)
    x[:100] = NAN  # never-active latents
    paths = F.plot_probe_vs_latents(list(y), list(x), tmp_path)
    check_outputs(paths, tmp_path)
    assert paths["pdf"].stat().st_size < 2_000_000  # the scatter is rasterised, not 16k vector markers
    check_outputs(F.plot_probe_vs_latents([1.0, 2.0], [1.0, 2.5], tmp_path, stem="few", corr=0.9), tmp_path)


def test_ce_recovered(tmp_path: Path) -> None:
    settings = ["16k", "32k", "65k", "16k L0 11", "16k L0 20"]
    paths = F.plot_ce_recovered(
        settings,
        [76, 72, 66, NAN, 80],
        [42, 43, 44, 63, 46],
        [62, 58, 54, 71, 65],
        [37, 41, 45, 28, NAN],
        [79, 76, 74, 85, 81],
        [61, 65, 67, 53, 59],
        tmp_path,
    )
    check_outputs(paths, tmp_path)


def test_training_curves(tmp_path: Path) -> None:
    steps = np.arange(0, 1000, 10)
    curves = {
        "LinearError": [(float(s), 0.54 + 0.5 * math.exp(-s / 100)) for s in steps],
        "NonlinearError": [(float(s), 0.59 + 0.5 * math.exp(-s / 120)) for s in steps],
        "broken": [(0.0, NAN), (10.0, 0.9)],
    }
    check_outputs(F.plot_training_curves(curves, tmp_path), tmp_path)


def test_detection_accuracy(tmp_path: Path) -> None:
    deciles = ["Not", *[f"Q{i}" for i in range(1, 11)]]
    lin = [0.77, 0.395, 0.43, 0.42, 0.41, 0.46, 0.47, 0.50, 0.53, 0.59, 0.70]
    non = [0.75, 0.365, 0.385, 0.395, 0.39, 0.44, 0.445, 0.475, 0.505, 0.55, NAN]
    ci_lin = [(v - 0.02, v + 0.02) for v in lin]
    ci_non = [(v - 0.02, v + 0.02) for v in non]
    ci_non[0] = (NAN, NAN)
    check_outputs(F.plot_detection_accuracy(deciles, lin, non, ci_lin, ci_non, tmp_path), tmp_path)


def test_earlier_layer_r2(tmp_path: Path) -> None:
    regs = ["Residual", "Prev. residual", "MLP", "Attention"]
    r2 = {
        "NonlinearError": [0.11, 0.14, 0.05, 0.02],
        "SaeError": [0.5, 0.55, 0.1, NAN],
        "LinearError": [0.6, 0.6, 0.12, 0.05],
    }
    check_outputs(F.plot_earlier_layer_r2(regs, r2, tmp_path), tmp_path)


def test_synthetic_simulation(tmp_path: Path) -> None:
    ab = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    curves = {
        "σ_act=1, σ_rec=0.6: SAE": [0.06 + 0.15 * a for a in ab],
        "σ_act=1, σ_rec=0.6: SAE + error prediction": [0.02] * 6,
        "σ_act=0, σ_rec=0: SAE": [0.12 * a for a in ab],
        "σ_act=0, σ_rec=0: SAE + error prediction": [0.0, 0.001, NAN, 0.002, 0.003, 0.003],
    }
    check_outputs(F.plot_synthetic_simulation(ab, curves, tmp_path), tmp_path)


ALL_NAN_CASES: list[tuple[str, Callable[[Path], dict[str, Path]]]] = [
    ("maps", lambda o: F.plot_error_prediction_maps(DEMO_W, DEMO_K, *[[NAN] * 4] * 4, o)),
    ("scaling", lambda o: F.plot_scaling_decomposition(DEMO_W, [NAN] * 4, [NAN] * 4, None, None, NAN, o)),
    ("matrix", lambda o: F.plot_per_token_matrix(["a", "b"], np.full((2, 2), NAN), o)),
    ("violins", lambda o: F.plot_norm_prediction_violins(["x"], {"x": [NAN]}, o)),
    ("probe", lambda o: F.plot_probe_vs_latents([NAN], [NAN], o)),
    ("synthetic", lambda o: F.plot_synthetic_simulation([0.0, 0.5], {"s": [NAN, NAN]}, o)),
]


@pytest.mark.parametrize(("name", "call"), ALL_NAN_CASES, ids=[c[0] for c in ALL_NAN_CASES])
def test_all_nan_inputs_still_render(
    tmp_path: Path, name: str, call: Callable[[Path], dict[str, Path]]
) -> None:
    check_outputs(call(tmp_path), tmp_path)


def test_save_is_atomic_and_cleans_up_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fig = Figure(figsize=(3, 2))
    fig.subplots().plot([0, 1], [0, 1])
    paths = F.save(fig, tmp_path / "new", "fig")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["fig.pdf", "fig.png"]
    before = paths["png"].read_bytes()

    def boom(*a: Any, **k: Any) -> None:
        Path(a[0]).write_bytes(b"partial")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(fig, "savefig", boom)
    with pytest.raises(RuntimeError):
        F.save(fig, tmp_path / "new", "fig")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["fig.pdf", "fig.png"]
    assert paths["png"].read_bytes() == before  # the old complete file is untouched
    for bad in ("", "a/b", ".hidden"):
        with pytest.raises(ValueError):
            F.save(fig, tmp_path, bad)


def test_save_is_deterministic(tmp_path: Path) -> None:
    fig = Figure(figsize=(3, 2))
    fig.subplots().plot([0, 1], [0, 1])
    a, b = F.save(fig, tmp_path / "a", "f"), F.save(fig, tmp_path / "b", "f")
    assert a["png"].read_bytes() == b["png"].read_bytes()
    assert a["pdf"].read_bytes() == b["pdf"].read_bytes()


def test_mismatched_lengths_raise_shape_error(tmp_path: Path) -> None:
    with pytest.raises(ShapeError, match="fvu has 3 entries"):
        F.plot_scaling_decomposition(DEMO_W, [0.1, 0.2, 0.3], [0.1] * 4, None, None, 0.1, tmp_path)
    with pytest.raises(ShapeError):
        F.plot_error_prediction_maps(DEMO_W, DEMO_K[:2], *[[0.1] * 4] * 4, tmp_path)
    with pytest.raises(ShapeError, match="fvu_nonlinear has 3 entries"):
        F.plot_error_prediction_maps(DEMO_W, DEMO_K, *[[0.1] * 4] * 3, [0.1] * 3, tmp_path)
