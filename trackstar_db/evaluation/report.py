"""A static, self-contained HTML report: metric tables, plots and side-by-side proponents.

`write_report(out_dir, summary, samples, by_bucket=...)` writes out_dir/index.html with inline
CSS and inline SVG plots (matplotlib's SVG backend; no scripts, no external files). Inputs:

    summary    one row per run: method, run_id, n_queries, mrr, recall_at_10,
               tailpatch_at_1/3/5/10 (any subset of the metric columns; nulls are left blank)
    by_bucket  the same metrics with a frequency_bucket column (one row per run and bucket)
    samples    from `build_samples`: per query, the proponents of two or more runs

Every column of the given tables is shown; plots use the metric columns that are present.
"""

from __future__ import annotations

import html
import io
import math
import random
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from trackstar_db.errors import TrackstarError

from . import highlight

TAILPATCH = ("tailpatch_at_1", "tailpatch_at_3", "tailpatch_at_5", "tailpatch_at_10")
LABELS = {"mrr": "MRR", "recall_at_10": "recall@10", **{c: f"tail-patch@{c.rsplit('_', 1)[1]} (pp)" for c in TAILPATCH}}

CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1150px;color:#222}
h1,h2{font-weight:600} table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:.3em .6em} th{background:#f0f0f0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.plots{display:flex;flex-wrap:wrap;gap:1em} .plots svg{max-width:100%;height:auto}
.sample{border-top:2px solid #888;margin-top:1.5em}
.side{display:grid;grid-template-columns:repeat(var(--n),1fr);gap:1em}
.side ol{padding-left:1.5em} .side li{margin:.4em 0}
.score{color:#666;font-size:.85em} .ok{color:#080;font-weight:bold} mark{background:#ffe27a}
"""


def _label_runs(table: pa.Table) -> list[str]:
    """'method', or 'method (run_id)' where a method has several runs."""
    methods = table.column("method").to_pylist()
    runs = table.column("run_id").to_pylist() if "run_id" in table.column_names else methods
    several = {m for m in methods if len({r for mm, r in zip(methods, runs) if mm == m}) > 1}
    return [f"{m} ({r})" if m in several else m for m, r in zip(methods, runs)]


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.4g}" if isinstance(value, float) else html.escape(str(value))


def html_table(table: pa.Table) -> str:
    """`table` as an HTML <table>, numbers right-aligned."""
    numeric = [pa.types.is_integer(t) or pa.types.is_floating(t) for t in table.schema.types]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in table.column_names)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{_fmt(v)}</td>' if num else f"<td>{_fmt(v)}</td>"
                         for v, num in zip(row.values(), numeric)) + "</tr>"
        for row in table.to_pylist())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _svg(fig, salt: str) -> str:
    """A matplotlib Figure as inline <svg> text (text kept as text, ids made unique by salt)."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        fig.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _figure(n_panels: int):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise TrackstarError("the report needs matplotlib: pip install 'trackstar-db[report]'") from None
    fig = Figure(figsize=(4.2 * n_panels, 3.4))
    return fig, [fig.add_subplot(1, n_panels, i + 1) for i in range(n_panels)]


def _values(table: pa.Table, column: str) -> list[float]:
    return [math.nan if v is None else float(v) for v in table.column(column).to_pylist()]


def summary_plot(summary: pa.Table) -> str | None:
    """Bars per run: MRR, recall@10, and tail-patch at each k (grouped)."""
    labels = _label_runs(summary)
    panels = [c for c in ("mrr", "recall_at_10") if c in summary.column_names]
    ks = [c for c in TAILPATCH if c in summary.column_names]
    if not panels and not ks:
        return None
    fig, axes = _figure(len(panels) + bool(ks))
    for ax, column in zip(axes, panels):
        ax.bar(range(len(labels)), _values(summary, column), color="#4c72b0")
        ax.set_title(LABELS[column])
    if ks:
        ax, width = axes[-1], 0.8 / len(ks)
        for i, column in enumerate(ks):
            ax.bar([x + (i - (len(ks) - 1) / 2) * width for x in range(len(labels))],
                   _values(summary, column), width, label=column.rsplit("_", 1)[1])
        ax.set_title("tail-patch (pp) at k")
        ax.legend(title="k", fontsize="small")
    for ax in axes:
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.grid(axis="y", alpha=0.3)
    return _svg(fig, "summary")


def bucket_plot(by_bucket: pa.Table) -> str | None:
    """One line per run over frequency buckets, one panel per metric."""
    panels = [c for c in ("mrr", "recall_at_10", "tailpatch_at_10") if c in by_bucket.column_names]
    if not panels or by_bucket.num_rows == 0:
        return None
    by_bucket = by_bucket.sort_by("frequency_bucket")
    labels = _label_runs(by_bucket)
    fig, axes = _figure(len(panels))
    for ax, column in zip(axes, panels):
        for label in dict.fromkeys(labels):
            rows = by_bucket.filter(pa.array([lab == label for lab in labels]))
            ax.plot(rows.column("frequency_bucket").to_pylist(), _values(rows, column), marker="o", label=label)
        ax.set_title(LABELS[column])
        ax.set_xticks(sorted(set(by_bucket.column("frequency_bucket").to_pylist())))
        ax.set_xlabel("frequency bucket (5 = most common)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    return _svg(fig, "buckets")


def _where(data: pa.Table | ds.Dataset, expression: pc.Expression) -> pa.Table:
    """Rows of a table or (Lance) dataset matching `expression`, as a table."""
    return data.to_table(filter=expression) if isinstance(data, ds.Dataset) else data.filter(expression)


def build_samples(retrievals: pa.Table | ds.Dataset, queries: pa.Table | ds.Dataset,
                  examples: pa.Table | ds.Dataset, ground_truth: pa.Table | ds.Dataset | None, run_ids: Sequence[str],
                  *, n: int = 5, k: int = 5, seed: int = 0) -> list[dict]:
    """`n` random queries retrieved by every run in `run_ids`, with each run's top-k proponents.

    Each sample: {query_id, prompt, target, columns: [{method, run_id, proponents:
    [{rank, example_id, text, score, correct (bool, or None without ground truth)}]}]}.
    """
    props = _where(retrievals, (pc.field("kind") == "proponent") & (pc.field("rank") <= k)
                   & pc.field("run_id").isin(list(run_ids)))
    rows = props.sort_by([("rank", "ascending")]).to_pylist()
    per_run = {r: {} for r in run_ids}
    for row in rows:
        per_run[row["run_id"]].setdefault(row["query_id"], []).append(row)
    common = sorted(set.intersection(*(set(v) for v in per_run.values()))) if per_run else []
    chosen = sorted(random.Random(seed).sample(common, min(n, len(common))))
    query_rows = {q["query_id"]: q for q in _where(queries, pc.field("query_id").isin(chosen)).to_pylist()}
    wanted = {r["example_id"] for q in chosen for run in per_run.values() for r in run[q]}
    found = _where(examples, pc.field("example_id").isin(list(wanted)))
    texts = dict(zip(found.column("example_id").to_pylist(), found.column("text").to_pylist()))
    facts = list({q["fact_id"] for q in query_rows.values()} - {None})
    truth = None if ground_truth is None else {
        (row["fact_id"], row["example_id"]) for row in _where(ground_truth, pc.field("fact_id").isin(facts)).to_pylist()}
    samples = []
    for query_id in chosen:
        q = query_rows.get(query_id, {"prompt": "", "target": "", "fact_id": None})
        columns = [{"method": per_run[run][query_id][0]["method"], "run_id": run, "proponents": [
            {"rank": r["rank"], "example_id": r["example_id"], "text": texts.get(r["example_id"], ""),
             "score": r["score"], "correct": None if truth is None else (q["fact_id"], r["example_id"]) in truth}
            for r in per_run[run][query_id]]} for run in run_ids]
        samples.append({"query_id": query_id, "prompt": q["prompt"], "target": q["target"], "columns": columns})
    return samples


def _sample_html(sample: dict) -> str:
    refs = [sample["prompt"], sample["target"]]
    cells = []
    for column in sample["columns"]:
        items = "".join(
            f'<li value="{p["rank"]}">{highlight.to_html(p["text"], refs)} '
            f'<span class="score">{_fmt(p["score"])} · {html.escape(p["example_id"])}</span>'
            f'{" <span class=ok>✓</span>" if p.get("correct") else ""}</li>'
            for p in column["proponents"])
        cells.append(f"<div><h4>{html.escape(column['method'])} <span class=score>"
                     f"{html.escape(column['run_id'])}</span></h4><ol>{items}</ol></div>")
    return (f'<div class="sample"><h3>{html.escape(sample["query_id"])}</h3>'
            f"<p>{html.escape(sample['prompt'])} <b>{html.escape(sample['target'])}</b></p>"
            f'<div class="side" style="--n:{len(cells)}">{"".join(cells)}</div></div>')


def write_report(out_dir: str | Path, summary: pa.Table, samples: Sequence[dict] = (),
                 *, by_bucket: pa.Table | None = None, title: str = "trackstar-db report") -> Path:
    """Write out_dir/index.html (self-contained) and return its path."""
    for name, table in (("summary", summary), ("by_bucket", by_bucket)):
        if table is not None and "method" not in table.column_names:
            raise TrackstarError(f"report: the {name} table needs a 'method' column")
    if by_bucket is not None and "frequency_bucket" not in by_bucket.column_names:
        raise TrackstarError("report: the by_bucket table needs a 'frequency_bucket' column")
    parts = [f"<h1>{html.escape(title)}</h1>", "<h2>Methods by metric</h2>", html_table(summary)]
    plot = summary_plot(summary)
    if plot:
        parts.append(f'<div class="plots">{plot}</div>')
    if by_bucket is not None:
        parts += ["<h2>By fact frequency bucket</h2>", html_table(by_bucket)]
        plot = bucket_plot(by_bucket)
        if plot:
            parts.append(f'<div class="plots">{plot}</div>')
    if samples:
        parts.append("<h2>Proponents side by side</h2><p>Words shared with the prompt or target are "
                     "<mark>marked</mark>; ✓ = annotated with the query's fact.</p>")
        parts += [_sample_html(s) for s in samples]
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
