"""The report's curation sections (evaluation/report.py: write_report's `sections`): the
distribution of self-influence with the top outliers, and the contribution ledger by source."""

from __future__ import annotations

import html
import sys

import numpy as np
import pyarrow.compute as pc

from trackstar_db.errors import TrackstarError

OUTLIERS = 10


def self_influence_section(db) -> str:
    from .self_influence import histogram_svg, self_influence

    ranked = self_influence(db)
    values = ranked.column("self_influence").to_numpy()
    quantiles = np.quantile(values, [0.5, 0.95, 0.99])
    top = ranked.slice(0, OUTLIERS).to_pylist()
    ids = [r["example_id"] for r in top]
    rows = db.table("examples", columns=["example_id", "text"], filter=pc.field("example_id").isin(ids))
    texts = dict(zip(rows.column("example_id").to_pylist(), rows.column("text").to_pylist()))
    rows = "".join(f'<tr><td class="num">{r["rank"]}</td><td>{html.escape(r["example_id"])}</td>'
                   f'<td class="num">{r["self_influence"]:.4g}</td><td>{html.escape(texts.get(i, "")[:120])}</td></tr>'
                   for r, i in zip(top, ids))
    note = (f"g R<sub>train</sub><sup>-1</sup> g of each of {ranked.num_rows:,} training examples (corrected "
            f"gradients), stored by <code>fit</code>: median {quantiles[0]:.4g}, 95th percentile {quantiles[1]:.4g}, "
            f"99th {quantiles[2]:.4g}. The largest are the examples the rest of the data explains least "
            "(<code>trackstar-db rank</code> lists them).")
    table = f"<table><tr><th>rank</th><th>example</th><th>g R⁻¹ g</th><th>text</th></tr>{rows}</table>"
    return f'<p class="note">{note}</p><div class="plots">{histogram_svg(ranked)}</div>{table}'


def ledger_section(db, by: str = "source") -> str | None:
    from .ledger import ledger, ledger_svg

    table = ledger(db, by)
    chart = ledger_svg(table, by)
    if chart is None:
        return None
    note = (f"Per run, the mean over its queries of the share of retrieved proponents (and of the summed tail-patch "
            f"effect) coming from each value of <code>{html.escape(by)}</code>; error bars: 95% percentile bootstrap "
            "intervals over queries (1,000 resamples, seed 0). <code>trackstar-db eval --by COLUMN</code> gives "
            "the table for any metadata column.")
    return f'<p class="note">{note}</p><div class="plots">{chart}</div>'


def sections(db) -> list[tuple[str, str, str]]:
    """(anchor, heading, HTML) of each curation section this database can show; a section that
    cannot be made is skipped with a note on stderr."""
    out = []
    for anchor, heading, make in (("self-influence", "Self-influence: outliers of the training data",
                                   self_influence_section),
                                  ("ledger", "Contribution ledger by source", ledger_section)):
        try:
            part = make(db)
        except (TrackstarError, OSError) as exc:
            print(f"report: no {anchor} section: {exc}", file=sys.stderr)
            continue
        if part:
            out.append((anchor, heading, part))
    return out
