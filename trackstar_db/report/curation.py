"""The report's curation sections (report/summary.py: write_report's `sections`): the
distribution of self-influence with the top outliers, and the contribution ledger by source."""

from __future__ import annotations

import sys

import numpy as np
import pyarrow.compute as pc

from trackstar_db.errors import TrackstarError
from trackstar_db.selection.ledger import ledger
from trackstar_db.selection.self_influence import self_influence

from .page import escape, figure, svg

OUTLIERS = 10


def self_influence_section(db) -> str:
    ranked = self_influence(db)
    values = ranked.column("self_influence").to_numpy()
    quantiles = np.quantile(values, [0.5, 0.95, 0.99])
    top = ranked.slice(0, OUTLIERS).to_pylist()
    ids = [r["example_id"] for r in top]
    rows = db.table("examples", columns=["example_id", "text"], filter=pc.field("example_id").isin(ids))
    texts = dict(zip(rows.column("example_id").to_pylist(), rows.column("text").to_pylist()))
    rows = "".join(f'<tr><td class="num">{r["rank"]}</td><td>{escape(r["example_id"])}</td>'
                   f'<td class="num">{r["self_influence"]:.4g}</td><td>{escape(texts.get(i, "")[:120])}</td></tr>'
                   for r, i in zip(top, ids))
    note = (f"g R<sub>train</sub><sup>-1</sup> g of each of {ranked.num_rows:,} training examples (corrected "
            f"gradients), stored by <code>fit</code>: median {quantiles[0]:.4g}, 95th percentile {quantiles[1]:.4g}, "
            f"99th {quantiles[2]:.4g}. The largest are the examples the rest of the data explains least "
            "(<code>trackstar-db rank</code> lists them).")
    table = f"<table><tr><th>rank</th><th>example</th><th>g R⁻¹ g</th><th>text</th></tr>{rows}</table>"
    return f'<p class="note">{note}</p><div class="plots">{histogram_svg(ranked)}</div>{table}'


def ledger_section(db, by: str = "source") -> str | None:
    table = ledger(db, by)
    chart = ledger_svg(table, by)
    if chart is None:
        return None
    note = (f"Per run, the mean over its queries of the share of retrieved proponents (and of the summed tail-patch "
            f"effect) coming from each value of <code>{escape(by)}</code>; error bars: 95% percentile bootstrap "
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


def ledger_svg(table: pa.Table, by: str, top: int = 12) -> str | None:
    """The report's chart: each run's share of proponents (and tail-patch effect, when measured)
    by group, bars with their bootstrap intervals as error bars; the `top` largest groups."""
    if table.num_rows == 0:
        return None
    share = {}
    for row in table.to_pylist():
        share[row[by]] = max(share.get(row[by], 0.0), row["share"])
    groups = sorted(share, key=lambda g: -share[g])[:top]
    runs = sorted(set(table.column("run_id").to_pylist()))
    panels = [("share", "share of proponents")]
    if any(n > 0 for n in table.column("n_patched_queries").to_pylist()):
        panels.append(("tailpatch", "tail-patch effect (pp)"))
    fig, axes = figure(len(panels), width=5.5)
    width = 0.8 / len(runs)
    rows = {(r["run_id"], r[by]): r for r in table.to_pylist()}
    for ax, (metric, title) in zip(axes, panels):
        for i, run in enumerate(runs):
            xs, ys, errors = [], [], [[], []]
            for x, group in enumerate(groups):
                row = rows.get((run, group))
                if row is None or row[metric] is None or np.isnan(row[metric]):
                    continue
                xs.append(x + (i - (len(runs) - 1) / 2) * width)
                ys.append(row[metric])
                errors[0].append(max(0.0, row[metric] - row[f"{metric}_low"]))
                errors[1].append(max(0.0, row[f"{metric}_high"] - row[metric]))
            ax.bar(xs, ys, width, yerr=errors, capsize=2, label=run)
        ax.set_title(title)
        ax.set_xticks(range(len(groups)), [str(g)[:18] for g in groups], rotation=35, ha="right", fontsize="small")
        ax.grid(axis="y", alpha=0.3)
    axes[-1].legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    return svg(fig, f"ledger-{by}")


def histogram_svg(table: pa.Table) -> str:
    """The report's plot: the distribution of log10 self-influence (and of |g|^2), as inline SVG."""
    fig, (ax,) = figure(1, width=7.5)
    for column, label, color in (("self_influence", "g R⁻¹ g", "#4c72b0"), ("grad_sq_norm", "|g|²", "#dd8452")):
        values = table.column(column).to_numpy()
        values = values[np.isfinite(values) & (values > 0)]
        if len(values):
            ax.hist(np.log10(values), bins=40, alpha=0.6, color=color, label=label)
    ax.set_xlabel("log10 self-influence")
    ax.set_ylabel("training examples")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return svg(fig, "self-influence")
