"""Vector column codec: torch [n, d] tensors <-> Arrow fixed_size_list columns.

Storage dtypes: float32, float16 (native Arrow types, searchable by LanceDB) and bfloat16,
which Arrow lacks: its 16-bit patterns are stored as fixed_size_list<uint16> and the manifest
records the dtype. Reading is zero-copy: the Arrow value buffer becomes a torch tensor of the
stored dtype (`native=True`), and half precision is widened by torch's vectorised copy, never
by numpy's float16 -> float32 cast (far slower: the cause of slow half-precision scans). Scans
widen tile by tile into a reused buffer (retrieval/scoring.py), so fresh float32 batches are
never allocated per batch.
"""

from __future__ import annotations

import warnings
from typing import Iterator

import numpy as np
import pyarrow as pa

from trackstar_db import defaults
from trackstar_db.errors import TrackstarError
from trackstar_db.progress import bar

DTYPES = ("float32", "float16", "bfloat16")
BATCH_BYTES = defaults.SCAN_BATCH_BYTES
_ARROW = {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16()}


def arrow_type(dim: int, dtype: str) -> pa.DataType:
    if dtype not in DTYPES:
        raise ValueError(f"vector dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    return pa.list_(_ARROW[dtype], dim)


def bytes_per_vector(dim: int, dtype: str) -> int:
    return dim * (4 if dtype == "float32" else 2)


def to_arrow(vectors: torch.Tensor, dtype: str) -> pa.FixedSizeListArray:
    """[n, d] float tensor -> fixed_size_list array in the storage dtype."""
    import torch  # heavy: torch

    n, dim = vectors.shape
    vectors = vectors.detach().to("cpu")
    if dtype == "bfloat16":
        flat = vectors.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16).reshape(-1)
    elif dtype == "float16":
        flat = vectors.to(torch.float16).contiguous().numpy().reshape(-1)
    elif dtype == "float32":
        flat = vectors.to(torch.float32).contiguous().numpy().reshape(-1)
    else:
        raise ValueError(f"vector dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=_ARROW[dtype]), dim)


def to_torch(column: pa.Array | pa.ChunkedArray, dtype: str, device: str | torch.device = "cpu", *,
             native: bool = False) -> torch.Tensor:
    """fixed_size_list column -> [n, d] tensor on `device`: float32, or with `native` the stored
    dtype (float32, float16 or bfloat16) as a zero-copy view of the Arrow buffer on the CPU."""
    import torch  # heavy: torch (the store imports without it)

    if dtype not in DTYPES:
        raise ValueError(f"vector dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim, n = column.type.list_size, len(column)
    # .values ignores a slice's offset; flatten() would copy
    values = column.values.slice(column.offset * dim, n * dim)
    flat = values.to_numpy(zero_copy_only=False)
    with warnings.catch_warnings():  # read-only Arrow buffer; the tensor is never written
        warnings.simplefilter("ignore", UserWarning)
        if dtype == "bfloat16":
            tensor = torch.from_numpy(flat.view(np.int16)).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(flat)
    tensor = tensor.reshape(n, dim)
    if tensor.dtype != getattr(torch, dtype):
        raise TrackstarError(f"vector column holds {column.type.value_type}, the table's dtype is {dtype}")
    if native:
        return tensor.to(device)
    return tensor.to(device=device, dtype=torch.float32)


# Lance read-ahead: batches, fragments and bytes of I/O in flight (Lance's defaults are 16, 4 and 2 GiB);
# bounded, a scan's peak RSS is lower (docs/scale.md).
READAHEAD, FRAGMENT_READAHEAD, IO_BUFFER_BYTES = 4, 1, 256 << 20


def record_batches(source, columns: list[str], batch_size: int):
    """Record batches of `columns` from a Lance dataset (read-ahead bounded as above), an Arrow
    dataset or a Table: every scan of stored vectors (retrieve, fit, index) reads through here."""
    if isinstance(source, pa.Table):
        return source.select(columns).to_batches(max_chunksize=batch_size)
    try:
        return source.to_batches(columns=columns, batch_size=batch_size, batch_readahead=READAHEAD,
                                 fragment_readahead=FRAGMENT_READAHEAD, io_buffer_size=IO_BUFFER_BYTES)
    except TypeError:  # an Arrow dataset: no io_buffer_size
        return source.to_batches(columns=columns, batch_size=batch_size)


def vector_batches(source, *, dtype: str = "float32", id_column: str = "id", vector_column: str = "vector",
                   batch_size: int = defaults.SCAN_BATCH_ROWS, device: str | torch.device = "cpu", extra_columns: tuple[str, ...] = (),
                   native: bool = False) -> Iterator[tuple]:
    """(ids, vectors [nb, d] float32) batches from a Lance or Arrow dataset, a Table or RecordBatches;
    with `extra_columns`, (ids, vectors, {column: numpy array}); with `native`, vectors in the
    stored dtype (zero-copy, see to_torch).

    `dtype` is the stored vector dtype (the manifest's; 'bfloat16' is stored as uint16 bits).
    """
    columns = [id_column, vector_column, *extra_columns]
    stream = record_batches(source, columns, batch_size) if hasattr(source, "to_batches") else source
    for batch in stream:
        names = batch.schema.names
        for column in (id_column, vector_column, *extra_columns):
            if column not in names:
                raise TrackstarError(f"vector batches: no column {column!r} (columns: {', '.join(names)})")
        vectors = batch.column(vector_column)
        if vectors.null_count:
            raise TrackstarError(f"vector batches: {vectors.null_count} null vectors in column {vector_column!r}")
        ids, x = batch.column(id_column).to_pylist(), to_torch(vectors, dtype, device, native=native)
        if extra_columns:
            yield ids, x, {c: batch.column(c).to_numpy(zero_copy_only=False) for c in extra_columns}
        else:
            yield ids, x


def scan_progress(batches, total: int, label: str, progress: bool | None = None):
    """Pass (ids, vectors) batches through, advancing a progress bar by the rows scanned
    (trackstar_db/progress.py: by default only in a terminal, and only for a long scan)."""
    with bar(total=total, desc=f"scan {label}", unit=" ex", leave=False, progress=progress) as shown:
        for item in batches:
            yield item
            shown.update(len(item[0]))
