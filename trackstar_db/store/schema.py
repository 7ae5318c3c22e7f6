"""Arrow schemas of the database tables, read from the plain JSON files in schema/.

The JSON files are the truth: outside tools can read them without this package. Types are
written as short strings: string, bool, int32, int64, float32, float64, timestamp[us],
list<T>, and 'vector' (a fixed-size list whose element type and width are chosen when a
gradient table is created: trackstar_db.store.vectors).
"""

from __future__ import annotations

import json
from functools import lru_cache

import pyarrow as pa

from trackstar_db.resources import data_dir

from .vectors import arrow_type

_SCALARS = {
    "string": pa.string(),
    "bool": pa.bool_(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float16": pa.float16(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "timestamp[us]": pa.timestamp("us"),
}



def parse_type(text: str, *, vector: pa.DataType | None = None) -> pa.DataType:
    """Arrow type of a schema-file type string."""
    text = text.strip()
    if text in _SCALARS:
        return _SCALARS[text]
    if text.startswith("list<") and text.endswith(">"):
        return pa.list_(parse_type(text[5:-1], vector=vector))
    if text == "vector":
        if vector is None:
            raise ValueError("a 'vector' field needs its element type and width")
        return vector
    raise ValueError(f"unknown schema type {text!r}")


@lru_cache(maxsize=None)
def _load(name: str) -> dict:
    path = data_dir("schema") / f"{name}.json"
    if not path.is_file():
        raise KeyError(f"no schema file for table {name!r} ({path})")
    return json.loads(path.read_text(encoding="utf-8"))


def table_names() -> list[str]:
    """Names of the fixed tables (gradient tables are created per featurizer configuration)."""
    return sorted(p.stem for p in data_dir("schema").glob("*.json") if p.stem != "gradients")


def arrow_schema(name: str, *, vector: pa.DataType | None = None) -> pa.Schema:
    """Arrow schema of table `name` ('gradients' for a gradient table, with `vector`)."""
    spec = _load(name)
    fields = [
        pa.field(
            f["name"],
            parse_type(f["type"], vector=vector),
            nullable=bool(f.get("nullable", True)),
            metadata={"description": f.get("description", "")},
        )
        for f in spec["fields"]
    ]
    return pa.schema(fields, metadata={"table": spec["table"], "version": str(spec["version"])})


def gradient_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    """Schema of a gradient table holding `dim`-wide vectors stored as `dtype` (see vectors.py)."""
    return arrow_schema("gradients", vector=arrow_type(dim, dtype))


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast `table` to `schema` (column order, types), naming the field that does not fit."""
    columns = []
    for field in schema:
        if field.name not in table.column_names:
            if not field.nullable:
                raise ValueError(f"missing required field {field.name!r}")
            columns.append(pa.nulls(len(table), field.type))
            continue
        column = table.column(field.name)
        try:
            columns.append(column.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ValueError(f"field {field.name!r}: cannot store {column.type} as {field.type}: {exc}") from exc
        if not field.nullable and columns[-1].null_count:
            raise ValueError(f"field {field.name!r} has {columns[-1].null_count} empty values")
    return pa.Table.from_arrays(columns, schema=schema)
