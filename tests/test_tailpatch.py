"""Tail-patch against an explicit step of a real torch optimizer loaded with the saved state."""

import copy

import pytest
import torch
import transformers

from trackstar_db.errors import TrackstarError
from trackstar_db.featurizer import optimizer_state
from trackstar_db.featurizer.tokenize import (
    collate,
    encode_query,
    encode_text,
    pad_id,
)
from trackstar_db.featurizer.task import per_example_loss
from trackstar_db.tailpatch.patcher import TailPatchConfig, TailPatcher, tail_patch
from trackstar_db.testbed.vocab import build_tokenizer

TEXTS = ["Paris is the capital of France .", "Berlin is the capital of Germany .",
         "Rome is the capital of Italy .", "Alice was born in Paris .", "Bob was born in Rome ."]
QUERIES = [("q1", "The capital of France is", "Paris"), ("q2", "Bob was born in", "Rome")]


def trained(kind: str, tmp_path):
    """A tiny GPT-2 trained a few steps with torch's Adam/AdamW; its state saved and reloaded."""
    tokenizer = build_tokenizer(TEXTS + [p + " " + t for _, p, t in QUERIES])
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=2, n_positions=32,
                                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = transformers.GPT2LMHeadModel(config)
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[kind]
    opt = cls(model.parameters(), lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    batch = collate([encode_text(tokenizer, t) for t in TEXTS], pad_id(tokenizer))
    model.train()
    for _ in range(4):
        opt.zero_grad()
        per_example_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                         batch["labels"])[0].mean().backward()
        opt.step()
    state = optimizer_state.from_torch_adam(opt, dict(model.named_parameters()), kind=kind)
    state.lr = 0.05  # the "final" lr: large, so each step moves the probabilities visibly
    return model.eval(), tokenizer, optimizer_state.load(optimizer_state.save(state, tmp_path))


def probability(model, tokenizer, prompt, target):
    batch = collate([encode_query(tokenizer, prompt, target)], pad_id(tokenizer))
    with torch.no_grad():
        loss, n = per_example_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"])
    return float(torch.exp(-(loss.double() * n))[0])


def manual_after(model, tokenizer, state, text, prompt, target):
    """Fresh copy, a real torch optimizer built via load_state_dict, .step() on the example."""
    model = copy.deepcopy(model).eval()
    names = [n for n, _ in model.named_parameters()]
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[state.optimizer]
    opt = cls(model.parameters(), lr=state.lr, betas=(state.beta1, state.beta2), eps=state.eps,
              weight_decay=state.weight_decay)
    saved = opt.state_dict()
    saved["state"] = {i: {"step": torch.tensor(float(state.step)), "exp_avg": state.tensors[f"exp_avg.{n}"].clone(),
                          "exp_avg_sq": state.tensors[f"exp_avg_sq.{n}"].clone()} for i, n in enumerate(names)}
    opt.load_state_dict(saved)
    batch = collate([encode_text(tokenizer, text)], pad_id(tokenizer))
    per_example_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"])[0][0].backward()
    opt.step()
    return probability(model, tokenizer, prompt, target)


def pairs_for(proponents):
    return [(q, p, t, [(rank, f"e{i}", TEXTS[i]) for rank, i in enumerate(proponents[q], 1)]) for q, p, t in QUERIES]


@pytest.mark.parametrize("kind", ["adamw", "adam"])
def test_equals_manual_optimizer_step(kind, tmp_path):
    model, tokenizer, state = trained(kind, tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    proponents = {"q1": [0, 3, 1], "q2": [4, 3]}  # e3 is shared: stepped once, measured for both
    table = tail_patch(model, tokenizer, state, pairs_for(proponents), TailPatchConfig(k=10, batch_size=1),
                       run_id="r")
    changes = [abs(r["p_after"] - r["p_before"]) for r in table.to_pylist()]
    assert min(changes) > 1e-6 and max(changes) > 1e-3  # the steps did something
    assert table.num_rows == 5 and set(table["run_id"].to_pylist()) == {"r"}
    for row in table.to_pylist():
        q, prompt, target = next(x for x in QUERIES if x[0] == row["query_id"])
        text = TEXTS[int(row["example_id"][1:])]
        assert row["p_before"] == pytest.approx(probability(model, tokenizer, prompt, target), rel=1e-6)
        want = manual_after(model, tokenizer, state, text, prompt, target)
        assert row["p_after"] == pytest.approx(want, rel=1e-5, abs=1e-9)
    for n, p in model.named_parameters():  # restored exactly
        assert torch.equal(p, before[n]), n


def test_runs_share_cache_and_k(tmp_path):
    model, tokenizer, state = trained("adamw", tmp_path)
    patcher = TailPatcher(model, tokenizer, state, TailPatchConfig(k=2))
    a = patcher.run({"a": pairs_for({"q1": [0, 3, 1], "q2": [4]})})
    assert a.num_rows == 3 and sorted(a["rank"].to_pylist()) == [1, 1, 2]  # rank 3 > k left out
    measured = dict(patcher.p_after)
    both = patcher.run({"a": pairs_for({"q1": [0, 3, 1], "q2": [4]}), "b": pairs_for({"q1": [3], "q2": [4, 0]})})
    assert both.num_rows == 6
    assert {k: patcher.p_after[k] for k in measured} == measured
    # batch composition does not matter: one big batch equals one query per pass
    single = tail_patch(model, tokenizer, state, pairs_for({"q1": [3], "q2": [4, 0]}), TailPatchConfig(batch_size=1))
    rows = {(r["query_id"], r["example_id"]): r["p_after"] for r in both.to_pylist() if r["run_id"] == "b"}
    for r in single.to_pylist():
        assert rows[(r["query_id"], r["example_id"])] == pytest.approx(r["p_after"], rel=1e-5)


def test_bad_state(tmp_path):
    model, tokenizer, state = trained("adamw", tmp_path)
    del state.tensors["exp_avg.transformer.h.0.mlp.c_fc.weight"]
    with pytest.raises(TrackstarError, match="transformer.h.0.mlp.c_fc.weight"):
        TailPatcher(model, tokenizer, state)
    state.optimizer = "adafactor"
    with pytest.raises(TrackstarError, match="adafactor"):
        TailPatcher(model, tokenizer, state)
