"""A cost plan before a build (`trackstar-db plan`): bytes on disk, RAM and time of each step.

Sizes are arithmetic on the layout (rows x d x bytes per value; block-diagonal R as float64
eigenvectors per block). RAM is what this package holds at once (batches, buffers, R), not the
model: add the checkpoint and its optimizer state for `ingest gradients`. Times are sizes
divided by the rates below, measured by benchmarks/bench_scale.py on the 2-core development
machine (shared, so treat them as a floor on speed), with the command that produced them:

    BENCH_THREADS=1 python benchmarks/bench_scale.py --n 100000

Featurizing (the model's forward and backward) is timed by benchmarks/bench_featurize.py on the
target model and hardware; with a model (--model DIR --device-gib G) the plan adds the devices
its featurizer needs (gradients/memory.py: unsharded, or sharded with --shard-model).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

BENCH = "BENCH_THREADS=1 python benchmarks/bench_scale.py --n 100000 --skip index,ann"
# Rates measured by BENCH on the shared 2-core development VM at a load average of 0.4-2.8 (docs/scale.md,
# 2026-11-29 23:03; the earlier run at load 12-16 gave 5x lower rates); d = 4,096 float16, R blocks of 256.
READ_GBPS = 0.47  # bare sequential read of the vector column, warm page cache (0.82 GB in 1.75 s)
SCAN_GBPS = {"grad-dot": 0.51, "grad-cos": 0.50, "trak": 0.34, "opt-cos": 0.48, "r-train": 0.45,
             "trackstar": 0.50}  # one exact query per rung, warm
WRITE_GBPS = 0.037  # synthetic rows through GradientTable.create + Database.append (1.64 GB in 44.3 s)
FIT_SECONDS_PER_ROW = 1.09e-3  # the whole fit, 109.4 s for 100K rows (3 Gram + 2 norm passes then; now 2 + 2)
# ANN (the default IVF_RQ: sqrt(rows) / 5 partitions, 4-bit codes, re-ranked on the float16
# vectors), measured by ANN_BENCH at 1M x 4,096 (docs/scale.md, 2026-11-30, load 1-4): built in
# 1,313.6 s (186.2 s materialising, 1,126.0 s LanceDB, 200 partitions); one query with opponents,
# repeated in a warm process, 62 ms at the default search (nprobes 4, 300 candidates; recall@100
# 0.993), 43 ms at nprobes 2.
ANN_BENCH = "BENCH_THREADS=1 python benchmarks/bench_scale.py --n 1000000 --reuse --skip retrieve --rungs ''"
ANN_BUILD_ROWS_PER_S = 760  # at d = 4,096
ANN_QUERY_S = 0.062  # at 1M x 4,096; grows with the rows in the partitions searched

PROCESS_BYTES = 330 << 20  # python + torch + pyarrow + lancedb imported (VmRSS before a scan)
LANCE_READ_BYTES = 450 << 20  # Lance's reader at the bounded read-ahead (peak RSS of a bare read - the above)

ROW_OVERHEAD = 48  # bytes per gradient row besides the vector: id, norm, loss, n_tokens, offsets
SCAN_BATCH_BYTES = 64 << 20  # store/vectors.BATCH_BYTES (copied: the plan must not import torch)
COMMIT_ROWS = 2048  # GradientJob.commit_rows
FIT_BATCH_ROWS = 8192  # gradients/fit._stream, at most SCAN_BATCH_BYTES of float32


@dataclass
class Plan:
    """rows: training examples; dim, dtype: the vectors; queries; blocks of the block-diagonal R
    (default one per 1,024 dimensions); variants: gradient tables per split (2: corrected and
    uncorrected, the whole ladder)."""

    rows: int
    dim: int
    dtype: str = "float16"
    queries: int = 1000
    blocks: int | None = None
    variants: int = 2

    def __post_init__(self):
        from trackstar_db.errors import TrackstarError
        from trackstar_db.store.vectors import DTYPES

        if self.dtype not in DTYPES:
            raise TrackstarError(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        for name in ("rows", "dim", "queries", "variants"):
            if getattr(self, name) < 1:
                raise TrackstarError(f"--{name} must be >= 1, not {getattr(self, name)}")
        self.blocks = self.blocks or max(1, self.dim // 1024)
        if self.blocks < 1 or self.blocks > self.dim:
            raise TrackstarError(f"--blocks must be in [1, {self.dim}], not {self.blocks}")

    @property
    def value_bytes(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @property
    def block(self) -> int:
        return -(-self.dim // self.blocks)


def plan_rows(p: Plan) -> list[dict]:
    """[{item, bytes, ram_bytes, seconds, note}] for plan `p`."""
    vector = p.rows * p.dim * p.value_bytes
    table = p.rows * (p.dim * p.value_bytes + ROW_OVERHEAD)
    r_file = p.blocks * (p.block * p.block + p.block) * 8
    scale = p.dim / 4096 * p.block / 256  # Gram and R work per row grows with d x block
    rows = [
        {"item": "disk: gradient vectors (one table)", "bytes": vector, "note": f"{p.rows:,} x {p.dim:,} {p.dtype}"},
        {"item": "disk: training gradient tables", "bytes": p.variants * table,
         "note": f"{p.variants} variants (corrected, uncorrected) with ids and columns"},
        {"item": "disk: query gradient tables", "bytes": p.variants * p.queries * (p.dim * p.value_bytes + ROW_OVERHEAD)},
        {"item": "disk: R files and row norms", "bytes": 3 * r_file + 2 * 4 * p.rows,
         "note": f"3 R ({p.blocks:,} blocks of {p.block:,}, float64) + whitened norms"},
        {"item": "disk: ANN table (float16) + index", "bytes": p.rows * (p.dim * 2 + p.dim // 2 + ROW_OVERHEAD),
         "note": "float16 vectors + 4-bit RaBitQ codes (d / 2 bytes)"},
        {"item": "ram: ingest gradients", "ram_bytes": PROCESS_BYTES + p.variants * COMMIT_ROWS * p.dim * (4 + p.value_bytes),
         "note": "process + commit buffers; add the model, its optimizer state and activations"},
        {"item": "ram: fit", "ram_bytes": PROCESS_BYTES + LANCE_READ_BYTES + 2 * r_file + 3 * p.block * p.block * 8
         + min(FIT_BATCH_ROWS, SCAN_BATCH_BYTES // (4 * p.dim)) * p.dim * 12, "note": "Gram sums (train + eval) + eigh workspace + one float32/float64 batch"},
        {"item": "ram: scan (exact, any rung)", "ram_bytes": PROCESS_BYTES + LANCE_READ_BYTES
         + int(SCAN_BATCH_BYTES * (1 + p.value_bytes / 4)) + 4 * p.rows + r_file * 2,
         "note": "process + Lance reader + one batch + the float32 buffer + row norms + R^p"},
        {"item": "time: write vectors", "seconds": p.variants * table / (WRITE_GBPS * 1e9),
         "note": "through Database.append; featurizing not included"},
        {"item": "time: fit (3 R + norms)", "seconds": p.rows * FIT_SECONDS_PER_ROW * scale,
         "note": "2 Gram passes + 2 norm passes; work per row grows with d x block"},
    ]
    for rung, rate in SCAN_GBPS.items():
        rows.append({"item": f"scan: one exact query, {rung}", "seconds": vector / (rate * 1e9),
                     "note": f"{rate:g} GB/s"})
    rows += [
        {"item": "time: ANN index build", "seconds": p.rows / ANN_BUILD_ROWS_PER_S * p.dim / 4096},
        # partitions of 5 sqrt(rows) rows each: the codes read grow with sqrt(rows), every byte with d
        {"item": "scan: one ANN query", "seconds": ANN_QUERY_S * p.dim / 4096 * max(1.0, (p.rows / 1e6) ** 0.5),
         "note": "default search, warm process; measured at 1M x 4,096, scaled by d and sqrt(rows)"},
        {"item": "time: bare read of one table", "seconds": vector / (READ_GBPS * 1e9), "note": f"{READ_GBPS:g} GB/s"},
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
    `extra` rows (the devices a model needs, gradients/memory.plan_rows_for_model) appended."""
    rows = plan_rows(p) + list(extra)
    return pa.table({
        "item": [r["item"] for r in rows],
        "size": [_human(r.get("bytes") or r.get("ram_bytes"), "B") if ("bytes" in r or "ram_bytes" in r) else None
                 for r in rows],
        "time": [_human(r.get("seconds"), "s") for r in rows],
        "bytes": pa.array([r.get("bytes") for r in rows], pa.int64()),
        "ram_bytes": pa.array([r.get("ram_bytes") for r in rows], pa.int64()),
        "seconds": pa.array([r.get("seconds") for r in rows], pa.float64()),
        "note": [r.get("note") for r in rows],
    })
