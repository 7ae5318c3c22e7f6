"""Vector column codec: torch [n, d] tensors <-> Arrow fixed_size_list columns.

Storage dtypes: float32, float16 (native Arrow types, searchable by LanceDB) and bfloat16,
which Arrow lacks: its 16-bit patterns are stored as fixed_size_list<uint16> and the manifest
records the dtype. Conversions go through numpy without Python loops.
"""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import torch

DTYPES = ("float32", "float16", "bfloat16")
_ARROW = {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16()}


def arrow_type(dim: int, dtype: str) -> pa.DataType:
    if dtype not in DTYPES:
        raise ValueError(f"vector dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    return pa.list_(_ARROW[dtype], dim)


def bytes_per_vector(dim: int, dtype: str) -> int:
    return dim * (4 if dtype == "float32" else 2)


def to_arrow(vectors: torch.Tensor, dtype: str) -> pa.FixedSizeListArray:
    """[n, d] float tensor -> fixed_size_list array in the storage dtype."""
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


def to_torch(column: pa.Array | pa.ChunkedArray, dtype: str, device: str | torch.device = "cpu") -> torch.Tensor:
    """fixed_size_list column -> [n, d] float32 tensor on `device`."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False)
    with warnings.catch_warnings():  # read-only Arrow buffer; the tensor is never written
        warnings.simplefilter("ignore", UserWarning)
        if dtype == "bfloat16":
            tensor = torch.from_numpy(np.ascontiguousarray(flat).view(np.int16)).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(np.ascontiguousarray(flat))
    return tensor.reshape(-1, dim).to(device=device, dtype=torch.float32)
