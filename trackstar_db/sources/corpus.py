"""Corpus ingest: training texts into the examples table and the BM25 index.

Accepts the authors' T-REx sentence records (sentence_id, text, abstract_uri, sent_idx_in_abst,
fact_triples) and plain records whose text and id fields are named by the caller. Ingest is
idempotent (an example_id already stored with the same text is skipped) and all-or-nothing per
run, kill -9 included (the write-ahead journal, store/journal.py, covers examples, ground_truth
and the BM25 documents): on a bad record it either stops and rolls back, or, with
skip_bad=True, records the line in DB/rejects.jsonl and goes on. Ids are strings; integer ids
are stored as their decimal text, and an input holding both 17 and "17" is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from trackstar_db import defaults
from trackstar_db import faults
from trackstar_db.errors import RecordError
from trackstar_db.store.bm25 import BM25Index, sync_bm25

from .records import IdRegistry, checked_records, record_id, require_text

TREX_FIELDS = {"sentence_id", "text", "abstract_uri", "sent_idx_in_abst", "fact_triples"}
ID_CANDIDATES = ("sentence_id", "example_id", "id")


@dataclass
class CorpusOptions:
    text_field: str = "text"
    id_field: str | None = None  # None: the first of ID_CANDIDATES present, else a hash of the text
    skip_bad: bool = False
    batch_size: int = defaults.CORPUS_COMMIT_ROWS


@dataclass
class IngestReport:
    added: int = 0
    already_present: int = 0
    rejected: list[RecordError] = field(default_factory=list)


def fact_key(triple, path, line) -> str:
    """'entity0_uri|predicate_uri|entity1_uri' from a [s, p, o] list or an already joined string."""
    if isinstance(triple, str) and triple:
        return triple
    if isinstance(triple, (list, tuple)) and len(triple) == 3 and all(isinstance(x, str) for x in triple):
        return "|".join(triple)
    if isinstance(triple, dict) and {"entity0_uri", "predicate_uri", "entity1_uri"} <= set(triple):
        return "|".join(str(triple[k]) for k in ("entity0_uri", "predicate_uri", "entity1_uri"))
    raise RecordError(path, line, f"fact_triples entry {triple!r} is not a [subject, predicate, object] triple")


def to_row(record: dict, path: Path, line: int, options: CorpusOptions) -> dict:
    """One examples-table row from one input record (RecordError when it cannot be)."""
    text = require_text(record, options.text_field, path, line)
    if "\x00" in text:
        raise RecordError(path, line, f"field {options.text_field!r} contains a NUL character")
    content_hash = hashlib.sha256(text.encode("utf-8")).hexdigest()
    id_field = options.id_field or next((f for f in ID_CANDIDATES if f in record), None)
    if id_field is not None:
        example_id, _ = record_id(record, id_field, path, line)
    else:
        example_id = content_hash[:20]
    triples = record.get("fact_triples") or []
    if not isinstance(triples, list):
        raise RecordError(path, line, "field 'fact_triples' must be a list")
    sent_idx = record.get("sent_idx_in_abst")
    if sent_idx is not None and not isinstance(sent_idx, int):
        raise RecordError(path, line, "field 'sent_idx_in_abst' must be an integer")
    known = TREX_FIELDS | {options.text_field, id_field}
    extra = {k: v for k, v in record.items() if k not in known}
    return {
        "example_id": example_id,
        "text": text,
        "source": path.name,
        "n_tokens": None,
        "abstract_uri": record.get("abstract_uri"),
        "sent_idx": sent_idx,
        "fact_triples": [fact_key(t, path, line) for t in triples],
        "metadata": json.dumps(extra, sort_keys=True, default=str) if extra else None,
        "content_hash": content_hash,
    }


def _tokenizer(db):
    """The database model's tokenizer, for n_tokens; None before a model is recorded."""
    if not db.manifest.get("model"):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(db.model_info()["tokenizer"], local_files_only=True)


def _stored_hashes(db) -> dict[str, tuple[str, str]]:
    """example_id -> (content_hash, source file) of the stored examples."""
    if db.count("examples") == 0:
        return {}
    rows = db.table("examples", columns=["example_id", "content_hash", "source"])
    return {eid: (digest, source) for eid, digest, source in zip(*(rows.column(c).to_pylist() for c in rows.column_names))}


def ingest_corpus(db, files: list[str | Path], options: CorpusOptions | None = None,
                  progress: bool | None = None) -> IngestReport:
    """Add the files' records to examples and BM25, all or nothing (store/journal.py), under the
    writer lock. A conflicting duplicate id (in the files, or against a stored example) is a
    RecordError naming both places."""
    from trackstar_db.store import journal

    options = options or CorpusOptions()
    report = IngestReport()
    tokenizer = _tokenizer(db)
    with journal.transaction(db, "ingest corpus", ["examples", "ground_truth"], bm25=True):
        sync_bm25(db)
        stored = _stored_hashes(db)
        faults.point("corpus.before_write")
        registry = IdRegistry("example")
        new_ids: list[str] = []
        new_texts: list[str] = []
        pending: list[dict] = []

        def flush():
            if pending:
                if tokenizer is not None:
                    counts = tokenizer([row["text"] for row in pending], add_special_tokens=False)["input_ids"]
                    for row, ids in zip(pending, counts):
                        row["n_tokens"] = len(ids)
                db.append("examples", pa.Table.from_pylist(pending))
                pending.clear()
                faults.point("corpus.after_examples")

        def check(record, path, line):
            row = to_row(record, path, line, options)
            return row, _check_duplicate(row, _id_kind(record, options), stored, registry, path, line)

        for _, _, row in checked_records(files, check, report, options.skip_bad, progress, "corpus"):
            pending.append(row)
            new_ids.append(row["example_id"])
            new_texts.append(row["text"])
            if len(pending) >= options.batch_size:
                flush()
        flush()
        BM25Index(db.path).add(new_ids, new_texts)
        faults.point("corpus.after_bm25")
        from .facts import rebuild_ground_truth

        rebuild_ground_truth(db)
        faults.point("corpus.after_ground_truth")
    report.added = len(new_ids)
    if report.rejected:
        with (db.path / "rejects.jsonl").open("a", encoding="utf-8") as handle:
            for error in report.rejected:
                handle.write(json.dumps({"file": error.path, "line": error.line, "reason": error.reason}) + "\n")
    return report


def _id_kind(record: dict, options: CorpusOptions) -> str:
    id_field = options.id_field or next((f for f in ID_CANDIDATES if f in record), None)
    if id_field is None:
        return "hash"
    return "integer" if isinstance(record.get(id_field), int) else "string"


def _check_duplicate(row: dict, kind: str, stored: dict, registry: IdRegistry, path: Path, line: int) -> bool:
    """True for a new example; False for one already stored or repeated with the same text."""
    example_id = row["example_id"]
    if example_id in stored:
        digest, source = stored[example_id]
        if digest != row["content_hash"]:
            raise RecordError(path, line, f"example id {example_id!r} is stored (from {source}) with a different "
                                          "text: same id, different content")
        return False
    return registry.add(example_id, kind, row["content_hash"], path, line)
