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


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """(shrunk second moment, rho) of the rows of x, the slow explicit way: Ledoit and Wolf's
    b2 as the mean squared Frobenius distance of each outer product from S, over n."""
    n, size = x.shape
    s = x.T @ x / n
    mu = np.trace(s) / size
    d2 = np.sum((s - mu * np.eye(size)) ** 2)
    b2 = sum(np.sum((np.outer(row, row) - s) ** 2) for row in x) / n ** 2
    rho = min(b2, d2) / d2
    return (1 - rho) * s + rho * mu * np.eye(size), rho


def prior(x: np.ndarray) -> np.ndarray:
    """The 'prior' rule written out: (n S + size mu I) / (n + size), the posterior mean under a
    prior mu I worth one pseudo-vector per dimension."""
    n, size = x.shape
    s = x.T @ x / n
    return (n * s + size * np.trace(s) / size * np.eye(size)) / (n + size)


def numpy_reference(train, queries, spans, k, damping, power, shrink="none"):
    """Explicit R_mix^power, dense [d, d] (zeros off the blocks); with `shrink` ('prior' or
    'ledoit-wolf'), each block of R_train and R_eval shrunk by its own rule before the mix."""
    t = np.concatenate([x.numpy() for x in train]).astype(np.float64)
    q = np.concatenate([x.numpy() for x in queries]).astype(np.float64)
    blocks_t = [t[:, o:o + s].T @ t[:, o:o + s] / len(t) for o, s in spans]
    blocks_q = [q[:, o:o + s].T @ q[:, o:o + s] / len(q) for o, s in spans]
    s_t = np.sort(np.concatenate([np.linalg.eigvalsh(b) for b in blocks_t]))[::-1]
    s_q = np.sort(np.concatenate([np.linalg.eigvalsh(b) for b in blocks_q]))[::-1]
    lam = s_t[k] / (s_t[k] + s_q[k])
    rule = {"prior": prior, "ledoit-wolf": lambda x: ledoit_wolf(x)[0]}.get(shrink)
    if rule is not None:
        blocks_t = [rule(t[:, o:o + s]) for o, s in spans]
        blocks_q = [rule(q[:, o:o + s]) for o, s in spans]
    mixed = [lam * bq + (1 - lam) * bt for bt, bq in zip(blocks_t, blocks_q)]
    mean = sum(np.trace(m) for m in mixed) / DIM
    out = np.zeros((DIM, DIM))
    for (o, s), m in zip(spans, mixed):
        w, u = np.linalg.eigh(m)
        out[o:o + s, o:o + s] = (u * (w + damping * mean) ** power) @ u.T
    return lam, out


@pytest.mark.parametrize("shrinkage", ["none", "prior", "ledoit-wolf"])
@pytest.mark.parametrize("kind", ["block", "dense"])
@pytest.mark.parametrize("power", [-0.5, -1.0])
def test_matches_numpy(kind, power, shrinkage):
    train, queries = stream(0, 50), stream(1, 30, scale=torch.linspace(3.0, 0.1, DIM))
    spans = SPANS if kind == "block" else [(0, DIM)]
    pre = fit_preconditioner(train, queries, dim=DIM, spans=SPANS, kind=kind, damping=0.01, k=3, shrinkage=shrinkage)
    lam, matrix = numpy_reference(train, queries, spans, 3, 0.01, power, shrink=shrinkage)
    assert pre.params["lambda"] == pytest.approx(lam, rel=1e-9)
    assert pre.params["n_train"] == 50 and pre.params["n_eval"] == 30
    x = torch.randn(5, DIM, dtype=torch.float64)
    np.testing.assert_allclose(pre.apply(x, power).numpy(), x.numpy() @ matrix, rtol=1e-8, atol=1e-10)


def test_without_queries_is_r_train():
    train = stream(2, 40)
    pre = fit_preconditioner(train, dim=DIM, spans=SPANS, shrinkage="none")
    t = torch.cat(train).double()
    for (o, s), m in zip(SPANS, pre.matrices()):
        torch.testing.assert_close(m, t[:, o:o + s].T @ t[:, o:o + s] / 40)
    default = fit_preconditioner(train, dim=DIM, spans=SPANS)  # the default rule: 'prior' per block
    for (o, s), m, rho in zip(SPANS, default.matrices(), default.params["rho_train"]):
        assert rho == pytest.approx(s / (40 + s)) and default.params["shrinkage"] == "prior"
        np.testing.assert_allclose(m.numpy(), prior(t[:, o:o + s].numpy()), rtol=1e-9, atol=1e-12)
    shrunk = fit_preconditioner(train, dim=DIM, spans=SPANS, shrinkage="ledoit-wolf")
    for (o, s), m, rho in zip(SPANS, shrunk.matrices(), shrunk.params["rho_train"]):
        want, want_rho = ledoit_wolf(t[:, o:o + s].numpy())
        assert rho == pytest.approx(want_rho, rel=1e-9) and 0 < rho <= 1
        np.testing.assert_allclose(m.numpy(), want, rtol=1e-9, atol=1e-12)
    assert pre.params["lambda"] == 0.0 and pre.params["k"] == 1


def test_whitened_row_norms_and_their_file_round_trip(tmp_path):
    """The row norms stored with R (used by the pure scan) equal |x (R + d mean I)^-1/2| computed
    with numpy's inverse of the explicit damped matrix, and survive save/load with the version."""
    train, queries = stream(3, 60), stream(4, 20)
    pre = fit_preconditioner(train, queries, dim=DIM, spans=SPANS, damping=1e-2, k=2)
    x = torch.cat(train).double()
    _, inverse = numpy_reference(train, queries, SPANS, 2, 1e-2, -1.0, shrink="prior")  # (R_damped)^-1, dense
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
    assert back.params == pre.params and back.spans == pre.spans and len(back.params["rho_eval"]) == len(SPANS)
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


def test_ledoit_wolf_rho_on_a_known_spectrum():
    """n vectors, half sqrt(2) a e_1 and half sqrt(2) b e_2, in p dimensions: S = diag(a^2, b^2, 0..),
    so d2 = a^4 + b^4 - (a^2 + b^2)^2 / p and b2 = (a^4 + b^4) / n in closed form; a = b = 1,
    p = 4, n = 8: rho = 0.25 and the shrunk spectrum is 0.875, 0.875, 0.125, 0.125."""
    from trackstar_db.featurizer.preconditioner import GramAccumulator, ledoit_wolf_rho, shrink

    x = torch.zeros(8, 4, dtype=torch.float64)
    x[:4, 0] = x[4:, 1] = 2 ** 0.5
    acc = GramAccumulator([(0, 4)])
    acc.update(x[:3])
    acc.update(x[3:])  # two batches: the |x|^4 sums add up
    (mean,) = acc.means()
    assert ledoit_wolf_rho(mean, acc.fourth[0], acc.n) == pytest.approx(0.25)
    (shrunk,), (rho,) = shrink([mean], acc, "ledoit-wolf")
    np.testing.assert_allclose(np.linalg.eigvalsh(shrunk.numpy()), [0.125, 0.125, 0.875, 0.875])
    assert shrink([mean], acc, "none")[1] == [0.0] and shrink([mean], acc, 0.5)[1] == [0.5]
    assert shrink([mean], acc, "prior")[1] == [pytest.approx(4 / (8 + 4))]  # size / (n + size)
    x[:, 2] = x[:, 3] = 0.0
    iso = GramAccumulator([(0, 2)])  # S = I already: rho 0, shrinking could not change it
    iso.update(x[:, :2])
    assert ledoit_wolf_rho(iso.means()[0], iso.fourth[0], iso.n) == 0.0
    same = torch.ones(6, 3, dtype=torch.float64)  # one direction seen 6 times: no sampling noise at all
    acc = GramAccumulator([(0, 3)])
    acc.update(same)
    assert ledoit_wolf_rho(acc.means()[0], acc.fourth[0], acc.n) == 0.0


def test_fewer_vectors_than_a_block_stay_well_conditioned():
    """The case that sank trackstar at d = 16,384 (blocks of ~1,600 dims from 354 gradients): n = 40
    vectors in a block of 200. Unshrunk (damping ~0), R has 160 zero eigenvalues and R^-1/2 blows
    up whatever a new vector has outside the 40 seen directions; shrunk by the default rule (and
    by Ledoit-Wolf), fresh vectors from the same law whiten to norms like the fitted ones', and
    rho grows as n falls."""
    size, gen = 200, torch.Generator().manual_seed(0)
    scale = torch.linspace(0.1, 3.0, size, dtype=torch.float64)
    draw = lambda n: torch.randn(n, size, generator=gen, dtype=torch.float64) * scale  # noqa: E731
    train, fresh = draw(40), draw(40)
    raw = fit_preconditioner([train], dim=size, kind="dense", damping=1e-9, shrinkage="none")
    s_raw = raw.eigvals[0]
    ratio = lambda pre: float(pre.norms(fresh, -0.5).median() / pre.norms(train, -0.5).median())  # noqa: E731
    assert float(s_raw.max() / s_raw.clamp(min=1e-300).min()) > 1e10 and ratio(raw) > 100
    for shrinkage in ("prior", "ledoit-wolf"):
        rule = fit_preconditioner([train], dim=size, kind="dense", damping=1e-9, shrinkage=shrinkage)
        s_rule = rule.eigvals[0]
        assert float(s_rule.max() / s_rule.min()) < 1e3 and ratio(rule) < 3, shrinkage
        rhos = [fit_preconditioner([draw(n)], dim=size, kind="dense", shrinkage=shrinkage).params["rho_train"][0]
                for n in (20, 200, 20000)]
        assert rhos[0] > rhos[1] > rhos[2] and rhos[2] < 0.1, shrinkage
