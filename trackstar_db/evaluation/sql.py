"""Read-only SQL over Arrow tables with DuckDB, and the output formats of query results.

`ReadOnlySQL({"retrievals": table, ...})` registers each Arrow table, Arrow dataset or Lance
dataset (a pyarrow Dataset, scanned lazily in record batches) as a DuckDB view, then locks the
connection: external access off (no file, network or extension can be read or written) and the
configuration frozen, so no later statement can switch it back. Only read statements run:
SELECT (with WITH, VALUES, FROM-first, DESCRIBE, SHOW, SUMMARIZE) and EXPLAIN of one of those.

Output formats (`format_table` / `write_table`):
    table    aligned text, numbers as trackstar_db/numbers.py prints them (one number of decimal
             places per column), long cells cut with '…', then '(N rows)'
    csv      RFC 4180 with a header; list and struct cells as JSON
    json     JSON lines: one object per row (the format `jq` and the viewer files use)
    parquet  a file only (write_table)
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Mapping

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from trackstar_db import numbers
from trackstar_db.errors import TrackstarError

FORMATS = ("table", "csv", "json", "parquet")

_READ_TYPES = {duckdb.StatementType.SELECT}
_LOCKDOWN = (
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET allow_community_extensions = false",
    "SET enable_external_access = false",
    "SET enable_progress_bar = false",  # quiet as a library: DuckDB's own bar would print on long queries
    "SET lock_configuration = true",
)
_EXPLAIN = re.compile(r"^\s*EXPLAIN(\s+ANALY[SZ]E)?\s*(\([^)]*\))?", re.IGNORECASE)
_MISSING_TABLE = re.compile(r"Table with name (\S+) does not exist")


class ReadOnlySQL:
    """A locked-down, in-memory DuckDB connection whose tables are views over Arrow data."""

    def __init__(self, tables: Mapping[str, object]):
        self._con = duckdb.connect(":memory:")
        self.table_names = sorted(tables)
        for name, data in tables.items():
            self._con.register(name, data)
        for statement in _LOCKDOWN:
            self._con.execute(statement)

    def run(self, text: str, params: list | dict | None = None) -> pa.Table:
        """Result of one read statement as an Arrow table; TrackstarError (one line) otherwise."""
        self.check(text)
        try:
            return self._con.sql(text, params=params).to_arrow_table()
        except duckdb.Error as exc:
            raise TrackstarError(self._explain_error(exc)) from None

    def check(self, text: str) -> None:
        """Refuse anything but exactly one read statement."""
        statements = self._parse(text)
        if len(statements) != 1:
            raise TrackstarError(f"read-only: give exactly one statement, not {len(statements)}")
        kind = statements[0].type
        if kind == duckdb.StatementType.EXPLAIN:
            inner = self._parse(_EXPLAIN.sub("", statements[0].query, count=1))
            if len(inner) == 1 and inner[0].type in _READ_TYPES:
                return
            kind = inner[0].type if inner else kind
        if kind not in _READ_TYPES:
            raise TrackstarError(f"read-only: {kind.name.replace('_', ' ')} statements are not allowed")

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> "ReadOnlySQL":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _parse(self, text: str) -> list:
        try:
            return self._con.extract_statements(text)
        except duckdb.Error as exc:
            raise TrackstarError(self._explain_error(exc)) from None

    def _explain_error(self, exc: duckdb.Error) -> str:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        missing = _MISSING_TABLE.search(first)
        if missing:
            return f"unknown table {missing.group(1)}; tables: {', '.join(self.table_names) or '(none)'}"
        return first


# -- output formats -------------------------------------------------------------------------

def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _dumps(value) -> str:
    return json.dumps(_jsonable(value), ensure_ascii=False, default=str)


def _cell(value) -> str:
    """Text of one cell as the data holds it (csv): lists and structs as JSON."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, dict)):
        return _dumps(value)
    return str(value)


def _cut(text: str, width: int) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _aligned(table: pa.Table, max_cell: int) -> str:
    names = table.column_names
    numeric = [pa.types.is_integer(t) or pa.types.is_floating(t) for t in table.schema.types]
    columns = [numbers.column(n, table.column(n).to_pylist()) if num else [_cell(v) for v in table.column(n).to_pylist()]
               for n, num in zip(names, numeric)]
    rows = [[_cut(c[i], max_cell) for c in columns] for i in range(table.num_rows)]
    widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]

    def line(cells):
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(cells, widths, numeric)).rstrip()

    out = [line(names), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    out.append(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''})")
    return "\n".join(out) + "\n"


def format_table(table: pa.Table, fmt: str = "table", *, max_cell: int = 40) -> str:
    """`table` as text in `fmt` ('table', 'csv' or 'json'); max_cell cuts cells of 'table'."""
    if fmt == "table":
        return _aligned(table, max_cell)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(table.column_names)
        writer.writerows([_cell(v) for v in row.values()] for row in table.to_pylist())
        return buffer.getvalue()
    if fmt == "json":
        return "".join(_dumps(row) + "\n" for row in table.to_pylist())
    if fmt == "parquet":
        raise TrackstarError("format 'parquet' is binary: give an output file")
    raise TrackstarError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")


def write_table(table: pa.Table, fmt: str, path: str | Path, *, max_cell: int = 40) -> Path:
    """Write `table` to `path` in `fmt` (any of FORMATS); returns the path."""
    path = Path(path)
    if fmt == "parquet":
        pq.write_table(table, path)
    else:
        path.write_text(format_table(table, fmt, max_cell=max_cell), encoding="utf-8")
    return path
