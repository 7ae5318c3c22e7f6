"""Exact streaming top-k against a brute-force numpy ranking."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from trackstar_db.errors import TrackstarError
from trackstar_db.retrieval.topk import search
from trackstar_db.store import vectors
from trackstar_db.store.vectors import vector_batches


def brute_force(q: np.ndarray, x: np.ndarray, k: int):
    """Ranking by score (desc for proponents, asc for opponents), ties by stream position."""
    scores = q.astype(np.float64) @ x.astype(np.float64).T
    n = x.shape[0]
    best = [sorted(range(n), key=lambda j: (-row[j], j))[:k] for row in scores]
    worst = [sorted(range(n), key=lambda j: (row[j], j))[:k] for row in scores]
    return best, worst, scores


def split(ids, x, sizes):
    start = 0
    for size in sizes:
        yield ids[start:start + size], torch.from_numpy(x[start:start + size])
        start += size


def run(q, x, k, sizes, **kw):
    ids = [f"e{i}" for i in range(len(x))]
    return search(torch.from_numpy(q), split(ids, x, sizes), k, **kw)


@pytest.mark.parametrize("sizes", [[50], [1] * 50, [7, 13, 30], [49, 1]])
@pytest.mark.parametrize("k", [1, 5, 80])
def test_matches_brute_force(sizes, k):
    rng = np.random.default_rng(k + len(sizes))
    q, x = rng.standard_normal((4, 16)).astype(np.float32), rng.standard_normal((50, 16)).astype(np.float32)
    result = run(q, x, k, sizes)
    best, worst, scores = brute_force(q, x, k)
    assert result.proponent_ids == [[f"e{j}" for j in row] for row in best]
    assert result.opponent_ids == [[f"e{j}" for j in row] for row in worst]
    for row in range(4):
        np.testing.assert_allclose(result.proponent_scores[row], scores[row, best[row]], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(result.opponent_scores[row], scores[row, worst[row]], rtol=1e-5, atol=1e-5)
    assert len(result.proponent_ids[0]) == min(k, 50)


@pytest.mark.parametrize("sizes", [[40], [3] * 13 + [1], [1] * 40, [25, 15]])
def test_ties_break_by_stream_position(sizes):
    rng = np.random.default_rng(0)
    x = rng.integers(-2, 3, size=(40, 3)).astype(np.float32)  # many exact duplicates and equal scores
    q = np.array([[1, 0, 0], [1, 1, 1], [0, 0, 0]], np.float32)  # the last ties everything
    result = run(q, x, 6, sizes)
    best, worst, _ = brute_force(q, x, 6)
    assert result.proponent_ids == [[f"e{j}" for j in row] for row in best]
    assert result.opponent_ids == [[f"e{j}" for j in row] for row in worst]


def test_transform_and_arrow_rows():
    rng = np.random.default_rng(1)
    q, x = rng.standard_normal((2, 8)).astype(np.float32), rng.standard_normal((30, 8)).astype(np.float32)
    result = run(q, x, 3, [10, 20], transform=lambda t: 2 * t)
    best, _, scores = brute_force(q, 2 * x, 3)
    assert result.proponent_ids[1] == [f"e{j}" for j in best[1]]
    table = result.to_arrow(["qa", "qb"], run_id="r1", method="grad-dot")
    assert table.num_rows == 12
    assert table.schema.field("rank").type == pa.int32()
    rows = table.filter(pa.compute.equal(table["query_id"], "qb")).to_pylist()
    props = [r for r in rows if r["kind"] == "proponent"]
    assert [r["rank"] for r in props] == [1, 2, 3]
    assert [r["example_id"] for r in props] == [f"e{j}" for j in best[1]]
    assert {r["run_id"] for r in rows} == {"r1"}


def test_vector_batches_from_arrow_float16():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((25, 8)).astype(np.float16)
    table = pa.table({"id": [f"e{i}" for i in range(25)],
                      "vector": vectors.to_arrow(torch.from_numpy(x.astype(np.float32)), "float16")})
    batches = list(vector_batches(table, dtype="float16", batch_size=10))
    assert [len(ids) for ids, _ in batches] == [10, 10, 5]
    np.testing.assert_array_equal(torch.cat([v for _, v in batches]).numpy(), x.astype(np.float32))
    q = rng.standard_normal((3, 8)).astype(np.float32)
    result = search(torch.from_numpy(q), vector_batches(table, dtype="float16", batch_size=7), 4)
    best, _, _ = brute_force(q, x.astype(np.float32), 4)
    assert result.proponent_ids == [[f"e{j}" for j in row] for row in best]


def test_empty_corpus_and_bad_input():
    q = torch.randn(2, 4)
    result = search(q, iter([]), 5)
    assert result.proponent_ids == [[], []] and result.to_arrow(["a", "b"], "r", "m").num_rows == 0
    with pytest.raises(TrackstarError, match="non-finite score for example 'e1'"):
        search(q, iter([(["e0", "e1"], torch.tensor([[1.0, 0, 0, 0], [float("nan"), 0, 0, 0]]))]), 1)
    with pytest.raises(TrackstarError, match="dim"):
        search(q, iter([(["e0"], torch.ones(1, 3))]), 1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(3)
    q, x = rng.standard_normal((5, 32)).astype(np.float32), rng.standard_normal((300, 32)).astype(np.float32)
    ids = [f"e{i}" for i in range(300)]
    cpu = search(torch.from_numpy(q), split(ids, x, [100, 200]), 10)
    gpu = search(torch.from_numpy(q).cuda(), split(ids, x, [100, 200]), 10)
    assert cpu.proponent_ids == gpu.proponent_ids and cpu.opponent_ids == gpu.opponent_ids
