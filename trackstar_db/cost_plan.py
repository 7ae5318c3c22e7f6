"""A cost plan before a build (`trackstar-db plan`): bytes on disk, RAM and time of each step.

Sizes are arithmetic on the layout (rows x d x bytes per value; block-diagonal R as float64
eigenvectors per block). RAM is what this package holds at once (batches, buffers, R), not the
model: add the checkpoint and its optimizer state for `ingest gradients`. Times are sizes
divided by measured rates, read from a rates file that benchmarks/bench_scale.py writes
(`--rates FILE`): benchmarks/rates.json by default (shipped in the wheel), another with
`Plan(rates=PATH)` or TRACKSTAR_RATES=PATH. Each entry of the file names the command, machine,
date and load that measured it; `plan_table` carries them in its metadata ("rates").

Featurizing (the model's forward and backward) is timed by benchmarks/bench_featurize.py on the
target model and hardware; with a model (--model DIR --device-gib G) the plan adds the devices
its featurizer needs (gradients/memory.py: unsharded, or sharded with --shard-model).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pyarrow as pa

from trackstar_db import defaults
from trackstar_db.errors import ParameterError, TrackstarError
from trackstar_db.option_checks import COUNT, check_fields, ruled
from trackstar_db.resources import data_dir
from trackstar_db.store.vectors import DTYPES

RATES_FILE = "rates.json"
ROW_OVERHEAD = 48  # bytes per gradient row besides the vector: id, norm, loss, n_tokens, offsets
BLOCK_DIMS = 1024  # the plan's default R block: one block per this many dimensions
INT64_MAX = 2**63 - 1  # the plan's byte columns are int64


def rates_path(path: str | Path | None = None) -> Path:
    """The rates file: `path`, else TRACKSTAR_RATES, else benchmarks/rates.json of this install."""
    if path is None and os.environ.get("TRACKSTAR_RATES"):
        path = os.environ["TRACKSTAR_RATES"]
    if path is not None:
        return Path(path)

    return data_dir("benchmarks") / RATES_FILE


@lru_cache(maxsize=8)
def _read_rates(path: Path) -> dict:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrackstarError(f"{path}: no rates file; run 'python benchmarks/bench_scale.py --rates {path}'") from None
    except json.JSONDecodeError as exc:
        raise TrackstarError(f"{path}: invalid JSON in the rates file (line {exc.lineno})") from None
    rates, sources = {}, {}
    for name, entry in entries.items():
        if isinstance(entry, dict):
            sources[name] = {k: entry[k] for k in ("command", "machine", "date", "load") if k in entry}
            rates.update({k: v for k, v in entry.items() if k not in sources[name] and k != "note"})
    needed = ("read_gbps", "scan_gbps", "write_gbps", "fit_seconds_per_row", "process_bytes", "lance_read_bytes",
              "ann_build_rows_per_s", "ann_query_s", "dim", "block")
    missing = [k for k in needed if k not in rates]
    if missing:
        raise TrackstarError(f"{path}: the rates file lacks {', '.join(missing)}")
    return {"rates": rates, "sources": sources}


def load_rates(path: str | Path | None = None) -> dict:
    """{'rates': {name: value}, 'sources': {entry: {command, machine, date, load}}} of a rates file."""
    return _read_rates(rates_path(path).resolve())


@dataclass
class Plan:
    """rows: training examples; dim, dtype: the vectors; queries; blocks of the block-diagonal R
    (default one per 1,024 dimensions); variants: gradient tables per split (2: corrected and
    uncorrected, the whole ladder)."""

    rows: int = ruled(COUNT)
    dim: int = ruled(COUNT)
    dtype: str = "float16"
    queries: int = ruled(COUNT, 1000)
    blocks: int | None = None
    variants: int = ruled(COUNT, 2)
    rates: str | Path | None = None  # the rates file (default: rates_path())

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ParameterError("dtype", f"must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        check_fields(self)
        self.blocks = self.blocks or max(1, self.dim // BLOCK_DIMS)
        if self.blocks < 1 or self.blocks > self.dim:
            raise ParameterError("blocks", f"must be in [1, {self.dim}], not {self.blocks}")
        # every figure is an int64 count of bytes: the largest of the training tables (all
        # variants) or ANN table, the query tables and the R files must fit, or the plan names
        # the parameter that carries it past
        per_row = max(self.variants * (self.dim * self.value_bytes + ROW_OVERHEAD),
                      self.dim * 2 + self.dim // 2 + ROW_OVERHEAD)
        figures = (("dim", 3 * self.blocks * (self.block * self.block + self.block) * 8, None),
                   ("rows", self.rows * per_row, INT64_MAX // per_row),
                   ("queries", self.variants * self.queries * (self.dim * self.value_bytes + ROW_OVERHEAD),
                    INT64_MAX // (self.variants * (self.dim * self.value_bytes + ROW_OVERHEAD))))
        for name, size, most in figures:
            if size > INT64_MAX:
                bound = f"; at most {most:,} at dim {self.dim:,}" if most else ""
                raise ParameterError(name, f"{getattr(self, name):,} comes to {size:.3g} bytes, beyond what a plan "
                                           f"counts (2^63 bytes){bound}")

    @classmethod
    def for_database(cls, db, dim: int, rows: int | None = None, queries: int | None = None, **kwargs) -> "Plan":
        """A plan for `db`: rows default to the most examples or training gradients it holds, queries
        to its queries (else the plan's default)."""
        if rows is None:
            rows = max(db.count("examples"), db.count("grads_train_corrected"), db.count("grads_train_uncorrected"))
        if queries is None:
            queries = db.count("queries") or None
        if not rows:
            raise ParameterError("rows", f"not given, and {db.path} holds no examples")
        return cls(rows=rows, dim=dim, **({"queries": queries} if queries else {}), **kwargs)

    @property
    def value_bytes(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @property
    def block(self) -> int:
        return -(-self.dim // self.blocks)


def plan_rows(p: Plan) -> list[dict]:
    """[{item, bytes, ram_bytes, seconds, note}] for plan `p`."""
    rates = load_rates(p.rates)["rates"]
    process, lance_read = rates["process_bytes"], rates["lance_read_bytes"]
    fit_batch_rows = min(defaults.STREAM_BATCH_ROWS, defaults.SCAN_BATCH_BYTES // (4 * p.dim))
    vector = p.rows * p.dim * p.value_bytes
    table = p.rows * (p.dim * p.value_bytes + ROW_OVERHEAD)
    r_file = p.blocks * (p.block * p.block + p.block) * 8
    scale = p.dim / rates["dim"] * p.block / rates["block"]  # Gram and R work per row grows with d x block
    rows = [
        {"item": "disk: gradient vectors (one table)", "bytes": vector, "note": f"{p.rows:,} x {p.dim:,} {p.dtype}"},
        {"item": "disk: training gradient tables", "bytes": p.variants * table,
         "note": f"{p.variants} variants (corrected, uncorrected) with ids and columns"},
        {"item": "disk: query gradient tables", "bytes": p.variants * p.queries * (p.dim * p.value_bytes + ROW_OVERHEAD)},
        {"item": "disk: R files and row norms", "bytes": 3 * r_file + 2 * 4 * p.rows,
         "note": f"3 R ({p.blocks:,} blocks of {p.block:,}, float64) + whitened norms"},
        {"item": "disk: ANN table (float16) + index", "bytes": p.rows * (p.dim * 2 + p.dim // 2 + ROW_OVERHEAD),
         "note": "float16 vectors + 4-bit RaBitQ codes (d / 2 bytes)"},
        {"item": "ram: ingest gradients", "ram_bytes": process + p.variants * defaults.COMMIT_ROWS * p.dim * (4 + p.value_bytes),
         "note": "process + commit buffers; add the model, its optimizer state and activations"},
        {"item": "ram: fit", "ram_bytes": process + lance_read + 2 * r_file + 3 * p.block * p.block * 8
         + fit_batch_rows * p.dim * 12, "note": "Gram sums (train + eval) + eigh workspace + one float32/float64 batch"},
        {"item": "ram: scan (exact, any rung)", "ram_bytes": process + lance_read
         + int(defaults.SCAN_BATCH_BYTES * (1 + p.value_bytes / 4)) + 4 * p.rows + r_file * 2,
         "note": "process + Lance reader + one batch + the float32 buffer + row norms + R^p"},
        {"item": "time: write vectors", "seconds": p.variants * table / (rates["write_gbps"] * 1e9),
         "note": "through Database.append; featurizing not included"},
        {"item": "time: fit (3 R + norms)", "seconds": p.rows * rates["fit_seconds_per_row"] * scale,
         "note": "2 Gram passes + 2 norm passes; work per row grows with d x block"},
    ]
    for rung, rate in rates["scan_gbps"].items():
        rows.append({"item": f"scan: one exact query, {rung}", "seconds": vector / (rate * 1e9),
                     "note": f"{rate:g} GB/s"})
    rows += [
        {"item": "time: ANN index build", "seconds": p.rows / rates["ann_build_rows_per_s"] * p.dim / rates["dim"]},
        # partitions of 5 sqrt(rows) rows each: the codes read grow with sqrt(rows), every byte with d
        {"item": "scan: one ANN query", "seconds": rates["ann_query_s"] * p.dim / rates["dim"] * max(1.0, (p.rows / 1e6) ** 0.5),
         "note": "default search, warm process; the rates file's figure scaled by d and sqrt(rows)"},
        {"item": "time: bare read of one table", "seconds": vector / (rates["read_gbps"] * 1e9), "note": f"{rates['read_gbps']:g} GB/s"},
    ]
    return rows


def _human(n: float | None, unit: str) -> str | None:
    if n is None:
        return None
    if unit == "s":
        for size, name in ((86400, "d"), (3600, "h"), (60, "min")):
            if n >= size:
                return f"{n / size:.1f} {name}"
        return f"{n:.2f} s"
    for size, name in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= size:
            return f"{n / size:.1f} {name}"
    return f"{n:.0f} B"


def plan_table(p: Plan, extra: list[dict] = ()) -> pa.Table:
    """The plan as Arrow: item, bytes, ram_bytes, seconds (numbers) and human-readable columns;
    `extra` rows (the devices a model needs, gradients/memory.plan_rows_for_model) appended; the
    schema metadata 'rates' holds the rates file's sources (command, machine, date, load)."""
    rows = plan_rows(p) + list(extra)
    sources = json.dumps(load_rates(p.rates)["sources"])
    return pa.table({
        "item": [r["item"] for r in rows],
        "size": [_human(r.get("bytes") or r.get("ram_bytes"), "B") if ("bytes" in r or "ram_bytes" in r) else None
                 for r in rows],
        "time": [_human(r.get("seconds"), "s") for r in rows],
        "bytes": pa.array([r.get("bytes") for r in rows], pa.int64()),
        "ram_bytes": pa.array([r.get("ram_bytes") for r in rows], pa.int64()),
        "seconds": pa.array([r.get("seconds") for r in rows], pa.float64()),
        "note": [r.get("note") for r in rows],
    }).replace_schema_metadata({"rates": sources})
