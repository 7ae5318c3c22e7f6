"""The one HTML home: every page trackstar-db writes or serves (the report, the explorer pages, the
curation sections, the live page's stylesheet) is built from the pieces here.

    STYLESHEET   the one stylesheet (the report, the explorer, and /static/explorer.css of `serve`)
    escape       the one escaping of text and attribute values
    document     the one page shell: doctype, charset, viewport, title, the stylesheet (inline, or
                 linked where a server serves it), then what else the page's head needs
    figure, svg  a matplotlib figure of n panels, and its inline <svg> text

Written pages are plain HTML with the stylesheet inline: no script, no network, open from disk.
The served page (`serve`'s "/", made at start-up by serve/routes.live_page) is the same shell
around its body (serve/static/live.html), the stylesheet linked, its own layout and script
(static/app.css, static/app.js) added to the head.
"""

from __future__ import annotations

import html
import io

from trackstar_db.errors import TrackstarError

STYLESHEET = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1240px;padding:0 1em;color:#222;line-height:1.35}
nav{font-size:.9em;margin-bottom:.8em} nav a{margin-right:1em}
h1,h2{font-weight:600} h1{font-size:1.35em;margin:.2em 0} h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em} th,td{border:1px solid #ccc;padding:.25em .55em;text-align:left}
th{background:#f0f0f0;font-weight:600} td{overflow-wrap:anywhere}
td.num{text-align:right;font-variant-numeric:tabular-nums} td.best{font-weight:700;background:#dff3df}
table.list{width:100%} table.list th,table.list td{border:0;border-bottom:1px solid #ddd;background:none}
.note{color:#555;font-size:.9em}
.plots{display:flex;flex-wrap:wrap;gap:1em} .plots svg{max-width:100%;height:auto}
.tables{display:flex;flex-wrap:wrap;gap:0 2em}
.target{background:#dde8ff;padding:0 .2em}
.facts{color:#555;font-size:.9em} .runs{display:grid;grid-template-columns:repeat(auto-fill,minmax(290px,1fr));gap:1em}
.run{border:1px solid #ddd;border-radius:6px;padding:.5em .7em;min-width:0} .run h2{font-size:1em;margin:.1em 0 .4em;border:0}
ol{padding-left:1.6em;margin:.2em 0} li{margin:.5em 0;overflow-wrap:anywhere}
.meta{font-size:.8em;color:#666} .ok{color:#080;font-weight:bold} .bad{color:#b00;font-weight:bold}
mark{background:#ffe27a} .tk{border-radius:2px} .sh{text-decoration:underline;font-weight:600}
details{margin-top:.4em;font-size:.95em} summary{cursor:pointer;color:#345}
.legend{font-size:.85em;color:#444}
.lab{border-radius:3px;padding:0 .3em;border:1px solid #bbb} .l-both{background:#c8ecc8} .l-states{background:#dde8ff}
.l-moves{background:#ffe9c2} .l-none{color:#888}
"""


def escape(text) -> str:
    """`text` (any value, as str) safe in HTML text and in a quoted attribute value."""
    return html.escape(str(text), quote=True)


def document(title: str, body: str, *, stylesheet_href: str | None = None, head: str = "") -> str:
    """A whole HTML document: `body` (HTML) under `title` (text), the stylesheet inline, or linked
    from `stylesheet_href` (a server's copy of STYLESHEET); `head`: markup the head ends with."""
    style = (f'<link rel="stylesheet" href="{escape(stylesheet_href)}">' if stylesheet_href is not None
             else f"<style>{STYLESHEET}</style>")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width">{style}{head}</head>'
            f"<body>{body}</body></html>")


def svg(fig, salt: str) -> str:
    """A matplotlib Figure as inline <svg> text (text kept as text, ids made unique by salt)."""
    import matplotlib  # heavy: matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        fig.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def figure(n_panels: int, width: float = 3.7):
    """A matplotlib Figure of `n_panels` side by side, and their axes (matplotlib is the report extra)."""
    try:
        from matplotlib.figure import Figure  # heavy: matplotlib
    except ImportError:
        raise TrackstarError("the report needs matplotlib: pip install 'trackstar-db[report]'") from None
    fig = Figure(figsize=(width * n_panels, 3.1))
    return fig, [fig.add_subplot(1, n_panels, i + 1) for i in range(n_panels)]
