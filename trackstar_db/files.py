"""Files read and written safely, for every layer: JSON with a one-line error naming the file,
a replace that is one step on disk, and a content digest that stays fast on large weights."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from trackstar_db.errors import TrackstarError

_SAMPLE = 16 << 20  # bytes hashed at each end of a large file


def read_json(path: Path, what: str):
    """The JSON value in `path`, or one line naming the file and what is wrong with it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TrackstarError(f"{path}: corrupt {what} ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TrackstarError(f"{path}: unreadable {what} ({exc})") from None

def write_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` as one step: a temp file, complete on disk, renamed over it."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:  # a full disk: no partial temp file is left behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)

def file_digest(path: Path) -> str:
    """sha256 of a file; for files over 32 MiB, of its size and its first and last 16 MiB."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as handle:
        if size <= 2 * _SAMPLE:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        else:
            digest.update(str(size).encode())
            digest.update(handle.read(_SAMPLE))
            handle.seek(size - _SAMPLE)
            digest.update(handle.read(_SAMPLE))
    return digest.hexdigest()
