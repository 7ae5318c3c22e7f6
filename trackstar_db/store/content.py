"""Files named by their content: one byte layout for one content, whatever process writes it.

safetensors' own writer orders its header (and the metadata in it) by a hash map whose order
changes from process to process, so two bit-equal fits wrote different bytes, and a name taken
from the file's sha256 differed between a clean run and a rerun. `canonical_safetensors` lays a
safetensors file out in one order: the header is JSON with sorted keys and no spaces (tensors by
name, each {dtype, shape, data_offsets}; "__metadata__" with sorted string keys), padded with
spaces to 8 bytes as the format asks, then each tensor's little-endian bytes in name order. Any
safetensors reader reads it. Its sha256 is therefore a hash of the tensors (dtype, shape, bytes)
and the metadata in canonical order: `digest` names the file, so identical content gets an
identical name and a writer finding that name present has nothing to write.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def _raw(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: its bit pattern as int16
        tensor = tensor.view(torch.int16)
    data = tensor.numpy()
    return data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes()


def canonical_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The bytes of a safetensors file holding `tensors` and `metadata`, in the one canonical layout."""
    header: dict[str, object] = {}
    blobs, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} has no safetensors name here")
        blob = _raw(tensor)
        header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def digest(data: bytes) -> str:
    """The content hash a content-named file is named by (sha256, hex)."""
    return hashlib.sha256(data).hexdigest()


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` and fsync it (a full disk leaves no partial file)."""
    path = Path(path)
    try:
        with open(path, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path
