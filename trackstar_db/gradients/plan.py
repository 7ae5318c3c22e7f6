"""Plan a gradient run: which ids of a split still lack a row, in this shard, in bounded memory.

The set of missing ids comes from an anti-join in DuckDB between the source table (examples or
queries) and the gradient tables being written, streamed in record batches, so no Python set of
every id is ever built. Each chunk is ordered long-first (less padding per batch).
Shards (--shard I/N) split ids by crc32(id) % N, so separate processes never overlap.
"""

from __future__ import annotations

import os
import zlib
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from trackstar_db.errors import ParameterError

SOURCES = {"train": ("examples", "example_id", ("text",)),
           "queries": ("queries", "query_id", ("prompt", "target"))}
# carried with the payload when the table has them (a loss-masked task's spans, featurizer/task.py)
CARRIED = {"train": ("loss_spans",), "queries": ()}


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N', or 'auto': from torchrun (RANK, WORLD_SIZE) or Slurm (SLURM_PROCID, SLURM_NTASKS)."""
    if text == "auto":
        for rank, size in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
            if rank in os.environ and size in os.environ:
                return int(os.environ[rank]), int(os.environ[size])
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ParameterError("shard", f"{text!r}: expected I/N, e.g. 0/4") from None
    check_shard((index, count))
    return index, count


def check_shard(shard: tuple[int, int]) -> None:
    """Shard I of N: 0 <= I < N, else ParameterError naming shard."""
    index, count = shard
    if not (count >= 1 and 0 <= index < count):
        raise ParameterError("shard", f"must be I/N (shard I of N) with 0 <= I < N, not {index}/{count}")


def in_shard(item_id: str, shard: tuple[int, int]) -> bool:
    return zlib.crc32(item_id.encode("utf-8")) % shard[1] == shard[0]


def count_missing(db, split: str, tables: list) -> int:
    return sum(chunk.num_rows for chunk in missing(db, split, tables, (0, 1), chunk_rows=1 << 20, payload=False))


def missing(db, split: str, tables: list, shard: tuple[int, int], chunk_rows: int = 8192,
            payload: bool = True) -> Iterator[pa.Table]:
    """Chunks (id, payload columns) of `split` whose id lacks a row in any of `tables`
    (GradientTables), in this shard, each chunk sorted long-first then by id."""
    import duckdb  # heavy: duckdb

    source, key, columns = SOURCES[split]
    dataset = db.dataset(source)
    carried = [c for c in CARRIED[split] if c in dataset.schema.names] if payload else []
    select = ", ".join([f"s.{key} AS id"] + ([f"s.{c}" for c in columns] if payload else []) + [f"s.{c}" for c in carried])
    con = duckdb.connect()
    con.register("source", dataset)
    lacks = []
    for i, table in enumerate(tables):
        if table.exists() and table.count():
            con.register(f"done{i}", table.dataset())
            lacks.append(f"NOT EXISTS (SELECT 1 FROM done{i} d WHERE d.id = s.{key})")
    where = f"WHERE {' OR '.join(lacks)}" if lacks else ""
    reader = con.sql(f"SELECT {select} FROM source s {where} ORDER BY s.{key}").to_arrow_reader(batch_size=chunk_rows)
    try:
        for batch in reader:
            chunk = pa.Table.from_batches([batch])
            if shard != (0, 1):
                keep = [in_shard(i, shard) for i in chunk.column("id").to_pylist()]
                chunk = chunk.filter(pa.array(keep, pa.bool_()))
            if chunk.num_rows and payload:
                lengths = pc.utf8_length(chunk.column(columns[0]))
                for column in columns[1:]:
                    lengths = pc.add(lengths, pc.utf8_length(chunk.column(column)))
                chunk = chunk.append_column("_length", lengths)
                chunk = chunk.sort_by([("_length", "descending"), ("id", "ascending")]).drop(["_length"])
            if chunk.num_rows:
                yield chunk
    finally:
        con.close()
