"""The ablation ladder (METHOD.md section 2) as data: one MethodSpec per rung, and the one list
of method names and their display order that the CLI, the demo, fit and the SQL summaries read.

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

Plain data with no heavy import: the transforms that apply a spec live in retrieval/methods.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from trackstar_db.errors import TrackstarError

TABLES = ("uncorrected", "corrected")
PRECONDITIONERS = ("train", "mixed")


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
# TracIn-CP over the checkpoints training kept (retrieval/tracin_cp.py); not in 'all': it needs every checkpoint's
# gradient tables (ingest gradients --checkpoint NAME) or featurizes them in memory.
CHECKPOINT_METHODS = ("tracin-cp", "tracin-cp-cos", "tracin-cp-opt")
# Every method in display order: the one list the CLI, the demo and the SQL summaries read.
ALL_METHODS = BASELINES + tuple(METHODS) + CHECKPOINT_METHODS


def method_order() -> list[tuple[str, int]]:
    """(method, position) rows for SQL: summaries sort by it (methods not listed go last)."""
    return [(name, i) for i, name in enumerate(ALL_METHODS)]


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise TrackstarError(f"unknown gradient method {name!r}; methods: {', '.join(METHODS)}") from None
