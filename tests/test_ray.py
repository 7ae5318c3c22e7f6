"""The Ray engine (trackstar_db/distributed): same ids, vectors, R and rankings as one process.

The fragment-range and merge tests run without Ray; the rest start a local Ray cluster of
2 CPUs (skipped cleanly when the `ray` extra is not installed).
"""

import os
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch

from trackstar_db.distributed.ranges import fragment_ranges, range_batches
from trackstar_db.distributed.scan import merge_topk
from trackstar_db.featurizer.config import FeaturizerConfig
from trackstar_db.retrieval.topk import search

CONFIG = FeaturizerConfig(dim=1024, correction="adam-factored")


# -- without Ray: ranges cover the scan in order; merged top-k equals one scan's -------------
def test_fragment_ranges_visit_the_rows_in_scan_order(tmp_path):
    import lance

    rng = np.random.default_rng(0)
    sizes = [5, 1, 17, 3, 9, 2]
    for i, n in enumerate(sizes):
        rows = pa.table({"id": [f"r{i}-{j}" for j in range(n)],
                         "vector": pa.FixedSizeListArray.from_arrays(pa.array(rng.random(n * 4, np.float32)), 4)})
        lance.write_dataset(rows, tmp_path / "t.lance", mode="append" if i else "create")
    dataset = lance.dataset(tmp_path / "t.lance")
    dataset.delete("id = 'r2-3'")  # a deletion vector: ranges count live rows
    dataset = lance.dataset(tmp_path / "t.lance")
    whole = dataset.to_table(columns=["id"]).column("id").to_pylist()
    for parts in (1, 2, 3, 4, 6, 10):
        ranges = fragment_ranges(dataset, parts)
        assert 1 <= len(ranges) <= min(parts, len(sizes))
        seen = []
        for r in ranges:
            assert r.offset == len(seen)
            ids = [i for batch_ids, _ in range_batches(r, "float32", batch_rows=4) for i in batch_ids]
            assert len(ids) == r.rows
            seen += ids
        assert seen == whole


def test_merged_range_results_equal_one_scan_with_ties():
    rng = np.random.default_rng(1)
    x = rng.integers(-2, 3, size=(61, 8)).astype(np.float32)  # small integers: many tied scores
    q = torch.from_numpy(rng.integers(-2, 3, size=(5, 8)).astype(np.float32))
    ids = [f"e{i}" for i in range(len(x))]
    whole = search(q, [(ids, torch.from_numpy(x))], k=7)
    for cuts in ([0, 61], [0, 10, 61], [0, 3, 4, 30, 61], [0, 20, 40, 61]):
        parts = [search(q, [(ids[a:b], torch.from_numpy(x[a:b]))], k=7) for a, b in zip(cuts, cuts[1:])]
        merged = merge_topk(parts, 7)
        assert merged.proponent_ids == whole.proponent_ids
        assert merged.opponent_ids == whole.opponent_ids
        assert np.array_equal(merged.proponent_scores, whole.proponent_scores)
        assert np.array_equal(merged.opponent_scores, whole.opponent_scores)


# -- on a local Ray cluster -------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def _copy(template, root, name):
    shutil.copytree(template / "model", root / name / "model")
    shutil.copytree(template / "db", root / name / "db")
    from trackstar_db import connect

    db = connect(root / name / "db")
    db.set_model(root / name / "model")
    return db


@pytest.fixture(scope="module")
def local_db(tiny_db_template, tmp_path_factory):
    """Gradients featurized by one process; the training split in 2 shards of small commits
    (many fragments: an unsharded run compacts them into one)."""
    from trackstar_db.gradients.worker import GradientJob, ingest_gradients

    db = _copy(tiny_db_template, tmp_path_factory.mktemp("ray"), "local")
    for i in range(2):
        ingest_gradients(db, CONFIG, GradientJob("train", batch_size=8, commit_rows=48, shard=(i, 2)), progress=False)
    ingest_gradients(db, CONFIG, GradientJob("queries", batch_size=8), progress=False)
    return db


def _by_id(db, name):
    from trackstar_db.store.vectors import to_torch

    table = db.table(name).sort_by("id")
    return table.column("id").to_pylist(), to_torch(table.column("vector"), db.manifest["gradient_tables"][name]["dtype"])


@pytest.mark.slow
def test_ray_ingest_killed_worker_resumes_and_matches_one_process(ray_cluster, local_db, tiny_db_template,
                                                                  tmp_path, monkeypatch):
    from trackstar_db import connect
    from trackstar_db.distributed.ingest import ingest_gradients
    from trackstar_db.errors import TrackstarError
    from trackstar_db.gradients.worker import GradientJob

    db = _copy(tiny_db_template, tmp_path, "ray")
    n = db.count("examples")
    job = GradientJob("train", batch_size=8, commit_rows=24)
    monkeypatch.setenv("TRACKSTAR_FAULT", "distributed.fragments:2")  # each worker dies at its 2nd write
    with pytest.raises(TrackstarError, match="Ray workers died"):
        ingest_gradients(db, CONFIG, job, progress=False)
    monkeypatch.delenv("TRACKSTAR_FAULT")
    db = connect(db.path)
    assert db.manifest["featurizer"]["config"] == CONFIG.to_dict()  # actor 0 recorded the settings
    done = db.count("grads_train_corrected")
    assert 0 < done < n  # the first batch of each worker was committed, the rest was not
    from click.testing import CliRunner

    from trackstar_db.cli import main

    result = CliRunner().invoke(main, ["ingest", "gradients", str(db.path), "--engine", "ray", "--device", "cpu",
                                       "--batch-size", "8", "--commit-rows", "24"])  # the rerun, as typed
    assert result.exit_code == 0, result.output
    assert f"featurized {n - done:,} train rows" in result.output  # only what was missing
    assert f"grads_train_corrected={n:,}, grads_train_uncorrected={n:,}" in result.output
    for name in ("grads_train_corrected", "grads_train_uncorrected"):
        ids, vectors = _by_id(db, name)
        local_ids, local = _by_id(local_db, name)
        assert ids == local_ids and len(set(ids)) == n  # same ids, no duplicates
        assert bool(((vectors - local).norm(dim=1) <= 1e-4 * local.norm(dim=1)).all())
    assert connect(db.path).manifest["featurizer"] == local_db.manifest["featurizer"]


@pytest.mark.slow
def test_ray_fit_and_retrieve_match_one_process(ray_cluster, local_db):
    from trackstar_db.distributed import fit as ray_fit
    from trackstar_db.distributed.scan import score_table as ray_score
    from trackstar_db.gradients.fit import fit
    from trackstar_db.retrieval.methods import LADDER
    from trackstar_db.retrieval.runners import stored_query_vectors
    from trackstar_db.retrieval.scoring import score_table

    table = local_db.gradient_table("train")
    assert len(table.dataset().get_fragments()) > 2  # the scans below really split the table
    fit(local_db)
    pre = table.load_preconditioner("mixed")
    spans = pre.spans
    acc = ray_fit.gram(table, spans, workers=2)
    from trackstar_db.featurizer.preconditioner import GramAccumulator

    local = GramAccumulator(spans)
    for _, x in table.batches():
        local.update(x)
    assert acc.n == local.n == table.count()
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(acc.sums, local.sums))
    norms = ray_fit.row_norms(table, pre, [-0.5], workers=3)
    assert torch.allclose(norms[-0.5], pre.row_norms[-0.5], rtol=1e-5)
    query_ids = sorted(local_db.table("queries", columns=["query_id"]).column("query_id").to_pylist())[:9]
    for spec in LADDER:
        g_q = stored_query_vectors(local_db, spec, query_ids)
        one = score_table(local_db, spec, g_q, k=10, progress=False)
        for workers in (2, 3):
            many = ray_score(local_db, spec, g_q, k=10, workers=workers)
            assert many.proponent_ids == one.proponent_ids, spec.name
            assert many.opponent_ids == one.opponent_ids, spec.name
            assert np.allclose(many.proponent_scores, one.proponent_scores, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_cli_fit_and_retrieve_with_engine_ray_as_a_user_types_them(ray_cluster, local_db):
    from click.testing import CliRunner

    from trackstar_db import connect
    from trackstar_db.cli import main

    runner = CliRunner()
    path = str(local_db.path)
    for args in (["fit", path, "--engine", "ray"],
                 ["retrieve", path, "--method", "trackstar", "--k", "5", "--engine", "ray", "--run", "ts-ray"],
                 ["retrieve", path, "--method", "trackstar", "--k", "5", "--run", "ts-local"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
    rows = connect(path).sql("SELECT a.example_id AS a, b.example_id AS b, a.score AS sa, b.score AS sb "
                             "FROM retrievals a JOIN retrievals b USING (query_id, kind, rank) "
                             "WHERE a.run_id = 'ts-ray' AND b.run_id = 'ts-local'")
    assert rows.num_rows == 2 * 5 * connect(path).count("queries") // 3 > 0  # prompt0 queries, both kinds
    assert rows.column("a").to_pylist() == rows.column("b").to_pylist()
    assert np.allclose(rows.column("sa").to_numpy(), rows.column("sb").to_numpy(), rtol=1e-5, atol=1e-7)
    bad = runner.invoke(main, ["fit", path, "--engine", "spark"])
    assert bad.exit_code != 0 and "--engine" in bad.output


@pytest.mark.slow
def test_ray_ingest_with_a_token_budget_equals_the_local_worker(ray_cluster, local_db, tiny_db_template, tmp_path):
    """The actors run the local worker's loop: a token budget (batches of mixed row counts),
    tokenizing ahead and writing behind; the table is the local worker's, row for row."""
    from trackstar_db.distributed.ingest import ingest_gradients
    from trackstar_db.gradients.worker import GradientJob

    db = _copy(tiny_db_template, tmp_path, "budget")
    for split in ("train", "queries"):
        totals = ingest_gradients(db, CONFIG, GradientJob(split, batch_size=8, batch_tokens=160, commit_rows=40),
                                  workers=2, progress=False)
        assert totals["rows"] == db.count("examples" if split == "train" else "queries")
    for name in ("grads_train_corrected", "grads_train_uncorrected", "grads_queries_corrected"):
        table, local = db.table(name).sort_by("id"), local_db.table(name).sort_by("id")
        assert table.column("id").to_pylist() == local.column("id").to_pylist()
        assert table.column("n_tokens").to_pylist() == local.column("n_tokens").to_pylist()
        ids, vectors = _by_id(db, name)
        _, expected = _by_id(local_db, name)
        assert bool(((vectors - expected).norm(dim=1) <= 1e-4 * expected.norm(dim=1)).all()), name
