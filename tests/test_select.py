"""Data selection: the mean query vector equals the mean of the scores and a brute-force
computation from the stored vectors and R; top N, fractions and dropped opponents; JSONL and
Parquet round trips; task files; BM25; the ANN path; one-line errors for bad input."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from trackstar_db.errors import TrackstarError
from trackstar_db.ladder import lookup
from trackstar_db.retrieval.runners import Request, aggregate
from trackstar_db.selection.select import Task


@pytest.fixture(scope="module")
def db(tiny_db_template, tmp_path_factory):
    """The tiny database with gradients (train and queries, both variants) and R fitted."""
    from databases import with_gradients

    return with_gradients(tiny_db_template, tmp_path_factory.mktemp("select"))


def gradient_scores(db, spec, g_q, how="mean-vector"):
    """(ids, mean scores) of the registry's aggregate for the raw query gradients g_q, in scan order."""
    scored = aggregate(db, lookup(spec.name), Request([], [], 1, query_vectors=g_q, aggregate=how))
    return scored.ids, scored.scores


def _stored(db, name):
    from trackstar_db.store.vectors import to_torch

    table = db.table(name)
    return table.column("id").to_pylist(), to_torch(table.column("vector"), db.manifest["gradient_tables"][name]["dtype"])


def brute_force(db, method, query_ids):
    """Mean over the queries of t_train(g_z) . t_query(g_q), from the stored vectors and R, by id."""
    from trackstar_db.ladder import METHODS

    spec = METHODS[method]
    variant = spec.table
    ids, train = _stored(db, f"grads_train_{variant}")
    qids, queries = _stored(db, f"grads_queries_{variant}")
    queries = queries[[qids.index(q) for q in query_ids]].double()
    train = train.double()
    if spec.preconditioner:
        pre = db.gradient_table("train", corrected=variant == "corrected").load_preconditioner(spec.preconditioner)
        dense = lambda power: torch.block_diag(*pre.power(power))  # noqa: E731  (R^power over every block)
        train = train @ dense(spec.train_power) if spec.train_power else train
        queries = queries @ dense(spec.query_power) if spec.query_power else queries
    if spec.unit_norm:
        train = train / train.norm(dim=1, keepdim=True)
        queries = queries / queries.norm(dim=1, keepdim=True)
    return dict(zip(ids, (train @ queries.T).mean(dim=1).tolist()))


def _relation_queries(db, relation):
    return db.sql(f"SELECT q.query_id FROM queries q JOIN facts f USING (fact_id) WHERE f.relation = '{relation}' "
                  "AND q.template = 'prompt0' ORDER BY q.query_id").column("query_id").to_pylist()


@pytest.mark.parametrize("method", ["trackstar", "grad-dot", "trak"])
def test_mean_vector_equals_mean_of_scores_and_brute_force(db, method):
    from trackstar_db.ladder import METHODS
    from trackstar_db.retrieval.runners import stored_query_vectors

    query_ids = _relation_queries(db, "place of birth")
    assert len(query_ids) >= 3
    g_q = stored_query_vectors(db, METHODS[method], query_ids)
    ids, fast = gradient_scores(db, METHODS[method], g_q, "mean-vector")
    same_ids, slow = gradient_scores(db, METHODS[method], g_q, "mean-score")
    assert ids == same_ids
    scale = np.abs(slow).max()
    assert np.allclose(fast, slow, rtol=1e-4, atol=1e-5 * scale)
    want = brute_force(db, method, query_ids)
    assert np.allclose(fast, [want[i] for i in ids], rtol=1e-3, atol=1e-4 * scale)
    # one query: the mean is that query's own score, as a stored run scores it
    from trackstar_db.retrieval.scoring import score_table

    top = score_table(db, METHODS[method], g_q[:1], 5, progress=False)
    _, single = gradient_scores(db, METHODS[method], g_q[:1])
    position = {i: n for n, i in enumerate(ids)}
    assert np.allclose([single[position[i]] for i in top.proponent_ids[0]], top.proponent_scores[0], rtol=1e-4, atol=1e-6)


def test_top_fraction_and_drop_opponents(db):
    task = Task(relation="place of birth")
    want = brute_force(db, "trackstar", _relation_queries(db, "place of birth"))
    ranked = sorted(want, key=lambda i: -want[i])
    n = db.count("examples")
    top = db.select(task, top=25, method="trackstar")
    assert top.rows.column("example_id").to_pylist()[:20] == ranked[:20]  # ties at the cut aside
    assert top.rows.num_rows == 25 and top.n_queries == len(_relation_queries(db, "place of birth"))
    scores = top.rows.column("score").to_numpy()
    assert (np.diff(scores) <= 0).all() and top.rows.column("rank").to_pylist() == list(range(1, 26))
    assert db.select(task, fraction=0.2, method="trackstar").rows.num_rows == round(0.2 * n)
    assert db.select(task, fraction=1.0, method="trackstar").rows.num_rows == n
    dropped = db.select(task, top=30, method="trackstar", drop_opponents=True)
    kept = set(dropped.rows.column("example_id").to_pylist())
    assert len(kept) == n - 30 and not kept & set(ranked[-25:]) and set(ranked[:n - 35]) <= kept


def test_jsonl_and_parquet_round_trip_with_the_examples_fields(db, tmp_path):
    task = Task(bucket=5)
    jsonl = db.select(task, top=12, out=tmp_path / "keep.jsonl").rows
    rows = [json.loads(line) for line in (tmp_path / "keep.jsonl").read_text().splitlines()]
    assert [r["example_id"] for r in rows] == jsonl.column("example_id").to_pylist()
    examples = {r["example_id"]: r for r in db.table("examples").to_pylist()}
    for row in rows:
        assert row["text"] == examples[row["example_id"]]["text"]
        assert row["source"] == examples[row["example_id"]]["source"] and isinstance(row["score"], float)
    db.select(task, top=12, out=tmp_path / "keep.parquet")
    parquet = pq.read_table(tmp_path / "keep.parquet")
    assert parquet.column("example_id").to_pylist() == jsonl.column("example_id").to_pylist()
    assert {"rank", "example_id", "score", "text", "source", "metadata"} <= set(parquet.column_names)


def test_a_task_file_scores_like_the_stored_queries_it_repeats(db, tmp_path):
    queries = db.table("queries").sort_by("query_id").slice(0, 3).to_pylist()
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps({"prompt": q["prompt"], "target": q["target"]}) + "\n" for q in queries))
    from_file = db.select(Task(examples=path), top=20, method="r-train").rows
    stored = db.select(Task(query_ids=tuple(q["query_id"] for q in queries), template=None), top=20,
                       method="r-train").rows
    assert np.allclose(from_file.column("score").to_numpy(), stored.column("score").to_numpy(), rtol=1e-3, atol=1e-5)
    assert from_file.column("example_id").to_pylist()[:10] == stored.column("example_id").to_pylist()[:10]


def test_bm25_is_the_mean_of_the_per_query_scores(db):
    from trackstar_db.retrieval.embedding import query_text
    from trackstar_db.store.bm25 import BM25Index

    task = Task(relation="employer")
    queries = db.sql("SELECT q.prompt, q.target FROM queries q JOIN facts f USING (fact_id) "
                     "WHERE f.relation = 'employer' AND q.template = 'prompt0'").to_pylist()
    index, total = BM25Index(db.path), {}
    for q in queries:
        for example_id, score in index.search(query_text(q["prompt"], q["target"]), 1000):
            total[example_id] = total.get(example_id, 0.0) + score / len(queries)
    rows = db.select(task, top=10, method="bm25").rows
    assert np.allclose(rows.column("score").to_numpy(), sorted(total.values(), reverse=True)[:10], rtol=1e-5)


def test_ann_selection_agrees_with_the_exact_scan(db):
    from trackstar_db.retrieval.ann import AnnOptions
    from trackstar_db.retrieval.ann_build import build_index

    build_index(db, "trackstar", "ivf_flat", num_partitions=2, progress=False)
    task = Task(relation="place of birth")
    exact = db.select(task, top=15, method="trackstar").rows
    approx = db.select(task, top=15, method="trackstar", ann=AnnOptions(nprobes=2))
    assert approx.method == "trackstar-ann"
    assert approx.rows.column("example_id").to_pylist() == exact.column("example_id").to_pylist()
    assert np.allclose(approx.rows.column("score").to_numpy(), exact.column("score").to_numpy(), atol=2e-3)
    with pytest.raises(TrackstarError, match="^ann serves"):
        db.select(task, top=5, method="trackstar", ann=AnnOptions(), drop_opponents=True)


def _cli(*args):
    from trackstar_db.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("args, message", [
    (["--fraction", "0"], "--fraction must be in (0, 1], not 0.0"),
    (["--fraction", "1.5"], "--fraction must be in (0, 1], not 1.5"),
    (["--top", "0"], "--top must be >= 1, not 0"),
    (["--top", "-3"], "--top must be >= 1, not -3"),
    (["--top", "3", "--fraction", "0.5"], "--top or --fraction: give exactly one of them"),
    ([], "--top or --fraction: give exactly one of them"),
    (["--top", "3", "--relation", "favourite colour"], "unknown task relation 'favourite colour'; relations:"),
    (["--top", "3", "--query-id", "nope"], "unknown task query id 'nope'"),
    (["--top", "3", "--template", "prompt9"], "unknown task template 'prompt9'"),
    (["--top", "3", "--method", "embedding"], "select scores with a gradient method"),
    (["--top", "3", "--out", "DB/keep.jsonl"], "inside the database directory"),
    (["--top", "3", "--out", "DB/sub/keep.parquet"], "inside the database directory"),
    (["--top", "3", "--out", "OUT/keep.csv"], "the output must end in .jsonl or .parquet"),
])
def test_bad_input_is_one_line_and_changes_nothing(db, tmp_path, args, message):
    before = {name: db.count(name) for name in db.table_names()}
    args = [a.replace("DB", str(db.path)).replace("OUT", str(tmp_path)) for a in args]
    if "--out" not in args:
        args += ["--out", tmp_path / "keep.jsonl"]
    result = _cli("select", db.path, *args)
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert {name: db.count(name) for name in db.table_names()} == before
    assert not (tmp_path / "keep.jsonl").exists()


def test_task_file_errors_name_the_line(db, tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text('{"prompt": "a", "target": "b"}\n{"prompt": "c"}\n')
    result = _cli("select", db.path, "--top", 3, "--task-file", path, "--out", tmp_path / "k.jsonl")
    assert result.exit_code != 0 and f"{path}:2: missing field 'target'" in result.output


def test_cli_select_writes_what_the_api_returns(db, tmp_path):
    result = _cli("select", db.path, "--fraction", "0.1", "--relation", "employer", "--method", "trackstar",
                  "--out", tmp_path / "keep.jsonl")
    assert result.exit_code == 0, result.output
    assert "selected for queries with relation 'employer'" in result.output and "mean-vector" in result.output
    written = [json.loads(line)["example_id"] for line in (tmp_path / "keep.jsonl").read_text().splitlines()]
    want = db.select(Task(relation="employer"), fraction=0.1, method="trackstar").rows
    assert written == want.column("example_id").to_pylist()


def _bm25_brute_force(db, task):
    """Mean over the task's query texts of each example's BM25 score, from one search per text."""
    from trackstar_db.retrieval.embedding import query_text
    from trackstar_db.selection.select import task_queries
    from trackstar_db.store.bm25 import BM25Index

    queries = task_queries(db, task).to_pylist()
    index, total = BM25Index(db.path), dict.fromkeys(db.table("examples").column("example_id").to_pylist(), 0.0)
    for q in queries:
        for example_id, score in index.search(query_text(q["prompt"], q["target"]), len(total)):
            total[example_id] += score / len(queries)
    return total


@pytest.mark.parametrize("method", ["grad-cos", "trackstar", "bm25"])
def test_select_of_every_example_equals_the_brute_force_mean(db, method):
    """Through the registry's aggregate, select(fraction=1) scores every example with its mean
    score over the task's queries, as computed here from the stored vectors and R (or one BM25
    search per query text), and ranks them best first."""
    task = Task(relation="place of birth")
    chosen = db.select(task, fraction=1.0, method=method)
    want = (_bm25_brute_force(db, task) if method == "bm25"
            else brute_force(db, method, _relation_queries(db, "place of birth")))
    ids, scores = chosen.rows.column("example_id").to_pylist(), chosen.rows.column("score").to_numpy()
    assert sorted(ids) == sorted(want) and chosen.n_scored == len(want)
    scale = max(abs(v) for v in want.values())
    assert np.allclose(scores, [want[i] for i in ids], rtol=1e-3, atol=1e-4 * scale)
    assert (np.diff(scores) <= 0).all()
    assert chosen.aggregate == ("mean-score" if method == "bm25" else "mean-vector") and chosen.method == method
