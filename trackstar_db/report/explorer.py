"""The report's query explorer: one static page per sampled query, and a paged picker.

    out_dir/queries/index.html, index-2.html, ...   the picker: sampled queries, 50 a page
    out_dir/queries/q-0001.html, ...                one page per query

A query page shows the prompt and target, the model's answer (the predictions table: greedy
answer correct or not, P(target)), fact and frequency bucket, and one column per run side by
side: its top-k proponents with score, ground-truth mark (the example is annotated with the
query's fact), tail-patch delta (percentage points of P(target) after one step on it, where the
run was tail-patched), its evidence label (retrieval/evidence.py: 'states it', 'moves the model' from the
stored tail-patch, both, neither) and the words shared with the prompt or target marked; opponents sit in
a <details> element. Where `tokens` were computed (gradient runs, top few proponents), the
proponent's tokens are shaded by their part of the score (retrieval/tokens.py): green adds to
the score, red takes from it; hovering shows the value.

Pages are plain HTML with the one stylesheet inline (page.py): no script, no network, open from disk. A large database
gets a sample of `n` queries (seeded), so the report stays small whatever the query count.

`build_pages` works on Arrow tables or Lance datasets (testable without a database);
`write_explorer` renders them.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from trackstar_db.evaluation import highlight
from trackstar_db.retrieval.evidence import MOVES_MIN, label, text_evidence

from .page import document, escape

PAGE_SIZE = 50


def _where(data, expression: pc.Expression) -> pa.Table:
    """Rows of a table or (Lance) dataset matching `expression`, as a table."""
    return data.to_table(filter=expression) if isinstance(data, ds.Dataset) else data.filter(expression)


def _isin(field: str, values) -> pc.Expression:
    """field IN values, typed as strings (an empty list would be a null array Lance refuses)."""
    return pc.field(field).isin(pa.array(list(values), pa.string()))


def choose_queries(retrievals, run_ids: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """`n` query ids (seeded sample, sorted) that every run in `run_ids` retrieved for (when the
    runs share none, e.g. an imported run of other queries: that any of them retrieved for)."""
    rows = _where(retrievals, (pc.field("rank") == 1) & _isin("run_id", run_ids))
    seen: dict[str, set[str]] = {r: set() for r in run_ids}
    for run, query in zip(rows.column("run_id").to_pylist(), rows.column("query_id").to_pylist()):
        seen[run].add(query)
    common = sorted(set.intersection(*seen.values()) or set.union(*seen.values())) if seen else []
    return sorted(random.Random(seed).sample(common, min(n, len(common))))


def _lookup(data, key: str, values: list, columns: list[str] | None = None) -> dict:
    if data is None or not values:
        return {}
    rows = _where(data, _isin(key, values)).to_pylist()
    return {r[key]: r for r in rows} if columns is None else {r[key]: {c: r.get(c) for c in columns} for r in rows}


def build_pages(tables: Mapping[str, object], run_ids: Sequence[str], query_ids: Sequence[str],
                k: int = 5) -> list[dict]:
    """Page data for `query_ids`: tables holds retrievals, queries, examples and optionally
    ground_truth, tail_patch, predictions, facts (Arrow tables or Lance datasets)."""
    query_ids = list(query_ids)
    hits = _where(tables["retrievals"], _isin("query_id", query_ids) & (pc.field("rank") <= k)
                  & _isin("run_id", run_ids)).sort_by([("rank", "ascending")]).to_pylist()
    queries = _lookup(tables["queries"], "query_id", query_ids)
    texts = {i: r["text"] for i, r in _lookup(tables["examples"], "example_id",
                                              sorted({h["example_id"] for h in hits}), ["text"]).items()}
    facts = sorted({q["fact_id"] for q in queries.values() if q.get("fact_id")})
    truth = None
    if tables.get("ground_truth") is not None:
        rows = _where(tables["ground_truth"], _isin("fact_id", facts))
        truth = set(zip(rows.column("fact_id").to_pylist(), rows.column("example_id").to_pylist()))
    patched = {}
    if tables.get("tail_patch") is not None:
        for r in _where(tables["tail_patch"], _isin("query_id", query_ids)).to_pylist():
            patched[(r["run_id"], r["query_id"], r["example_id"])] = 100.0 * (r["p_after"] - r["p_before"])
    answers = _lookup(tables.get("predictions"), "query_id", query_ids)
    buckets = _lookup(tables.get("facts"), "fact_id", facts, ["frequency_bucket", "relation", "subject"])
    pages = []
    for query_id in query_ids:
        q = queries.get(query_id, {"prompt": "", "target": "", "fact_id": None})
        answer = answers.get(query_id, {})
        fact = buckets.get(q.get("fact_id"), {})
        columns = []
        for run in run_ids:
            mine = [h for h in hits if h["run_id"] == run and h["query_id"] == query_id]
            column = {"run_id": run, "method": mine[0]["method"] if mine else run, "proponent": [], "opponent": []}
            evidence = text_evidence(q["prompt"], q["target"], [texts.get(h["example_id"], "") for h in mine],
                                     fact.get("subject"))
            for i, h in enumerate(mine):
                delta_pp = patched.get((run, query_id, h["example_id"])) if h["kind"] == "proponent" else None
                moves = None if delta_pp is None else delta_pp / 100 >= MOVES_MIN
                column.setdefault(h["kind"], []).append({
                    "rank": h["rank"], "example_id": h["example_id"], "text": texts.get(h["example_id"], ""),
                    "score": h["score"], "tokens": None,
                    "correct": None if truth is None else (q.get("fact_id"), h["example_id"]) in truth,
                    "delta_pp": delta_pp, "shared_span": evidence["shared_span"][i],
                    "label": label(evidence["states_it"][i], moves)})
            columns.append(column)
        pages.append({"query_id": query_id, "prompt": q["prompt"], "target": q["target"], "fact_id": q.get("fact_id"),
                      "bucket": fact.get("frequency_bucket"), "relation": fact.get("relation"),
                      "correct": answer.get("correct"), "p_target": answer.get("p_target"), "columns": columns})
    return pages


def add_tokens(pages: list[dict], contributions: Callable, methods: Sequence[str], top: int = 3) -> int:
    """Shade the top `top` proponents of runs whose method is in `methods`: contributions(prompt,
    target, example_id, method, text) -> token table (retrieval/tokens.py). Returns how many."""
    done = 0
    for page in pages:
        for column in page["columns"]:
            if column["method"] not in methods:
                continue
            for hit in column["proponent"][:top]:
                table = contributions(page["prompt"], page["target"], hit["example_id"], column["method"], hit["text"])
                hit["tokens"] = list(zip(*(table.column(c).to_pylist() for c in ("start", "end", "contribution"))))
                done += 1
    return done


def _num(value, digits: int = 3) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}g}"


def shade(value: float, scale: float) -> str:
    """The background of a token whose part of the score is `value` (green +, red -), its
    strength relative to `scale`, the largest magnitude in the text."""
    alpha = min(1.0, abs(value) / (scale or 1.0)) * 0.8
    return f"rgba(0,150,60,{alpha:.2f})" if value >= 0 else f"rgba(220,30,30,{alpha:.2f})"


def shaded_pieces(text: str, tokens: list[tuple], refs: Sequence[str]) -> tuple[list[dict], float, float]:
    """`text` cut into pieces {text, shade (a CSS colour) and value for a token's span, shared
    (a word also in `refs`)}, plus (the parts' total, the part of tokens without a span: bos,
    eos). The one cutting shaded_html and the live explorer (trackstar_db/serve) both render."""
    spans = sorted((s, e, c) for s, e, c in tokens if s is not None and e is not None and e > s)
    scale = max((abs(c) for _, _, c in tokens), default=0.0) or 1.0
    shared = highlight.spans(text, refs)
    pieces, at = [], 0
    for start, end, value in spans:
        if start < at:
            continue
        if start > at:
            pieces.append({"text": text[at:start]})
        pieces.append({"text": text[start:end], "shade": shade(value, scale), "value": value,
                       "shared": any(a < end and start < b for a, b in shared)})
        at = end
    if at < len(text):
        pieces.append({"text": text[at:]})
    special = sum(c for s, e, c in tokens if s is None or e is None or e <= s)
    return pieces, sum(c for _, _, c in tokens), special


def marked_html(text: str, refs: Sequence[str]) -> str:
    """`text` escaped, the words shared with `refs` in <mark> (evaluation/highlight.py finds them)."""
    return highlight.render(text, highlight.spans(text, refs), escape, lambda w: f"<mark>{escape(w)}</mark>")


def shaded_html(text: str, tokens: list[tuple], refs: Sequence[str]) -> str:
    """`text` with each token's span shaded by its contribution (green +, red -), shared words
    underlined; tokens without a span (bos, eos) are summed into a note."""
    pieces, total, special = shaded_pieces(text, tokens, refs)
    out = []
    for piece in pieces:
        body = escape(piece["text"])
        if "shade" not in piece:
            out.append(body)
            continue
        if piece["shared"]:
            body = f'<span class="sh">{body}</span>'
        out.append(f'<span class="tk" style="background:{piece["shade"]}" title="{piece["value"]:+.4g}">{body}</span>')
    return (f"{''.join(out)}<div class=meta>token parts sum to {total:.4g}"
            f"{f' (special tokens {special:+.3g})' if special else ''}</div>")


_LABEL_CLASS = {"both": "l-both", "states it": "l-states", "moves the model": "l-moves", "neither": "l-none",
                "states it (not verified)": "l-states"}


def _hit_html(hit: dict, refs: Sequence[str]) -> str:
    body = shaded_html(hit["text"], hit["tokens"], refs) if hit["tokens"] else marked_html(hit["text"], refs)
    marks = [f"score {_num(hit['score'], 4)}"]
    if hit["correct"]:
        marks.append('<span class="ok" title="annotated with the query\'s fact">✓ fact</span>')
    if hit["delta_pp"] is not None:
        marks.append(f"tail-patch {hit['delta_pp']:+.2f} pp")
    if hit.get("label"):
        marks.append(f'<span class="lab {_LABEL_CLASS.get(hit["label"], "")}" title="shares {hit["shared_span"]} '
                     f'words verbatim with prompt + target">{escape(hit["label"])}</span>')
    marks.append(escape(hit["example_id"]))
    return f'<li value="{hit["rank"]}">{body}<div class="meta">{" · ".join(marks)}</div></li>'


def _answer(page: dict) -> str:
    if page["correct"] is None:
        return "model answer: not measured"
    mark = '<span class="ok">✓ answers correctly</span>' if page["correct"] else '<span class="bad">✗ answers wrongly</span>'
    return f"model: {mark} (P(target) = {_num(page['p_target'])})"


def query_html(page: dict, number: int, total: int) -> str:
    refs = [page["prompt"], page["target"]]
    runs = []
    for column in page["columns"]:
        items = "".join(_hit_html(h, refs) for h in column["proponent"]) or "<p class=meta>no proponents</p>"
        opponents = "".join(_hit_html(h, refs) for h in column["opponent"])
        if opponents:
            opponents = f"<details><summary>opponents ({len(column['opponent'])})</summary><ol>{opponents}</ol></details>"
        label = column["method"] + ("" if column["run_id"] == column["method"] else f" ({column['run_id']})")
        runs.append(f'<section class="run"><h2>{escape(label)}</h2><ol>{items}</ol>{opponents}</section>')
    prev_link = f'<a href="q-{number - 1:04d}.html">← previous</a>' if number > 1 else ""
    next_link = f'<a href="q-{number + 1:04d}.html">next →</a>' if number < total else ""
    facts = [f"query {escape(page['query_id'])}"]
    if page.get("relation"):
        facts.append(f"relation {escape(str(page['relation']))}")
    if page.get("bucket") is not None:
        facts.append(f"frequency bucket {page['bucket']}")
    body = (f'<nav><a href="../index.html">summary</a><a href="{_picker_name(1 + (number - 1) // PAGE_SIZE)}">all queries</a>'
            f"{prev_link}{next_link}<span class=meta>query {number} of {total}</span></nav>"
            f'<h1>{escape(page["prompt"])} <span class="target">{escape(page["target"])}</span></h1>'
            f'<p class="facts">{" · ".join(facts)} · {_answer(page)}</p>'
            '<p class="legend"><mark>marked</mark> / <span class="sh">underlined</span>: words shared with the prompt '
            'or target · ✓ fact: the example states the query\'s fact · label: <b>states it</b> (has the target and '
            'the subject, or 3+ words verbatim from prompt + target), <b>moves the model</b> (its stored tail-patch raises '
            'P(target) by 0.1 pp or more, with no random-step baseline, unlike <code>query --verify</code>; '
            '"not verified" where the run was not tail-patched), both or neither · shading: each token\'s part of the score '
            '(<span class="tk" style="background:rgba(0,150,60,.5)">adds</span> / '
            '<span class="tk" style="background:rgba(220,30,30,.5)">takes</span>)</p>'
            f'<div class="runs">{"".join(runs)}</div>')
    return document(f"{page['prompt']} {page['target']}", body)


def _picker_name(n: int) -> str:
    return "index.html" if n == 1 else f"index-{n}.html"


def picker_html(pages: Sequence[dict], number: int, n_pages: int, total: int) -> str:
    first = (number - 1) * PAGE_SIZE
    rows = "".join(
        f'<tr><td><a href="q-{first + i + 1:04d}.html">{first + i + 1}</a></td><td>{escape(p["prompt"])} '
        f'<b>{escape(p["target"])}</b></td><td>{"" if p["bucket"] is None else p["bucket"]}</td>'
        f'<td>{"" if p["correct"] is None else ("✓" if p["correct"] else "✗")}</td></tr>'
        for i, p in enumerate(pages))
    links = " ".join(f'<a href="{_picker_name(n)}">{n}</a>' if n != number else f"<b>{n}</b>" for n in range(1, n_pages + 1))
    body = (f'<nav><a href="../index.html">summary</a>{"pages: " + links if n_pages > 1 else ""}</nav>'
            f"<h1>Queries ({total} sampled)</h1><table class=\"list\"><thead><tr><th>#</th><th>prompt and target</th>"
            f"<th>bucket</th><th>model</th></tr></thead><tbody>{rows}</tbody></table>")
    return document("queries", body)


def write_explorer(out_dir: str | Path, pages: Sequence[dict]) -> Path:
    """Write out_dir/queries/: the picker pages and one page per query; returns the first picker."""
    folder = Path(out_dir) / "queries"
    folder.mkdir(parents=True, exist_ok=True)
    for old in list(folder.glob("q-*.html")) + list(folder.glob("index*.html")):
        old.unlink()
    total = len(pages)
    for i, page in enumerate(pages):
        (folder / f"q-{i + 1:04d}.html").write_text(query_html(page, i + 1, total), encoding="utf-8")
    n_pages = max(1, math.ceil(total / PAGE_SIZE))
    for n in range(1, n_pages + 1):
        chunk = pages[(n - 1) * PAGE_SIZE: n * PAGE_SIZE]
        (folder / _picker_name(n)).write_text(picker_html(chunk, n, n_pages, total), encoding="utf-8")
    return folder / "index.html"
