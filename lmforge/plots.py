"""Matplotlib figures made off-screen and turned into PNG bytes: the one way every picture here is drawn."""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def new_figure(width: float, height: float) -> Figure:
    """A figure (inches) with constrained layout, on an Agg canvas of its own."""
    figure = Figure(figsize=(width, height), layout="constrained")
    # The Agg canvas renders to files with no display and without pyplot's process-wide state, so a picture
    # drawn from a notebook or a server leaves the caller's matplotlib backend alone.
    FigureCanvasAgg(figure)
    return figure


def png_bytes(figure: Figure) -> bytes:
    """The figure as a PNG at 100 dpi."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
