"""The paper's figures as pure plotting functions: plain data in, a PNG (150 dpi) and a PDF out.

Every ``plot_*`` function takes lists / numpy arrays, draws on a fresh ``matplotlib.figure.Figure``
(no pyplot, no global backend), and writes ``OUT_DIR/STEM.png`` and ``OUT_DIR/STEM.pdf`` atomically
through :func:`save`, returning ``{"png": path, "pdf": path}``. NaN (or ``None``) entries are skipped or
drawn grey; they never raise. Mismatched lengths raise :class:`~darkmatter.errors.ShapeError`.

Modules, by what they draw: :mod:`.style` (palette, rcParams, axes helpers, :func:`save`), :mod:`.inputs`
(input checks), :mod:`.scaling` (Fig 1), :mod:`.error_prediction` (Fig 2), :mod:`.per_token` (Figs 4, 5,
App. E), :mod:`.distributions` (Figs 6, 12), :mod:`.probes` (Figs 13, 14) and :mod:`.downstream`
(Figs 7-10, 15). Import the public names from here.
"""

from __future__ import annotations

from matplotlib.axes import Axes as Axes
from matplotlib.figure import Figure as Figure

from darkmatter.report.figures.distributions import (
    plot_linear_vs_nonlinear_norms,
    plot_norm_prediction_violins,
)
from darkmatter.report.figures.downstream import (
    plot_ce_recovered,
    plot_detection_accuracy,
    plot_earlier_layer_r2,
    plot_synthetic_simulation,
    plot_training_curves,
)
from darkmatter.report.figures.error_prediction import plot_error_prediction_maps
from darkmatter.report.figures.per_token import _escape_token as _escape_token
from darkmatter.report.figures.per_token import plot_per_token_matrix, plot_token_trace
from darkmatter.report.figures.probes import plot_layer_baselines, plot_probe_vs_latents
from darkmatter.report.figures.scaling import decomposition_bands as decomposition_bands
from darkmatter.report.figures.scaling import plot_scaling_decomposition
from darkmatter.report.figures.style import BLACK as BLACK
from darkmatter.report.figures.style import BLUE as BLUE
from darkmatter.report.figures.style import DPI as DPI
from darkmatter.report.figures.style import GREEN as GREEN
from darkmatter.report.figures.style import MISSING as MISSING
from darkmatter.report.figures.style import ORANGE as ORANGE
from darkmatter.report.figures.style import PALETTE, formats, save
from darkmatter.report.figures.style import PURPLE as PURPLE
from darkmatter.report.figures.style import SEQ_CMAP as SEQ_CMAP
from darkmatter.report.figures.style import SKY as SKY
from darkmatter.report.figures.style import VERMILION as VERMILION
from darkmatter.report.figures.style import YELLOW as YELLOW

__all__ = [
    "PALETTE",
    "formats",
    "plot_ce_recovered",
    "plot_detection_accuracy",
    "plot_earlier_layer_r2",
    "plot_error_prediction_maps",
    "plot_layer_baselines",
    "plot_linear_vs_nonlinear_norms",
    "plot_norm_prediction_violins",
    "plot_per_token_matrix",
    "plot_probe_vs_latents",
    "plot_scaling_decomposition",
    "plot_synthetic_simulation",
    "plot_token_trace",
    "plot_training_curves",
    "save",
]
