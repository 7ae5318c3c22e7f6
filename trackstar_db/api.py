"""The handle users hold: the store's Database (store/database.py: tables, manifest, writes) plus
the questions a user asks of it, answered by the stages above the store:

    db = trackstar_db.connect("demo-db")
    db.query("The capital of France is", "Paris")      # retrieval/adhoc.py, one prompt
    db.token_contributions(prompt, target, example_id)  # retrieval/tokens.py
    db.sql("SELECT ...")                                 # evaluation/sql.py, read-only DuckDB
    db.evaluate(by="bucket")                             # evaluation/analysis.py, queries/*.sql

Everything returns Arrow tables. The store's own code never needs these, so it never imports them.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from trackstar_db.errors import TrackstarError
from trackstar_db.store import database as _store


class Database(_store.Database):
    """An open trackstar-db directory, with its one-prompt attributor kept warm between queries."""

    _attributor = None  # retrieval.adhoc.PromptAttributor, made by the first query()

    def _attributor_for(self, device: str):
        from trackstar_db.retrieval.adhoc import PromptAttributor

        if self._attributor is None or self._attributor.device != device:
            self._attributor = PromptAttributor(self, device)
        return self._attributor

    def sql(self, text: str, vectors: bool = False) -> pa.Table:
        """Run one read-only SQL statement over the tables (DuckDB); the result as Arrow."""
        from trackstar_db.evaluation.sql import ReadOnlySQL

        with ReadOnlySQL(self.views(vectors)) as con:
            return con.run(text)

    def evaluate(self, by: str = "method") -> pa.Table:
        """The method-by-metric table (queries/summary*.sql); by='bucket' or 'correct' splits it."""
        from trackstar_db.evaluation.analysis import evaluation

        return evaluation(self, by)

    def query(self, prompt: str, target: str, k: int = 10, method: str | None = None, device: str = "cpu",
              ann=None, verify: bool = False) -> pa.Table:
        """Which examples made the model say `target` after `prompt`? (kind, rank, example_id,
        score, method, text, and evidence: retrieval/evidence.py). method None: the best rung this
        database can serve. verify: measure each proponent's tail-patch effect now (delta_p, label)."""
        return self._attributor_for(device).attribute(prompt, target, method=method, k=k, ann=ann, verify=verify)

    def token_contributions(self, prompt: str, target: str, example_id: str, method: str | None = None,
                            device: str = "cpu") -> pa.Table:
        """Each token's part of `example_id`'s score for (prompt, target); the parts sum to the
        score (position, token_id, token, start, end, contribution; retrieval/tokens.py)."""
        from trackstar_db.retrieval.tokens import token_contributions

        return token_contributions(self, prompt, target, example_id, method, attributor=self._attributor_for(device))

    def validate(self, options=None, bootstrap: int = 1000, report=None, **settings) -> pa.Table:
        """Counterfactual validation (validate/): retrain on random subsets the validation lacks
        (options: validate.options.ValidateOptions, or its fields as keywords: models, fraction,
        seed, name, train_command, ...), then the LDS of every retrieval run with a bootstrap
        interval (run_id, method, validation, n_queries, n_undefined, n_subsets, lds, lds_low, lds_high)."""
        from trackstar_db.validate.lds import lds_table
        from trackstar_db.validate.options import ValidateOptions
        from trackstar_db.validate.runner import run_validation

        options = options or ValidateOptions(**settings)
        trained = run_validation(self, options)
        if report is not None:
            report(f"validation {options.name}: trained {len(trained)} model(s) now, "
                   f"{options.models - len(trained)} already stored")
        table = lds_table(self, options.name, bootstrap)
        if report is not None and table.num_rows == 0:
            report("no retrieval run covers these queries yet: run 'trackstar-db retrieve', then validate again "
                   "(nothing is retrained)")
        return table

    def select(self, task=None, *, top: int | None = None, fraction: float | None = None, drop_opponents: bool = False,
               method: str | None = None, aggregate: str = "mean-vector", ann=None, device: str = "cpu", out=None):
        """Training examples for a task (selection.select.Task): the top N or fraction by mean score
        against its queries, or all but the most harmful; a Selection (rows: Arrow), written to `out`."""
        from trackstar_db.selection.select import select

        return select(self, task, top=top, fraction=fraction, drop_opponents=drop_opponents, method=method,
                      aggregate=aggregate, ann=ann, device=device, out=out)

    def self_influence(self, variant: str = "corrected", mix: str = "train", k: int | None = None) -> pa.Table:
        """Each training example's g R^-1 g and |g|^2 (stored by fit), highest first; the first k."""
        from trackstar_db.selection.self_influence import self_influence

        ranked = self_influence(self, variant, mix)
        return ranked if k is None else ranked.slice(0, k)

    def contribution(self, by: str = "source", n_boot: int = 1000, seed: int = 0) -> pa.Table:
        """The contribution ledger: each run's proponent share, score and tail-patch effect per value
        of one metadata column of the examples, with seeded bootstrap intervals over queries."""
        from trackstar_db.selection.ledger import ledger

        return ledger(self, by, n_boot=n_boot, seed=seed)

    def prompt_attributor(self, device: str = "cpu"):
        """The one-prompt attributor (retrieval.adhoc.PromptAttributor) this handle keeps warm on `device`."""
        return self._attributor_for(device)


def connect(path: str | Path) -> Database:
    """Open an existing trackstar-db database directory."""
    path = Path(path)
    if not path.exists():
        raise TrackstarError(f"{path}: no such database directory")
    return Database(path)
