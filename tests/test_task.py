"""The task contract: completion-only gradients against a brute-force loop, the encoders against
the encoding they replaced, the module selection, and the manifest field (old manifests read as
the default task)."""

from __future__ import annotations

import json
from fnmatch import fnmatchcase

import pytest
import torch
import transformers
from tiny_tokenizers import word_tokenizer

from trackstar_db.featurizer import Featurizer, FeaturizerConfig, plan_layout, projection_matrix
from trackstar_db.featurizer.task import DEFAULT, Task, segments, task_of
from trackstar_db.featurizer.tokenize import IGNORE, collate, encode_query, encode_text, pad_id
from trackstar_db.sources.corpus import CorpusOptions, text_and_spans

PAIRS = [("what does Ada keep", "honey bees"), ("the river runs", "north past a mill"),
         ("why is sky blue", "because light scatters"), ("tell me about rivers", "they flow to sea"),
         ("hello how are you ", "fine thanks")]  # the last prompt ends in a space: no separator added
OPTIONS = CorpusOptions(prompt_field="prompt", completion_field="completion")


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


def tiny_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tokenizer),
                                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config._attn_implementation = "eager"
    return transformers.GPT2LMHeadModel(config).float().eval()


def words(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def brute_force(model, tokenizer, pairs, config, patterns=None):
    """One example at a time: the loss over the whole sequence [bos] prompt completion [eos] with
    the bos and prompt tokens' losses zeroed, full parameter gradients, explicit projections."""
    params = dict(model.named_parameters())
    names = [n for n, p in params.items() if p.dim() == 2
             and (patterns is None or any(fnmatchcase(n, pat) for pat in patterns))]
    layout = plan_layout(config, names)
    out = torch.zeros(len(pairs), layout.dim, dtype=torch.float64)
    for row, (prompt, completion) in enumerate(pairs):
        head = [tokenizer.bos_token_id] + words(tokenizer, prompt)
        tail = words(tokenizer, completion) + [tokenizer.eos_token_id]
        ids = torch.tensor([head + tail])
        weight = torch.tensor([0.0] * len(head) + [1.0] * len(tail))[1:]  # weight of each predicted token
        token_loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="none")
        loss = (token_loss * weight).sum() / weight.sum()
        grads = dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names])))
        for block in layout.blocks:
            g = grads[block.name].double()
            p_r = projection_matrix(config.seed, block.name, "row", block.k_r, g.shape[0]).double()
            p_c = projection_matrix(config.seed, block.name, "col", block.k_c, g.shape[1]).double()
            out[row, block.offset: block.offset + block.size] += (p_r @ g @ p_c.T).flatten()
    return out.float()


def completion_batch(tokenizer, task, pairs):
    rows = [text_and_spans({"prompt": p, "completion": c}, "x.jsonl", i, OPTIONS) for i, (p, c) in enumerate(pairs, 1)]
    return collate([task.encode_example(tokenizer, text, spans, 64) for text, spans in rows], pad_id(tokenizer))


def test_completion_only_gradients_equal_a_brute_force_loop(tokenizer):
    model, config, task = tiny_model(tokenizer), FeaturizerConfig(dim=1024, correction="none"), Task("completion")
    batch = completion_batch(tokenizer, task, PAIRS)
    got = Featurizer(model, config, task=task).featurize(batch).vectors["uncorrected"]
    want = brute_force(model, tokenizer, PAIRS, config)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    # the mask matters: the same sequences with the loss on every token give other vectors
    full = dict(batch, labels=torch.where(batch["attention_mask"].bool(), batch["input_ids"], IGNORE))
    full["labels"][:, 0] = IGNORE
    plain = Featurizer(model, config).featurize(full).vectors["uncorrected"]
    assert (plain - got).norm(dim=1).min() > 0.05 * got.norm(dim=1).max()


def test_module_patterns_select_the_tracked_matrices(tokenizer):
    model, config = tiny_model(tokenizer), FeaturizerConfig(dim=1024, correction="none")
    patterns = ("transformer.h.1.*",)
    task = Task("completion", modules=patterns)
    featurizer = Featurizer(model, config, task=task)
    assert [m.name for m in featurizer.tracked] == [n for n, p in model.named_parameters()
                                                    if p.dim() == 2 and n.startswith("transformer.h.1.")]
    got = featurizer.featurize(completion_batch(tokenizer, task, PAIRS[:3])).vectors["uncorrected"]
    want = brute_force(model, tokenizer, PAIRS[:3], config, patterns)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert featurizer.manifest()["task"] == {"examples": "completion", "queries": "target", "modules": list(patterns)}
    assert "task" not in Featurizer(model, config).manifest()  # the default task leaves old settings as they were
    with pytest.raises(ValueError, match="select no Linear"):
        Featurizer(model, config, task=Task(modules=("nothing.*",)))


def reference_text(tokenizer, text, max_length):
    """The encoders as they were before the task contract: the default task must not move a token."""
    ids = [tokenizer.bos_token_id] + words(tokenizer, text) + [tokenizer.eos_token_id]
    ids = ids[:max_length]
    return ids, [IGNORE] + ids[1:]


def reference_query(tokenizer, prompt, target, max_length):
    prompt_ids = [tokenizer.bos_token_id] + words(tokenizer, prompt)
    target_ids = words(tokenizer, ("" if prompt[-1:].isspace() else " ") + target)
    if len(prompt_ids) + len(target_ids) > max_length:
        prompt_ids = prompt_ids[-max(max_length - len(target_ids), 1):]
    return prompt_ids + target_ids, [IGNORE] * len(prompt_ids) + target_ids


@pytest.mark.parametrize("cut", [64, 6, 3])
def test_default_task_encodes_as_before(tokenizer, cut):
    for prompt, target in PAIRS:
        text = f"{prompt} {target}"
        got = DEFAULT.encode_example(tokenizer, text, None, cut)
        assert (got.input_ids, got.labels) == reference_text(tokenizer, text, cut)
        if len(words(tokenizer, " " + target)) < cut:
            got = DEFAULT.encode_query(tokenizer, prompt, target, cut)
            assert (got.input_ids, got.labels) == reference_query(tokenizer, prompt, target, cut)
            assert (got.input_ids, got.labels) == tuple(vars(encode_query(tokenizer, prompt, target, cut)).values())
        assert encode_text(tokenizer, text, cut) == DEFAULT.encode_example(tokenizer, text, None, cut)


def test_a_completion_is_a_query_plus_eos_and_keeps_its_end(tokenizer):
    task = Task("completion")
    for i, (prompt, completion) in enumerate(PAIRS, 1):
        text, spans = text_and_spans({"prompt": prompt, "completion": completion}, "x.jsonl", i, OPTIONS)
        example = task.encode_example(tokenizer, text, spans, 64)
        query = encode_query(tokenizer, prompt, completion, 64)
        assert example.input_ids == query.input_ids + [tokenizer.eos_token_id]
        assert example.labels == query.labels + [tokenizer.eos_token_id]
    # cut: the prompt loses its start; a completion longer than the cut keeps one prompt token
    text, spans = text_and_spans({"prompt": "the river runs north past", "completion": "a mill"}, "x", 1, OPTIONS)
    cut = task.encode_example(tokenizer, text, spans, 5)
    assert tokenizer.convert_ids_to_tokens(cut.input_ids) == ["north", "past", "a", "mill", "<eos>"]
    assert cut.labels[:2] == [IGNORE, IGNORE] and IGNORE not in cut.labels[2:]
    text, spans = text_and_spans({"prompt": "hello", "completion": "the river runs north past a mill"}, "x", 1, OPTIONS)
    cut = task.encode_example(tokenizer, text, spans, 4)
    assert tokenizer.convert_ids_to_tokens(cut.input_ids) == ["hello", "the", "river", "runs"]
    assert cut.labels[0] == IGNORE and IGNORE not in cut.labels[1:]


def test_segments_and_bad_spans():
    assert segments("abcdef", [1, 3, 4, 6]) == [("a", False), ("bc", True), ("d", False), ("ef", True)]
    for bad in ([1], [3, 1], [0, 9], [-1, 2]):
        with pytest.raises(ValueError, match="loss spans"):
            segments("abcdef", bad)
    with pytest.raises(ValueError, match="without loss spans"):
        Task("chat").encode_example(None, "text", None)


def test_task_round_trip_and_manifests_without_the_field():
    task = Task("chat", modules=["transformer.h.*"])
    assert Task.from_dict(json.loads(json.dumps(task.to_dict()))) == task
    assert task_of({"format": "trackstar-db", "format_version": 2, "model": None}) == DEFAULT == Task()
    with pytest.raises(ValueError, match="examples must be one of"):
        Task("tokens")
    with pytest.raises(ValueError, match="unknown field"):
        Task.from_dict({"examples": "all", "weights": 2})


def test_tail_patch_steps_on_the_completion_loss(tokenizer):
    """Tail-patch's optimizer step on a completion example equals a manual AdamW step on the loss
    with the prompt tokens zeroed (and differs from a step on every token)."""
    import copy

    from trackstar_db.featurizer.optimizer_state import OptimizerState
    from trackstar_db.tailpatch.patcher import TailPatcher

    model = tiny_model(tokenizer)
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for n, p in model.named_parameters():
        tensors[f"exp_avg.{n}"] = torch.randn(p.shape, generator=g) * 1e-3
        tensors[f"exp_avg_sq.{n}"] = torch.rand(p.shape, generator=g) * 1e-5 + 1e-8
    state = OptimizerState("adamw", step=10, lr=3e-2, beta2=0.999, tensors=tensors)
    (prompt, completion), (q_prompt, q_target) = PAIRS[1], PAIRS[0]
    text, spans = text_and_spans({"prompt": prompt, "completion": completion}, "x.jsonl", 1, OPTIONS)
    pairs = [("q", q_prompt, q_target, [(1, "e", text)])]
    got = TailPatcher(model, tokenizer, state, task=Task("completion"), spans={"e": spans}).run({"r": pairs})
    plain = TailPatcher(model, tokenizer, state).run({"r": pairs})

    manual = copy.deepcopy(model)
    names = [n for n, _ in manual.named_parameters()]
    opt = torch.optim.AdamW(manual.parameters(), lr=state.lr, betas=(state.beta1, state.beta2), eps=state.eps,
                            weight_decay=state.weight_decay)
    saved = opt.state_dict()
    saved["state"] = {i: {"step": torch.tensor(float(state.step)), "exp_avg": tensors[f"exp_avg.{n}"].clone(),
                          "exp_avg_sq": tensors[f"exp_avg_sq.{n}"].clone()} for i, n in enumerate(names)}
    opt.load_state_dict(saved)
    head = [tokenizer.bos_token_id] + words(tokenizer, prompt)
    ids = torch.tensor([head + words(tokenizer, completion) + [tokenizer.eos_token_id]])
    weight = torch.tensor([0.0] * len(head) + [1.0] * (ids.shape[1] - len(head)))[1:]
    token_loss = torch.nn.functional.cross_entropy(manual(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="none")
    ((token_loss * weight).sum() / weight.sum()).backward()
    opt.step()
    query = collate([encode_query(tokenizer, q_prompt, q_target)], pad_id(tokenizer))
    with torch.no_grad():
        from trackstar_db.featurizer.task import per_example_loss

        loss, n = per_example_loss(manual(input_ids=query["input_ids"]).logits, query["labels"])
    want = float(torch.exp(-(loss.double() * n))[0])
    assert got.column("p_after")[0].as_py() == pytest.approx(want, rel=1e-5)
    assert abs(plain.column("p_after")[0].as_py() - want) > 1e-3 * want
