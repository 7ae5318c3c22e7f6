"""The report's front page: the method-by-metric table and plots, static and self-contained.

`write_report(out_dir, summary, by_bucket=..., by_correct=..., pages=...)` writes
out_dir/index.html (the stylesheet inline: page.py; inline SVG plots from matplotlib's SVG backend; no script, no
external file) and, given query pages (explorer.build_pages), the query explorer under
out_dir/queries/ (explorer.py). Inputs:

    summary     one row per run: method, run_id, n_queries, mrr, recall_at_10,
                n_tailpatch_queries, tailpatch_at_1/3/5/10 (any subset of the metric columns)
    by_bucket   the same metrics with a frequency_bucket column (one row per run and bucket)
    by_correct  the same with a model_correct column (does the model answer the query?)
    lds         LDS per run with a bootstrap interval (validate/lds.lds_table of one validation):
                a chart and table after the summary; the summary's own lds column shows the value
    trajectory  one probe's loss over a held-out Simfluence run: step, actual and the simulated
                columns linear, additive, constant (simfluence.evaluate.report_trajectory; the
                schema metadata names run_id, query_id and train_runs)

The summary table has methods as rows, numbers as every table prints them (trackstar_db/numbers.py:
MRR and recall to 3 decimals, tail-patch to 2) and the best value of each metric column in bold on green; it is sized to fit
a 1280 px window. The splits are plotted and tabulated compactly (one metric per small table:
methods as rows, bucket / correctness as columns).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import pyarrow as pa

from trackstar_db import numbers
from trackstar_db.errors import TrackstarError

from .explorer import write_explorer
from .page import document, escape, figure, svg

TAILPATCH = ("tailpatch_at_1", "tailpatch_at_3", "tailpatch_at_5", "tailpatch_at_10")
METRICS = ("mrr", "recall_at_10") + TAILPATCH
LABELS = {"mrr": "MRR", "recall_at_10": "recall@10", "n_queries": "queries",
          "n_tailpatch_queries": "patched", **{c: f"tail-patch@{c.rsplit('_', 1)[1]}" for c in TAILPATCH}, "lds": "LDS"}


def _label_runs(table: pa.Table) -> list[str]:
    """'method', or 'method (run_id)' where a method has several runs or the run is renamed."""
    methods = table.column("method").to_pylist()
    runs = table.column("run_id").to_pylist() if "run_id" in table.column_names else methods
    several = {m for m in methods if len({r for mm, r in zip(methods, runs) if mm == m}) > 1}
    return [f"{m} ({r})" if m in several or (r != m and r is not None) else m for m, r in zip(methods, runs)]


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def metric_table(rows: Sequence[str], columns: Sequence[str], values: dict, headers: Sequence[str],
                 digits: int, mark_best: bool = True, best_of=max) -> str:
    """An HTML table: `rows` labels, `columns` keys, values[(row, column)] numbers; the largest
    value of each column (`best_of=min`: the smallest) is marked best (class 'best')."""
    best = {}
    for c in columns:
        seen = [values[(r, c)] for r in rows if not _missing(values.get((r, c)))]
        best[c] = round(best_of(seen), digits) if seen and mark_best else None

    def cell(r, c):
        v = values.get((r, c))
        if _missing(v):
            return '<td class="num"></td>'
        text = numbers.number(v, digits)
        cls = "num best" if best[c] is not None and isinstance(v, float) and round(v, digits) == best[c] else "num"
        return f'<td class="{cls}">{text}</td>'

    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(f"<tr><td>{escape(r)}</td>" + "".join(cell(r, c) for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def summary_html(summary: pa.Table) -> str:
    """The method-by-metric table: methods as rows, rounded, the best of each metric marked."""
    labels = _label_runs(summary)
    columns = [c for c in ("n_queries", "mrr", "recall_at_10", "n_tailpatch_queries") + TAILPATCH + ("lds",)
               if c in summary.column_names and (c != "lds" or summary.column(c).null_count < summary.num_rows)]
    rows = summary.to_pylist()
    best, places = {}, {}
    for c in columns:
        seen = [r[c] for r in rows if not _missing(r[c])]
        places[c] = numbers.places(c, seen)
        best[c] = round(max(seen), places[c]) if c in METRICS + ("lds",) and seen else None
    head = "<th>method</th>" + "".join(
        f"<th>{LABELS[c]}{' (pp)' if c in TAILPATCH else ''}</th>" for c in columns)
    body = []
    for label, row in zip(labels, rows):
        cells = []
        for c in columns:
            v = row[c]
            mark = best[c] is not None and not _missing(v) and round(v, places[c]) == best[c]
            cells.append(f'<td class="num{" best" if mark else ""}">{numbers.number(v, places[c])}</td>')
        body.append(f"<tr><td>{escape(label)}</td>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def split_tables(table: pa.Table, column: str, names: dict | None = None) -> str:
    """Small tables of one metric each (MRR, tail-patch@1 when present): rows = runs, columns =
    the values of `column` (e.g. frequency buckets)."""
    labels = _label_runs(table)
    keys = sorted(set(table.column(column).to_pylist()), key=lambda v: (v is None, v))
    parts = []
    for metric in [m for m in ("mrr", "tailpatch_at_1") if m in table.column_names]:
        values = {(lab, r[column]): r[metric] for lab, r in zip(labels, table.to_pylist())}
        heads = [LABELS[metric] + (" (pp)" if metric in TAILPATCH else "")] + [
            (names or {}).get(k, str(k)) for k in keys]
        parts.append(f"<div>{metric_table(list(dict.fromkeys(labels)), keys, values, heads, numbers.places(metric, values.values()))}</div>")
    return f'<div class="tables">{"".join(parts)}</div>'


def _values(rows: list[dict], column: str) -> list[float]:
    return [math.nan if _missing(r[column]) else float(r[column]) for r in rows]


def summary_plot(summary: pa.Table) -> str | None:
    """Bars per run: MRR, recall@10, and tail-patch at each k (grouped)."""
    labels, rows = _label_runs(summary), summary.to_pylist()
    panels = [c for c in ("mrr", "recall_at_10") if c in summary.column_names]
    ks = [c for c in TAILPATCH if c in summary.column_names]
    if not panels and not ks:
        return None
    fig, axes = figure(len(panels) + bool(ks))
    for ax, column in zip(axes, panels):
        ax.bar(range(len(labels)), _values(rows, column), color="#4c72b0")
        ax.set_title(LABELS[column])
    if ks:
        ax, width = axes[-1], 0.8 / len(ks)
        for i, column in enumerate(ks):
            ax.bar([x + (i - (len(ks) - 1) / 2) * width for x in range(len(labels))],
                   _values(rows, column), width, label=column.rsplit("_", 1)[1])
        ax.set_title("tail-patch (pp) at k")
        ax.legend(title="k", fontsize="small")
    for ax in axes:
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize="small")
        ax.grid(axis="y", alpha=0.3)
    return svg(fig, "summary")


def split_plot(table: pa.Table, column: str, xlabel: str, salt: str) -> str | None:
    """One line per run over the values of `column`, one panel per metric (MRR, recall@10, tail-patch@1)."""
    panels = [c for c in ("mrr", "recall_at_10", "tailpatch_at_1") if c in table.column_names]
    if not panels or table.num_rows == 0:
        return None
    keys = sorted(set(table.column(column).to_pylist()), key=lambda v: (v is None, v))
    position = {k: i for i, k in enumerate(keys)}
    labels, rows = _label_runs(table), table.to_pylist()
    fig, axes = figure(len(panels))
    for ax, metric in zip(axes, panels):
        for label in dict.fromkeys(labels):
            mine = sorted((r for lab, r in zip(labels, rows) if lab == label), key=lambda r: position[r[column]])
            ax.plot([position[r[column]] for r in mine], _values(mine, metric), marker="o", label=label)
        ax.set_title(LABELS[metric] + (" (pp)" if metric in TAILPATCH else ""))
        ax.set_xticks(range(len(keys)), [str(k) for k in keys])
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    return svg(fig, salt)


TRAJECTORY = (("actual", "recorded", {"color": "black", "marker": "o", "markersize": 3}),
              ("linear", "Simfluence-Linear", {"color": "#c44e52"}),
              ("additive", "TracIn as simulator (additive)", {"color": "#4c72b0"}),
              ("constant", "constant loss", {"color": "#888888", "linestyle": "--"}))


def trajectory_section(table: pa.Table) -> str:
    """A probe's recorded vs simulated loss over a held-out run: the plot and each simulator's MSE."""
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    fig, (ax,) = figure(1, width=7.5)
    steps, actual = table.column("step").to_pylist(), table.column("actual").to_numpy()
    values = {}
    for column, label, style in TRAJECTORY:
        if column in table.column_names:
            ax.plot(steps, table.column(column).to_numpy(), label=label, linewidth=1.4, **style)
            if column != "actual":
                values[(label, "mse")] = float(((table.column(column).to_numpy() - actual)[1:] ** 2).mean())
    ax.set_xlabel("training step")
    ax.set_ylabel("probe loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    rows = [label for _, label, _ in TRAJECTORY[1:] if (label, "mse") in values]
    note = (f"Probe {escape(meta.get('query_id', '?'))} on held-out run {escape(meta.get('run_id', '?'))}: "
            f"the simulators were fitted on {escape(meta.get('train_runs', '?'))} other runs and rolled out from "
            "the probe's loss at step 0 through this run's batches, never fed its recorded losses. "
            "MSE over steps 1..T of this probe (lower is better); <code>trackstar-db simfluence eval</code> gives all probes.")
    table_html = metric_table(rows, ["mse"], values, ["simulator", "MSE"],
                              numbers.places("mse", values.values()), best_of=min)
    return (f'<p class="note">{note}</p><div class="plots">{svg(fig, "trajectory")}<div>{table_html}</div></div>')


def lds_section(table: pa.Table) -> str:
    """LDS per run with its bootstrap interval (validate/lds.lds_table rows of one validation): a
    bar chart with error bars and the numbers."""
    labels, rows = _label_runs(table), table.to_pylist()
    fig, (ax,) = figure(1, width=max(4.0, 0.6 * len(labels) + 1.5))
    values = _values(rows, "lds")
    # a percentile interval can miss its own point estimate (few queries): that side's bar is 0, not negative
    low = [math.nan if _missing(r["lds_low"]) else max(0.0, v - r["lds_low"]) for v, r in zip(values, rows)]
    high = [math.nan if _missing(r["lds_high"]) else max(0.0, r["lds_high"] - v) for v, r in zip(values, rows)]
    ax.bar(range(len(labels)), values, yerr=[low, high], capsize=3, color="#55a868")
    ax.axhline(0, color="#444", linewidth=0.8)
    ax.set_title("LDS (Spearman, retrained subsets), 95% bootstrap interval")
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    cells = {(lab, c): r[c] for lab, r in zip(labels, rows) for c in ("lds", "lds_low", "lds_high")}
    first = rows[0] if rows else {}
    note = (f"Validation {escape(str(first.get('validation', '')))}: {first.get('n_subsets', '?')} models retrained "
            "on random subsets; per query, the Spearman correlation of each subset's summed scores with minus the "
            "query's loss under the subset's model (higher = the scores predict which subsets help), averaged over "
            "queries. <code>trackstar-db validate</code>; docs/validate.md.")
    table_html = metric_table(labels, ["lds", "lds_low", "lds_high"], cells, ["run", "LDS", "low", "high"],
                              numbers.places("lds", []))
    return f'<p class="note">{note}</p><div class="plots">{svg(fig, "lds")}<div>{table_html}</div></div>'


def _check(name: str, table: pa.Table | None, column: str | None) -> None:
    if table is None:
        return
    for needed in ("method", column):
        if needed and needed not in table.column_names:
            raise TrackstarError(f"report: the {name} table needs a {needed!r} column")


def write_report(out_dir: str | Path, summary: pa.Table, *, by_bucket: pa.Table | None = None,
                 by_correct: pa.Table | None = None, pages: Sequence[dict] = (),
                 trajectory: pa.Table | None = None, lds: pa.Table | None = None,
                 title: str = "trackstar-db report", sections: Sequence[tuple[str, str, str]] = ()) -> Path:
    """Write out_dir/index.html (and out_dir/queries/ given pages); return index.html's path.
    `sections`: more (anchor, heading, HTML) parts, after the splits (report/curation.py)."""
    _check("summary", summary, None)
    _check("by_bucket", by_bucket, "frequency_bucket")
    _check("by_correct", by_correct, "model_correct")
    for needed in ("step", "actual") if trajectory is not None else ():
        if needed not in trajectory.column_names:
            raise TrackstarError(f"report: the trajectory table needs a {needed!r} column")
    nav = ['<a href="#summary">summary</a>']
    parts = ['<h2 id="summary">Methods by metric</h2>', summary_html(summary),
             '<p class="note">MRR and recall@10 over the queries whose fact has a ground-truth example; '
             "tail-patch in percentage points of P(target | prompt) over the patched queries. "
             "Best of each column in bold.</p>"]
    plot = summary_plot(summary)
    if plot:
        parts.append(f'<div class="plots">{plot}</div>')
    if lds is not None and lds.num_rows:
        nav.append('<a href="#lds">LDS</a>')
        parts += ['<h2 id="lds">Counterfactual check: LDS</h2>', lds_section(lds)]
    for name, table, column, xlabel, names in (
            ("bucket", by_bucket, "frequency_bucket", "fact frequency bucket (0 = never stated)", None),
            ("correct", by_correct, "model_correct", "does the model answer correctly?", {True: "correct", False: "wrong"})):
        if table is None or table.num_rows == 0:
            continue
        heading = "By fact frequency bucket" if name == "bucket" else "By model correctness"
        nav.append(f'<a href="#{name}">{heading.lower()}</a>')
        parts += [f'<h2 id="{name}">{heading}</h2>', split_tables(table, column, names)]
        plot = split_plot(table, column, xlabel, name)
        if plot:
            parts.append(f'<div class="plots">{plot}</div>')
    if trajectory is not None and trajectory.num_rows:
        nav.append('<a href="#simfluence">simulated trajectory</a>')
        parts += ['<h2 id="simfluence">Simfluence: a probe\'s loss, recorded and simulated</h2>',
                  trajectory_section(trajectory)]
    for anchor, heading, part in sections:
        nav.append(f'<a href="#{escape(anchor)}">{escape(heading.lower())}</a>')
        parts += [f'<h2 id="{escape(anchor)}">{escape(heading)}</h2>', part]
    if pages:
        write_explorer(out_dir, pages)
        nav.append('<a href="queries/index.html">explore queries</a>')
        parts += ['<h2 id="queries">Queries</h2>',
                  f'<p><a href="queries/index.html">Explore {len(pages)} sampled queries</a>: prompt, target, the '
                  "model's answer and every run's proponents side by side.</p>"]
    text = document(title, f"<h1>{escape(title)}</h1><nav>{''.join(nav)}</nav>{''.join(parts)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "index.html"
    path.write_text(text, encoding="utf-8")
    return path
