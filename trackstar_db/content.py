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

import numpy as np

_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32", "int16": "I16",
           "int8": "I8", "uint8": "U8", "bool": "BOOL"}  # numpy dtype -> safetensors name


def canonical_safetensors(arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """The bytes of a safetensors file holding `arrays` (numpy; a caller with torch tensors passes
    t.cpu().numpy(): the store never imports torch) and `metadata`, in the one canonical layout."""
    header: dict[str, object] = {}
    blobs, offset = [], 0
    for name in sorted(arrays):
        array = np.asarray(arrays[name])
        if array.dtype.name not in _DTYPES:
            raise ValueError(f"array {name!r}: dtype {array.dtype} has no safetensors name here")
        blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": _DTYPES[array.dtype.name], "shape": list(array.shape),
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


def file_sha256(path: str | Path) -> str:
    """digest() of a file's bytes, read in chunks: what a content-named file's record holds."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


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
