"""Preconditioner R against an explicit numpy computation, plus power and file round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trackstar_db.featurizer import Preconditioner, fit_preconditioner

SPANS = [(0, 6), (6, 4), (10, 8)]
DIM = 18


def stream(seed, n, scale=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=g) * (scale if scale is not None else torch.linspace(0.2, 3.0, DIM))
    return [x[i: i + 7] for i in range(0, n, 7)]  # uneven batches


def numpy_reference(train, queries, spans, k, damping, power):
    """Explicit R_mix^power, dense [d, d] (zeros off the blocks)."""
    t = np.concatenate([x.numpy() for x in train]).astype(np.float64)
    q = np.concatenate([x.numpy() for x in queries]).astype(np.float64)
    blocks_t = [t[:, o:o + s].T @ t[:, o:o + s] / len(t) for o, s in spans]
    blocks_q = [q[:, o:o + s].T @ q[:, o:o + s] / len(q) for o, s in spans]
    s_t = np.sort(np.concatenate([np.linalg.eigvalsh(b) for b in blocks_t]))[::-1]
    s_q = np.sort(np.concatenate([np.linalg.eigvalsh(b) for b in blocks_q]))[::-1]
    lam = s_t[k] / (s_t[k] + s_q[k])
    mixed = [lam * bq + (1 - lam) * bt for bt, bq in zip(blocks_t, blocks_q)]
    mean = sum(np.trace(m) for m in mixed) / DIM
    out = np.zeros((DIM, DIM))
    for (o, s), m in zip(spans, mixed):
        w, u = np.linalg.eigh(m)
        out[o:o + s, o:o + s] = (u * (w + damping * mean) ** power) @ u.T
    return lam, out


@pytest.mark.parametrize("kind", ["block", "dense"])
@pytest.mark.parametrize("power", [-0.5, -1.0])
def test_matches_numpy(kind, power):
    train, queries = stream(0, 50), stream(1, 30, scale=torch.linspace(3.0, 0.1, DIM))
    spans = SPANS if kind == "block" else [(0, DIM)]
    pre = fit_preconditioner(train, queries, dim=DIM, spans=SPANS, kind=kind, damping=0.01, k=3)
    lam, matrix = numpy_reference(train, queries, spans, 3, 0.01, power)
    assert pre.params["lambda"] == pytest.approx(lam, rel=1e-9)
    assert pre.params["n_train"] == 50 and pre.params["n_eval"] == 30
    x = torch.randn(5, DIM, dtype=torch.float64)
    np.testing.assert_allclose(pre.apply(x, power).numpy(), x.numpy() @ matrix, rtol=1e-8, atol=1e-10)


def test_without_queries_is_r_train():
    train = stream(2, 40)
    pre = fit_preconditioner(train, dim=DIM, spans=SPANS)
    t = torch.cat(train).double()
    for (o, s), m in zip(SPANS, pre.matrices()):
        torch.testing.assert_close(m, t[:, o:o + s].T @ t[:, o:o + s] / 40)
    assert pre.params["lambda"] == 0.0 and pre.params["k"] == 1


def test_whitened_row_norms_and_their_file_round_trip(tmp_path):
    """The row norms stored with R (used by the pure scan) equal |x (R + d mean I)^-1/2| computed
    with numpy's inverse of the explicit damped matrix, and survive save/load with the version."""
    train, queries = stream(3, 60), stream(4, 20)
    pre = fit_preconditioner(train, queries, dim=DIM, spans=SPANS, damping=1e-2, k=2)
    x = torch.cat(train).double()
    _, inverse = numpy_reference(train, queries, SPANS, 2, 1e-2, -1.0)  # (R_damped)^-1, dense
    want = np.sqrt(np.einsum("nd,de,ne->n", x.numpy(), inverse, x.numpy()))  # |x R^-1/2|^2 = x R^-1 x^T
    np.testing.assert_allclose(pre.norms(x, -0.5).numpy(), want, rtol=1e-6)  # norms are float32
    pre.row_norms = {-0.5: pre.norms(x, -0.5).float()}
    pre.params["table_version"] = 7
    back = Preconditioner.load(pre.save(tmp_path / "R.safetensors"))
    assert back.params["table_version"] == 7
    torch.testing.assert_close(back.row_norms[-0.5], pre.row_norms[-0.5])


def test_save_load_round_trip(tmp_path):
    pre = fit_preconditioner(stream(5, 30), stream(6, 30), dim=DIM, spans=SPANS, damping=0.05, k=4)
    path = pre.save(tmp_path / "R.safetensors")
    back = Preconditioner.load(path)
    assert back.params == pre.params and back.spans == pre.spans
    x = torch.randn(3, DIM)
    torch.testing.assert_close(back.apply(x, -0.5), pre.apply(x, -0.5))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="tile"):
        fit_preconditioner(stream(0, 10), dim=DIM, spans=[(0, 6), (7, 11)])
    with pytest.raises(ValueError, match="k=99"):
        fit_preconditioner(stream(0, 10), stream(1, 10), dim=DIM, k=99)
    with pytest.raises(ValueError, match="width"):
        fit_preconditioner(stream(0, 10), dim=DIM).apply(torch.zeros(2, 5), -0.5)
    bad = stream(0, 10)
    bad[0][0, 3] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        fit_preconditioner(bad, dim=DIM)
