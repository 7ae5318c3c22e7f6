"""Committed versions: what a reader pins, and what shows that a table lost versions.

DB/versions.json holds the state of the database as its last writer left it, written atomically
(temp file, fsync, rename) when a command releases the writer lock after finishing cleanly
(Database.writer):

    {"tables": {"examples": 7, "retrievals": 12, ...}, "manifest": {...the manifest then...}}

Every reader takes its read view from it (store/read_view.py: the handle's read verbs, the
server's snapshots, check): every table is read at its committed version for the whole read,
BM25 in the committed folder of the index the record names ("bm25"), with the manifest read
once at its start (its featurizer settings and dims are compared with the committed ones first;
the R files it names are never overwritten). So rows a writer has staged,
or written but not yet committed (a retrieve --replace, an import, a fit in progress), are never
seen, and a run being replaced stays readable until its writer commits; old Lance versions and
old preconditioner files stay on disk for such readers (gradients/fit.py keeps retired R files).

The same record makes damage visible: a table whose newest version on disk is older than its
committed one (its latest versions deleted) is refused by reads and writes and named by
`trackstar-db check`, with the repair.
"""

from __future__ import annotations

import json
from pathlib import Path

from trackstar_db.errors import TrackstarError

from . import manifest as _manifest
from .manifest import write_atomic

FILENAME = "versions.json"
_V2 = 1 << 63  # Lance's V2 manifest naming stores u64::MAX - version as the file name


def read(db_path: str | Path) -> dict | None:
    """The committed record, or None for a database written before it existed."""
    path = Path(db_path) / FILENAME
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrackstarError(f"{path}: unreadable record of committed versions ({exc}); repair: delete it (the next "
                             "writer records the tables as they are), then run 'trackstar-db check'") from None
    if not isinstance(record, dict) or not isinstance(record.get("tables"), dict):
        raise TrackstarError(f"{path}: not a record of committed versions; repair: delete it, then run "
                             "'trackstar-db check'")
    return record


def write(db, manifest: dict) -> None:
    """Record every table's newest version, the BM25 index's committed folder (store/bm25.py)
    and `manifest` as the committed state."""
    from .bm25 import commit_index  # heavy: tantivy

    record = {"tables": latest_versions(db), "manifest": manifest}
    bm25 = commit_index(db.path)
    if bm25 is not None:
        record["bm25"] = bm25
    text = json.dumps(record, sort_keys=True)
    path = Path(db.path) / FILENAME
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return  # nothing committed since: the record is not rewritten
    write_atomic(path, text)


def _latest_local(table_dir: Path) -> int | None:
    best = None
    for entry in (table_dir / "_versions").iterdir():
        if entry.name.endswith(".manifest") and entry.name[: -len(".manifest")].isdigit():
            number = int(entry.name[: -len(".manifest")])
            version = (2**64 - 1 - number) if number >= _V2 else number
            best = version if best is None else max(best, version)
    return best


def latest_versions(db) -> dict[str, int]:
    """{table: newest version on disk}; read from the file names where the tables are local."""
    local = db._local_tables()
    if local is None:
        return {name: db._lance.open_table(name).version for name in db._lance.list_tables().tables}
    if not local.is_dir():
        return {}
    versions = {}
    for folder in sorted(local.iterdir()):
        if folder.name.endswith(".lance") and (folder / "_versions").is_dir():
            version = _latest_local(folder)
            if version is not None:
                versions[folder.name[: -len(".lance")]] = version
    return versions


def damage(db, record: dict | None = None) -> list[tuple[str, str, str]]:
    """(table, problem, repair) for each committed table that is missing or behind its committed version."""
    record = read(db.path) if record is None else record
    if record is None:
        return []
    latest = latest_versions(db)
    found = []
    for name, committed in sorted(record["tables"].items()):
        where = Path(db.tables_uri) / f"{name}.lance"
        if name not in latest:
            found.append((name, f"table missing (version {committed} was committed)",
                          f"restore {where} from a backup, or delete {Path(db.path) / FILENAME} to accept its loss "
                          "and rebuild the table"))
        elif latest[name] < committed:
            found.append((name, f"newest version on disk is {latest[name]} but version {committed} was committed "
                                "(its latest versions were deleted)",
                          f"restore {where}/_versions from a backup, or delete {Path(db.path) / FILENAME} to accept "
                          f"version {latest[name]}, then run 'trackstar-db check {db.path}'"))
    return found + _manifest_damage(db, record.get("manifest") or {}, latest)


def _manifest_damage(db, committed: dict, latest: dict[str, int]) -> list[tuple[str, str, str]]:
    """The manifest against the committed one and the stored vectors: its featurizer settings
    (projection seeds, dims, hashes: fixed once vectors exist) and each gradient table's dim."""
    current = _manifest.read(db.path)
    path = Path(db.path) / _manifest.FILENAME
    found = []
    if committed.get("featurizer"):
        was, now = (_manifest._flat({k: v for k, v in (m or {}).items() if k != "context_cap"})
                    for m in (committed["featurizer"], current.get("featurizer")))
        for key in sorted(set(was) | set(now)):
            if was.get(key) != now.get(key):
                found.append(("manifest.json", f"featurizer setting {key!r} is {now.get(key)!r} but the stored vectors "
                                               f"were written with {was.get(key)!r}",
                              f"set it back to {was.get(key)!r} in {path} (or restore the file from a backup)"))
                break
    for name, entry in sorted((current.get("gradient_tables") or {}).items()):
        dim = _stored_dim(db, name) if name in latest else None
        if dim is not None and dim != entry.get("dim"):
            found.append((name, f"manifest.json records dim {entry.get('dim')!r} but the stored vectors have {dim}",
                          f"set gradient_tables.{name}.dim back to {dim} in {path}"))
    return found


def _stored_dim(db, name: str) -> int | None:
    try:
        import lance  # heavy: lance

        local = db._local_tables()
        dataset = (db._lance.open_table(name).to_lance() if local is None
                   else lance.dataset(str(local / f"{name}.lance")))
        return getattr(dataset.schema.field("vector").type, "list_size", None)
    except Exception:  # an unreadable table is reported by check's scan
        return None


def refuse_damage(db, record: dict | None = None) -> None:
    """One line naming the first damaged table and its repair."""
    found = damage(db, record)
    if found:
        name, problem, repair = found[0]
        raise TrackstarError(f"{db.path}: {name}: {problem}; repair: {repair}")
