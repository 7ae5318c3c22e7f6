"""One writer at a time: an advisory lock per database directory (DB/.writer.lock).

Every command that changes a database holds this lock while it writes (`with db.writer("ingest
corpus"):`); readers never take it (Lance reads are snapshots and stay concurrent). The lock is
fcntl.flock on DB/.writer.lock, whose content is JSON {pid, command, since} naming the holder.
A second writer waits up to a timeout (TRACKSTAR_LOCK_TIMEOUT seconds, default 10) and then
fails with one line naming the holder's pid and command. flock dies with its process, so a lock
left by a killed writer is simply free again: the next writer takes it over (the file's stale
content is overwritten).

The lock is re-entrant within a process (a writing command that updates the manifest takes it
once), and it is not shared between threads of one process beyond that re-entrancy.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import threading
import time
from pathlib import Path

from trackstar_db.errors import TrackstarError

FILENAME = ".writer.lock"
DEFAULT_TIMEOUT = 10.0
_POLL = 0.05

_held: dict[str, list] = {}  # realpath of the lock file -> [fd, depth]; this process's locks
_guard = threading.Lock()


def default_timeout() -> float:
    """Seconds a writer waits for the lock: TRACKSTAR_LOCK_TIMEOUT, else DEFAULT_TIMEOUT."""
    value = os.environ.get("TRACKSTAR_LOCK_TIMEOUT")
    if value is None or not value.strip():
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        raise TrackstarError(f"TRACKSTAR_LOCK_TIMEOUT={value!r}: not a number of seconds") from None
    if not seconds >= 0:
        raise TrackstarError(f"TRACKSTAR_LOCK_TIMEOUT={value!r}: must be >= 0 seconds")
    return seconds


def holder(db_path: str | Path) -> dict | None:
    """The {pid, command, since} written by the last holder (it may no longer hold it), or None."""
    try:
        text = (Path(db_path) / FILENAME).read_text(encoding="utf-8")
        info = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


class WriterLock:
    """Context manager: hold DB/.writer.lock for `command` (re-entrant within the process)."""

    def __init__(self, db_path: str | Path, command: str, timeout: float | None = None):
        self.path = Path(db_path) / FILENAME
        self.command = command
        self.timeout = default_timeout() if timeout is None else timeout
        self.first = False  # True when this context took the lock (not a re-entry)

    def __enter__(self) -> "WriterLock":
        key = os.path.realpath(self.path)
        with _guard:
            if key in _held:
                _held[key][1] += 1
                return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise TrackstarError(f"{self.path}: cannot open the writer lock ({exc.strerror})") from None
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise TrackstarError(self._busy_message()) from None
                time.sleep(_POLL)
        info = {"pid": os.getpid(), "command": self.command,
                "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        with _guard:
            _held[key] = [fd, 1]
        self.first = True
        return self

    def __exit__(self, *exc) -> None:
        key = os.path.realpath(self.path)
        with _guard:
            entry = _held[key]
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _held[key]
        fd = entry[0]
        try:
            os.ftruncate(fd, 0)  # an empty file says: nobody holds it
        except OSError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def _busy_message(self) -> str:
        info = holder(self.path.parent) or {}
        who = (f"pid {info.get('pid')} ('{info.get('command')}', since {info.get('since')})"
               if info else "another process")
        return (f"{self.path.parent}: another writer holds the database: {who}; waited {self.timeout:g} s "
                "(set TRACKSTAR_LOCK_TIMEOUT to wait longer)")


def held(db_path: str | Path) -> bool:
    """Does this process hold the writer lock of the database at db_path?"""
    return os.path.realpath(Path(db_path) / FILENAME) in _held
