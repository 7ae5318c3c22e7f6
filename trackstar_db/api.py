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
              ann=None) -> pa.Table:
        """Which examples made the model say `target` after `prompt`? (kind, rank, example_id,
        score, text, method). method None: the best rung this database can serve."""
        return self._attributor_for(device).attribute(prompt, target, method=method, k=k, ann=ann)

    def token_contributions(self, prompt: str, target: str, example_id: str, method: str | None = None,
                            device: str = "cpu") -> pa.Table:
        """Each token's part of `example_id`'s score for (prompt, target); the parts sum to the
        score (position, token_id, token, start, end, contribution; retrieval/tokens.py)."""
        from trackstar_db.retrieval.tokens import token_contributions

        return token_contributions(self, prompt, target, example_id, method, attributor=self._attributor_for(device))

    def prompt_attributor(self, device: str = "cpu"):
        """The one-prompt attributor (retrieval.adhoc.PromptAttributor) this handle keeps warm on `device`."""
        return self._attributor_for(device)


def connect(path: str | Path) -> Database:
    """Open an existing trackstar-db database directory."""
    path = Path(path)
    if not path.exists():
        raise TrackstarError(f"{path}: no such database directory")
    return Database(path)
