"""Self-influence of every training example: g R^-1 g (and the unpreconditioned |g|^2).

`trackstar-db fit` stores, next to R_train of each gradient table, the norms |g R^-1/2| and
|g| of every row in scan order (gradients/fit.py: SELF_INFLUENCE_POWERS), so this module reads,
never recomputes: g R^-1 g = |g R^-1/2|^2 (R symmetric). A row whose gradient the rest of the
data does not explain (a mislabeled or contradicting example) has a large one: the outliers are
the top of `self_influence(db)`, listed by `trackstar-db rank`, plotted in the report.

Default: the corrected table (the gradients r-train and trackstar score) and R_train; `mix='mixed'`
reads the task's R instead (its fit stores |g R^-1/2| only: no plain norm column then).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from trackstar_db.errors import TrackstarError

COLUMNS = ("rank", "example_id", "self_influence", "grad_sq_norm")


def self_influence(db, variant: str = "corrected", mix: str = "train") -> pa.Table:
    """rank, example_id, self_influence (g R^-1 g), grad_sq_norm (|g|^2), highest first."""
    from trackstar_db.retrieval.scoring import check_fitted, load_preconditioner  # heavy: torch

    table = db.gradient_table("train", corrected=variant == "corrected").require()
    pre = load_preconditioner(table, mix)
    whitened, plain = pre.row_norms.get(-0.5), pre.row_norms.get(0.0)
    if whitened is None:
        raise TrackstarError(f"{table.name}: its {mix!r} R holds no self-influence norms; "
                             f"run 'trackstar-db fit {db.path}' again")
    check_fitted(db, table, pre, whitened)
    rows = len(whitened)
    ids = table.dataset().to_table(columns=["id"]).column("id")  # the scan order the norms were stored in
    si = whitened.double().numpy() ** 2
    sq = plain.double().numpy() ** 2 if plain is not None else np.full(rows, np.nan)
    order = np.argsort(-si, kind="stable")
    return pa.table({"rank": pa.array(np.arange(1, rows + 1), pa.int32()), "example_id": ids.take(order),
                     "self_influence": pa.array(si[order]), "grad_sq_norm": pa.array(sq[order])})


def recall_at(ranked: pa.Table, planted: set[str], share: float = 0.05) -> float:
    """Fraction of `planted` example ids among the top `share` of a ranked table."""
    if not planted:
        raise TrackstarError("recall: no planted examples")
    top = ranked.column("example_id").to_pylist()[: max(1, round(share * ranked.num_rows))]
    return len(planted & set(top)) / len(planted)
