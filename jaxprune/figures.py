"""Figures ready for a paper: every figure jaxprune writes goes through `save_figure`.

A figure is saved twice under one stem: a PNG at `DPI` for screens and notebooks, and a PDF
(vector, fonts embedded as TrueType, no creation date so reruns give the same bytes) for print.
Figures are built on `matplotlib.figure.Figure` directly, never through `pyplot`, so writing one
neither opens a window nor changes the backend of the program that called jaxprune.

    figure = new_figure(6.0, 3.0)
    ax = figure.add_subplot()
    ax.bar(names, fractions)
    ax.set_ylabel("kernels kept (fraction of base)")
    paths = save_figure(figure, workdir / "summary.png")  # summary.png and summary.pdf
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

# Resolution of the PNG (journals ask for 300 for photographs, 150-300 for line art).
DPI = 200
# The formats written, raster first.
FORMATS = ("png", "pdf")
# Type 42 (TrueType) fonts in the PDF: publishers refuse the Type 3 fonts matplotlib uses by
# default. A fixed hash salt keeps SVG ids stable if SVG is asked for.
_SAVE_RC = {"pdf.fonttype": 42, "ps.fonttype": 42, "svg.hashsalt": "jaxprune"}
# Metadata that would change on every run.
_NO_DATES = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}


def new_figure(width: float, height: float) -> Figure:
    """A figure of `width` x `height` inches with constrained layout (labels never clipped).

    Args:
      width: inches.
      height: inches.

    Returns:
      A `matplotlib.figure.Figure` not registered with pyplot.
    """
    return Figure(figsize=(width, height), layout="constrained")


def save_figure(
    figure: Figure,
    path: str | Path,
    *,
    formats: Sequence[str] = FORMATS,
    dpi: int = DPI,
) -> dict[str, Path]:
    """Saves `figure` once per format, under the stem of `path` (its suffix is replaced).

    Args:
      figure: the figure.
      path: e.g. ``workdir / "summary.png"``; parent folders are created.
      formats: file formats ("png", "pdf", "svg"); PNG and PDF by default.
      dpi: resolution of raster formats; at least 200.

    Returns:
      Format -> path written, e.g. ``{"png": .../summary.png, "pdf": .../summary.pdf}``.

    Raises:
      ValueError: no format, an unknown one, or a dpi under 200.
    """
    if dpi < DPI:
        raise ValueError(f"Figures are saved at {DPI} dpi or more for print; got dpi={dpi}.")
    known = ("png", "pdf", "svg")
    if not formats or any(f not in known for f in formats):
        raise ValueError(f"formats must be some of {known}; got {tuple(formats)}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = {}
    with matplotlib.rc_context(_SAVE_RC):
        for kind in formats:
            target = path.with_suffix(f".{kind}")
            figure.savefig(target, format=kind, dpi=dpi, metadata=_NO_DATES.get(kind))
            written[kind] = target
    return written
