"""The verb that writes the static HTML report (report/analysis.py), with Simfluence's trajectory
plot when the database has recorded runs (simfluence/evaluate.py)."""

from __future__ import annotations

from pathlib import Path

from trackstar_db.simfluence.evaluate import report_trajectory


class ReportVerbs:
    """write_report (mixed into api.Database)."""

    def write_report(self, out_dir: str | Path, compare=None, samples: int = 40) -> Path:
        """The summary table, plots and query explorer as HTML in `out_dir` (outside the database);
        compare: show only these two runs on the query pages; samples: queries given a page.
        Returns the index page's path."""
        from trackstar_db.report.analysis import write_db_report  # heavy: duckdb, matplotlib

        with self.reading():
            return write_db_report(self, Path(out_dir), compare, samples, trajectory=report_trajectory(self))
