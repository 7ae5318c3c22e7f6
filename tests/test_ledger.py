"""The contribution ledger: queries/contribution_by_source.sql against a loop in Python, bootstrap
intervals that cover the estimate and narrow as queries are added, the read-only guard, and
`eval --by COLUMN` as a user types it."""

import json
import random

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from trackstar_db import resources
from trackstar_db.errors import TrackstarError
from trackstar_db.evaluation.sql import ReadOnlySQL
from trackstar_db.selection.ledger import bootstrap_means, example_groups, ledger, run_cells
from trackstar_db.store import schema as _schema

GROUPS = ("web", "books", "code")


def synthetic(n_queries: int, k: int = 5, seed: int = 0, patched: int = 0):
    """retrievals (one run, k proponents a query), tail_patch (the first `patched` queries) and
    groups: 60 examples in three sources with unequal shares."""
    rng = random.Random(seed)
    examples = [f"e{i}" for i in range(60)]
    group_of = {e: GROUPS[0 if i < 30 else 1 if i < 50 else 2] for i, e in enumerate(examples)}
    rows, patches = [], []
    for q in range(n_queries):
        for rank, example in enumerate(rng.sample(examples, k), 1):
            score = rng.random()
            rows.append({"run_id": "r", "method": "trackstar", "query_id": f"q{q:04d}", "kind": "proponent",
                         "rank": rank, "example_id": example, "score": score})
            rows.append({"run_id": "r", "method": "trackstar", "query_id": f"q{q:04d}", "kind": "opponent",
                         "rank": rank, "example_id": rng.choice(examples), "score": -score})
            if q < patched and rank <= 3:
                before = rng.random() * 0.5
                patches.append({"run_id": "r", "query_id": f"q{q:04d}", "rank": rank, "example_id": example,
                                "p_before": before, "p_after": before + rng.gauss(0.01, 0.02)})
    retrievals = _schema.conform(pa.Table.from_pylist(rows), _schema.arrow_schema("retrievals"))
    tail = (_schema.conform(pa.Table.from_pylist(patches), _schema.arrow_schema("tail_patch")) if patches
            else _schema.arrow_schema("tail_patch").empty_table())
    groups = pa.table({"example_id": examples, "group_value": [group_of[e] for e in examples]})
    return retrievals, tail, groups, group_of


def test_cells_equal_a_loop_over_queries():
    retrievals, tail, groups, group_of = synthetic(12, patched=4)
    cells = {(r["group_value"], r["query_id"]): r for r in run_cells(retrievals, tail, groups).to_pylist()}
    assert len(cells) == 12 * len(GROUPS)
    for query in {r["query_id"] for r in retrievals.to_pylist()}:
        mine = [r for r in retrievals.to_pylist() if r["query_id"] == query and r["kind"] == "proponent"]
        patches = [t for t in tail.to_pylist() if t["query_id"] == query]
        for group in GROUPS:
            cell = cells[(group, query)]
            hits = [r for r in mine if group_of[r["example_id"]] == group]
            assert cell["n_proponents"] == len(hits)
            assert cell["proponent_share"] == pytest.approx(len(hits) / len(mine))
            assert cell["score_sum"] == pytest.approx(sum(r["score"] for r in hits), rel=1e-5)
            if patches:
                want = sum((t["p_after"] - t["p_before"]) * 100 for t in patches if group_of[t["example_id"]] == group)
                assert cell["tailpatch_pp"] == pytest.approx(want)
            else:
                assert cell["tailpatch_pp"] is None
        assert sum(cells[(g, query)]["proponent_share"] for g in GROUPS) == pytest.approx(1.0)


def _table(n_queries: int, seed: int = 0):
    retrievals, tail, groups, _ = synthetic(n_queries, seed=seed, patched=n_queries)
    return ledger(None, "source", table=run_cells(retrievals, tail, groups))


def test_intervals_cover_the_estimate_and_shrink_as_queries_are_added():
    widths = {}
    for n in (10, 40, 160, 640):
        rows = {r["source"]: r for r in _table(n).to_pylist()}
        assert set(rows) == set(GROUPS)
        for group, row in rows.items():
            for metric in ("share", "score", "tailpatch"):
                assert row[f"{metric}_low"] <= row[metric] <= row[f"{metric}_high"], (n, group, metric)
            widths.setdefault(group, []).append(row["share_high"] - row["share_low"])
        assert sum(row["share"] for row in rows.values()) == pytest.approx(1.0)
    for group, seen in widths.items():
        assert all(a > b for a, b in zip(seen, seen[1:])), (group, seen)
        assert seen[-1] < seen[0] / 4  # 64 times the queries: about 1/8 the width
    # 640 queries: the estimate is near the true expected share 30/60, 20/60, 10/60
    rows = {r["source"]: r for r in _table(640).to_pylist()}
    for group, share in zip(GROUPS, (0.5, 1 / 3, 1 / 6)):
        assert rows[group]["share_low"] - 0.02 <= share <= rows[group]["share_high"] + 0.02


def test_bootstrap_is_seeded_and_matches_a_loop():
    values = np.random.default_rng(3).normal(size=(2, 25))
    mean, low, high = bootstrap_means(values, n_boot=200, seed=7)
    again = bootstrap_means(values, n_boot=200, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip((mean, low, high), again))
    assert not np.array_equal(low, bootstrap_means(values, n_boot=200, seed=8)[1])
    # the same resamples drawn one by one: counts -> index lists
    counts = np.random.default_rng(7).multinomial(25, np.full(25, 1 / 25), size=200)
    loop = np.array([[values[g, np.repeat(np.arange(25), c)].mean() for c in counts] for g in range(2)])
    assert np.allclose(low, np.quantile(loop, 0.025, axis=1)) and np.allclose(high, np.quantile(loop, 0.975, axis=1))
    assert np.allclose(mean, values.mean(axis=1))


def test_the_ledger_sql_runs_on_the_read_only_connection():
    text = resources.read_text("queries", "contribution_by_source.sql")
    retrievals, tail, groups, _ = synthetic(3)
    with ReadOnlySQL({"retrievals": retrievals, "tail_patch": tail, "example_groups": groups}) as sql:
        sql.check(text)  # one read statement
        assert sql.run(text).num_rows == 3 * len(GROUPS)
        with pytest.raises(TrackstarError, match="read-only"):
            sql.run("CREATE TABLE leak AS " + text)
        with pytest.raises(TrackstarError):
            sql.run("SELECT * FROM read_csv('/etc/passwd')")


def test_groups_from_metadata_and_unknown_column(tmp_path):
    from trackstar_db import Database
    from trackstar_db.sources.corpus import ingest_corpus

    path = tmp_path / "shard-00.jsonl"
    path.write_text("".join(json.dumps({"id": f"x{i}", "text": f"text number {i}", "domain": ["news", "law"][i % 2],
                                        "licence": None if i == 3 else "cc-by"}) + "\n" for i in range(6)))
    db = Database.create(tmp_path / "db")
    ingest_corpus(db, [path], progress=False)
    groups = {r["example_id"]: r["group_value"] for r in example_groups(db, "domain").to_pylist()}
    assert groups == {f"x{i}": ["news", "law"][i % 2] for i in range(6)}
    assert set(example_groups(db, "source").column("group_value").to_pylist()) == {"shard-00.jsonl"}
    assert example_groups(db, "licence").column("group_value").to_pylist().count(None) == 1
    with pytest.raises(TrackstarError, match=r"^by 'shard' is neither a column \(.*source.*\) nor a metadata key "
                                             r"\(domain, licence\)"):
        example_groups(db, "shard")


def test_eval_by_source_as_a_user_types_it(tiny_db):
    from trackstar_db.cli import main
    from trackstar_db.retrieval.runs import RetrieveOptions, retrieve

    retrieve(tiny_db, "bm25", RetrieveOptions(k=5))
    runner = CliRunner()
    result = runner.invoke(main, ["eval", str(tiny_db.path), "--by", "source", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["source"] for r in rows] == ["trex_sentences.jsonl"] and rows[0]["share"] == pytest.approx(1.0)
    assert rows[0]["share_low"] <= rows[0]["share"] <= rows[0]["share_high"]
    result = runner.invoke(main, ["eval", str(tiny_db.path), "--by", "licence"])
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1].startswith("Error: --by 'licence' is not a column (")
    assert len(result.output.strip().splitlines()) == 1
