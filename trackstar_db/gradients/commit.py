"""Buffer featurized rows and append them to their gradient tables, one Lance commit per
`commit_rows` rows per table. Each append is atomic; rows a table already holds (a run killed
between the appends of two tables) are dropped before the append, so a rerun never duplicates;
each flush holds the database's writer lock, so concurrent ingests of one split never do either."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import torch

from trackstar_db import faults
from trackstar_db.errors import TrackstarError
from trackstar_db.store import journal, vectors as _vectors
from trackstar_db.store.lock import default_timeout

FLUSH_LOCK_TIMEOUT = 600.0  # a flush waits this long for the lock: featurized rows cost hours, not seconds


def check_vectors(ids: list[str], vectors: torch.Tensor) -> torch.Tensor:
    """Row norms [n] of vectors [n, d]; a zero or non-finite row is an error naming its id."""
    norms = vectors.norm(dim=1)
    bad = (~torch.isfinite(norms)) | (norms == 0)
    if bad.any():
        row = int(bad.nonzero()[0])
        raise TrackstarError(f"gradient of {ids[row]!r} has norm {norms[row].item()}; "
                             "it would be a NaN row in the index (empty text or overflow?)")
    return norms


def absent(table, rows: pa.Table) -> pa.Table:
    """The rows whose id `table` does not hold yet (a rerun after a kill never duplicates one)."""
    present = table.dataset().to_table(columns=["id"], filter=pc.field("id").isin(rows.column("id")))
    if not present.num_rows:
        return rows
    return rows.filter(pc.invert(pc.is_in(rows.column("id"), present.column("id"))))


class Committer:
    """add(ids, FeaturizeOutput) buffers rows per table; flush() appends them."""

    def __init__(self, db, tables: dict, dtype: str, commit_rows: int):
        self.db, self.tables, self.dtype, self.commit_rows = db, tables, dtype, commit_rows
        self.pending: dict[str, list[pa.Table]] = {variant: [] for variant in tables}
        self.rows = 0

    def add(self, ids: list[str], out) -> None:
        for variant in self.tables:
            vectors = out.vectors[variant]
            norms = check_vectors(ids, vectors)
            self.pending[variant].append(pa.table({
                "id": ids,
                "vector": _vectors.to_arrow(vectors, self.dtype),
                "norm": pa.array(norms.numpy(), pa.float32()),
                "loss": pa.array(out.loss.numpy(), pa.float32()),
                "n_tokens": pa.array(out.n_tokens.numpy().astype("int32")),
            }))
        self.rows += len(ids)
        if self.rows >= self.commit_rows:
            self.flush()

    def flush(self) -> None:
        if not any(self.pending.values()):
            self.rows = 0
            return
        # Under the writer lock (only here: featurizing stays concurrent across shards and runs),
        # dropping the ids a table holds before appending makes concurrent ingests duplicate-free.
        # The appends of one flush are journaled: a failure (a full disk) or a kill between the
        # tables' appends rolls both back, so no table holds rows the other lacks.
        names = [table.name for variant, table in self.tables.items() if self.pending[variant]]
        with self.db.writer("ingest gradients", timeout=max(default_timeout(), FLUSH_LOCK_TIMEOUT)), \
                journal.transaction(self.db, "ingest gradients", names):
            for variant, parts in self.pending.items():
                if not parts:
                    continue
                table = self.tables[variant]
                rows = absent(table, pa.concat_tables(parts))
                faults.point("gradients.before_append")
                self.db.append(table.name, rows)
                faults.point("gradients.commit")
        for parts in self.pending.values():
            parts.clear()
        self.rows = 0
