"""Gaussian projection matrices, regenerated from (seed, parameter name, side), never stored.

For a tracked matrix W [rows, cols] the two-sided projection is P_r W P_c^T with
P_r [k_r, rows] ~ N(0, 1/k_r) and P_c [k_c, cols] ~ N(0, 1/k_c), so the Kronecker product
P_r (x) P_c has entries of variance 1/(k_r k_c) (Johnson-Lindenstrauss: dot products are kept
in expectation). Matrices are drawn on the CPU from a generator seeded by a sha256 of
"seed/name/side", then moved, so every device and every shard gets the same numbers. A
lower-precision copy (bfloat16, for a bfloat16 model) is the float32 matrix, scale included,
rounded once: the same numbers for every batch, shard and query.
"""

from __future__ import annotations

import hashlib

import torch

SIDES = ("row", "col")


def stream_seed(seed: int, name: str, side: str) -> int:
    """A stable 63-bit generator seed for one projection matrix."""
    if side not in SIDES:
        raise ValueError(f"projection side must be one of {SIDES}, not {side!r}")
    digest = hashlib.sha256(f"{int(seed)}/{name}/{side}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def projection_matrix(seed: int, name: str, side: str, k: int, n: int) -> torch.Tensor:
    """[k, n] float32 on the CPU, entries ~ N(0, 1/k)."""
    generator = torch.Generator(device="cpu").manual_seed(stream_seed(seed, name, side))
    return torch.randn(k, n, generator=generator, dtype=torch.float32) / k**0.5


class Projections:
    """Per-featurizer cache of (P_r, P_c) on one device, optionally with the factored optimizer
    correction folded in: P_r diag(d_r), P_c diag(d_c), so P_r (D_r G D_c) P_c^T is exact."""

    def __init__(self, seed: int, device: torch.device | str = "cpu"):
        self.seed = seed
        self.device = torch.device(device)
        self._cache: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, side: str, k: int, n: int, scale: torch.Tensor | None = None,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[k, n] in `dtype` on self.device; columns multiplied by `scale` [n] (in float32) when given."""
        key = (name, side, k, n, scale is not None, dtype)
        if key not in self._cache:
            matrix = projection_matrix(self.seed, name, side, k, n)
            if scale is not None:
                matrix = matrix * scale.to(torch.float32).cpu()[None, :]
            self._cache[key] = matrix.to(self.device, dtype)
        return self._cache[key]

    def nbytes(self) -> int:
        """Bytes the cached matrices hold."""
        return sum(m.numel() * m.element_size() for m in self._cache.values())
