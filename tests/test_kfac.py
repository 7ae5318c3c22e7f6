"""Oracle for the Kronecker-factored curvature (featurizer/kfac.py): on a GPT-2 small enough for
dense Fishers (a few hundred parameters per matrix), K-FAC and EK-FAC scores equal an independent
dense computation: per-example gradients by autograd one example at a time, the covariances from
module hooks one unpadded example at a time, the Fisher built with torch.kron and solved."""

from __future__ import annotations

import pytest
import torch
import transformers
from scipy.stats import spearmanr
from transformers.pytorch_utils import Conv1D

from tests.tiny_models import random_items
from trackstar_db.featurizer import kfac
from trackstar_db.featurizer.task import per_example_loss
from trackstar_db.featurizer.tokenize import collate
from trackstar_db.featurizer.tracked import find_tracked, per_example_backward

VOCAB = 12


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, n_positions=16, vocab_size=VOCAB,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # a trained-looking spread of weights, not GPT-2's tiny init
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def dense_reference(model, train_items, query_items, damping=0.1):
    """{kind: [nq, n] scores} computed without featurizer/kfac.py or tracked.py's factors."""
    params = {n: p for n, p in model.named_parameters() if p.dim() == 2}
    users = {}  # param name -> [(module, kind)]
    for module in model.modules():
        for cls, kind in ((torch.nn.Linear, "linear"), (Conv1D, "conv1d"), (torch.nn.Embedding, "embedding")):
            if isinstance(module, cls):
                name = next(n for n, p in params.items() if p is module.weight)
                users.setdefault(name, []).append((module, kind))

    def gradients(item):
        batch = collate([item])
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_example_loss(logits, batch["labels"])[0].sum().backward()
        return {n: params[n].grad.detach().double().clone() for n in users}

    sums = {n: [torch.zeros(p.shape[0], p.shape[0], dtype=torch.float64),
                torch.zeros(p.shape[1], p.shape[1], dtype=torch.float64), 0] for n, p in params.items() if n in users}
    for item in train_items:
        seen = []
        handles = []
        for name, uses in users.items():
            for module, kind in uses:
                def fwd(mod, args, out, name=name, kind=kind):
                    seen.append((name, kind, args[0].detach(), out))
                handles.append(module.register_forward_hook(fwd))
        grads_out = {}

        def keep(name, kind, i):
            def hook(g):
                grads_out[i] = g.detach()
            return hook
        batch = collate([item])
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for i, (name, kind, x, out) in enumerate(seen):
            out.register_hook(keep(name, kind, i))
        per_example_loss(logits, batch["labels"])[0].sum().backward()
        for h in handles:
            h.remove()
        for i, (name, kind, x, out) in enumerate(seen):
            g = grads_out[i].reshape(-1, grads_out[i].shape[-1]).double()
            if kind == "embedding":
                rows_side = torch.nn.functional.one_hot(x.reshape(-1), params[name].shape[0]).double()
                cols_side = g
            elif kind == "linear":
                rows_side, cols_side = g, x.reshape(-1, x.shape[-1]).double()
            else:
                rows_side, cols_side = x.reshape(-1, x.shape[-1]).double(), g
            sums[name][0] += rows_side.T @ rows_side
            sums[name][1] += cols_side.T @ cols_side
            sums[name][2] += rows_side.shape[0]
    train_grads = [gradients(item) for item in train_items]
    query_grads = [gradients(item) for item in query_items]
    out = {}
    for kind in ("kfac", "ekfac"):
        scores = torch.zeros(len(query_items), len(train_items), dtype=torch.float64)
        for name in users:
            c_r, c_c = sums[name][0] / sums[name][2], sums[name][1] / sums[name][2]
            if kind == "kfac":
                fisher = torch.kron(c_r, c_c)
                values = torch.linalg.eigvalsh(fisher)
            else:
                q = torch.kron(torch.linalg.eigh(c_r).eigenvectors, torch.linalg.eigh(c_c).eigenvectors)
                values = torch.stack([(q.T @ g[name].reshape(-1)) ** 2 for g in train_grads]).mean(0)
                fisher = (q * values) @ q.T
            dim = fisher.shape[0]
            system = fisher + damping * values.clamp(min=0).mean() * torch.eye(dim, dtype=torch.float64)
            train = torch.stack([g[name].reshape(-1) for g in train_grads], 1)  # [dim, n]
            solved = torch.linalg.solve(system, train)
            scores += torch.stack([g[name].reshape(-1) for g in query_grads]) @ solved
        out[kind] = scores
    return out


def library_scores(model, train_items, query_items, batch_size=5):
    tracked = find_tracked(model)
    covariance = kfac.CovarianceAccumulator(tracked)
    batches = [collate(train_items[i:i + batch_size]) for i in range(0, len(train_items), batch_size)]
    for batch in batches:  # padded batches: the attention mask must keep pads out of the sums
        per_example_backward(model, tracked, batch,
                             lambda n, r, c, m=batch["attention_mask"]: covariance.update(n, r, c, m))
    factors = kfac.factors_from(covariance.covariances(), {"damping": 0.1})
    correction = kfac.EigenCorrection({m.name: (m.rows, m.cols) for m in tracked})
    train_rotated = []
    for batch in batches:
        rotated, _ = kfac.rotated_batch(model, tracked, factors, batch)
        correction.update(rotated)
        train_rotated.append(rotated)
    factors.corrected = correction.means()
    query_rotated, _ = kfac.rotated_batch(model, tracked, factors, collate(query_items))
    out = {}
    for kind in ("kfac", "ekfac"):
        pre = kfac.precondition(factors, query_rotated, kind)
        out[kind] = torch.cat([kfac.pair_scores(pre, r) for r in train_rotated], 1)
    return out, factors


@pytest.fixture(scope="module")
def scored():
    model = tiny_gpt2()
    items = random_items(26, seed=3, min_len=3, max_len=10, query_fraction=0.0, vocab=VOCAB)
    queries = random_items(4, seed=4, min_len=4, max_len=8, query_fraction=1.0, vocab=VOCAB)
    return dense_reference(model, items, queries), library_scores(model, items, queries)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_scores_equal_dense_kronecker_oracle(scored, kind):
    reference, (library, _) = scored
    for row in range(reference[kind].shape[0]):
        rho = spearmanr(reference[kind][row].numpy(), library[kind][row].numpy()).statistic
        assert rho >= 0.99, (kind, row, rho)
    torch.testing.assert_close(library[kind], reference[kind], rtol=1e-3, atol=1e-6 * float(reference[kind].abs().max()))


def test_kfac_and_ekfac_differ_and_curvature_matters(scored):
    """The oracle can fail: the two kinds give different scores, and both differ from plain dot products."""
    reference, _ = scored
    assert not torch.allclose(reference["kfac"], reference["ekfac"], rtol=1e-2)


def test_factors_round_trip_and_projected_blocks(tmp_path, scored):
    from trackstar_db.featurizer.config import FeaturizerConfig, plan_layout
    from trackstar_db.featurizer.projection import projection_matrix

    _, (library, factors) = scored
    path = factors.save(tmp_path / "f.safetensors")
    loaded = kfac.KroneckerFactors.load(path)
    assert loaded.kind == "ekfac" and set(loaded.sides) == set(factors.sides)
    for name in factors.sides:
        torch.testing.assert_close(loaded.eigenvalues(name, "ekfac"), factors.eigenvalues(name, "ekfac").float().double())
        torch.testing.assert_close(loaded.eigenvalues(name, "kfac"), factors.eigenvalues(name, "kfac"))
    # projected K-FAC block = kron of the projected factors; projected EK-FAC = M diag(Lambda) M^T densely
    names = list(factors.sides)
    layout = plan_layout(FeaturizerConfig(dim=1024), names)
    project = lambda n, s, k, width: projection_matrix(0, n, s, k, width)  # noqa: E731
    for which in ("kfac", "ekfac"):
        spans, blocks = kfac.projected_blocks(factors, layout, project, which)
        assert spans == layout.spans()
        block, matrix = layout.blocks[2], blocks[2]
        row, col = factors.sides[block.name]
        p = torch.kron(project(block.name, "row", block.k_r, row.eigvals.shape[0]),
                       project(block.name, "col", block.k_c, col.eigvals.shape[0])).double()
        q = torch.kron(row.eigvecs if row.eigvecs is not None else torch.eye(len(row.eigvals), dtype=torch.float64),
                       col.eigvecs if col.eigvecs is not None else torch.eye(len(col.eigvals), dtype=torch.float64))
        fisher = (q * factors.eigenvalues(block.name, which).reshape(-1)) @ q.T
        dense = p @ fisher @ p.T
        dense = dense + 0.1 * dense.diagonal().mean() * torch.eye(dense.shape[0], dtype=torch.float64)
        torch.testing.assert_close(matrix, dense, rtol=1e-6, atol=1e-7 * float(dense.abs().max()))


def test_large_sides_are_diagonal():
    model = tiny_gpt2()
    tracked = find_tracked(model)
    acc = kfac.CovarianceAccumulator(tracked, max_dense=10)
    wide = {m.name for m in tracked if m.rows > 10}
    assert wide and all(acc.diagonal[n][0] for n in wide)
    assert acc.diagonal["transformer.wpe.weight"][0]  # ids only: diagonal whatever the width
    assert not kfac.CovarianceAccumulator(tracked).diagonal["transformer.wte.weight"][0]  # tied with lm_head: dense


def test_direct_scores_equal_rotated_scores(scored):
    """<H_q, G_z> from token factors (no per-example gradient formed) = the rotated-basis product."""
    model = tiny_gpt2()
    _, (library, factors) = scored
    tracked = find_tracked(model)
    items = random_items(26, seed=3, min_len=3, max_len=10, query_fraction=0.0, vocab=VOCAB)
    queries = random_items(4, seed=4, min_len=4, max_len=8, query_fraction=1.0, vocab=VOCAB)
    rotated_q, _ = kfac.rotated_batch(model, tracked, factors, collate(queries))
    for kind in ("kfac", "ekfac"):
        h = kfac.unrotate(factors, kfac.precondition(factors, rotated_q, kind))
        direct = torch.cat([kfac.direct_scores(model, tracked, h, collate(items[i:i + 7])) for i in range(0, 26, 7)], 1)
        torch.testing.assert_close(direct, library[kind], rtol=1e-4, atol=1e-6 * float(library[kind].abs().max()))
