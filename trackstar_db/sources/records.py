"""Read input records from JSON lines, Parquet or Arrow files and from dataset directories,
naming file and line on bad input.

JSON lines: any file whose name contains '.jsonl' or ends in '.json' (the authors' shards are
named trex_sentences.jsonl-00000-of-00020). Each line must be valid UTF-8 holding one JSON
object; blank lines are skipped. Parquet: '.parquet'; Arrow: '.arrow' (IPC file or stream, as
`datasets` writes its shards); 'line' is then the 1-based row number in that file.

A directory is expanded into its files (`expand`): one written by `datasets.save_to_disk`
(state.json lists its Arrow shards) or a folder of .parquet / .arrow / .jsonl shards, in name
order. Parquet and Arrow are read in record batches of READ_ROWS rows (Arrow memory-mapped),
so a dataset larger than memory streams through.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from trackstar_db.errors import RecordError, TrackstarError, first_line
from trackstar_db.progress import bar as progress_bar


READ_ROWS = 8192  # rows per record batch read from Parquet and Arrow


def file_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    if ".jsonl" in name or name.endswith(".json"):
        return "jsonl"
    raise TrackstarError(f"{path}: unknown file type (expected JSON lines '.jsonl', '.parquet' or '.arrow')")


def expand(paths) -> list[Path]:
    """Input paths with every directory replaced by its record files (see the module doc)."""
    out: list[Path] = []
    for path in map(Path, paths):
        out += _directory_files(path) if path.is_dir() else [path]
    return out


def _directory_files(path: Path) -> list[Path]:
    if (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        except (OSError, ValueError, KeyError, TypeError):
            splits = ["SPLIT"]
        raise TrackstarError(f"{path}: a DatasetDict (splits {', '.join(map(str, splits))}); give one split's "
                             f"directory, e.g. {path / str(splits[0])}")
    state = path / "state.json"
    if state.is_file():  # datasets.save_to_disk
        try:
            names = [entry["filename"] for entry in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TrackstarError(f"{state}: not a datasets.save_to_disk state file ({exc})") from None
        files = [path / name for name in names]
        for file in files:
            if not file.is_file():
                raise TrackstarError(f"{file}: listed in {state} but missing")
        return files
    files = []
    for file in sorted(path.iterdir()):
        try:
            if file.is_file() and not file.name.startswith("."):
                file_kind(file)
                files.append(file)
        except TrackstarError:
            continue
    if not files:
        raise TrackstarError(f"{path}: no .parquet, .arrow or .jsonl files, and not a datasets.save_to_disk directory")
    return files


def iter_records(path: str | Path, rejected: list[RecordError] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) pairs. A line that is not a JSON object raises RecordError,
    or, when a `rejected` list is given, is appended to it and skipped. A file without a single
    record (empty, or blank lines only) is refused: it is never what was meant."""
    seen = 0
    for number, record in _parse(Path(path)):
        seen += 1
        if isinstance(record, RecordError):
            if rejected is None:
                raise record
            rejected.append(record)
            continue
        yield number, record
    if not seen:
        raise TrackstarError(f"{path}: no records (the file is empty); nothing was stored")


def _parse(path: Path) -> Iterator[tuple[int, dict | RecordError]]:
    if not path.is_file():
        raise TrackstarError(f"{path}: no such file")
    kind = file_kind(path)
    if kind in ("parquet", "arrow"):
        row = 0
        for batch in _record_batches(path, kind):
            for start in range(0, batch.num_rows, READ_ROWS):
                for record in batch.slice(start, READ_ROWS).to_pylist():
                    row += 1
                    yield row, record
        return
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, RecordError(path, number, f"invalid UTF-8 at byte {exc.start}")
                continue
            if not line.strip():
                continue
            yield number, _json_record(line, path, number)


class _HugeInt(int):
    """An integer literal too long for Python to convert to int (over sys.get_int_max_str_digits())."""

    digits = 0


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # over the digit limit: kept as a marker so the error can name its field
        marker = _HugeInt(0)
        marker.digits = len(text.lstrip("-"))
        return marker


def _json_record(line: str, path: Path, number: int) -> dict | RecordError:
    """One JSON-lines record, or the RecordError naming its line (and field, where one is to blame)."""
    try:
        record = json.loads(line, parse_int=_parse_int)
    except json.JSONDecodeError as exc:
        return RecordError(path, number, f"malformed JSON ({exc.msg}, column {exc.colno})")
    except RecursionError:
        field = _deep_field(line)
        return RecordError(path, number, (f"field {field!r}: " if field else "") + "JSON nested too deeply to read")
    if not isinstance(record, dict):
        return RecordError(path, number, f"expected a JSON object, got {type(record).__name__}")
    for key, value in record.items():
        huge = _find_huge(value)
        if huge is not None:
            return RecordError(path, number, f"field {key!r}: an integer of {huge.digits:,} digits is too long to read "
                                             "(give long ids as strings)")
    return record


def _find_huge(value, depth: int = 0):
    if isinstance(value, _HugeInt):
        return value
    if depth < 64 and isinstance(value, (list, dict)):
        for item in value.values() if isinstance(value, dict) else value:
            found = _find_huge(item, depth + 1)
            if found is not None:
                return found
    return None


def _deep_field(line: str, limit: int = 200) -> str | None:
    """The top-level key whose value nests deeper than `limit` (a scan outside string literals)."""
    depth, last, start, in_string, escape = 0, None, 0, False, False
    for i, char in enumerate(line):
        if in_string:
            if escape:
                escape = False
            elif char == "\\":
                escape = True
            elif char == '"':
                in_string = False
                if depth == 1:
                    last = line[start:i]
        elif char == '"':
            in_string, start = True, i + 1
        elif char in "[{":
            depth += 1
            if depth > limit:
                return last
        elif char in "]}":
            depth -= 1
    return None


def _record_batches(path: Path, kind: str) -> Iterator[pa.RecordBatch]:
    """The file's record batches, one at a time; an unreadable file is a TrackstarError."""
    try:
        if kind == "parquet":
            yield from pq.ParquetFile(path).iter_batches(batch_size=READ_ROWS)
            return
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:  # not the IPC file format: the stream format datasets writes
            source.seek(0)
            batches = pa.ipc.open_stream(source)
        yield from batches
    except (pa.ArrowInvalid, OSError) as exc:
        raise TrackstarError(f"{path}: not a readable {kind} file ({first_line(exc)})") from None


def require_text(record: dict, field: str, path, line: int, allow_empty: bool = False) -> str:
    """A record's string field, or RecordError naming the field."""
    if field not in record or record[field] is None:
        raise RecordError(path, line, f"missing field {field!r}")
    value = record[field]
    if not isinstance(value, str):
        raise RecordError(path, line, f"field {field!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(path, line, f"field {field!r} is empty")
    return value


INT32_MAX = 2**31 - 1


def optional_text(record: dict, field: str, path, line: int) -> str | None:
    """A free-text field that may be absent (abstract_uri, kilt_id). The one rule for its type, on
    every line alike: a string is kept, an integer is read as its decimal text (as ids are), so
    a file mixing 17 and "a" across lines stores "17" and "a"; any other type is refused."""
    value = record.get(field)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise RecordError(path, line, f"field {field!r} must be a string, got {type(value).__name__}")


def optional_index(record: dict, field: str, path, line: int, maximum: int = INT32_MAX) -> int | None:
    """A count or position that may be absent (sent_idx_in_abst): an integer in [0, maximum]."""
    value = record.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecordError(path, line, f"field {field!r} must be an integer, got {type(value).__name__}")
    if not 0 <= value <= maximum:
        raise RecordError(path, line, f"field {field!r} must be an integer in [0, {maximum:,}], got {value}")
    return value


def string_list(value, field: str, path, line: int) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int)) for v in value):
        return [str(v) for v in value]
    raise RecordError(path, line, f"field {field!r} must be a list of strings")


def record_id(record: dict, field: str, path, line: int) -> tuple[str, str]:
    """(id, kind) of a record's id field. Ids are strings; an integer id is stored as its decimal
    string (the one canonical conversion), and kind ('string' | 'integer') lets IdRegistry refuse
    an input where 17 and "17" both occur. Other types (floats, booleans, lists) are refused."""
    value = record.get(field)
    if value is None or value == "":
        raise RecordError(path, line, f"missing field {field!r}")
    if isinstance(value, str):
        return value, "string"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value), "integer"
    raise RecordError(path, line, f"field {field!r} must be a string (or an integer) id, got {type(value).__name__}")


class IdRegistry:
    """The ids of one input set, each with the digest of its content and where it first appeared.

    add() returns False for an exact repeat (same id, same content: skipped), and raises a
    RecordError naming both file:line for a conflicting duplicate (same id, other content) or
    for an integer and a string id that are the same id once converted (17 and "17")."""

    def __init__(self, what: str):
        self.what = what
        self.first: dict[str, tuple[str, str, str]] = {}  # id -> (digest, kind, "file:line")

    def add(self, key: str, kind: str, digest: str, path, line: int) -> bool:
        here = f"{path}:{line}"
        if key not in self.first:
            self.first[key] = (digest, kind, here)
            return True
        first_digest, first_kind, where = self.first[key]
        if first_kind != kind:
            raise RecordError(path, line, f"{self.what} id {key!r} ({kind}) is the same id as the {first_kind} id at "
                                          f"{where} once converted to text; give every id one type")
        if first_digest != digest:
            raise RecordError(path, line, f"{self.what} id {key!r} conflicts with {where}: same id, different content")
        return False


def checked_records(files, check: Callable[[dict, Path, int], tuple[object, bool]], report, skip_bad: bool,
                    progress: bool | None, desc: str) -> Iterator[tuple[Path, int, object]]:
    """(path, line, value) for every record of `files` (directories expanded) that
    `check(record, path, line) -> (value, is_new)` accepts as new. A RecordError is raised, or
    with skip_bad kept in report.rejected; a repeat counts in report.already_present. One
    progress bar per file."""
    for path in expand(files):
        records = iter_records(path, report.rejected if skip_bad else None)
        with progress_bar(records, desc=f"{desc} {path.name}", unit=" rec", progress=progress) as bar:
            for line, record in bar:
                try:
                    value, new = check(record, path, line)
                except RecordError as error:
                    if not skip_bad:
                        raise
                    report.rejected.append(error)
                    continue
                if new:
                    yield path, line, value
                else:
                    report.already_present += 1
