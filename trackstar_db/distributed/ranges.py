"""A Lance table's fragments cut into contiguous ranges: the unit of work of the Ray scans.

A scan of the fragments of range 0, then range 1, ... visits the rows in the table's own scan
order, so per-range results concatenated (row norms) or merged by stream position (top-k) equal
the one-process scan's. Each range carries its first row's position in that order, which is
where its slice of R's stored row norms starts. Workers open the dataset at the driver's
version, so a concurrent append never shifts a range.
"""

from __future__ import annotations

from dataclasses import dataclass

from trackstar_db import defaults


@dataclass(frozen=True)
class Range:
    uri: str
    version: int
    fragment_ids: tuple[int, ...]
    offset: int  # position of the range's first row in the table's scan order
    rows: int
    storage_options: dict | None = None


def fragment_ranges(dataset, parts: int, storage_options: dict | None = None) -> list[Range]:
    """Up to `parts` ranges of consecutive fragments with about equal row counts (none empty):
    a fragment goes to the part its first row falls in."""
    fragments = [(f.fragment_id, f.count_rows()) for f in dataset.get_fragments()]
    total = sum(rows for _, rows in fragments)
    parts = max(1, parts)
    groups: list[list[int]] = [[] for _ in range(parts)]
    sizes, starts, position = [0] * parts, [0] * parts, 0
    for fragment_id, rows in fragments:
        part = min(parts - 1, position * parts // total) if total else 0
        if not groups[part]:
            starts[part] = position
        groups[part].append(fragment_id)
        sizes[part] += rows
        position += rows
    return [Range(dataset.uri, dataset.version, tuple(g), s, n, storage_options)
            for g, s, n in zip(groups, starts, sizes) if n]


def open_range(r: Range):
    """(dataset at the range's version, its LanceFragments) inside a worker."""
    import lance  # heavy: lance

    dataset = lance.dataset(r.uri, version=r.version, storage_options=r.storage_options)
    return dataset, [dataset.get_fragment(i) for i in r.fragment_ids]


class RangeSource:
    """A range as a source of record batches for store.vectors.vector_batches."""

    def __init__(self, r: Range):
        self.dataset, self.fragments = open_range(r)

    def to_batches(self, columns, batch_size):
        return self.dataset.scanner(columns=columns, batch_size=batch_size, fragments=self.fragments,
                                    scan_in_order=True).to_batches()


def range_batches(r: Range, dtype: str, batch_rows: int = defaults.SCAN_BATCH_ROWS, columns: tuple[str, ...] = ()):
    """(ids, vectors [nb, d] float32) of one range, in scan order (CPU)."""
    from trackstar_db.store.vectors import vector_batches  # heavy: pyarrow

    return vector_batches(RangeSource(r), dtype=dtype, batch_size=batch_rows, extra_columns=columns)
