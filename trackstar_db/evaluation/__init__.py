"""The SQL metrics: queries/*.sql run over the tables (metrics_sql.py), read-only SQL and its output
formats (sql.py), and the words a retrieved text shares with its query (highlight.py)."""
