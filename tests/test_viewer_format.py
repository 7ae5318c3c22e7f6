"""The authors' viewer results format: export / import round trip, their files, malformed lines."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from trackstar_db.errors import RecordError
from trackstar_db.evaluation.sql import ReadOnlySQL
from trackstar_db.exchange.viewer_format import export_viewer, import_viewer
from trackstar_db.store.schema import arrow_schema, conform


def tiny_world(seed: int = 0) -> dict[str, pa.Table]:
    """Three fact queries plus one ad-hoc query, ten examples, one run with proponents/opponents."""
    rng = np.random.default_rng(seed)
    examples = [{"example_id": f"e{i}", "text": f"Sentence {i}: \"quoted\" — ünïcode {i * 7}", "source": "s",
                 "content_hash": f"h{i}"} for i in range(10)]
    facts = [{"fact_id": f"f{i}", "subject": f"S{i}", "relation": "capital", "object": f"O{i}",
              "fact_key": f"k{i}", "frequency": 3 * i, "frequency_bucket": i} for i in range(3)]
    queries = [{"query_id": f"f{i}:prompt0", "fact_id": f"f{i}", "prompt": f"S{i} capital is",
                "target": f" O{i}", "template": "prompt0"} for i in range(3)]
    queries.append({"query_id": "free", "fact_id": None, "prompt": "Hello", "target": " world", "template": "adhoc"})
    ground_truth = [{"fact_id": "f0", "example_id": "e1"}, {"fact_id": "f0", "example_id": "e4"},
                    {"fact_id": "f1", "example_id": "e2"}, {"fact_id": "f2", "example_id": "e9"}]
    retrievals = []
    for q in queries:
        order = rng.permutation(10)
        scores = np.sort(rng.normal(size=10).astype(np.float32))[::-1]
        for rank in range(4):  # proponents: highest scores first
            retrievals.append(("proponent", rank + 1, f"e{order[rank]}", scores[rank], q["query_id"]))
        for rank in range(3):  # opponents: lowest scores first
            retrievals.append(("opponent", rank + 1, f"e{order[-1 - rank]}", scores[-1 - rank], q["query_id"]))
    kind, rank, example_id, score, query_id = zip(*retrievals)
    tables = {
        "examples": pa.Table.from_pylist(examples), "facts": pa.Table.from_pylist(facts),
        "queries": pa.Table.from_pylist(queries), "ground_truth": pa.Table.from_pylist(ground_truth),
        "retrievals": pa.table({"run_id": ["run1"] * len(kind), "method": ["trackstar"] * len(kind),
                                "query_id": list(query_id), "kind": list(kind), "rank": list(rank),
                                "example_id": list(example_id), "score": pa.array(score, pa.float32())}),
    }
    return {name: conform(t, arrow_schema(name)) for name, t in tables.items()}


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([(c, "ascending") for c in ("query_id", "kind", "rank")])


def _export(world, path, **kw):
    return export_viewer(world["retrievals"], world["queries"], world["examples"], world["facts"],
                         world["ground_truth"], path, **kw)


def test_round_trip(tmp_path):
    world = tiny_world()
    path = _export(world, tmp_path / "run.jsonl")
    back = import_viewer(path, "trackstar", "run1")
    assert _sorted(back.retrievals).equals(_sorted(world["retrievals"]))  # ids, ranks, float32 scores exact
    assert back.queries.sort_by("query_id").equals(world["queries"].sort_by("query_id"))
    texts = dict(zip(*world["examples"].select(["example_id", "text"]).to_pydict().values()))
    assert all(texts[e] == t for e, t in zip(*back.examples.select(["example_id", "text"]).to_pydict().values()))
    assert set(back.examples.column("example_id").to_pylist()) == set(world["retrievals"].column("example_id").to_pylist())
    # proponent_correct carries the ground truth of the retrieved proponents
    truth = set(zip(*world["ground_truth"].to_pydict().values()))
    props = world["retrievals"].filter(pa.compute.equal(world["retrievals"].column("kind"), "proponent")).to_pylist()
    fact_of = {q["query_id"]: q["fact_id"] for q in world["queries"].to_pylist()}
    expected = {(fact_of[r["query_id"]], r["example_id"]) for r in props} & truth
    assert set(zip(*back.ground_truth.to_pydict().values())) == expected
    assert back.retrievals.schema.equals(arrow_schema("retrievals"))
    assert back.examples.schema.equals(arrow_schema("examples"))


def test_records(tmp_path):
    world = tiny_world()
    path = export_viewer(world["retrievals"], ds.dataset(world["queries"]), ds.dataset(world["examples"]),
                         world["facts"], ds.dataset(world["ground_truth"]), tmp_path / "run.jsonl", query_set="trex")
    records = {r["example_id"]: r for r in map(json.loads, path.read_text().splitlines())}
    assert set(records) == {"f0:prompt0", "f1:prompt0", "f2:prompt0", "free"}
    r = records["f2:prompt0"]
    assert (r["query_set"], r["inputs_plaintext"], r["targets_plaintext"]) == ("trex", "S2 capital is", " O2")
    assert (r["fact_id"], r["relation"], r["c4_frequency"], r["c4_frequency_bucket"]) == ("f2", "capital", 6, 2)
    assert r["proponent_scores"] == sorted(r["proponent_scores"], reverse=True)
    assert r["opponent_scores"] == sorted(r["opponent_scores"])
    assert r["proponents"] == [f"Sentence {e[1:]}: \"quoted\" — ünïcode {int(e[1:]) * 7}" for e in r["proponent_ids"]]
    assert r["proponent_correct"] == [e == "e9" for e in r["proponent_ids"]]
    assert "fact_id" not in records["free"] and "proponent_correct" not in records["free"]


def test_export_refuses_bad_input(tmp_path):
    world = tiny_world()
    run2 = world["retrievals"].set_column(0, world["retrievals"].schema.field("run_id"),
                                          pa.array(["run2"] * world["retrievals"].num_rows))
    two_runs = pa.concat_tables([world["retrievals"], run2])
    with pytest.raises(ValueError, match="one run, not 2"):
        export_viewer(two_runs, world["queries"], world["examples"], None, None, tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match="not in examples"):
        export_viewer(world["retrievals"], world["queries"], world["examples"].slice(0, 5), None, None,
                      tmp_path / "x.jsonl")


# Two records as the authors' BM25/Gecko files hold them: integer ids, no opponents, one record
# without a fact (an ad-hoc query); query 7's correct proponent is at rank 2.
AUTHORS_LINES = [
    {"example_id": 7, "query_set": "prompt0", "inputs_plaintext": "A is in", "targets_plaintext": " B",
     "proponents": ["x A B", "y", "z"], "proponent_ids": [11, 12, 13], "proponent_scores": [9.5, 3, 1.25],
     "fact_id": "f7", "relation": "in", "proponent_correct": [False, True, False]},
    {"example_id": "8", "inputs_plaintext": "C", "targets_plaintext": " D",
     "proponents": ["y"], "proponent_ids": ["12"], "proponent_scores": [0.5]},
]


def test_authors_file_without_opponents(tmp_path):
    """Their BM25/Gecko files: no opponents, integer ids; gzip; evaluated with the same SQL."""
    lines = AUTHORS_LINES
    path = tmp_path / "bm25.jsonl.gz"
    with gzip.open(path, "wt") as out:
        out.write("\n".join(json.dumps(r) for r in lines) + "\n\n")
    back = import_viewer(path, "bm25-authors", "authors-bm25")
    assert back.retrievals.num_rows == 4 and set(back.retrievals.column("kind").to_pylist()) == {"proponent"}
    assert back.queries.column("template").to_pylist() == ["prompt0", "adhoc"]
    assert back.examples.column("example_id").to_pylist() == ["11", "12", "13"]
    assert back.ground_truth.to_pylist() == [{"fact_id": "f7", "example_id": "12"}]
    with ReadOnlySQL({"retrievals": back.retrievals, "queries": back.queries,
                      "ground_truth": back.ground_truth}) as sql:
        mrr = sql.run("""
            SELECT avg(coalesce(first_hit, 0)) AS mrr FROM (
              SELECT q.query_id, max(1.0 / r.rank) FILTER (WHERE g.example_id IS NOT NULL) AS first_hit
              FROM queries q JOIN retrievals r USING (query_id)
              LEFT JOIN ground_truth g ON g.fact_id = q.fact_id AND g.example_id = r.example_id
              WHERE r.kind = 'proponent' GROUP BY q.query_id)""").column("mrr").to_pylist()
    assert mrr == [pytest.approx(0.25)]


GOOD = {"example_id": "q", "inputs_plaintext": "p", "targets_plaintext": "t",
        "proponents": ["a"], "proponent_ids": ["e1"], "proponent_scores": [1.0]}


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({**GOOD, "example_id": None}), "'example_id'"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "inputs_plaintext"}), "'inputs_plaintext'"),
    (json.dumps({**GOOD, "proponent_scores": [1.0, 2.0]}), "differ in length"),
    (json.dumps({**GOOD, "proponent_scores": ["high"]}), r"proponent_scores\[0\] must be a number"),
    (json.dumps({**GOOD, "proponent_ids": [None]}), r"proponent_ids\[0\]"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "proponent_ids"}), "'proponent_ids' missing"),
    (json.dumps({**GOOD, "proponent_correct": [True, False]}), "one bool per proponent"),
    (json.dumps({**GOOD, "opponent_ids": ["e2"]}), "must be lists"),
    (json.dumps(GOOD), "appears twice"),
    (json.dumps({**GOOD, "example_id": "q2", "proponents": ["other text"]}), "another text"),
])
def test_malformed_line_named(tmp_path, bad, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + bad + "\n")
    with pytest.raises(RecordError, match=message) as info:
        import_viewer(path, "m", "r")
    assert str(info.value).startswith(f"{path}:3: ") and "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="no such viewer file"):
        import_viewer(tmp_path / "nope.jsonl", "m", "r")


def test_authors_file_imported_into_a_database_keeps_its_ground_truth(tmp_path):
    """`trackstar-db import` of a results file whose correctness marks are the only ground truth:
    `eval` must score it with them (query 7: first correct proponent at rank 2 -> MRR 0.5; the
    fact-less query is not a fact query), and a later ground-truth rebuild must not drop them."""
    from click.testing import CliRunner

    from trackstar_db import connect
    from trackstar_db.cli import main
    from trackstar_db.sources.facts import rebuild_ground_truth

    lines = AUTHORS_LINES
    path = tmp_path / "bm25.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    runner = CliRunner()
    assert runner.invoke(main, ["init", str(tmp_path / "db")]).exit_code == 0
    result = runner.invoke(main, ["import", str(tmp_path / "db"), str(path), "--method", "bm25-authors"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in runner.invoke(main, ["eval", str(tmp_path / "db"), "--format", "json"]).output.splitlines()]
    assert [(r["run_id"], r["n_queries"]) for r in rows] == [("bm25-authors", 1)]
    assert rows[0]["mrr"] == pytest.approx(0.5) and rows[0]["recall_at_10"] == pytest.approx(1.0)
    db = connect(tmp_path / "db")
    rebuild_ground_truth(db)
    assert db.table("ground_truth").to_pylist() == [{"fact_id": "f7", "example_id": "12"}]
