"""Mixture-of-experts layers attributed whole: the per-example factors of every fused expert
tensor, router and shared expert against autograd run on one example at a time (before any
projection), and the projected, corrected vectors against an explicit projection of those
gradients."""

from __future__ import annotations

import pytest
import torch
from tiny_families import EXPERTS, make_family
from tiny_models import random_batch

from trackstar_db.featurizer import Featurizer, FeaturizerConfig, find_tracked, projection_matrix
from trackstar_db.featurizer.optimizer_state import from_torch_adam
from trackstar_db.featurizer.per_token import per_token_vectors
from trackstar_db.featurizer.second_moment import from_optimizer_state
from trackstar_db.featurizer.task import per_example_loss
from trackstar_db.featurizer.tracked import dense_gradient, per_example_backward

RTOL = 1e-4


def autograd_per_example(model, batch, names):
    """{name: [batch, *param shape]}: autograd of each example's loss, run on that example alone."""
    params = dict(model.named_parameters())
    out = {n: [] for n in names}
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        loss, _ = per_example_loss(model(input_ids=batch["input_ids"][i:i + 1, :n]).logits, batch["labels"][i:i + 1, :n])
        for name, g in zip(names, torch.autograd.grad(loss.sum(), [params[k] for k in names])):
            out[name].append(g)
    return {n: torch.stack(g) for n, g in out.items()}


def factor_gradients(model, batch):
    """{name: [batch, rows, cols]} formed from the factors per_example_backward hands over."""
    rows = {m.name: m.rows for m in find_tracked(model)}
    grads = {}

    def on_factors(name, x_r, x_c, routed=None):
        g = dense_gradient(x_r.double() if x_r.dtype != torch.long else x_r, x_c.double(), rows[name], routed)
        grads[name] = grads[name] + g if name in grads else g

    loss, _ = per_example_backward(model, find_tracked(model), batch, on_factors)
    return grads, loss


def relative(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def check_against_autograd(family):
    model = make_family(family)
    batch = random_batch(4, seed=1)
    expected_names = [n for n, p in model.named_parameters() if p.dim() >= 2]
    grads, loss = factor_gradients(model, batch)
    missing = sorted(set(expected_names) - set(grads))
    assert not missing, f"no factors for {missing}"
    reference = autograd_per_example(model, batch, expected_names)
    experts = [n for n in expected_names if "experts" in n and reference[n].dim() >= 3]
    assert experts, "the family has fused expert tensors"
    for name in expected_names:
        want = reference[name].reshape(grads[name].shape)  # [E, R, C] read as [E * R, C]
        assert relative(grads[name], want) < RTOL, name
    # the tapped experts forward computes the model's own function
    with torch.no_grad():
        plain, _ = per_example_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                    batch["labels"])
    assert torch.allclose(loss, plain, rtol=1e-5, atol=1e-6)
    assert not any("forward" in module.__dict__ for module in model.modules())  # the class's forward is back


@pytest.mark.parametrize("family", EXPERTS)
def test_expert_gradients_match_autograd_one_example_at_a_time(family):
    check_against_autograd(family)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "llama4_text"])
def test_the_check_fails_without_the_expert_hooks(monkeypatch, family):
    """The same check fails when the experts are left to the model's own forward (no fused-tensor
    factors: the state before this featurizer knew MoE layers)."""
    from trackstar_db.featurizer import tracked

    monkeypatch.setattr(tracked, "is_experts", lambda module: False)
    with pytest.raises(AssertionError, match="no factors for .*experts"):
        check_against_autograd(family)


def reference_vectors(model, batch, featurizer, correct=lambda name, g: g):
    """Explicit P_r C(G) P_c^T of every tracked matrix (its 2-D view), concatenated."""
    names = [m.name for m in featurizer.tracked]
    grads = autograd_per_example(model, batch, names)
    out = torch.zeros(batch["input_ids"].shape[0], featurizer.layout.dim, dtype=torch.float64)
    seed = featurizer.config.seed
    for m in featurizer.tracked:
        block = featurizer.layout.block(m.name)
        p_r = projection_matrix(seed, m.name, "row", block.k_r, m.rows).double()
        p_c = projection_matrix(seed, m.name, "col", block.k_c, m.cols).double()
        for i, g in enumerate(grads[m.name]):
            g = correct(m.name, g.reshape(m.rows, m.cols).double())
            out[i, block.offset: block.offset + block.size] += (p_r @ g @ p_c.T).flatten()
    return out


def adam_state(model, batch):
    """A real AdamW state after two steps on `batch` (every parameter, experts [E, R, C] included)."""
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(params.values(), lr=1e-3)
    for _ in range(2):
        loss, _ = per_example_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                   batch["labels"])
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    state = from_torch_adam(optimizer, params)
    model.zero_grad(set_to_none=True)
    return state


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "qwen2_moe", "llama4_text"])
@pytest.mark.parametrize("correction", ["none", "adam-factored", "adam-exact"])
def test_moe_vectors_match_explicit_projection(family, correction):
    model = make_family(family)
    batch = random_batch(3, seed=2)
    config = FeaturizerConfig(dim=512, correction=correction)
    moment, correct = None, (lambda name, g: g)
    if correction != "none":
        state = adam_state(model, random_batch(4, seed=5))
        moment = from_optimizer_state(config, find_tracked(model), state)

        def correct(name, g):
            v = state.second_moment(name).double().reshape(g.shape)
            if correction == "adam-exact":
                return g / (v.sqrt() + config.eps)
            r, c = v.sum(1), v.sum(0)
            quarter = r.sum() ** 0.25
            return g / torch.outer(r.sqrt() / quarter + config.eps ** 0.5, c.sqrt() / quarter + config.eps ** 0.5)
    featurizer = Featurizer(model, config, second_moment=moment)
    assert any(kind == "experts" for m in featurizer.tracked for _, kind in m.uses)
    got = featurizer.featurize(batch).vectors["corrected" if moment else "uncorrected"].double()
    want = reference_vectors(model, batch, featurizer, correct)
    assert relative(got, want) < 1e-4


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss", "llama4_text"])
def test_batch_invariance_and_per_token_parts(family):
    """An example's vector does not depend on its batch (the flattened shared expert and gate of
    qwen2_moe included; a batch of one is the case a [tokens, hidden] state confuses), and its
    per-token parts sum to it."""
    model = make_family(family)
    featurizer = Featurizer(model, FeaturizerConfig(dim=512, correction="none"))
    batch = random_batch(3, seed=3)
    together = featurizer.featurize(batch).vectors["uncorrected"]
    for i in range(3):
        n = int(batch["attention_mask"][i].sum())
        one = {k: v[i:i + 1, :n] for k, v in batch.items()}
        alone = featurizer.featurize(one).vectors["uncorrected"][0]
        assert relative(alone, together[i]) < 1e-5
        parts = per_token_vectors(featurizer, one)["uncorrected"]
        assert relative(parts.sum(0), alone) < 1e-5


def test_tracking_only_the_experts_and_routers_gives_their_same_factors():
    """A task restricted to the MoE tensors (no embedding tracked: the backward's roots are the
    experts' own outputs) hands over the same factors as tracking everything."""
    from trackstar_db.featurizer import Task

    model = make_family("olmoe")
    batch = random_batch(3, seed=4)
    everything, _ = factor_gradients(model, batch)
    task = Task(modules=("*.mlp.experts.*", "*.mlp.gate.weight"))
    tracked = find_tracked(model, task)
    assert {m.name for m in tracked} == {n for n in everything if ".mlp." in n}
    rows = {m.name: m.rows for m in tracked}
    grads = {}

    def on_factors(name, x_r, x_c, routed=None):
        g = dense_gradient(x_r.double(), x_c.double(), rows[name], routed)
        grads[name] = grads[name] + g if name in grads else g

    per_example_backward(model, tracked, batch, on_factors)
    assert set(grads) == set(rows)
    for name, g in grads.items():
        assert relative(g, everything[name]) < 1e-10, name


def test_adafactor_state_of_an_expert_tensor_is_read_as_its_matrix():
    """Adafactor keeps an expert tensor [E, R, C] as row means [E, R] and column means [E, C];
    the correction is the factorisation of the whole [E x R, C] matrix, given as a 2-D matrix's
    is (row means, column sums): column sums = R x (sum over experts of the column means)."""
    from trackstar_db.featurizer.optimizer_state import OptimizerState
    from trackstar_db.featurizer.second_moment import factored

    model = make_family("mixtral")
    config = FeaturizerConfig(dim=512, correction="adafactor")
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, param in model.named_parameters():
        shape = tuple(param.shape)
        if len(shape) >= 2:
            tensors[f"exp_avg_sq_row.{name}"] = torch.rand(shape[:-1], generator=g) + 0.1
            tensors[f"exp_avg_sq_col.{name}"] = torch.rand(shape[:-2] + shape[-1:], generator=g) + 0.1
    moment = from_optimizer_state(config, find_tracked(model), OptimizerState("adafactor", 3, 1e-3, tensors=tensors))
    name = "model.layers.0.mlp.experts.gate_up_proj"
    experts, rows, cols = model.get_parameter(name).shape
    row, col = tensors[f"exp_avg_sq_row.{name}"], tensors[f"exp_avg_sq_col.{name}"]
    want = factored(row.reshape(-1), col.sum(0) * rows, config.eps)
    for got, expected in zip(moment.weights[name], want):
        assert torch.allclose(got, expected, rtol=1e-5)
    assert moment.weights[name][0].shape == (experts * rows,)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_estimated_correction_of_expert_tensors_is_the_mean_squared_gradient(family):
    """The 'estimated' second moment of an expert tensor: mean over the sample of the squared
    per-example gradient (autograd, one example at a time), factored over its [E x R, C] view."""
    from trackstar_db.featurizer.second_moment import estimate, factored, seen_floor

    model = make_family(family)
    sample = random_batch(4, seed=6)
    config = FeaturizerConfig(dim=512, correction="estimated")
    tracked = find_tracked(model)
    moment = estimate(config, model, tracked, [sample])
    reference = autograd_per_example(model, sample, [m.name for m in tracked])
    for m in tracked:
        if not any(kind == "experts" for _, kind in m.uses):
            continue
        v = reference[m.name].double().reshape(-1, m.rows, m.cols).square().mean(0)
        want = factored(seen_floor(v.sum(1)), seen_floor(v.sum(0)), config.eps)
        for got, expected in zip(moment.weights[m.name], want):
            assert torch.allclose(got.double(), expected.double(), rtol=1e-3), m.name
