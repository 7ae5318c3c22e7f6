"""Arrow answers as the JSON the server sends: tables as {columns, rows}, query hits with the
pieces the page renders (the static explorer's shading and marks: evaluation/explorer.py,
evaluation/highlight.py), and the stored facts of a prompt that is one of the database's queries.

Every value is plain data; the page builds its DOM from it with textContent, never as HTML.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

from trackstar_db.evaluation import highlight
from trackstar_db.evaluation.explorer import shaded_pieces
from trackstar_db.evaluation.sql import _jsonable


def dumps(value) -> bytes:
    """JSON with NaN and infinities as null and anything else unknown (timestamps) as text."""
    return json.dumps(_jsonable(value), ensure_ascii=False, default=str, allow_nan=False).encode("utf-8")


def table_json(table: pa.Table, limit: int | None = None) -> dict:
    """{columns: [{name, type}], rows: [[...]], truncated}: rows as lists in column order."""
    truncated = limit is not None and table.num_rows > limit
    if truncated:
        table = table.slice(0, limit)
    columns = table.column_names
    rows = [[row[c] for c in columns] for row in table.to_pylist()]
    return {"columns": [{"name": n, "type": str(t)} for n, t in zip(columns, table.schema.types)],
            "rows": rows, "num_rows": table.num_rows, "truncated": truncated}


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
    annotated with the stored query's fact; None when the prompt is no stored query), and the
    pieces to render: token shading when `tokens` (retrieval/tokens.py) is given, else marks."""
    text = hit["text"] or ""
    out = {"rank": hit["rank"], "example_id": hit["example_id"], "score": hit["score"], "text": hit["text"],
           "correct": None if truth is None else hit["example_id"] in truth}
    for key, value in hit.items():  # columns a newer Database.query adds (evidence, ...)
        if key not in ("kind", "method") and key not in out:
            out[key] = value
    if tokens is None:
        out.update(pieces=marked_pieces(text, refs), token_total=None, token_special=None)
    else:
        triples = list(zip(*(tokens.column(c).to_pylist() for c in ("start", "end", "contribution"))))
        pieces, total, special = shaded_pieces(text, triples, refs)
        out.update(pieces=pieces, token_total=total, token_special=special)
    return out


STORED_INDEX_ROWS = 200_000  # queries tables up to this size are looked up through a dict kept per snapshot


def _stored_ids(db, prompt: str, target: str) -> tuple[str, str | None] | None:
    """(query_id, fact_id) of the stored query with this prompt and target, or None."""
    if db.count("queries") > STORED_INDEX_ROWS:
        rows = db.table("queries", columns=["query_id", "fact_id"],
                        filter=(pc.field("prompt") == prompt) & (pc.field("target") == target)).to_pylist()
        return (rows[0]["query_id"], rows[0]["fact_id"]) if rows else None
    index = getattr(db, "_stored_queries", None)
    if index is None:  # a snapshot never changes: one scan serves every later request
        rows = db.table("queries", columns=["query_id", "fact_id", "prompt", "target"]).to_pylist()
        index = {(r["prompt"], r["target"]): (r["query_id"], r["fact_id"]) for r in reversed(rows)}
        db._stored_queries = index
    return index.get((prompt, target))


def stored_query(db, prompt: str, target: str) -> dict | None:
    """The stored query with this prompt and target, its fact's relation and frequency bucket,
    the model's recorded answer and the fact's ground-truth examples; None when there is none."""
    found = _stored_ids(db, prompt, target) if db.count("queries") else None
    if found is None:
        return None
    query_id, fact_id = found
    out = {"query_id": query_id, "fact_id": fact_id, "relation": None, "bucket": None, "correct": None,
           "p_target": None, "truth": None}
    if db.count("predictions"):
        answer = db.table("predictions", filter=pc.field("query_id") == query_id).to_pylist()
        if answer:
            out.update(correct=answer[0].get("correct"), p_target=answer[0].get("p_target"))
    if fact_id is not None:
        fact = db.table("facts", filter=pc.field("fact_id") == fact_id).to_pylist() if db.count("facts") else []
        if fact:
            out.update(relation=fact[0].get("relation"), bucket=fact[0].get("frequency_bucket"))
        if db.count("ground_truth"):
            truth = db.table("ground_truth", columns=["example_id"], filter=pc.field("fact_id") == fact_id)
            out["truth"] = set(truth.column("example_id").to_pylist())
    return out
