"""The ablation ladder (METHOD.md section 2) as data: one MethodSpec per rung.

Every gradient method scores score(z, q) = t_train(g_z) . t_query(g_q), where g are rows of a
gradient table and each transform is "apply R^power, then optionally L2-normalise":

| name      | table       | R (preconditioner) | train power | query power | unit norm |
|-----------|-------------|--------------------|-------------|-------------|-----------|
| grad-dot  | uncorrected | none               | 0           | 0           | no        |
| grad-cos  | uncorrected | none               | 0           | 0           | yes       |
| trak      | uncorrected | R_train            | 0           | -1          | no        |
| opt-cos   | corrected   | none               | 0           | 0           | yes       |
| r-train   | corrected   | R_train            | -1/2        | -1/2        | yes       |
| trackstar | corrected   | mixed (task) R     | -1/2        | -1/2        | yes       |

Gradient tables: 'uncorrected' = projected loss gradients without the optimizer's 1/sqrt(V)
correction (FeaturizerConfig.correction == 'none'); 'corrected' = with it. So the first three
rungs need the uncorrected train+query tables, the last three the corrected ones. The
preconditioners passed in must be fitted on the same table the spec reads: trak's R_train is
the autocorrelation of *uncorrected* gradients, r-train's of corrected ones.

Preconditioner interface (trackstar_db.featurizer.preconditioner): any object with
`.apply(x [b, d], power: float) -> [b, d]` computing rows of x R^power (R symmetric).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

import torch

from trackstar_db.errors import TrackstarError

TABLES = ("uncorrected", "corrected")
PRECONDITIONERS = ("train", "mixed")


class Preconditioner(Protocol):
    def apply(self, x: torch.Tensor, power: float) -> torch.Tensor:
        """x [b, d] -> x R^power [b, d]."""


@dataclass(frozen=True)
class MethodSpec:
    """One rung: which gradient table, which R and powers on each side, unit norm or not."""

    name: str
    table: str  # 'uncorrected' | 'corrected'
    train_power: float
    query_power: float
    unit_norm: bool
    preconditioner: str | None  # None | 'train' | 'mixed'

    def __post_init__(self):
        if self.table not in TABLES:
            raise TrackstarError(f"method {self.name}: table must be one of {TABLES}, not {self.table!r}")
        if self.preconditioner not in (None, *PRECONDITIONERS):
            raise TrackstarError(f"method {self.name}: preconditioner must be None or one of {PRECONDITIONERS}")
        uses_r = self.train_power != 0 or self.query_power != 0
        if uses_r != (self.preconditioner is not None):
            raise TrackstarError(f"method {self.name}: a non-zero power needs a preconditioner and vice versa")


LADDER = (
    MethodSpec("grad-dot", "uncorrected", 0.0, 0.0, False, None),
    MethodSpec("grad-cos", "uncorrected", 0.0, 0.0, True, None),
    MethodSpec("trak", "uncorrected", 0.0, -1.0, False, "train"),
    MethodSpec("opt-cos", "corrected", 0.0, 0.0, True, None),
    MethodSpec("r-train", "corrected", -0.5, -0.5, True, "train"),
    MethodSpec("trackstar", "corrected", -0.5, -0.5, True, "mixed"),
)
METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in LADDER}
BASELINES = ("bm25", "embedding", "lm-embedding")  # retrievers without gradients (lm-embedding: the model's hidden states)
# TracIn-CP over the checkpoints training kept (retrieval/tracin_cp.py); not in 'all': it featurizes every checkpoint.
CHECKPOINT_METHODS = ("tracin-cp", "tracin-cp-cos", "tracin-cp-opt")
# Every method in display order: the one list the CLI, the demo and the SQL summaries read.
ALL_METHODS = BASELINES + tuple(METHODS) + CHECKPOINT_METHODS


def method_order() -> list[tuple[str, int]]:
    """(method, position) rows for SQL: summaries sort by it (methods not listed go last)."""
    return [(name, i) for i, name in enumerate(ALL_METHODS)]


def expand(names, installed=None) -> list[str]:
    """Method names with 'all' expanded to every method whose needs are installed
    (`installed(name) -> bool`, default: the embedding baseline only with its package)."""
    if installed is None:
        from . import embedding

        installed = lambda name: (name != "embedding" or embedding.available()) and name not in CHECKPOINT_METHODS  # noqa: E731
    out = []
    for name in names:
        for method in (ALL_METHODS if name == "all" else (name,)):
            if method not in ALL_METHODS:
                raise TrackstarError(f"unknown method {method!r}; methods: {', '.join(ALL_METHODS)}, all")
            if (name != "all" or installed(method)) and method not in out:
                out.append(method)
    return out


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise TrackstarError(f"unknown gradient method {name!r}; methods: {', '.join(METHODS)}") from None


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
