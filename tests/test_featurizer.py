"""Featurizer against a brute-force reference (a Python loop of full per-example gradients,
explicit projection matrices, explicit corrections), plus invariants."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, make_model, random_batch

from trackstar_db.featurizer import (
    Featurizer,
    FeaturizerConfig,
    build_second_moment,
    plan_layout,
    projection_matrix,
)
from trackstar_db.featurizer.optimizer_state import OptimizerState
from trackstar_db.featurizer.task import per_example_loss

DIM = 1024


def full_grads(model, batch, names):
    """Per-example gradients of the mean token loss: list over examples of {name: [rows, cols]}."""
    params = dict(model.named_parameters())
    out = []
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        ids, labels = batch["input_ids"][i:i + 1, :n], batch["labels"][i:i + 1, :n]
        loss, _ = per_example_loss(model(input_ids=ids).logits, labels)
        grads = torch.autograd.grad(loss.sum(), [params[k] for k in names])
        out.append(dict(zip(names, grads)))
    return out


def reference(model, batch, config, correct):
    """Brute-force vectors [batch, dim]; correct(name, G) -> corrected G."""
    names = [n for n, p in model.named_parameters() if p.dim() == 2]
    layout = plan_layout(config, names)
    vectors = torch.zeros(batch["input_ids"].shape[0], layout.dim, dtype=torch.float64)
    for row, grads in enumerate(full_grads(model, batch, names)):
        for block in layout.blocks:
            g = correct(block.name, grads[block.name].double())
            p_r = projection_matrix(config.seed, block.name, "row", block.k_r, g.shape[0]).double()
            p_c = projection_matrix(config.seed, block.name, "col", block.k_c, g.shape[1]).double()
            vectors[row, block.offset: block.offset + block.size] += (p_r @ g @ p_c.T).flatten()
    return vectors.float()


def factored_root(v, eps=0.0, floor=False):
    """sqrt of V~ = r c^T / sum(r) written out densely; with eps, (a + sqrt eps)(b + sqrt eps)^T
    where a b^T = sqrt(V~) splits evenly (the documented eps placement). floor: zero row/column
    sums raised to the smallest positive one (the estimated correction's rule)."""
    r, c = v.sum(1), v.sum(0)
    if floor:
        r, c = (x.clamp(min=float(x[x > 0].min())) for x in (r, c))
    if eps == 0:
        return (torch.outer(r, c) / r.sum()).sqrt()
    quarter = r.sum() ** 0.25
    return torch.outer(r.sqrt() / quarter + eps ** 0.5, c.sqrt() / quarter + eps ** 0.5)


def fake_adam(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    tensors = {f"exp_avg_sq.{n}": torch.rand(p.shape, generator=g) * 1e-4 + 1e-7
               for n, p in model.named_parameters()}
    return OptimizerState("adamw", step=10, lr=1e-3, beta2=0.999, tensors=tensors)


def fake_adafactor(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for n, p in model.named_parameters():
        if p.dim() == 2:
            tensors[f"exp_avg_sq_row.{n}"] = torch.rand(p.shape[0], generator=g) * 1e-4 + 1e-7
            tensors[f"exp_avg_sq_col.{n}"] = torch.rand(p.shape[1], generator=g) * 1e-4 + 1e-7
    return OptimizerState("adafactor", step=10, lr=1e-3, tensors=tensors)


def assert_close(got, ref):
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def rung(model, correction, sample):
    """(config, second moment, explicit correction) of one rung."""
    # eps=0: factored rungs checked as exactly 1/sqrt(V~). The estimated V has zero rows (tokens
    # and positions the sample never used), so it needs eps > 0.
    eps = 0.0 if correction in ("adam-factored", "adafactor") else 1e-8
    config = FeaturizerConfig(dim=DIM, correction=correction, eps=eps)
    if correction == "none":
        return config, None, lambda name, g: g
    if correction == "estimated":
        names = [n for n, p in model.named_parameters() if p.dim() == 2]
        grads = full_grads(model, sample, names)
        v = {n: torch.stack([gr[n].double() ** 2 for gr in grads]).mean(0) for n in names}
        moment = build_second_moment(config, model, sample_batches=[sample])
        return config, moment, lambda name, g: g / factored_root(v[name], eps, floor=True)
    state = fake_adam(model) if correction.startswith("adam") else fake_adafactor(model)
    moment = build_second_moment(config, model, optimizer_state=state)
    if correction == "adafactor":
        def correct(name, g):
            row = state.moment("exp_avg_sq_row", name).double()
            col = state.moment("exp_avg_sq_col", name).double()
            return g / (torch.outer(row, col) / row.mean()).sqrt()
        return config, moment, correct
    v = {k.split(".", 1)[1]: t.double() / (1 - 0.999 ** 10) for k, t in state.tensors.items()}
    if correction == "adam-exact":
        return config, moment, lambda name, g: g / (v[name].sqrt() + 1e-8)
    return config, moment, lambda name, g: g / factored_root(v[name])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("correction", ["none", "adam-exact", "adam-factored", "adafactor", "estimated"])
def test_matches_brute_force(family, correction):
    model = make_model(family)
    batch = random_batch(6, seed=3)
    config, moment, correct = rung(model, correction, random_batch(5, seed=4, query_fraction=0))
    featurizer = Featurizer(model, config, moment, uncorrected=True)
    out = featurizer.featurize(batch)
    if correction == "none":  # no second moment: the vectors are the uncorrected ones, named so
        assert set(out.vectors) == {"uncorrected"}
    else:
        assert_close(out.vectors["corrected"], reference(model, batch, config, correct))
    assert_close(out.vectors["uncorrected"], reference(model, batch, config, lambda n, g: g))
    assert all(p.grad is None for p in model.parameters()), "featurize left .grad behind"
    assert all(not m._forward_hooks for m in model.modules()), "featurize left hooks behind"
    source = featurizer.manifest()["correction_source"]
    expected = {"none": "none", "adam-exact": "Adam exp_avg_sq (bias-corrected), elementwise",
                "adam-factored": "Adam exp_avg_sq (bias-corrected), row/column factorised",
                "adafactor": "Adafactor", "estimated": "estimated: mean squared per-example gradient"}
    assert source.startswith(expected[correction]), source


@pytest.mark.parametrize("family", FAMILIES)
def test_sum_combine_matches_brute_force(family):
    model = make_model(family)
    batch = random_batch(4, seed=5)
    config = FeaturizerConfig(dim=DIM, combine="sum", correction="none")
    out = Featurizer(model, config).featurize(batch)
    assert out.vectors["uncorrected"].shape == (4, DIM)
    assert_close(out.vectors["uncorrected"], reference(model, batch, config, lambda n, g: g))


def test_tied_embedding_is_one_matrix_with_both_uses():
    model = make_model("gpt2")
    featurizer = Featurizer(model, FeaturizerConfig(dim=DIM, correction="none"))
    names = [m.name for m in featurizer.tracked]
    assert "lm_head.weight" not in names
    (wte,) = [m for m in featurizer.tracked if m.name == "transformer.wte.weight"]
    assert {kind for _, kind in wte.uses} == {"embedding", "linear"}
    assert len(names) == len(featurizer.layout.blocks) == 2 + 4 * 2  # wte, wpe, 4 Conv1D per layer


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_size_and_padding_invariance(family):
    model = make_model(family)
    featurizer = Featurizer(model, FeaturizerConfig(dim=DIM, correction="none"))
    batch = random_batch(16, seed=6, query_fraction=0.5)
    together = featurizer.featurize(batch)
    for i in range(16):
        n = int(batch["attention_mask"][i].sum())
        alone = featurizer.featurize({k: v[i:i + 1, :n] for k, v in batch.items()})
        assert_close(alone.vectors["uncorrected"][0], together.vectors["uncorrected"][i])
        torch.testing.assert_close(alone.loss[0], together.loss[i], rtol=1e-5, atol=1e-6)
        assert int(alone.n_tokens[0]) == int(together.n_tokens[i])


def test_query_labels_are_target_only():
    model = make_model("llama")
    featurizer = Featurizer(model, FeaturizerConfig(dim=DIM, correction="none"))
    batch = random_batch(4, seed=7, query_fraction=1.0)
    out = featurizer.featurize(batch)
    assert (out.n_tokens <= 2).all()
    full = dict(batch, labels=torch.where(batch["attention_mask"] == 1, batch["input_ids"], -100))
    assert not torch.allclose(featurizer.featurize(full).vectors["uncorrected"], out.vectors["uncorrected"])


def test_projection_unbiased():
    """E<P a P^T, P b P^T> = <a, b> over seeds; a 2x scaling error would fail."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20, 12, generator=g, dtype=torch.float64)
    b = a + 0.7 * torch.randn(20, 12, generator=g, dtype=torch.float64)
    dots, squares = [], []
    for seed in range(600):
        p_r = projection_matrix(seed, "w", "row", 4, 20).double()
        p_c = projection_matrix(seed, "w", "col", 5, 12).double()
        pa, pb = p_r @ a @ p_c.T, p_r @ b @ p_c.T
        dots.append(float((pa * pb).sum()))
        squares.append(float((pa * pa).sum()))
    scale = float(a.norm() * b.norm())
    assert abs(sum(dots) / len(dots) - float((a * b).sum())) < 0.08 * scale
    assert abs(sum(squares) / len(squares) / float((a * a).sum()) - 1) < 0.08


def test_projection_deterministic_and_distinct():
    p = projection_matrix(3, "x.weight", "row", 8, 16)
    assert torch.equal(p, projection_matrix(3, "x.weight", "row", 8, 16))
    assert not torch.equal(p, projection_matrix(3, "x.weight", "col", 8, 16))
    assert not torch.equal(p, projection_matrix(4, "x.weight", "row", 8, 16))


def test_layout_and_config_round_trip():
    config = FeaturizerConfig(dim=4096, seed=5, combine="concat", correction="estimated")
    assert FeaturizerConfig.from_dict(config.to_dict()) == config
    layout = plan_layout(config, [f"m{i}" for i in range(18)])
    assert layout.dim <= 4096 and layout.dim == sum(b.size for b in layout.blocks)
    assert [b.offset for b in layout.blocks] == [i * layout.blocks[0].size for i in range(18)]
    summed = plan_layout(FeaturizerConfig(dim=3000, combine="sum"), ["a", "b"])
    assert summed.dim == 3000 and all(b.k_r * b.k_c == 3000 and b.offset == 0 for b in summed.blocks)
    with pytest.raises(ValueError, match="combine"):
        FeaturizerConfig(combine="mean")
    with pytest.raises(ValueError, match="unknown field"):
        FeaturizerConfig.from_dict({"dims": 3})


def test_missing_optimizer_state_is_named():
    model = make_model("gpt2")
    state = fake_adam(model)
    del state.tensors["exp_avg_sq.transformer.wpe.weight"]
    with pytest.raises(ValueError, match="transformer.wpe.weight"):
        build_second_moment(FeaturizerConfig(correction="adam-exact"), model, optimizer_state=state)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_matches_cpu(family):
    batch = random_batch(8, seed=8)
    config = FeaturizerConfig(dim=DIM, correction="adam-factored")
    vectors = {}
    for device in ("cpu", "cuda"):
        model = make_model(family).to(device)
        moment = build_second_moment(config, model, optimizer_state=fake_adam(model))
        vectors[device] = Featurizer(model, config, moment, device=device).featurize(batch).vectors["corrected"]
    torch.testing.assert_close(vectors["cuda"], vectors["cpu"], rtol=1e-3, atol=1e-3 * float(vectors["cpu"].abs().max()))


def test_estimated_correction_floors_rows_the_sample_never_touched():
    from trackstar_db.featurizer.second_moment import seen_floor

    assert seen_floor(torch.tensor([0.0, 2.0, 0.0, 5.0])).tolist() == [2.0, 2.0, 2.0, 5.0]
    assert seen_floor(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]
    model = make_model("gpt2")
    sample = random_batch(3, seed=1, max_len=6, query_fraction=0.0)
    unseen = sorted(set(range(model.config.vocab_size)) - set(sample["input_ids"].flatten().tolist()))
    assert unseen, "the sample should leave some tokens out"
    moment = build_second_moment(FeaturizerConfig(dim=DIM, correction="estimated"), model, sample_batches=[sample])
    d_r, _ = moment.weights["transformer.wte.weight"]
    # an unseen token's row gets the weight of the least-used seen row, not 1/sqrt(eps) = 1e4
    assert float(d_r[unseen].max()) == pytest.approx(float(d_r.max())) and float(d_r.max()) < 1e3
