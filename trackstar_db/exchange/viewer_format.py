"""The authors' results format ("viewer format"): JSON lines, one record per query.

Record fields (docs/formats.md, Results):
    example_id           the query id
    query_set            the query's template (prompt0, ...) unless another name is given
    inputs_plaintext     prompt
    targets_plaintext    target
    proponents, proponent_ids, proponent_scores    texts, ids and scores, rank order
    opponents, opponent_ids, opponent_scores       the same for opponents (may be absent)
    fact_id, relation, c4_frequency, c4_frequency_bucket    when the query has a known fact
    proponent_correct    one bool per proponent, when ground truth is given

`export_viewer` writes one retrieval run in it; `import_viewer` reads such a file (ours or the
authors' published ones, e.g. BM25/Gecko runs without opponents; .gz accepted) back into the
retrievals, queries, examples and ground_truth schemas, so they load into the database and are
evaluated with the same SQL. Ids are read as strings; scores are stored as float32.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from trackstar_db.errors import RecordError, TrackstarError
from trackstar_db.store.schema import arrow_schema, conform

KINDS = (("proponent", "proponents", "proponent_ids", "proponent_scores"),
         ("opponent", "opponents", "opponent_ids", "opponent_scores"))


class ViewerImport(NamedTuple):
    """Rows read from one viewer file, each in its table's schema."""

    retrievals: pa.Table
    queries: pa.Table
    examples: pa.Table      # the texts seen in the file; source = file name, other fields null
    ground_truth: pa.Table  # (fact_id, example_id) of retrieved examples marked correct
    lines: dict = {}        # ("query" | "example" | "fact", id) -> the line that first gave it
    relations: dict = {}    # fact_id -> the relation a record names for it


def _select(data: pa.Table | ds.Dataset, key: str, ids, columns: list[str]) -> pa.Table:
    """Rows of `data` whose `key` is in `ids` (a dataset is filtered while it is scanned)."""
    id_array = pa.array(sorted(set(ids)), pa.string())
    if isinstance(data, ds.Dataset):
        return data.to_table(columns=columns, filter=pc.field(key).isin(id_array))
    return data.select(columns).filter(pc.is_in(data.column(key), value_set=id_array))


def _rows_by(data: pa.Table | ds.Dataset, key: str, ids, columns: list[str]) -> dict:
    """{id: row dict} of the rows of `data` whose `key` is in `ids`."""
    return {row[key]: row for row in _select(data, key, ids, columns).to_pylist()}


def export_viewer(retrievals: pa.Table, queries: pa.Table | ds.Dataset,
                  examples: pa.Table | ds.Dataset, facts: pa.Table | ds.Dataset | None,
                  ground_truth: pa.Table | ds.Dataset | None, path: str | Path,
                  *, query_set: str | None = None) -> Path:
    """Write one retrieval run (all rows share a run_id) as viewer JSON lines at `path`."""
    runs = pc.unique(retrievals.column("run_id")).to_pylist()
    if len(runs) != 1:
        raise TrackstarError(f"export_viewer: retrievals must hold one run, not {len(runs)} ({', '.join(map(str, runs[:5]))})")
    rows = retrievals.sort_by([("query_id", "ascending"), ("kind", "ascending"), ("rank", "ascending")]).to_pylist()
    query_ids = list(dict.fromkeys(r["query_id"] for r in rows))
    query_rows = _rows_by(queries, "query_id", query_ids, ["query_id", "fact_id", "prompt", "target", "template"])
    texts = _rows_by(examples, "example_id", [r["example_id"] for r in rows], ["example_id", "text"])
    for name, wanted, found in (("queries", query_ids, query_rows), ("examples", [r["example_id"] for r in rows], texts)):
        missing = sorted(set(wanted) - set(found))
        if missing:
            raise TrackstarError(f"export_viewer: {len(missing)} ids not in {name} (first: {missing[0]!r})")
    fact_ids = [q["fact_id"] for q in query_rows.values() if q["fact_id"] is not None]
    fact_rows = _rows_by(facts, "fact_id", fact_ids, ["fact_id", "relation", "frequency", "frequency_bucket"]) if facts is not None else {}
    correct: set[tuple[str, str]] | None = None
    if ground_truth is not None:
        gt = _select(ground_truth, "fact_id", fact_ids, ["fact_id", "example_id"])
        correct = set(zip(gt.column("fact_id").to_pylist(), gt.column("example_id").to_pylist()))

    by_query: dict[str, list[dict]] = {q: [] for q in query_ids}
    for r in rows:
        by_query[r["query_id"]].append(r)
    path = Path(path)
    with path.open("w", encoding="utf-8") as out:
        for query_id in query_ids:
            query = query_rows[query_id]
            record = _record(query, by_query[query_id], texts, fact_rows.get(query["fact_id"]), correct)
            record["query_set"] = query_set or record["query_set"]
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def _record(query: dict, hits: list[dict], texts: dict, fact: dict | None,
            correct: set[tuple[str, str]] | None) -> dict:
    """The viewer record of one query from its retrieval rows (sorted by kind, rank)."""
    record = {"example_id": query["query_id"], "query_set": query["template"],
              "inputs_plaintext": query["prompt"], "targets_plaintext": query["target"]}
    for kind, texts_key, ids_key, scores_key in KINDS:
        of_kind = [r for r in hits if r["kind"] == kind]
        record[texts_key] = [texts[r["example_id"]]["text"] for r in of_kind]
        record[ids_key] = [r["example_id"] for r in of_kind]
        record[scores_key] = [r["score"] for r in of_kind]
    fact_id = query["fact_id"]
    if fact_id is None:
        return record
    record["fact_id"] = fact_id
    if fact is not None:
        record.update(relation=fact["relation"], c4_frequency=fact["frequency"],
                      c4_frequency_bucket=fact["frequency_bucket"])
    if correct is not None:
        record["proponent_correct"] = [(fact_id, e) in correct for e in record["proponent_ids"]]
    return record


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def _string(record: dict, key: str, fail, *, required: bool = True) -> str | None:
    value = record.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        fail(f"field {key!r} must be a string, not {type(value).__name__}")
    return str(value)


def _hits(record: dict, texts_key: str, ids_key: str, scores_key: str, fail) -> list[tuple]:
    """[(example_id, score, text | None)] of one kind, in file order (= rank order)."""
    ids = record.get(ids_key)
    if ids is None:
        if record.get(texts_key) or record.get(scores_key):
            fail(f"field {ids_key!r} missing while {texts_key!r}/{scores_key!r} are given")
        return []
    scores, texts = record.get(scores_key), record.get(texts_key)
    if not isinstance(ids, list) or not isinstance(scores, list) or not isinstance(texts, (list, type(None))):
        fail(f"fields {ids_key!r} and {scores_key!r} must be lists")
    if len(scores) != len(ids) or (texts is not None and len(texts) != len(ids)):
        fail(f"{ids_key!r}, {scores_key!r} and {texts_key!r} differ in length")
    for i, (example_id, score) in enumerate(zip(ids, scores)):
        if isinstance(example_id, bool) or not isinstance(example_id, (str, int)):
            fail(f"{ids_key}[{i}] must be a string")
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            fail(f"{scores_key}[{i}] must be a number")
        if not math.isfinite(score):
            fail(f"{scores_key}[{i}] is {score}: scores must be finite numbers")
        if texts is not None and not isinstance(texts[i], str):
            fail(f"{texts_key}[{i}] must be a string")
    return [(str(e), float(s), None if texts is None else texts[i]) for i, (e, s) in enumerate(zip(ids, scores))]


def _read_record(path: Path, number: int, line: str) -> tuple[dict, list[tuple], list[bool] | None, str | None]:
    """(query row, [(kind, example_id, score, text | None)] in rank order, proponent_correct, relation)."""
    def fail(message):
        raise RecordError(path, number, message)

    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        fail(f"not JSON ({exc.msg})")
    except RecursionError:
        fail("JSON nested too deeply to read")
    except ValueError as exc:  # an integer of over 4,300 digits
        fail(f"unreadable number ({exc})")
    if not isinstance(record, dict):
        fail("a record must be a JSON object")
    query = {"query_id": _string(record, "example_id", fail),
             "fact_id": _string(record, "fact_id", fail, required=False),
             "prompt": _string(record, "inputs_plaintext", fail),
             "target": _string(record, "targets_plaintext", fail),
             "template": _string(record, "query_set", fail, required=False) or "adhoc"}
    hits = [(kind, *hit) for kind, *keys in KINDS for hit in _hits(record, *keys, fail)]
    flags = record.get("proponent_correct")
    n_proponents = sum(kind == "proponent" for kind, *_ in hits)
    if flags is not None and (not isinstance(flags, list) or len(flags) != n_proponents
                              or not all(isinstance(f, bool) for f in flags)):
        fail("'proponent_correct' must be one bool per proponent")
    return query, hits, flags, _string(record, "relation", fail, required=False)


def import_viewer(path: str | Path, method: str, run_id: str) -> ViewerImport:
    """Read a viewer JSON-lines file into table rows; RecordError names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise TrackstarError(f"{path}: no such viewer file")
    retrievals, queries, texts, gt, where, relations = [], {}, {}, set(), {}, {}
    with _open(path) as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            query, hits, flags, relation = _read_record(path, number, line)
            query_id = query["query_id"]
            if query_id in queries:
                raise RecordError(path, number, f"query {query_id!r} appears twice")
            queries[query_id] = query
            where[("query", query_id)] = number
            if query["fact_id"] is not None:
                where.setdefault(("fact", query["fact_id"]), number)
                if relation is not None and relations.setdefault(query["fact_id"], relation) != relation:
                    raise RecordError(path, number, f"fact {query['fact_id']!r} has another relation than on an "
                                                    "earlier line")
            ranks = {"proponent": 0, "opponent": 0}
            for kind, example_id, score, text in hits:
                ranks[kind] += 1
                retrievals.append({"run_id": run_id, "method": method, "query_id": query_id, "kind": kind,
                                   "rank": ranks[kind], "example_id": example_id, "score": score})
                where.setdefault(("example", example_id), number)
                if text is not None and texts.setdefault(example_id, text) != text:
                    raise RecordError(path, number, f"example {example_id!r} has another text than on an earlier line")
                if kind == "proponent" and flags and flags[ranks[kind] - 1] and query["fact_id"] is not None:
                    gt.add((query["fact_id"], example_id))

    examples = [{"example_id": e, "text": t, "source": path.name,
                 "content_hash": hashlib.sha256(t.encode("utf-8")).hexdigest()} for e, t in texts.items()]
    return ViewerImport(
        retrievals=_from_rows(retrievals, "retrievals"),
        queries=_from_rows(list(queries.values()), "queries"),
        examples=_from_rows(examples, "examples"),
        ground_truth=_from_rows([{"fact_id": f, "example_id": e} for f, e in sorted(gt)], "ground_truth"),
        lines=where, relations=relations,
    )


def _from_rows(rows: list[dict], table: str) -> pa.Table:
    """`rows` (dicts with some of the table's fields) as a table in its full schema."""
    schema = arrow_schema(table)
    if not rows:
        return schema.empty_table()
    present = pa.schema([f.with_nullable(True) for f in schema if f.name in rows[0]])
    return conform(pa.Table.from_pylist(rows, schema=present), schema)
