"""Verbs that move retrieval runs in and out in the authors' viewer format (exchange/run_files.py)."""

from __future__ import annotations

from pathlib import Path


class ExchangeVerbs:
    """export_run, import_run (mixed into api.Database)."""

    def export_run(self, run_id: str, out: str | Path) -> Path:
        """Write run `run_id` as viewer JSON lines to `out` (outside the database); returns the path."""
        from trackstar_db.exchange.run_files import export_run  # heavy: duckdb, tantivy

        with self.reading():
            return export_run(self, run_id, Path(out))

    def import_run(self, path: str | Path, method: str, run_id: str | None = None) -> int:
        """Load a viewer-format results file as run `run_id` (default: the method's name) of `method`,
        all or nothing; returns the retrieval rows stored."""
        from trackstar_db.exchange.run_files import import_run  # heavy: duckdb, tantivy

        return import_run(self, Path(path), method, run_id or method)
