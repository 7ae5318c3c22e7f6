"""Fact ingest: the authors' T-REx facts format into the facts, queries and ground_truth tables.

Each fact gives one query per prompt field present (prompt0..prompt2), target = entity1.
ground_truth is derived, never edited: the (fact, example) pairs where the example's
fact_triples holds the fact's key or the fact's trex_sentences lists the example, restricted
to examples that are in the database, and the pairs an imported results file marked correct
(ground_truth_imported: an authors' file's marks may be the only ground truth of its facts,
which the database then knows by id only; `check` counts them as known). It is rebuilt after
every corpus or fact ingest and every import.
Fact ingest is all or nothing (facts, queries and ground_truth under one journal).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from trackstar_db import defaults
from trackstar_db import faults
from trackstar_db.errors import RecordError
from trackstar_db.store import journal, schema as _schema

from .records import IdRegistry, checked_records, optional_text, record_id, require_text, string_list

PROMPT_FIELDS = defaults.TEMPLATES
# Upper bounds (inclusive) of frequency buckets 0..4; bucket 5 is everything above.
BUCKET_BOUNDS = (0, 1, 3, 7, 15)


def frequency_bucket(count: int | None) -> int | None:
    """0: never seen, 1: once, 2: 2-3, 3: 4-7, 4: 8-15, 5: 16 or more."""
    if count is None:
        return None
    for bucket, bound in enumerate(BUCKET_BOUNDS):
        if count <= bound:
            return bucket
    return len(BUCKET_BOUNDS)


@dataclass
class FactReport:
    facts: int = 0
    queries: int = 0
    already_present: int = 0
    ground_truth: int = 0
    rejected: list[RecordError] = field(default_factory=list)


def _fact_rows(record: dict, path: Path, line: int) -> tuple[dict, list[dict]]:
    fact_id, _ = record_id(record, "fact_id", path, line)
    subject = require_text(record, "entity0", path, line)
    relation = require_text(record, "relation", path, line)
    obj = require_text(record, "entity1", path, line)
    uris = [record.get(k) for k in ("entity0_uri", "predicate_uri", "entity1_uri")]
    key = "|".join(uris) if all(isinstance(u, str) and u for u in uris) else f"{subject}|{relation}|{obj}"
    frequency = record.get("c4_frequency")
    if frequency is not None and (isinstance(frequency, bool) or not isinstance(frequency, int)):
        raise RecordError(path, line, f"field 'c4_frequency' must be an integer, got {type(frequency).__name__}")
    if frequency is not None and not 0 <= frequency < 2**63:
        raise RecordError(path, line, f"field 'c4_frequency' must be a count >= 0, got {frequency}")
    bucket = record.get("c4_frequency_bucket", frequency_bucket(frequency))
    if bucket is not None and (isinstance(bucket, bool) or not isinstance(bucket, int)
                               or not 0 <= bucket <= len(BUCKET_BOUNDS)):
        raise RecordError(path, line, f"field 'c4_frequency_bucket' must be an integer 0..{len(BUCKET_BOUNDS)}, "
                                      f"got {bucket!r}")
    fact = {
        "fact_id": fact_id, "kilt_id": optional_text(record, "kilt_id", path, line), "subject": subject, "relation": relation,
        "object": obj, "subject_uri": uris[0], "predicate_uri": uris[1], "object_uri": uris[2], "fact_key": key,
        "subject_aliases": string_list(record.get("entity0_alias"), "entity0_alias", path, line),
        "object_aliases": string_list(record.get("entity1_alias"), "entity1_alias", path, line),
        "trex_sentences": string_list(record.get("trex_sentences"), "trex_sentences", path, line),
        "frequency": frequency, "frequency_bucket": bucket, "is_repetition": _flag(record, "is_repetition", path, line),
    }
    queries = [
        {"query_id": f"{fact_id}:{name}", "fact_id": fact_id, "prompt": require_text(record, name, path, line),
         "target": obj, "template": name}
        for name in PROMPT_FIELDS if record.get(name) is not None
    ]
    if not queries:
        raise RecordError(path, line, "no prompt field (prompt0, prompt1 or prompt2)")
    return fact, queries


def _flag(record: dict, field: str, path: Path, line: int) -> bool | None:
    value = record.get(field)
    if value is not None and not isinstance(value, bool):
        raise RecordError(path, line, f"field {field!r} must be true or false, got {type(value).__name__}")
    return value


def _digest(fact: dict, queries: list[dict]) -> str:
    return hashlib.sha256(json.dumps([fact, queries], sort_keys=True, default=str).encode()).hexdigest()


def _read(files, skip_bad: bool, progress: bool | None, report: FactReport) -> list[tuple[dict, list[dict], tuple]]:
    """Every record of the files checked, before anything is written: (fact, queries, where).
    An exact repeat of a fact is skipped; a conflicting one is a RecordError naming both lines."""
    registry = IdRegistry("fact")

    def check(record, path, line):
        fact, fact_queries = _fact_rows(record, path, line)
        kind = "integer" if isinstance(record.get("fact_id"), int) else "string"
        return (fact, fact_queries), registry.add(fact["fact_id"], kind, _digest(fact, fact_queries), path, line)

    return [(fact, fact_queries, (path, line))
            for path, line, (fact, fact_queries) in checked_records(files, check, report, skip_bad, progress, "facts")]


def _stored_facts(db, ids: set[str]) -> dict[str, dict]:
    """fact_id -> {column: value} of the stored facts among `ids`, with their queries' prompts
    ("prompts": {template: prompt})."""
    if not ids or db.count("facts") == 0:
        return {}

    wanted = pa.array(sorted(ids), pa.string())
    facts = {r["fact_id"]: r for r in db.table("facts", filter=pc.field("fact_id").isin(wanted)).to_pylist()}
    for fact in facts.values():
        fact["prompts"] = {}
    queries = db.table("queries", columns=["fact_id", "template", "prompt"], filter=pc.field("fact_id").isin(wanted))
    for row in queries.to_pylist():
        if row["fact_id"] in facts:
            facts[row["fact_id"]]["prompts"][row["template"]] = row["prompt"]
    return facts


def _stored_queries(db, ids: set[str]) -> dict[str, dict]:
    """query_id -> {prompt, target} of stored queries among `ids` (an imported run's queries come
    before their facts: the fact's ingest then finds them stored)."""
    if not ids or db.count("queries") == 0:
        return {}

    rows = db.table("queries", columns=["query_id", "prompt", "target"],
                    filter=pc.field("query_id").isin(pa.array(sorted(ids), pa.string())))
    return {r["query_id"]: r for r in rows.to_pylist()}


def _new_queries(fact_queries: list[dict], known: dict, where: tuple, skip_bad: bool, report) -> list[dict]:
    """The fact's queries not yet stored; one stored with another prompt or target is refused."""
    out = []
    for query in fact_queries:
        old = known.get(query["query_id"])
        if old is None:
            out.append(query)
        elif (old["prompt"], old["target"]) != (query["prompt"], query["target"]):
            error = RecordError(*where, f"query {query['query_id']!r} is stored with prompt {old['prompt']!r} and "
                                        f"target {old['target']!r}; this line gives {query['prompt']!r} and "
                                        f"{query['target']!r}")
            if not skip_bad:
                raise error
            report.rejected.append(error)
    return out


def _conflict(stored: dict, fact: dict, queries: list[dict]) -> str | None:
    """The first field in which a line's fact differs from the stored fact of its id, else None."""
    schema = _schema.arrow_schema("facts")
    given = pa.Table.from_pylist([fact], schema=pa.schema([schema.field(c) for c in fact])).to_pylist()[0]
    for column in fact:  # each as stored: the line's values through the table's types
        if column in stored and given[column] != stored[column]:
            return f"{column} {given[column]!r} (stored: {stored[column]!r})"
    prompts = {q["template"]: q["prompt"] for q in queries}
    for template in sorted(set(prompts) | set(stored["prompts"])):
        if prompts.get(template) != stored["prompts"].get(template):
            return f"{template} {prompts.get(template)!r} (stored: {stored['prompts'].get(template)!r})"
    return None


def ingest_facts(db, files: list[str | Path], skip_bad: bool = False, progress: bool | None = None) -> FactReport:
    """Add facts and their queries and rebuild ground_truth: all or nothing, kill -9 included
    (store/journal.py), under the writer lock. A fact id stored with other content (any field,
    or a prompt) is refused, naming the line and the stored fact with the field that differs."""
    report = FactReport()
    parsed = _read(files, skip_bad, progress, report)
    with journal.transaction(db, "ingest facts", ["facts", "queries", "ground_truth"]):
        stored = _stored_facts(db, {fact["fact_id"] for fact, _, _ in parsed})
        known_queries = _stored_queries(db, {q["query_id"] for _, fact_queries, _ in parsed for q in fact_queries})
        facts, queries = [], []
        for fact, fact_queries, where in parsed:
            if fact["fact_id"] in stored:
                differs = _conflict(stored[fact["fact_id"]], fact, fact_queries)
                if differs is not None:
                    error = RecordError(*where, f"fact id {fact['fact_id']!r} conflicts with the stored fact "
                                        f"{fact['fact_id']!r}: {differs}; same id, different content")
                    if not skip_bad:
                        raise error
                    report.rejected.append(error)
                    continue
                report.already_present += 1
                continue
            facts.append(fact)
            queries.extend(_new_queries(fact_queries, known_queries, where, skip_bad, report))
        db.append("facts", pa.Table.from_pylist(facts))
        faults.point("facts.after_facts")
        db.append("queries", pa.Table.from_pylist(queries))
        faults.point("facts.after_queries")
        report.ground_truth = rebuild_ground_truth(db)
        faults.point("facts.after_ground_truth")
    report.facts, report.queries = len(facts), len(queries)
    return report


GROUND_TRUTH_SQL = """
SELECT DISTINCT fact_id, example_id FROM (
    SELECT f.fact_id, e.example_id
    FROM (SELECT example_id, unnest(fact_triples) AS fact_key FROM examples) e
    JOIN facts f USING (fact_key)
    UNION ALL
    SELECT f.fact_id, e.example_id
    FROM (SELECT fact_id, unnest(trex_sentences) AS example_id FROM facts) f
    JOIN examples e USING (example_id)
    UNION ALL
    SELECT fact_id, example_id FROM ground_truth_imported
) ORDER BY fact_id, example_id
"""


def rebuild_ground_truth(db) -> int:
    """Recompute ground_truth from examples, facts and imported results; returns its row count."""
    with duckdb.connect() as con:
        con.register("examples", db.table("examples", columns=["example_id", "fact_triples"]))
        con.register("facts", db.table("facts", columns=["fact_id", "fact_key", "trex_sentences"]))
        imported = (db.table("ground_truth_imported") if db.has_table("ground_truth_imported")
                    else _schema.arrow_schema("ground_truth_imported").empty_table())
        con.register("ground_truth_imported", imported)
        pairs = con.sql(GROUND_TRUTH_SQL).to_arrow_table()
    db.replace("ground_truth", pairs)
    return pairs.num_rows
