"""The one HTML home: every page trackstar-db writes or serves (the report, the explorer pages,
the curation sections, the live page) is built from the pieces here."""

from __future__ import annotations

import io

from trackstar_db.errors import TrackstarError


def svg(fig, salt: str) -> str:
    """A matplotlib Figure as inline <svg> text (text kept as text, ids made unique by salt)."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        fig.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def figure(n_panels: int, width: float = 3.7):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise TrackstarError("the report needs matplotlib: pip install 'trackstar-db[report]'") from None
    fig = Figure(figsize=(width * n_panels, 3.1))
    return fig, [fig.add_subplot(1, n_panels, i + 1) for i in range(n_panels)]
