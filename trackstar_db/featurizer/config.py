"""The featurizer's options and the layout of its output vector.

`FeaturizerConfig` is the whole recipe of a gradient table (it goes into the database
manifest); `plan_layout` turns it and the tracked matrix shapes into `Layout`: where each
tracked matrix's projected gradient lives in the output vector [dim].

- combine="concat": every tracked matrix gets its own block of k_r x k_c entries; blocks are
  concatenated in tracked order. Blocks are equal: block = dim // L (L matrices),
  k_r = floor(sqrt(block)), k_c = block // k_r, so the total is <= dim.
- dim: 1 .. 65536, and at most the number of entries of the tracked matrices (a projection
  wider than the gradient only pads it); in concat mode at least one entry per matrix. Below
  WELL_PROJECTED (256) a warning says the projection's distortion: a Gaussian projection to d
  dimensions keeps a squared norm to a relative standard deviation of sqrt(2 / d) (9% at 256,
  18% at 64), so scores of a narrow table rank coarsely; it is a choice, not refused.
- combine="sum": every matrix is projected to the same k_r x k_c = dim (k_r the largest divisor
  of dim <= sqrt(dim)) and the projections are added: one Johnson-Lindenstrauss projection of
  the whole gradient. Every block then has offset 0.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields

from trackstar_db import defaults
from trackstar_db.errors import ParameterError, TrackstarError
from trackstar_db.option_checks import DIM, NON_NEGATIVE, Choice, Range, check_fields, ruled

COMBINES = ("concat", "sum")
CORRECTIONS = ("none", "adam-exact", "adam-factored", "adafactor", "estimated")
# "auto" = what the checkpoint supports, decided by settings.resolve before any vector is made
CHOICES = CORRECTIONS + ("auto",)
MIN_DIM, MAX_DIM = DIM.low, DIM.high


class FeaturizerWarning(UserWarning):
    """A featurizer choice that works but deserves a look (a narrow dim, untracked matrices)."""


WELL_PROJECTED = 256  # below this width a warning says the projection's distortion (module docstring)


@dataclass(frozen=True)
class FeaturizerConfig:
    """dim: total output width; seed: projection seed; eps: in g / (sqrt(V) + eps);
    max_length: tokens kept per example (right cut)."""

    dim: int = ruled(DIM, defaults.DIM)
    seed: int = ruled(NON_NEGATIVE, 0)
    combine: str = ruled(Choice(COMBINES), "concat")
    correction: str = ruled(Choice(CHOICES), "auto")
    eps: float = ruled(Range(0.0, integer=False), 1e-8)
    max_length: int = ruled(Range(2), 512)

    def __post_init__(self):
        check_fields(self)  # dim: also at most the tracked matrices' entries (plan_layout)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FeaturizerConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrackstarError(f"featurizer settings: unknown field(s) {unknown}")
        return cls(**data)


@dataclass(frozen=True)
class Block:
    """One tracked matrix's place in the output vector: [offset, offset + size), size = k_r * k_c."""

    name: str
    offset: int
    size: int
    k_r: int
    k_c: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Layout:
    blocks: tuple[Block, ...]
    dim: int  # actual width of the output vector (<= config.dim in concat mode)

    def block(self, name: str) -> Block:
        for block in self.blocks:
            if block.name == name:
                return block
        raise KeyError(f"{name!r} is not a tracked matrix")

    def spans(self) -> list[tuple[int, int]]:
        """Distinct (offset, size) spans in order: the blocks of a block-diagonal R."""
        seen: dict[tuple[int, int], None] = {}
        for block in self.blocks:
            seen.setdefault((block.offset, block.size), None)
        return list(seen)

    def to_dict(self) -> dict:
        return {"dim": self.dim, "blocks": [b.to_dict() for b in self.blocks]}

    @classmethod
    def from_dict(cls, data: dict) -> "Layout":
        return cls(tuple(Block(**b) for b in data["blocks"]), int(data["dim"]))


def check_width(config: FeaturizerConfig, tracked: list) -> None:
    """Refuse a dim wider than the tracked matrices' entries (or, concat, narrower than their
    count); warn below WELL_PROJECTED. tracked: featurizer.tracked.TrackedMatrix list."""
    entries = sum(m.rows * m.cols for m in tracked)
    if config.dim > entries:
        raise ParameterError("dim", f"must be at most {entries:,}, the entries of the model's {len(tracked)} tracked "
                                    f"matrices, not {config.dim}")
    if config.combine == "concat" and config.dim < len(tracked):
        raise ParameterError("dim", f"must be at least {len(tracked)} with combine 'concat' (one block per tracked "
                                    f"matrix), not {config.dim}")
    if config.dim < WELL_PROJECTED:
        warnings.warn(f"dim {config.dim}: a projection this narrow distorts gradient norms by about "
                      f"{math.sqrt(2 / config.dim):.0%} (relative standard deviation sqrt(2/dim)); "
                      f"{WELL_PROJECTED} or more keeps it under {math.sqrt(2 / WELL_PROJECTED):.0%}",
                      FeaturizerWarning, stacklevel=3)


def _square_split(n: int) -> tuple[int, int]:
    k_r = max(1, math.isqrt(n))
    return k_r, n // k_r


def _exact_split(n: int) -> tuple[int, int]:
    k_r = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return k_r, n // k_r


def plan_layout(config: FeaturizerConfig, names: list[str]) -> Layout:
    """Blocks for the tracked matrices `names` (in tracked order)."""
    if not names:
        raise ValueError("no tracked matrices to lay out")
    if config.combine == "sum":
        k_r, k_c = _exact_split(config.dim)
        return Layout(tuple(Block(n, 0, k_r * k_c, k_r, k_c) for n in names), k_r * k_c)
    per_block = config.dim // len(names)
    if per_block < 1:
        raise ValueError(f"dim {config.dim} is smaller than the {len(names)} tracked matrices")
    k_r, k_c = _square_split(per_block)
    size = k_r * k_c
    blocks = tuple(Block(n, i * size, size, k_r, k_c) for i, n in enumerate(names))
    return Layout(blocks, size * len(names))
