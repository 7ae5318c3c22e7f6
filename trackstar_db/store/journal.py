"""A write-ahead journal, so a command that writes several tables is all-or-nothing under kill -9.

Before its first write, a multi-table command writes DB/journal.json (atomically: temp file,
fsync, rename):

    {"command": "ingest facts", "pid": 123, "tables": {"facts": 4, "queries": 4, "ground_truth": 9},
     "bm25": false, "phase": "write", "forward": null}

`tables` are the Lance versions before the command (null: the command creates the table). When
the command ends, the journal is removed; when it fails in-process, it is rolled back at once.
When the process dies (kill -9, power loss), the journal stays, and the next writer
(Database.writer) or any Database opened while no writer holds the lock recovers it before doing
anything else:

- phase "write" (the default): roll BACK: every listed table is restored to its version (a table
  created by the command is dropped) and, when `bm25` is set, the BM25 index is reconciled with
  the examples table (documents of rolled-back examples removed, missing ones added);
- phase "forward" (a write-then-swap whose new rows are complete): roll FORWARD by calling
  Database.roll_forward(entry["forward"]) (store/swap.py), which finishes the swap idempotently.

Every journal is written and recovered under the writer lock (store/lock.py).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from trackstar_db.errors import TrackstarError, first_line

FILENAME = "journal.json"


def path_of(db) -> Path:
    return Path(db.path) / FILENAME


def pending(db_path: str | Path) -> dict | None:
    """The journal left in a database directory, or None."""
    path = Path(db_path) / FILENAME
    if not path.exists():
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrackstarError(f"{path}: unreadable journal ({exc}) of an interrupted write; repair: move it away, "
                             f"then run 'trackstar-db check {Path(db_path)}' to see what the write left") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("tables"), dict):
        raise TrackstarError(f"{path}: not a trackstar-db journal (expected an object with 'tables'); repair: move "
                             f"it away, then run 'trackstar-db check {Path(db_path)}'")
    return entry


def _write(db, entry: dict) -> None:
    path = path_of(db)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(entry, handle, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def begin(db, command: str, tables: list[str], bm25: bool = False) -> dict:
    """Record the versions of `tables` before `command` writes them (call under the writer lock)."""
    if pending(db.path) is not None:  # never stack journals: recover first
        recover(db)
    entry = {"command": command, "pid": os.getpid(), "bm25": bm25, "phase": "write", "forward": None,
             "tables": {name: (db.version(name) if db.has_table(name) else None) for name in tables}}
    _write(db, entry)
    return entry


def go_forward(db, entry: dict, forward: dict) -> None:
    """Mark the command's new rows complete: from here a recovery finishes it instead of undoing it."""
    entry.update(phase="forward", forward=forward)
    _write(db, entry)


def clear(db) -> None:
    path_of(db).unlink(missing_ok=True)


def rollback(db, entry: dict) -> None:
    """Restore every journaled table to its recorded version; reconcile BM25 when asked."""
    for name, version in entry["tables"].items():
        if version is None:
            if db.has_table(name):
                db.drop_table(name)
        elif db.has_table(name):
            try:
                db.restore(name, int(version))
            except (OSError, ValueError, RuntimeError) as exc:  # the version is gone (deleted by hand)
                raise TrackstarError(
                    f"{path_of(db)}: the interrupted '{entry.get('command')}' needs version {version} of {name} to "
                    f"roll back, which cannot be restored ({first_line(exc)}); repair: move {path_of(db)} away to keep "
                    f"{name} as it is, then run 'trackstar-db check {db.path}'") from None
    if entry.get("bm25"):
        from trackstar_db.store.bm25 import sync_bm25  # heavy: tantivy (the one derived index outside Lance)

        sync_bm25(db, full=True)


def recover(db) -> str | None:
    """Finish or undo an interrupted command (call under the writer lock). Returns what was done."""
    entry = pending(db.path)
    if entry is None:
        return None
    if entry.get("phase") == "forward" and entry.get("forward"):
        db.roll_forward(entry["forward"])
        done = "rolled forward"
    else:
        rollback(db, entry)
        done = "rolled back"
    clear(db)
    return f"{done} an interrupted '{entry.get('command')}' (pid {entry.get('pid')})"


@contextlib.contextmanager
def transaction(db, command: str, tables: list[str], bm25: bool = False):
    """Hold the writer lock and a journal over a multi-table write; roll back on any failure.

    Yields the journal entry (pass it to go_forward for a write-then-swap). A failure after
    go_forward leaves the journal, so the next writer finishes the swap."""
    with db.writer(command):
        entry = begin(db, command, tables, bm25)
        try:
            yield entry
        except BaseException:
            if entry["phase"] != "forward":  # a failure while finishing: the next writer retries it
                rollback(db, entry)
                clear(db)
            raise
        clear(db)
