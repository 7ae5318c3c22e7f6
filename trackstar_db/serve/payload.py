"""Arrow answers as the JSON the server sends: tables as {columns, rows}, query hits with the
pieces the page renders (the static explorer's shading and marks: report/explorer.py,
evaluation/highlight.py), and the stored facts of a prompt that is one of the database's queries.

Every value is plain data; the page builds its DOM from it with textContent, never as HTML.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

from trackstar_db import numbers
from trackstar_db.evaluation import highlight
from trackstar_db.report.explorer import _LABEL_CLASS, shaded_pieces
from trackstar_db.evaluation.sql import _jsonable


def dumps(value) -> bytes:
    """JSON with NaN and infinities as null and anything else unknown (timestamps) as text."""
    return json.dumps(_jsonable(value), ensure_ascii=False, default=str, allow_nan=False).encode("utf-8")


def table_json(table: pa.Table, limit: int | None = None) -> dict:
    """{columns: [{name, type, places (floats)}], rows: [[...]], truncated}: rows as lists in column order."""
    truncated = limit is not None and table.num_rows > limit
    if truncated:
        table = table.slice(0, limit)
    columns = table.column_names
    rows = [[row[c] for c in columns] for row in table.to_pylist()]
    described = []
    for i, (name, kind) in enumerate(zip(columns, table.schema.types)):
        described.append({"name": name, "type": str(kind)})
        if pa.types.is_floating(kind):  # the page prints the column as every table does (numbers.py)
            described[-1]["places"] = numbers.places(name, [row[i] for row in rows])
    return {"columns": described, "rows": rows, "num_rows": table.num_rows, "truncated": truncated}


def marked_pieces(text: str, refs: list[str]) -> list[dict]:
    """`text` cut into pieces, the words shared with `refs` flagged `mark` (highlight.spans)."""
    pieces, at = [], 0
    for start, end in highlight.spans(text, refs):
        if start > at:
            pieces.append({"text": text[at:start]})
        pieces.append({"text": text[start:end], "mark": True})
        at = end
    if at < len(text):
        pieces.append({"text": text[at:]})
    return pieces


def hit_json(hit: dict, refs: list[str], tokens: pa.Table | None = None, truth: set | None = None) -> dict:
    """One proponent or opponent: rank, example_id, score, text, `correct` (the example is
    annotated with the stored query's fact; None when the prompt is no stored query), the
    evidence Database.query adds (label, shared_span, delta_p with verify, ...), and the
    pieces to render: token shading when `tokens` (retrieval/tokens.py) is given, else marks."""
    text = hit["text"] or ""
    out = {"rank": hit["rank"], "example_id": hit["example_id"], "score": hit["score"], "text": hit["text"],
           "correct": None if truth is None else hit["example_id"] in truth}
    for key, value in hit.items():  # the evidence columns (retrieval/evidence.py) and any later ones
        if key not in ("kind", "method") and key not in out:
            out[key] = value
    if hit.get("label"):
        out["label_class"] = _LABEL_CLASS.get(hit["label"], "")  # the static explorer's colour of the label
    if tokens is None:
        out.update(pieces=marked_pieces(text, refs), token_total=None, token_special=None)
    else:
        triples = list(zip(*(tokens.column(c).to_pylist() for c in ("start", "end", "contribution"))))
        pieces, total, special = shaded_pieces(text, triples, refs)
        out.update(pieces=pieces, token_total=total, token_special=special)
    return out


INDEX_ROWS = 200_000  # tables up to this size are looked up through dicts kept per snapshot


def _rows(db, table: str, key, value, columns: list[str]) -> list[dict]:
    """Rows of `table` whose `key` (a column, or a tuple of columns) equals `value`. A snapshot
    never changes, so a small table is read once into a dict that serves every later request;
    a larger one is filtered by Lance each time."""
    keys = key if isinstance(key, tuple) else (key,)
    values = value if isinstance(value, tuple) else (value,)
    if not db.count(table):
        return []
    if db.count(table) > INDEX_ROWS:
        match = None
        for k, v in zip(keys, values):
            match = (pc.field(k) == v) if match is None else match & (pc.field(k) == v)
        return db.table(table, columns=columns, filter=match).to_pylist()
    indexes = db.__dict__.setdefault("_serve_indexes", {})
    name = (table, keys, tuple(columns))
    if name not in indexes:
        index: dict = {}
        for row in db.table(table, columns=sorted(set(columns) | set(keys))).to_pylist():
            index.setdefault(tuple(row[k] for k in keys), []).append({c: row[c] for c in columns})
        indexes[name] = index
    return indexes[name].get(values, [])


def stored_query(db, prompt: str, target: str) -> dict | None:
    """The stored query with this prompt and target, its fact's relation and frequency bucket,
    the model's recorded answer and the fact's ground-truth examples; None when there is none."""
    found = _rows(db, "queries", ("prompt", "target"), (prompt, target), ["query_id", "fact_id"])
    if not found:
        return None
    query_id, fact_id = found[0]["query_id"], found[0]["fact_id"]
    out = {"query_id": query_id, "fact_id": fact_id, "relation": None, "bucket": None, "correct": None,
           "p_target": None, "truth": None}
    answer = _rows(db, "predictions", "query_id", query_id, ["correct", "p_target"])
    if answer:
        out.update(answer[0])
    if fact_id is not None:
        fact = _rows(db, "facts", "fact_id", fact_id, ["relation", "frequency_bucket"])
        if fact:
            out.update(relation=fact[0]["relation"], bucket=fact[0]["frequency_bucket"])
        if db.count("ground_truth"):
            out["truth"] = {r["example_id"] for r in _rows(db, "ground_truth", "fact_id", fact_id, ["example_id"])}
    return out
