"""Every retrieval method as data: the ablation ladder (docs/method.md) as one MethodSpec per rung,
and one registry entry per method (rungs, baselines, TracIn-CP) with its capabilities. `lookup`
is the one place a method name is checked; the CLI, the demo, fit, retrieval and the SQL
summaries read the registry and its display order.

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

Beyond the ladder, the Kronecker-factored methods (`trackstar-db fit-factors`): kfac-proj and
ekfac-proj score uncorrected vectors through the projected curvature (train and query power
-1/2 of F_p); kfac and ekfac re-score a first stage's candidates from full gradients.

Plain data with no heavy import: the transforms that apply a spec live in retrieval/methods.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from trackstar_db.errors import TrackstarError

TABLES = ("uncorrected", "corrected")
PRECONDITIONERS = ("train", "mixed")
CURVATURES = ("kfac", "ekfac")  # Kronecker-factored curvature (gradients/factors.py), not fitted by `fit`


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
        if self.preconditioner not in (None, *PRECONDITIONERS, *CURVATURES):
            raise TrackstarError(f"method {self.name}: preconditioner must be None or one of "
                                 f"{PRECONDITIONERS + CURVATURES}")
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
# The Kronecker-factored rungs (gradients/factors.py; not part of the ablation ladder, so `fit`
# leaves them alone): the uncorrected vectors scored through the projected K-FAC / EK-FAC
# curvature F_p (its powers -1/2 on both sides: g_z . g_q F_p^-1), still one dot-product scan.
KRONECKER = (
    MethodSpec("kfac-proj", "uncorrected", -0.5, -0.5, False, "kfac"),
    MethodSpec("ekfac-proj", "uncorrected", -0.5, -0.5, False, "ekfac"),
)


@dataclass(frozen=True)
class Method:
    """One retrieval method and what it can do. `runner` names the function of
    retrieval/runners.py that computes its top-k; `extra` the pip extra it needs, if any;
    `refuses_prompt` says why it cannot answer a one-prompt query, where it cannot."""

    name: str
    runner: str  # 'gradient' | 'bm25' | 'embedding' | 'lm-embedding' | 'tracin-cp'
    spec: MethodSpec | None = None  # the rung, for the gradient methods
    serves_ann: bool = False  # an ANN index of its final vectors can answer it ('trackstar-db index')
    needs_texts: bool = False  # scores the query's text, not its gradient
    needs_model: bool = False  # loads the attributed checkpoint to answer
    needs_checkpoints: bool = False  # sums over intermediate checkpoints' gradient tables
    gpu_free: bool = True  # has a CPU path
    extra: str | None = None  # pip install 'trackstar-db[EXTRA]'
    refuses_prompt: str | None = None
    needs_factors: bool = False  # reads the Kronecker factors of 'trackstar-db fit-factors'

    @property
    def serves_prompt(self) -> bool:
        return self.refuses_prompt is None

    @property
    def in_all(self) -> bool:
        """Part of `--method all`: everything but the methods that need intermediate checkpoints
        or the Kronecker factors (fitted by their own command)."""
        return not self.needs_checkpoints and not self.needs_factors


_ONE_PROMPT_TRACIN = ("{name} sums gradients of the database's stored queries over the checkpoints (their "
                      "tables from 'ingest gradients --checkpoint', or the queries table featurized in memory); a "
                      "one-prompt query is featurized at the final checkpoint only. Ingest the prompt as a fact and "
                      "retrieve with {name}, or query a ladder method")
REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("bm25", "bm25", needs_texts=True),
    Method("embedding", "embedding", needs_texts=True, extra="embedding"),
    Method("lm-embedding", "lm-embedding", needs_texts=True, needs_model=True),
    *(Method(spec.name, "gradient", spec, serves_ann=True, needs_model=True) for spec in LADDER),
    *(Method(name, "tracin-cp", needs_model=True, needs_checkpoints=True,
             refuses_prompt=_ONE_PROMPT_TRACIN.format(name=name))
      for name in ("tracin-cp", "tracin-cp-cos", "tracin-cp-opt")),
    *(Method(spec.name, "kronecker-proj", spec, needs_model=True, needs_factors=True) for spec in KRONECKER),
    # the second stage (retrieval/rerank.py): a first stage's top candidates re-scored from full
    # gradients through the factors (first stage: the best rung served, or query/retrieve --method)
    *(Method(name, "rerank", needs_model=True, needs_factors=True) for name in CURVATURES),
)}
# Every method in display order: the one list the CLI, the demo and the SQL summaries read.
ALL_METHODS = tuple(REGISTRY)
BASELINES = tuple(m.name for m in REGISTRY.values() if m.needs_texts)  # retrievers without gradients
# TracIn-CP over the checkpoints training kept (retrieval/tracin_cp.py); not in 'all': it needs every checkpoint's
# gradient tables (ingest gradients --checkpoint NAME) or featurizes them in memory.
CHECKPOINT_METHODS = tuple(m.name for m in REGISTRY.values() if m.needs_checkpoints)
# The Kronecker-factored methods: they need 'trackstar-db fit-factors' (gradients/factors.py).
FACTOR_METHODS = tuple(m.name for m in REGISTRY.values() if m.needs_factors)


def factors_missing(manifest: dict, name: str) -> str | None:
    """Why the factor method `name` cannot answer from a database with this manifest, or None."""
    entry = manifest.get("factors") or {}
    if not entry:
        return "no Kronecker factors (trackstar-db fit-factors)"
    spec = REGISTRY[name].spec
    kind = spec.preconditioner if spec is not None else name
    if kind == "ekfac" and entry.get("kind") != "ekfac":
        return "K-FAC factors only (trackstar-db fit-factors --kind ekfac)"
    if spec is not None and kind not in (entry.get("projected") or {}):
        return "no projected curvature (ingest the uncorrected gradients, then fit-factors)"
    return None


def lookup(name: str) -> Method:
    """The registry entry of `name`; the one "unknown method" error."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise TrackstarError(f"unknown method {name!r}; methods: {', '.join(ALL_METHODS)}") from None


def method_order() -> list[tuple[str, int]]:
    """(method, position) rows for SQL: summaries sort by it (methods not listed go last)."""
    return [(name, i) for i, name in enumerate(ALL_METHODS)]


def get_method(name: str) -> MethodSpec:
    """The rung `name` (a gradient method of the ladder)."""
    spec = lookup(name).spec
    if spec is None:
        raise TrackstarError(f"{name} is not a gradient method of the ladder ({', '.join(METHODS)})")
    return spec
