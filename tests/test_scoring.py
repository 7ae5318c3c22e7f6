"""Every rung's stored run against brute force from the stored vectors and the saved R; one-prompt
queries against stored runs; stale whitened row norms refused; half-precision reads.

The brute force here is independent of the scan: it reads whole tables, builds the dense
block-diagonal R from the saved eigendecomposition, damps it (R + damping * trace(R) / d * I),
takes powers by numpy eigh in float64 and computes unit?(g R^p) on each side explicitly.
(Checked by hand once: flipping the sign of r-train's train power in methods.LADDER, or
dropping R from the query side in scoring.Scoring.query_side, makes these tests fail.)
"""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner
from databases import copy_db

from trackstar_db.cli import main
from trackstar_db.errors import TrackstarError
from trackstar_db.featurizer.config import FeaturizerConfig
from trackstar_db.gradients.fit import fit
from trackstar_db.gradients.worker import GradientJob, ingest_gradients
from trackstar_db.retrieval.methods import LADDER
from trackstar_db.retrieval.runs import RetrieveOptions, retrieve
from trackstar_db.store import vectors
from trackstar_db.store.vectors import to_torch

CONFIG = FeaturizerConfig(dim=1024, correction="adam-factored")
K = 8
DAMPING = 0.1  # what the fixture fits with; the brute force damps with the value a test names, never the saved one


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_db_template):
    """The tiny database with train and query gradients (both variants) and every R fitted."""
    root = tmp_path_factory.mktemp("scoring")
    db = copy_db(tiny_db_template, root)
    ingest_gradients(db, CONFIG, GradientJob("train", batch_size=32), progress=False)
    ingest_gradients(db, CONFIG, GradientJob("queries", batch_size=32), progress=False)
    fit(db, damping=DAMPING)
    return root


@pytest.fixture
def db(fitted, tmp_path):
    return copy_db(fitted, tmp_path)


def stored(db, name):
    """{id: float64 row} of a gradient table, read whole."""
    table = db.table(name, columns=["id", "vector"])
    x = to_torch(table.column("vector"), db.manifest["gradient_tables"][name]["dtype"]).double().numpy()
    return dict(zip(table.column("id").to_pylist(), x))


def r_power(db, spec, power, damping):
    """R^power of the saved R, dense, from numpy eigh of the matrix damped by `damping` (chosen by
    the test, so a fit that ignored its damping argument disagrees)."""
    from trackstar_db.featurizer.preconditioner import Preconditioner

    variant = "corrected" if spec.table == "corrected" else "uncorrected"
    path = db.gradient_table("train", variant == "corrected").preconditioner_path(spec.preconditioner)
    pre = Preconditioner.load(path)
    r = np.zeros((pre.dim, pre.dim))
    for (offset, size), block in zip(pre.spans, pre.matrices()):
        r[offset: offset + size, offset: offset + size] = block.numpy()
    damped = r + damping * np.trace(r) / pre.dim * np.eye(pre.dim)
    w, v = np.linalg.eigh(damped)
    return (v * w ** power) @ v.T


def brute_force(db, spec, query_ids, damping=DAMPING):
    """Scores [nq, n_train] (float64) and the train ids, computed the slow, explicit way."""
    variant = "corrected" if spec.table == "corrected" else "uncorrected"
    train = stored(db, f"grads_train_{variant}")
    queries = stored(db, f"grads_queries_{variant}")
    ids = list(train)
    g = np.stack([train[i] for i in ids])
    q = np.stack([queries[i] for i in query_ids])

    def side(x, power):
        if power != 0:
            x = x @ r_power(db, spec, power, damping)
        return x / np.linalg.norm(x, axis=1, keepdims=True) if spec.unit_norm else x

    return side(q, spec.query_power) @ side(g, spec.train_power).T, ids


def check_run(db, spec, rows, query_ids, k=K, damping=DAMPING):
    scores, ids = brute_force(db, spec, query_ids, damping)
    column = {i: c for c, i in enumerate(ids)}
    by_query = {}
    for r in rows.to_pylist():
        by_query.setdefault((r["query_id"], r["kind"]), []).append(r)
    for row, qid in enumerate(query_ids):
        for kind, sign in (("proponent", -1), ("opponent", 1)):
            hits = sorted(by_query[(qid, kind)], key=lambda r: r["rank"])
            got = np.array([h["score"] for h in hits])
            want_top = np.sort(sign * scores[row])[:k] * sign  # best first
            scale = np.abs(scores[row]).max()
            np.testing.assert_allclose(got, want_top, atol=1e-5 * scale, err_msg=f"{spec.name} {qid} {kind}")
            recomputed = np.array([scores[row, column[h["example_id"]]] for h in hits])
            np.testing.assert_allclose(got, recomputed, atol=1e-5 * scale, err_msg=f"{spec.name} {qid} {kind} ids")


@pytest.mark.parametrize("spec", LADDER, ids=[s.name for s in LADDER])
def test_stored_run_equals_brute_force(db, spec):
    _, rows = retrieve(db, spec.name, RetrieveOptions(k=K))
    query_ids = sorted(set(rows.column("query_id").to_pylist()))
    assert len(query_ids) == db.sql("SELECT count(*) AS n FROM queries WHERE template = 'prompt0'").column("n")[0].as_py()
    check_run(db, spec, rows, query_ids)


def test_cli_retrieve_all_rungs_then_one_prompt_queries_agree(db):
    """`retrieve --method all` as typed, then Database.query for one fact gives the same top ids and scores."""
    result = CliRunner().invoke(main, ["retrieve", str(db.path), "--method", "grad-dot", "--method", "grad-cos",
                                       "--method", "trak", "--method", "opt-cos", "--method", "r-train",
                                       "--method", "trackstar", "--k", str(K), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    query = next(q for q in db.table("queries").sort_by("query_id").to_pylist() if q["template"] == "prompt0")
    for spec in LADDER:
        run = db.sql(f"SELECT kind, rank, example_id, score FROM retrievals WHERE run_id = '{spec.name}' "
                     f"AND query_id = '{query['query_id']}' ORDER BY kind, rank").to_pylist()
        hits = db.query(query["prompt"], query["target"], k=K, method=spec.name).to_pylist()
        assert {h["method"] for h in hits} == {spec.name}
        mine = sorted(hits, key=lambda h: (h["kind"], h["rank"]))
        assert len(mine) == len(run) == 2 * K
        scale = max(abs(r["score"]) for r in run)
        for h, r in zip(mine, run):
            assert abs(h["score"] - r["score"]) <= 1e-3 * scale, (spec.name, h, r)
            # the same example at each rank, unless two scores tie within float noise
            assert h["example_id"] == r["example_id"] or any(
                o["example_id"] == h["example_id"] and abs(o["score"] - h["score"]) <= 1e-3 * scale for o in run)


def append_examples(db, root, n=6):
    """Ingest a few more sentences and their gradients: the training tables change."""
    from trackstar_db.sources.corpus import ingest_corpus

    path = root / "more.jsonl"
    with path.open("w") as handle:
        for i in range(n):
            handle.write(json.dumps({"sentence_id": f"extra-{i}", "text": f"An extra sentence number {i} about places."}) + "\n")
    ingest_corpus(db, [path], progress=False)
    ingest_gradients(db, None, GradientJob("train", batch_size=32), progress=False)


def test_rows_appended_after_fit_are_refused_then_refit_serves_them(db, tmp_path):
    fitted = db.gradient_table("train").preconditioner_path("mixed")  # named by its content
    before = fitted.read_bytes()
    append_examples(db, tmp_path)
    for name in ("r-train", "trackstar"):
        with pytest.raises(TrackstarError, match="changed since R was fitted.*trackstar-db fit"):
            retrieve(db, name, RetrieveOptions(k=K))
    # as a user sees it: one line, saying what to run
    result = CliRunner().invoke(main, ["retrieve", str(db.path), "--method", "trackstar", "--device", "cpu"])
    assert result.exit_code != 0
    message = result.output.strip()
    assert len(message.splitlines()) == 1 and "changed since R was fitted" in message and "trackstar-db fit" in message
    # rungs whose train side needs no whitened norm still scan (their norms come from the rows)
    retrieve(db, "opt-cos", RetrieveOptions(k=K))
    fit(db)  # the refit stores norms for every row, the new ones included
    for name in ("r-train", "trackstar"):
        _, rows = retrieve(db, name, RetrieveOptions(k=K), replace=True)
        spec = next(s for s in LADDER if s.name == name)
        check_run(db, spec, rows, sorted(set(rows.column("query_id").to_pylist())))
    # an R file from before the append put back under the refit's name (a stale copy): refused, not silently mixed
    db.gradient_table("train").preconditioner_path("mixed").write_bytes(before)
    with pytest.raises(TrackstarError, match="changed since R was fitted|not the file fitted"):
        retrieve(db, "trackstar", RetrieveOptions(k=K), replace=True)


@pytest.mark.parametrize("damping", [0.5, 0.2])
def test_refit_with_other_damping_keeps_scores_exact(db, damping):
    fit(db, damping=damping)
    spec = next(s for s in LADDER if s.name == "trackstar")
    _, rows = retrieve(db, "trackstar", RetrieveOptions(k=K))
    query_ids = sorted(set(rows.column("query_id").to_pylist()))
    check_run(db, spec, rows, query_ids, damping=damping)
    # the brute force can tell the dampings apart: the fixture's damping does not match this run
    with pytest.raises(AssertionError):
        check_run(db, spec, rows, query_ids, damping=DAMPING)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_to_torch_reads_every_dtype_zero_copy_and_sliced(dtype):
    x = torch.randn(37, 16)
    column = vectors.to_arrow(x, dtype)
    want = x.to({"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]).float()
    assert torch.equal(vectors.to_torch(column, dtype), want)
    native = vectors.to_torch(column, dtype, native=True)
    assert native.dtype != torch.float32 or dtype == "float32"
    assert torch.equal(native.float(), want)
    sliced = column.slice(5, 7)  # an offset into the child buffer
    assert torch.equal(vectors.to_torch(sliced, dtype), want[5:12])
    chunked = pa.chunked_array([column.slice(0, 3), column.slice(3)])
    assert torch.equal(vectors.to_torch(chunked, dtype), want)
    with pytest.raises(TrackstarError, match="dtype"):
        vectors.to_torch(column, "float32" if dtype != "float32" else "float16")


def test_query_with_ann_matches_the_exact_query(db):
    """`query --ann` as typed: an IVF_FLAT index searched over all its partitions returns the
    exact top ids; its scores are dot products of the float16 unit vectors."""
    from trackstar_db.retrieval.ann_build import build_index

    build_index(db, "trackstar", kind="ivf_flat", num_partitions=2, progress=False)
    query = next(q for q in db.table("queries").sort_by("query_id").to_pylist() if q["template"] == "prompt0")
    exact = db.query(query["prompt"], query["target"], k=K, method="trackstar").to_pylist()
    result = CliRunner().invoke(main, ["query", str(db.path), "--prompt", query["prompt"], "--target", query["target"],
                                       "--method", "trackstar", "--k", str(K), "--ann", "--nprobes", "2",
                                       "--device", "cpu", "--format", "json"])
    assert result.exit_code == 0, result.output
    approx = [json.loads(line) for line in result.stdout.splitlines()]
    for kind in ("proponent", "opponent"):
        want = [h for h in exact if h["kind"] == kind]
        got = [h for h in approx if h["kind"] == kind]
        assert [h["example_id"] for h in got] == [h["example_id"] for h in want] or \
            np.allclose([h["score"] for h in got], [h["score"] for h in want], atol=2e-3)
        np.testing.assert_allclose([h["score"] for h in got], [h["score"] for h in want], atol=2e-3)
