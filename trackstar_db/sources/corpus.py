"""Corpus ingest: training texts into the examples table and the BM25 index.

Accepts the authors' T-REx sentence records (sentence_id, text, abstract_uri, sent_idx_in_abst,
fact_triples) and plain records whose text and id fields are named by the caller. Ingest is
idempotent (an example_id already stored is skipped) and all-or-nothing per run: on a bad
record it either stops and rolls the table back to its previous version, or, with
skip_bad=True, records the line in DB/rejects.jsonl and goes on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from tqdm.auto import tqdm

from trackstar_db.errors import RecordError

from .bm25 import BM25Index
from .records import iter_records, require_text

TREX_FIELDS = {"sentence_id", "text", "abstract_uri", "sent_idx_in_abst", "fact_triples"}
ID_CANDIDATES = ("sentence_id", "example_id", "id")


@dataclass
class CorpusOptions:
    text_field: str = "text"
    id_field: str | None = None  # None: the first of ID_CANDIDATES present, else a hash of the text
    skip_bad: bool = False
    batch_size: int = 10_000


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
        if record.get(id_field) in (None, ""):
            raise RecordError(path, line, f"missing field {id_field!r}")
        example_id = str(record[id_field])
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


def sync_bm25(db) -> int:
    """Index examples the BM25 index lacks (after a run killed between its two commits)."""
    index = BM25Index(db.path)
    n_examples = db.count("examples")
    if index.count() >= n_examples:
        return 0
    import tantivy

    searcher = index.index.searcher()
    hits = searcher.search(tantivy.Query.all_query(), max(searcher.num_docs, 1)).hits
    indexed = {searcher.doc(address)["example_id"][0] for _, address in hits}
    rows = db.table("examples", columns=["example_id", "text"])
    missing = [i for i, eid in enumerate(rows.column("example_id").to_pylist()) if eid not in indexed]
    if missing:
        taken = rows.take(missing)
        index.add(taken.column("example_id").to_pylist(), taken.column("text").to_pylist())
    return len(missing)


def ingest_corpus(db, files: list[str | Path], options: CorpusOptions | None = None,
                  progress: bool = True) -> IngestReport:
    options = options or CorpusOptions()
    report = IngestReport()
    sync_bm25(db)
    seen = db.ids("examples", "example_id")
    start_version = db.version("examples")
    new_ids: list[str] = []
    new_texts: list[str] = []
    pending: list[dict] = []

    tokenizer = _tokenizer(db)

    def flush():
        if pending:
            if tokenizer is not None:
                counts = tokenizer([row["text"] for row in pending], add_special_tokens=False)["input_ids"]
                for row, ids in zip(pending, counts):
                    row["n_tokens"] = len(ids)
            db.append("examples", pa.Table.from_pylist(pending))
            pending.clear()

    bar = tqdm(desc="ingest corpus", unit=" rec", disable=not progress)
    try:
        for path in map(Path, files):
            for line, record in iter_records(path, report.rejected if options.skip_bad else None):
                bar.update()
                try:
                    row = to_row(record, path, line, options)
                except RecordError as error:
                    if not options.skip_bad:
                        raise
                    report.rejected.append(error)
                    continue
                if row["example_id"] in seen:
                    report.already_present += 1
                    continue
                seen.add(row["example_id"])
                pending.append(row)
                new_ids.append(row["example_id"])
                new_texts.append(row["text"])
                if len(pending) >= options.batch_size:
                    flush()
        flush()
        bar.close()
        BM25Index(db.path).add(new_ids, new_texts)
    except BaseException:
        bar.close()
        db.restore("examples", start_version)
        raise
    report.added = len(new_ids)
    if report.rejected:
        with (db.path / "rejects.jsonl").open("a", encoding="utf-8") as handle:
            for error in report.rejected:
                handle.write(json.dumps({"file": error.path, "line": error.line, "reason": error.reason}) + "\n")
    from .facts import rebuild_ground_truth

    rebuild_ground_truth(db)
    return report
