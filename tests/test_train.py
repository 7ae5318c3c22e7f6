"""Tokenizer building, pretraining, checkpoint files and greedy fact accuracy."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trackstar_db.featurizer import optimizer_state
from trackstar_db.featurizer.tokenize import encode_query
from trackstar_db.testbed.train import (
    TrainConfig,
    build_model,
    fact_accuracy,
    lr_factor,
    train_model,
)
from trackstar_db.testbed.vocab import build_tokenizer
from trackstar_db.testbed.world import generate_world

TINY = dict(n_layer=1, d_model=32, n_head=2, max_length=24, batch_size=16, lr=1e-2, final_lr=1e-3, warmup=2,
            threads=2)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    files = generate_world(tmp_path_factory.mktemp("world"), seed=0, size="tiny")
    facts = [json.loads(line) for line in open(files.facts_path)]
    texts = [json.loads(line)["text"] for line in open(files.sentences_path)]
    return facts, texts


def test_tokenizer_round_trip_offline(tmp_path, tiny_world, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    facts, texts = tiny_world
    built = build_tokenizer(texts, tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in texts[:50] + [f["prompt0"] for f in facts]:
        ids = built(text, add_special_tokens=False)["input_ids"]
        assert loaded(text, add_special_tokens=False)["input_ids"] == ids
        assert loaded.decode(ids) == built.decode(ids)
        assert built.unk_token_id not in ids  # prompts use only corpus words
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(loaded, name) == getattr(built, name) is not None
    entity = facts[0]["entity1"]
    query = encode_query(loaded, facts[0]["prompt0"], entity)
    assert len([x for x in query.labels if x != -100]) == 1  # an entity name is one token
    assert built.decode(query.input_ids[-1:]) == entity


def test_tokenizer_refuses_empty_corpus():
    with pytest.raises(ValueError, match="no words"):
        build_tokenizer(["", " "])


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_training_lowers_loss_and_writes_a_loadable_checkpoint(tmp_path, tiny_world, architecture):
    _, texts = tiny_world
    config = TrainConfig(architecture=architecture, epochs=3, **TINY)
    result = train_model(texts, tmp_path, config, progress=False)
    assert result.final_loss < result.first_loss
    assert result.steps == 3 * -(-len(texts) // config.batch_size)

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert (tmp_path / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tokenizer) == model.config.vocab_size

    state = optimizer_state.load(tmp_path)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, param in trainable.items():
        assert state.moment("exp_avg_sq", name).shape == param.shape, name
    assert state.step == result.steps
    assert state.lr == pytest.approx(config.final_lr) == pytest.approx(result.final_lr)
    assert state.weight_decay == config.weight_decay

    info = json.loads((tmp_path / "train_info.json").read_text())
    assert info["config"]["architecture"] == architecture and info["steps"] == result.steps
    assert info["final_lr"] == pytest.approx(config.final_lr)


def test_max_steps_stops_early(tmp_path, tiny_world):
    _, texts = tiny_world
    result = train_model(texts, tmp_path, TrainConfig(epochs=5, max_steps=4, **TINY), progress=False)
    assert result.steps == 4 == optimizer_state.load(tmp_path).step


def test_schedule_warms_up_then_ends_at_final_lr():
    config = TrainConfig(lr=1.0, final_lr=0.1, warmup=4)
    factors = [lr_factor(step, 20, config) for step in range(25)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    assert factors[19] == pytest.approx(0.1) and factors[24] == pytest.approx(0.1)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="final_lr"):
        TrainConfig(final_lr=0.0)
    with pytest.raises(ValueError, match="architecture"):
        TrainConfig(architecture="rnn")


def _greedy_reference(model, tokenizer, prompt: str, target: str) -> bool:
    """Token-by-token greedy generation, one example at a time."""
    query = encode_query(tokenizer, prompt, target)
    n_target = sum(label != -100 for label in query.labels)
    ids = query.input_ids[: len(query.input_ids) - n_target]
    for _ in range(n_target):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits
        ids.append(int(logits[0, -1].argmax()))
    return ids[-n_target:] == query.input_ids[-n_target:]


def test_fact_accuracy_matches_greedy_generation(tiny_world):
    facts, texts = tiny_world
    tokenizer = build_tokenizer(texts)
    torch.manual_seed(0)
    model = build_model(TrainConfig(**TINY), tokenizer).eval()
    prompts = [f["prompt0"] for f in facts]
    targets = [f["entity1"] for f in facts]
    for i in range(0, len(prompts), 3):  # the model's own greedy two tokens, or one then a wrong one
        ids = encode_query(tokenizer, prompts[i], "x").input_ids[:-1]
        for _ in range(2):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        second = ids[-1] if i % 2 else (ids[-1] + 1) % len(tokenizer)
        targets[i] = tokenizer.decode([ids[-2], second])
    got = fact_accuracy(model, tokenizer, prompts, targets, batch_size=5)
    want = [_greedy_reference(model, tokenizer, p, t) for p, t in zip(prompts, targets)]
    assert got == want
    assert any(want) and not all(want)
    assert {len(encode_query(tokenizer, p, t).labels) - len(encode_query(tokenizer, p, "x").labels)
            for p, t in zip(prompts, targets)} == {0, 1}  # one- and two-token targets
