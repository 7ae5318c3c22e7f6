"""Ablation-ladder transforms against explicit numpy formulas."""

import numpy as np
import pytest
import torch

from trackstar_db.errors import TrackstarError
from trackstar_db.retrieval.methods import (
    LADDER,
    METHODS,
    MethodSpec,
    get_method,
    query_transform,
    train_transform,
    unit_normalize,
)

D = 6


class EighPreconditioner:
    """x R^power via numpy eigh of an explicit SPD matrix R."""

    def __init__(self, r: np.ndarray):
        self.values, self.vectors = np.linalg.eigh(r)

    def apply(self, x: torch.Tensor, power: float) -> torch.Tensor:
        m = (self.vectors * self.values ** power) @ self.vectors.T
        return torch.from_numpy(x.double().numpy() @ m).to(x.dtype)


def spd(seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((D, 2 * D))
    return a @ a.T / (2 * D) + 0.1 * np.eye(D)


def inv_sqrt(r):
    w, v = np.linalg.eigh(r)
    return (v / np.sqrt(w)) @ v.T


def unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((3, D)), rng.standard_normal((7, D))  # queries, train


def scores(name, q, g, preconditioners):
    spec = get_method(name)
    tq = query_transform(spec, preconditioners)(torch.from_numpy(q))
    tg = train_transform(spec, preconditioners)(torch.from_numpy(g))
    return (tq @ tg.T).numpy()


def test_each_rung_matches_its_formula(data):
    q, g = data
    r_train, r_mixed = spd(1), spd(2)
    pre = {"train": EighPreconditioner(r_train), "mixed": EighPreconditioner(r_mixed)}
    expected = {
        "grad-dot": q @ g.T,
        "grad-cos": unit(q) @ unit(g).T,
        "trak": q @ np.linalg.inv(r_train) @ g.T,  # g_z^T R^-1 g_q
        "opt-cos": unit(q) @ unit(g).T,
        "r-train": unit(q @ inv_sqrt(r_train)) @ unit(g @ inv_sqrt(r_train)).T,
        "trackstar": unit(q @ inv_sqrt(r_mixed)) @ unit(g @ inv_sqrt(r_mixed)).T,
    }
    assert [s.name for s in LADDER] == list(expected)
    for name, want in expected.items():
        np.testing.assert_allclose(scores(name, q, g, pre), want, rtol=1e-10, err_msg=name)


@pytest.mark.parametrize("name", [s.name for s in LADDER])
def test_pure_scan_equals_the_rung_definition(data, name):
    """retrieval/scoring moves R to the query side and divides stored rows by stored norms; the
    scores must equal t_train(g) . t_query(q) of the rung's definition (a flipped power sign or
    an R dropped from one side fails here)."""
    import pyarrow as pa

    from trackstar_db.featurizer.preconditioner import fit_preconditioner
    from trackstar_db.retrieval.scoring import Scoring, scan
    from trackstar_db.store.vectors import to_arrow

    q, g = (torch.from_numpy(a).float() for a in data)
    spec = get_method(name)
    rng = np.random.default_rng(5)
    pre = fit_preconditioner([torch.from_numpy(rng.standard_normal((40, D))).float()], dim=D, kind="dense")
    pre = pre if spec.preconditioner else None
    norms = pre.norms(g, spec.train_power) if pre is not None and spec.unit_norm and spec.train_power else None

    class Table:  # the stored rows, as a gradient table would hand them to the scan
        name, dtype, dim = "synthetic", "float32", D

        def dataset(self):
            return pa.table({"id": [str(i) for i in range(len(g))], "vector": to_arrow(g, "float32")})

    scoring = Scoring(spec, Table(), pre, norms)
    x = torch.cat([batch.clone() for _, batch in scan(scoring, "cpu")])
    got = scoring.query_side(q) @ x.T
    want = query_transform(spec, {spec.preconditioner: pre})(q) @ train_transform(spec, {spec.preconditioner: pre})(g).T
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_errors():
    with pytest.raises(TrackstarError, match="mixed"):
        query_transform(METHODS["trackstar"], {"train": EighPreconditioner(spd(1))})
    with pytest.raises(TrackstarError, match="unknown method .bogus."):
        get_method("bogus")
    with pytest.raises(TrackstarError, match="preconditioner"):
        MethodSpec("bad", "corrected", -0.5, -0.5, True, None)
    cos = train_transform(METHODS["grad-cos"])
    with pytest.raises(TrackstarError, match="zero or non-finite norm.*row 1"):
        cos(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(TrackstarError, match="non-finite"):
        cos(torch.tensor([[float("inf"), 0.0]]))


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf")])
def test_unit_normalize_names_bad_row(bad):
    x = torch.randn(4, 8)
    x[2] = bad
    with pytest.raises(ValueError, match="row 2"):
        unit_normalize(x)
    good = unit_normalize(torch.randn(3, 8))
    torch.testing.assert_close(good.norm(dim=1), torch.ones(3))
