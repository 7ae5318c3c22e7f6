"""Corpus ingest: training texts into the examples table and the BM25 index.

Accepts the authors' T-REx sentence records (sentence_id, text, abstract_uri, sent_idx_in_abst,
fact_triples) and plain records whose text and id fields are named by the caller, from JSON
lines, Parquet and Arrow files and dataset directories (records.expand), read in record batches.

The loss of an example (the database's task, featurizer/task.py) follows the options:
- text_field: loss on every token (the default task);
- prompt_field + completion_field: the stored text is prompt + separator + completion, the
  loss on the completion only (its span is stored in loss_spans);
- messages_field: a chat rendered with the model's chat template (chat.py), the loss on the
  assistant turns.
Every row of the examples table has the same loss: the manifest records it (task.examples)
and a run whose records have another is refused before anything is written.

Ingest is idempotent (an example_id already stored with the same text is skipped) and
all-or-nothing per run, kill -9 included (the write-ahead journal, store/journal.py, covers
examples, ground_truth and the BM25 documents): on a bad record it either stops and rolls back,
or, with skip_bad=True, records the line in DB/rejects.jsonl and goes on. Rows are committed
and indexed every batch_size rows, so no run holds more than one batch of texts. Ids are
strings; integer ids are stored as their decimal text, and an input holding both 17 and "17"
is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa

from trackstar_db import defaults
from trackstar_db import faults
from trackstar_db.errors import ParameterError, RecordError, TrackstarError
from trackstar_db.models.load import open_tokenizer
from trackstar_db.option_checks import COUNT, check_fields, ruled
from trackstar_db.store import journal
from trackstar_db.store.bm25 import BM25Index, sync_bm25
from trackstar_db.store.checkpoints import source

from .chat import chat_renderer
from .records import IdRegistry, checked_records, expand, optional_index, optional_text, record_id, require_text

TREX_FIELDS = {"sentence_id", "text", "abstract_uri", "sent_idx_in_abst", "fact_triples"}
ID_CANDIDATES = ("sentence_id", "example_id", "id")


LOSS_WORDS = {"all": "plain-text (loss on every token)", "completion": "prompt/completion (loss on the completion)",
              "chat": "chat (loss on the assistant turns)"}


@dataclass
class CorpusOptions:
    text_field: str = "text"
    id_field: str | None = None  # None: the first of ID_CANDIDATES present, else a hash of the text
    skip_bad: bool = False
    batch_size: int = ruled(COUNT, defaults.CORPUS_COMMIT_ROWS)
    prompt_field: str | None = None  # with completion_field: the loss on the completion only
    completion_field: str | None = None
    messages_field: str | None = None  # chat records: the loss on the assistant turns
    chat_template: str | Path | None = None  # a Jinja template file used instead of the tokenizer's own

    def __post_init__(self):
        if (self.prompt_field is None) != (self.completion_field is None):
            raise ParameterError("prompt_field", "and completion_field go together", others=("completion_field",))
        if self.messages_field is not None and self.prompt_field is not None:
            raise ParameterError("messages_field", "excludes prompt_field and completion_field",
                                 others=("prompt_field", "completion_field"))
        if self.chat_template is not None and self.messages_field is None:
            raise ParameterError("chat_template", "needs messages_field", others=("messages_field",))
        check_fields(self)

    @property
    def loss(self) -> str:
        """The task's example loss these options give (featurizer/task.py EXAMPLE_LOSSES)."""
        if self.messages_field is not None:
            return "chat"
        return "completion" if self.prompt_field is not None else "all"

    def fields(self) -> set:
        """The record fields these options read (the others go to metadata)."""
        used = {"all": {self.text_field}, "completion": {self.prompt_field, self.completion_field},
                "chat": {self.messages_field}}[self.loss]
        return used | {self.id_field}


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


def text_and_spans(record: dict, path: Path, line: int, options: CorpusOptions,
                   chat=None) -> tuple[str, list[int] | None]:
    """The example's text and loss spans (None: every token) under the options' loss; `chat`:
    the renderer of chat records (chat.ChatRenderer)."""
    if options.loss == "all":
        return require_text(record, options.text_field, path, line), None
    if options.loss == "completion":
        from trackstar_db.featurizer.tokenize import target_separator  # heavy: torch

        prompt = require_text(record, options.prompt_field, path, line, allow_empty=True)
        completion = require_text(record, options.completion_field, path, line)
        text = prompt + target_separator(prompt) + completion
        return text, [len(prompt), len(text)]
    return chat(record, options.messages_field, path, line)


def to_row(record: dict, path: Path, line: int, options: CorpusOptions, chat=None, source: str | None = None) -> dict:
    """One examples-table row from one input record (RecordError when it cannot be)."""
    text, spans = text_and_spans(record, path, line, options, chat)
    if "\x00" in text:
        names = " or ".join(repr(f) for f in sorted(options.fields() - {options.id_field}))
        raise RecordError(path, line, f"field {names} contains a NUL character")
    # a masked example is its text and its spans: the same text with other spans is other content
    content = text if spans is None else text + "\x00" + json.dumps(spans)
    content_hash = hashlib.sha256(content.encode("utf-8")).hexdigest()
    id_field = options.id_field or next((f for f in ID_CANDIDATES if f in record), None)
    if id_field is not None:
        example_id, _ = record_id(record, id_field, path, line)
    else:
        example_id = content_hash[:20]
    triples = record.get("fact_triples") or []
    if not isinstance(triples, list):
        raise RecordError(path, line, "field 'fact_triples' must be a list")
    sent_idx = optional_index(record, "sent_idx_in_abst", path, line)  # stored as int32
    known = TREX_FIELDS | options.fields() | {id_field}
    extra = {k: v for k, v in record.items() if k not in known}
    return {
        "example_id": example_id,
        "text": text,
        "source": source or path.name,
        "n_tokens": None,
        "abstract_uri": optional_text(record, "abstract_uri", path, line),
        "sent_idx": sent_idx,
        "fact_triples": [fact_key(t, path, line) for t in triples],
        "metadata": json.dumps(extra, sort_keys=True, default=str) if extra else None,
        "content_hash": content_hash,
        "loss_spans": spans,
    }


def _tokenizer(db):
    """The database model's tokenizer, for n_tokens; None before a model is recorded."""
    if not db.manifest.get("model"):
        return None

    return open_tokenizer(source(db))


def _stored_hashes(db) -> dict[str, tuple[str, str]]:
    """example_id -> (content_hash, source file) of the stored examples."""
    if db.count("examples") == 0:
        return {}
    rows = db.table("examples", columns=["example_id", "content_hash", "source"])
    return {eid: (digest, source) for eid, digest, source in zip(*(rows.column(c).to_pylist() for c in rows.column_names))}


def _loss_of_table(db, options: CorpusOptions):
    """The task these records are stored under: the manifest's, with the options' example loss.
    Refused (before anything is written) when the examples table holds rows of another loss."""
    from trackstar_db.featurizer.task import task_of  # heavy: torch

    task = task_of(db.manifest)
    if db.count("examples") and task.examples != options.loss:
        raise TrackstarError(f"{db.path}: the examples table holds {LOSS_WORDS[task.examples]} examples and these "
                             f"records are {LOSS_WORDS[options.loss]}; one table never mixes losses: ingest them into "
                             "a new database")
    return replace(task, examples=options.loss)


def _add_spans_column(db, task) -> None:
    """An examples table made before loss spans existed gains the (null) column for masked rows."""
    if task.masked and "loss_spans" not in db.lance_table("examples").schema.names:
        db.lance_table("examples").add_columns(pa.field("loss_spans", pa.list_(pa.int32())))


def ingest_corpus(db, files: list[str | Path], options: CorpusOptions | None = None,
                  progress: bool | None = None) -> IngestReport:
    """Add the files' records to examples and BM25, all or nothing (store/journal.py), under the
    writer lock. A conflicting duplicate id (in the files, or against a stored example) is a
    RecordError naming both places; records whose loss differs from the stored examples' are
    refused before anything is written."""
    from trackstar_db.featurizer.task import record_task  # heavy: torch

    options = options or CorpusOptions()
    report = IngestReport()
    files = list(files)
    sources = {shard: f"{path.name}/{shard.name}" for path in map(Path, files) if path.is_dir()
               for shard in expand([path])}
    if options.loss == "chat":
        chat = chat_renderer(db, options.chat_template)
        tokenizer = chat.tokenizer
    else:
        tokenizer, chat = _tokenizer(db), None
    with journal.transaction(db, "ingest corpus", ["examples", "ground_truth"], bm25=True):
        task = _loss_of_table(db, options)
        sync_bm25(db)
        stored = _stored_hashes(db)
        faults.point("corpus.before_write")
        _add_spans_column(db, task)
        registry = IdRegistry("example")
        bm25 = BM25Index(db.path)
        pending: list[dict] = []

        def flush():
            if pending:
                if tokenizer is not None:
                    counts = tokenizer([row["text"] for row in pending], add_special_tokens=False)["input_ids"]
                    for row, ids in zip(pending, counts):
                        row["n_tokens"] = len(ids)
                db.append("examples", pa.Table.from_pylist(pending))
                faults.point("corpus.after_examples")
                bm25.add([row["example_id"] for row in pending], [row["text"] for row in pending])
                report.added += len(pending)
                pending.clear()

        def check(record, path, line):
            row = to_row(record, path, line, options, chat, sources.get(path))
            return row, _check_duplicate(row, _id_kind(record, options), stored, registry, path, line)

        for _, _, row in checked_records(expand(files), check, report, options.skip_bad, progress, "corpus"):
            pending.append(row)
            if len(pending) >= options.batch_size:
                flush()
        flush()
        faults.point("corpus.after_bm25")
        from .facts import rebuild_ground_truth  # heavy: duckdb

        rebuild_ground_truth(db)
        faults.point("corpus.after_ground_truth")
        record_task(db, task)  # last: a run killed before here is rolled back to the old manifest
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
