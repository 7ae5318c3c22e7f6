"""The BM25 side: a Tantivy index over examples.text inside the database directory (DB/bm25).

Readers see the committed index (store/committed.py): when a writer commits, `commit_index`
hard-links the index's files (Tantivy never rewrites a file: segments are immutable, meta.json
is replaced by rename) into DB/bm25_versions/<sha256 of meta.json>/ and the committed record
names that folder; `BM25Index.reader(db)` opens the one its read view names, so a query
beside an ingest never meets a document whose example it cannot see, and BM25's statistics are
those of the committed examples. Folders no record names are removed once RETIRE_SECONDS old.

Documents carry the example_id (stored, untokenised) and the text (indexed with Tantivy's
default tokenizer, not stored: the text lives in the examples table). Queries are reduced to
their words, so no user text is parsed as Tantivy query syntax.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from pathlib import Path

import tantivy

from trackstar_db.errors import TrackstarError

_WORD = re.compile(r"\w+", re.UNICODE)
VERSIONS = "bm25_versions"  # DB/bm25_versions/<name>/: committed states of the index, hard-linked
RETIRE_SECONDS = 3600.0  # an uncommitted-to folder stays this long for readers that pinned it
_LOCKS = (".tantivy-writer.lock", ".tantivy-meta.lock")


def commit_index(db_path: str | Path, keep: set[str] = frozenset()) -> str | None:
    """The name of DB/bm25_versions/<name>, the index as it is now (made when new: hard links of
    its files, named by the sha256 of its meta.json, so an unchanged index makes no folder);
    None without an index. Called under the writer lock. Folders other than this one and
    `keep` are removed once older than RETIRE_SECONDS (TRACKSTAR_RETIRE_SECONDS)."""
    live = Path(db_path) / "bm25"
    meta = live / "meta.json"
    if not meta.is_file():
        return None
    name = hashlib.sha256(meta.read_bytes()).hexdigest()[:16]
    folder = Path(db_path) / VERSIONS
    target = folder / name
    if not (target / "meta.json").is_file():
        tmp = folder / f".{name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for item in live.iterdir():
            if item.is_file() and item.name not in _LOCKS:
                os.link(item, tmp / item.name)
        shutil.rmtree(target, ignore_errors=True)  # a half-made folder of a killed commit
        tmp.rename(target)
    _remove_old(folder, keep | {name})
    return name


def _remove_old(folder: Path, keep: set[str]) -> None:
    grace = float(os.environ.get("TRACKSTAR_RETIRE_SECONDS", RETIRE_SECONDS))
    now = time.time()
    for item in folder.iterdir():
        if item.name in keep:
            continue
        try:
            if now - item.stat().st_mtime > grace:
                shutil.rmtree(item, ignore_errors=True)
        except OSError:
            continue


def _schema() -> tantivy.Schema:
    builder = tantivy.SchemaBuilder()
    builder.add_text_field("example_id", stored=True, tokenizer_name="raw")
    builder.add_text_field("text", stored=False)
    return builder.build()


class BM25Index:
    def __init__(self, db_path: str | Path, must_exist: bool = False):
        """must_exist: refuse a missing index (a reader on a database with examples) instead of
        creating an empty one that would answer every query with nothing."""
        self.path = Path(db_path) / "bm25"
        if must_exist and not (self.path / "meta.json").is_file():
            raise TrackstarError(f"{self.path}: the BM25 index is missing; run 'trackstar-db check {db_path}' "
                                 f"and 'trackstar-db rebuild-bm25 {db_path}'")
        self.path.mkdir(parents=True, exist_ok=True)
        self.index = tantivy.Index(_schema(), path=str(self.path))

    @classmethod
    def reader(cls, db, must_exist: bool = False) -> "BM25Index":
        """The index a reading command of `db` sees: the committed folder its read view names
        (store/read_view.py: a handle inside reading(), a serve Snapshot, which holds it open), else
        the live index."""
        held = getattr(db, "held_bm25", None)  # a serve Snapshot opens its committed index once
        if held is not None:
            index = held()
            if index is not None:
                return index
        return cls.committed(db, must_exist)

    @classmethod
    def committed(cls, db, must_exist: bool = False) -> "BM25Index":
        """reader(db), opened afresh."""
        view = getattr(db, "view", None)
        name = view.bm25 if view is not None else None
        if name:
            folder = Path(db.path) / VERSIONS / name
            if (folder / "meta.json").is_file():
                index = cls.__new__(cls)
                index.path = folder
                index.index = tantivy.Index(_schema(), path=str(folder))
                return index
        return cls(db.path, must_exist=must_exist)

    def add(self, example_ids: list[str], texts: list[str]) -> None:
        """Add documents and commit (one commit per call: call it once per ingest run)."""
        writer = self.index.writer(heap_size=64_000_000, num_threads=1)
        try:
            for example_id, text in zip(example_ids, texts):
                writer.add_document(tantivy.Document(example_id=example_id, text=text))
            writer.commit()
        except BaseException:
            writer.rollback()
            raise
        finally:
            writer.wait_merging_threads()
        self.index.reload()

    def delete(self, example_ids: list[str]) -> None:
        """Remove documents by example_id (rolls back an add whose other writes failed)."""
        writer = self.index.writer(heap_size=64_000_000, num_threads=1)
        try:
            for example_id in example_ids:
                writer.delete_documents("example_id", example_id)
            writer.commit()
        finally:
            writer.wait_merging_threads()
        self.index.reload()

    def all_ids(self) -> list[str]:
        """The example_id of every document (a full scan: for reconciling after a rollback)."""
        self.index.reload()
        searcher = self.index.searcher()
        if not searcher.num_docs:
            return []
        hits = searcher.search(tantivy.Query.all_query(), searcher.num_docs).hits
        return [searcher.doc(address)["example_id"][0] for _, address in hits]

    def count(self) -> int:
        self.index.reload()
        return self.index.searcher().num_docs

    def search(self, text: str, k: int = 10) -> list[tuple[str, float]]:
        """Top-k (example_id, BM25 score) for a free-text query."""
        words = _WORD.findall(text.lower())
        if not words:
            return []
        query = self.index.parse_query(" ".join(words), ["text"])
        searcher = self.index.searcher()
        hits = searcher.search(query, k).hits
        return [(searcher.doc(address)["example_id"][0], float(score)) for score, address in hits]

    def scores_of(self, text: str, example_ids: list[str]) -> dict[str, float]:
        """BM25 score of each of `example_ids` for a free-text query (0.0 where it matches no word)."""
        words = _WORD.findall(text.lower())
        if not words or not example_ids:
            return {e: 0.0 for e in example_ids}
        among = tantivy.Query.term_set_query(self.index.schema, "example_id", list(example_ids))
        query = tantivy.Query.boolean_query([(tantivy.Occur.Must, self.index.parse_query(" ".join(words), ["text"])),
                                             (tantivy.Occur.Must, tantivy.Query.const_score_query(among, 0.0))])
        searcher = self.index.searcher()
        hits = searcher.search(query, len(example_ids)).hits
        found = {searcher.doc(address)["example_id"][0]: float(score) for score, address in hits}
        return {e: found.get(e, 0.0) for e in example_ids}

    def search_many(self, texts: list[str], k: int) -> list[list[tuple[str, float]]]:
        """Top-k (example_id, score) lists for many queries, in order (BM25 has no opponents)."""
        if k < 1:
            raise ValueError(f"BM25: k must be >= 1, not {k}")
        return [self.search(text, k) for text in texts]


def sync_bm25(db, full: bool = False) -> int:
    """Make the BM25 index hold exactly the stored examples: index those it lacks (a run killed
    between its two commits) and, when the counts differ or `full`, remove documents whose
    example is not stored (a rolled-back ingest). Returns how many documents changed."""
    index = BM25Index(db.path)
    n_docs, n_examples = index.count(), db.count("examples")
    if n_docs == n_examples and not full:
        return 0
    indexed = index.all_ids()
    rows = db.table("examples", columns=["example_id", "text"])
    stored = rows.column("example_id").to_pylist()
    extra = sorted(set(indexed) - set(stored))
    if extra:
        index.delete(extra)
    have = set(indexed)
    missing = [i for i, eid in enumerate(stored) if eid not in have]
    if missing:
        taken = rows.take(missing)
        index.add(taken.column("example_id").to_pylist(), taken.column("text").to_pylist())
    return len(missing) + len(extra)

