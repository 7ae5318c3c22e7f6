"""Applying the ablation ladder (trackstar_db/ladder.py: one MethodSpec per rung) to vectors.

Every gradient method scores score(z, q) = t_train(g_z) . t_query(g_q), where g are rows of a
gradient table and each transform is "apply R^power, then optionally L2-normalise"; the table
of rungs, powers and R is in trackstar_db/ladder.py, whose names are re-exported here.
`expand` turns 'all' into the methods whose needs are installed.

Preconditioner interface (trackstar_db.featurizer.preconditioner): any object with
`.apply(x [b, d], power: float) -> [b, d]` computing rows of x R^power (R symmetric).
"""

from __future__ import annotations

from typing import Callable, Mapping, Protocol

import torch

from trackstar_db.errors import TrackstarError
from trackstar_db.ladder import (  # noqa: F401  (re-exported: the ladder's names)
    ALL_METHODS, BASELINES, CHECKPOINT_METHODS, LADDER, METHODS, PRECONDITIONERS, REGISTRY, TABLES, MethodSpec,
    get_method, lookup, method_order,
)


class Preconditioner(Protocol):
    def apply(self, x: torch.Tensor, power: float) -> torch.Tensor:
        """x [b, d] -> x R^power [b, d]."""


def extra_installed(name: str) -> bool:
    """Whether the pip extra method `name` needs (ladder.Method.extra), if any, is importable."""
    from . import embedding  # heavy: transformers

    return REGISTRY[name].extra != "embedding" or embedding.available()


def not_installed(installed=None) -> list:
    """The registry entries of `--method all` that `expand` leaves out: their pip extra is missing."""
    installed = installed or extra_installed
    return [m for m in REGISTRY.values() if m.in_all and not installed(m.name)]


def expand(names, installed=None) -> list[str]:
    """Method names with 'all' expanded to every method of `--method all` (ladder.Method.in_all)
    whose needs are installed (`installed(name) -> bool`, default: extra_installed)."""
    installed = installed or extra_installed
    out = []
    for name in names:
        every = [m.name for m in REGISTRY.values() if m.in_all and installed(m.name)]
        for method in (every if name == "all" else (lookup(name).name,)):
            if method not in out:
                out.append(method)
    return out


def unit_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows of x [b, d] scaled to L2 norm 1; zero or non-finite rows are an error."""
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    bad = ~torch.isfinite(norms) | (norms == 0)
    if bool(bad.any()):
        rows = torch.nonzero(bad.flatten()).flatten().tolist()
        raise TrackstarError(f"unit norm: {len(rows)} row(s) with zero or non-finite norm (row {rows[0]} first)")
    return x / norms


def _transform(spec: MethodSpec, power: float, preconditioners: Mapping[str, Preconditioner]
               ) -> Callable[[torch.Tensor], torch.Tensor]:
    preconditioner = None
    if power != 0:
        preconditioner = preconditioners.get(spec.preconditioner)
        if preconditioner is None:
            raise TrackstarError(f"method {spec.name} needs the {spec.preconditioner!r} preconditioner "
                                 f"(given: {', '.join(preconditioners) or 'none'})")

    def transform(x: torch.Tensor) -> torch.Tensor:
        if preconditioner is not None:
            x = preconditioner.apply(x, power)
        return unit_normalize(x) if spec.unit_norm else x

    return transform


def query_transform(spec: MethodSpec, preconditioners: Mapping[str, Preconditioner] | None = None
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    """[b, d] query gradients -> the vectors scored against train vectors."""
    return _transform(spec, spec.query_power, preconditioners or {})


def train_transform(spec: MethodSpec, preconditioners: Mapping[str, Preconditioner] | None = None
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    """[b, d] training gradients -> the vectors scored against query vectors."""
    return _transform(spec, spec.train_power, preconditioners or {})
