"""The read-only SQL layer: views over Arrow data, refusals, lock-down, one-line errors, formats."""

from __future__ import annotations

import csv
import io
import json

import lance
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from trackstar_db.evaluation.sql import ReadOnlySQL, format_table, write_table

ITEMS = pa.table({"id": ["a", "b", "c"], "n": [1, 2, 3], "x": [0.5, 1.25, -2.0],
                  "tags": [["p", "q"], None, []], "text": ["short", "a" * 100, 'with "quotes", commas\nand newline']})
VECTORS = pa.table({"id": ["a", "b", "c"],
                    "vector": pa.array([[1, 0], [0, 1], [1, 1]], pa.list_(pa.float32(), 2))})


@pytest.fixture
def sql(tmp_path):
    lance.write_dataset(VECTORS, tmp_path / "vectors.lance")
    with ReadOnlySQL({"items": ITEMS, "items_ds": ds.dataset(ITEMS),
                      "vectors": lance.dataset(tmp_path / "vectors.lance")}) as conn:
        yield conn


def test_views_over_table_dataset_and_lance(sql):
    out = sql.run("SELECT i.id, i.n, v.vector[2] AS v2 FROM items i JOIN vectors v USING (id) "
                  "JOIN items_ds d USING (id) ORDER BY i.id")
    assert out.to_pydict() == {"id": ["a", "b", "c"], "n": [1, 2, 3], "v2": [0.0, 1.0, 1.0]}
    kinds = sql.run("SELECT table_name, table_type FROM information_schema.tables ORDER BY 1").to_pylist()
    assert kinds == [{"table_name": n, "table_type": "VIEW"} for n in ("items", "items_ds", "vectors")]


COLUMNS = ["id", "n", "x", "tags", "text"]


@pytest.mark.parametrize("text, column, want", [
    ("WITH t AS (SELECT n FROM items) SELECT sum(n) AS s FROM t", "s", [6]),
    ("FROM items", "id", ["a", "b", "c"]),
    ("VALUES (1), (2)", "col0", [1, 2]),
    ("DESCRIBE items", "column_name", COLUMNS),
    ("SUMMARIZE items", "column_name", COLUMNS),
    ("SELECT 1 AS one;", "one", [1]),
    ("EXPLAIN SELECT * FROM items", "explain_key", ["physical_plan"]),
    ("EXPLAIN ANALYZE SELECT count(*) FROM items", "explain_key", ["analyzed_plan"]),
])
def test_read_statements_run(sql, text, column, want):
    assert sql.run(text).column(column).to_pylist() == want


def test_summarize_and_explain_read_the_data(sql):
    summary = {r["column_name"]: r for r in sql.run("SUMMARIZE items").to_pylist()}
    assert (summary["n"]["min"], summary["n"]["max"], summary["n"]["count"]) == ("1", "3", 3)
    assert (summary["x"]["min"], summary["x"]["max"]) == ("-2.0", "1.25")
    plan = sql.run("EXPLAIN ANALYZE SELECT count(*) FROM items").column("explain_value")[0].as_py()
    assert "3 rows" in plan  # the scan read the three rows it was given


def test_parameters(sql):
    assert sql.run("SELECT id FROM items WHERE n >= $1 ORDER BY id", [2]).column("id").to_pylist() == ["b", "c"]


@pytest.mark.parametrize("text, kind", [
    ("COPY items TO '{tmp}/out.csv'", "COPY"),
    ("EXPORT DATABASE '{tmp}/dump'", "EXPORT"),
    ("IMPORT DATABASE '{tmp}/dump'", "PRAGMA"),
    ("ATTACH '{tmp}/other.db' AS other", "ATTACH"),
    ("DETACH other", "DETACH"),
    ("CREATE TABLE t AS SELECT 1 AS a", "CREATE"),
    ("CREATE TEMP VIEW v AS SELECT 1", "CREATE"),
    ("CREATE MACRO m(x) AS x", "CREATE"),
    ("INSERT INTO items VALUES ('d', 4, 0.0, [], 'x')", "INSERT"),
    ("UPDATE items SET n = 0", "UPDATE"),
    ("DELETE FROM items", "DELETE"),
    ("DROP VIEW items", "DROP"),
    ("ALTER VIEW items RENAME TO other", "ALTER"),
    ("SET enable_external_access = true", "SET"),
    ("RESET lock_configuration", "SET"),
    ("SET VARIABLE x = 1", "SET"),
    ("PRAGMA version", "PRAGMA"),
    ("INSTALL httpfs", "LOAD"),
    ("LOAD httpfs", "LOAD"),
    ("CALL pragma_version()", "CALL"),
    ("BEGIN TRANSACTION", "TRANSACTION"),
    ("PREPARE p AS SELECT 1", "PREPARE"),
    ("EXECUTE p", "EXECUTE"),
    ("VACUUM", "VACUUM"),
    ("PIVOT items ON id", "MULTI"),
    ("EXPLAIN ANALYZE COPY items TO '{tmp}/out.csv'", "COPY"),
])
def test_write_and_config_statements_refused(sql, tmp_path, text, kind):
    with pytest.raises(ValueError, match=rf"^read-only: {kind} statements are not allowed$"):
        sql.run(text.format(tmp=tmp_path))
    assert list(tmp_path.iterdir()) == [tmp_path / "vectors.lance"]  # nothing written


def test_files_cannot_be_read(sql, tmp_path):
    secret = tmp_path / "secret.csv"
    secret.write_text("a,b\n1,2\n")
    for text in (f"SELECT * FROM read_csv('{secret}')", f"SELECT * FROM read_text('{secret}')",
                 f"SELECT * FROM glob('{tmp_path}/*')", f"SELECT * FROM '{secret}'"):
        with pytest.raises(ValueError) as info:
            sql.run(text)
        assert "\n" not in str(info.value) and "disabled" in str(info.value)


def test_configuration_is_locked(sql):
    import duckdb

    with pytest.raises(duckdb.Error, match="locked"):
        sql._con.execute("SET enable_external_access = true")


def test_one_statement_at_a_time(sql):
    with pytest.raises(ValueError, match="exactly one statement, not 2"):
        sql.run("SELECT 1; DROP VIEW items")
    with pytest.raises(ValueError, match="exactly one statement, not 0"):
        sql.run("  ")


def test_errors_are_one_line(sql):
    with pytest.raises(ValueError, match=r"^unknown table nope; tables: items, items_ds, vectors$"):
        sql.run("SELECT * FROM nope")
    for text in ("SELEC 1", "SELECT missing_column FROM items", "SELECT 1 +"):
        with pytest.raises(ValueError) as info:
            sql.run(text)
        assert "\n" not in str(info.value) and str(info.value)


def test_csv_round_trip():
    rows = list(csv.reader(io.StringIO(format_table(ITEMS, "csv"))))
    assert rows[0] == ITEMS.column_names
    assert [r[0] for r in rows[1:]] == ["a", "b", "c"]
    assert [float(r[2]) for r in rows[1:]] == ITEMS.column("x").to_pylist()
    assert [r[4] for r in rows[1:]] == ITEMS.column("text").to_pylist()
    assert [json.loads(r[3]) if r[3] else None for r in rows[1:]] == ITEMS.column("tags").to_pylist()


def test_json_lines_round_trip():
    lines = format_table(ITEMS, "json").splitlines()
    assert [json.loads(line) for line in lines] == ITEMS.to_pylist()
    nan = pa.table({"v": [float("nan")]})
    assert json.loads(format_table(nan, "json")) == {"v": None}


def test_aligned_table():
    text = format_table(ITEMS, "table", max_cell=20)
    lines = text.splitlines()
    assert lines[0].split() == ITEMS.column_names and lines[-1] == "(3 rows)"
    assert len(lines) == 2 + 3 + 1
    assert all(len(cell) <= 20 for line in lines[2:5] for cell in line.split("  "))
    assert "a" * 19 + "…" in text and "a" * 20 not in text
    assert "1.25" in text and "-2" in text


def test_parquet_and_unknown_format(tmp_path):
    path = write_table(ITEMS, "parquet", tmp_path / "out.parquet")
    assert pq.read_table(path).equals(ITEMS)
    assert write_table(ITEMS, "csv", tmp_path / "out.csv").read_text() == format_table(ITEMS, "csv")
    with pytest.raises(ValueError, match="output file"):
        format_table(ITEMS, "parquet")
    with pytest.raises(ValueError, match="unknown format 'xml'"):
        format_table(ITEMS, "xml")
