"""Chat records: rendered with the model's own chat template, the loss mask on exactly the
assistant turns, featurized through the worker; bad records and template-less tokenizers stop
with one line and lose nothing."""

from __future__ import annotations

import json

import pytest
import torch
from test_task_ingest import error_line, run, snapshot, write_jsonl
from tiny_tokenizers import CHATML, model_dir, word_tokenizer

from trackstar_db import connect
from trackstar_db.featurizer import Featurizer, FeaturizerConfig
from trackstar_db.featurizer.task import Task, task_of
from trackstar_db.featurizer.tokenize import IGNORE, collate, pad_id
from trackstar_db.sources.chat import render

CONVERSATIONS = [
    [{"role": "system", "content": "answer question"}, {"role": "user", "content": "what does Ada keep"},
     {"role": "assistant", "content": "honey bees"}, {"role": "user", "content": "why is sky blue"},
     {"role": "assistant", "content": "because light scatters"}],
    [{"role": "user", "content": "hello how are you"}, {"role": "assistant", "content": "fine thanks"}],
    [{"role": "user", "content": "tell me about rivers"}, {"role": "assistant", "content": "they flow to sea"},
     {"role": "user", "content": "the mill"}],  # ends on a user turn: no loss there
]


def assistant_positions(tokens: list[str]) -> list[int]:
    """Positions inside assistant turns, found by reading the token stream: after the header
    '<|im_start|> assistant' up to and including the '<|im_end|>' that closes the turn."""
    inside, out = False, []
    for i, token in enumerate(tokens):
        if inside:
            out.append(i)
            inside = token != "<|im_end|>"
        elif token == "assistant" and i and tokens[i - 1] == "<|im_start|>":
            inside = True
    return out


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_a_chat_mask_covers_exactly_the_assistant_tokens(messages):
    tokenizer = word_tokenizer(chat_template=CHATML)
    text, spans = render(tokenizer, messages, "chat.jsonl", 1)
    assert text == tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = Task("chat").encode_example(tokenizer, text, spans, 64)
    assert encoded.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]  # the template's own tokens
    tokens = tokenizer.convert_ids_to_tokens(encoded.input_ids)
    masked = [i for i, label in enumerate(encoded.labels) if label != IGNORE]
    assert masked == assistant_positions(tokens)
    want = [t for m in messages if m["role"] == "assistant" for t in m["content"].split() + ["<|im_end|>"]]
    assert [tokens[i] for i in masked] == want
    assert all(encoded.labels[i] == encoded.input_ids[i] for i in masked)


def test_a_template_with_a_generation_header_of_its_own():
    """A Llama-3-like template: the assistant header comes from add_generation_prompt and is no loss."""
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }} said\n{{ m['content'] }}<|im_end|>{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant said\n{% endif %}")
    tokenizer = word_tokenizer(chat_template=template)
    messages = CONVERSATIONS[1]
    text, spans = render(tokenizer, messages, "chat.jsonl", 1)
    assert [text[a:b] for a, b in zip(spans[::2], spans[1::2])] == ["fine thanks<|im_end|>"]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return model_dir(tmp_path_factory.mktemp("chat") / "model", CHATML)


def test_chat_records_ingest_and_featurize_on_the_assistant_turns(tmp_path, chat_model):
    db = tmp_path / "db"
    run("init", db, "--model", chat_model)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"id": f"c{i}", "messages": m, "lang": "en"}
                                                 for i, m in enumerate(CONVERSATIONS)])
    assert "added 3 examples" in run("ingest", "corpus", db, path, "--messages-field", "messages").output
    handle = connect(db)
    assert task_of(handle.manifest) == Task("chat")
    rows = {r["example_id"]: r for r in handle.table("examples").to_pylist()}
    tokenizer = word_tokenizer(chat_template=CHATML)
    assert (rows["c1"]["text"], rows["c1"]["loss_spans"]) == render(tokenizer, CONVERSATIONS[1], "x", 1)
    assert json.loads(rows["c1"]["metadata"]) == {"lang": "en"}
    run("ingest", "gradients", db, "--correction", "none", "--dim", "1024", "--device", "cpu")
    stored = connect(db).table("grads_train_uncorrected")
    got = dict(zip(stored.column("id").to_pylist(), torch.tensor(stored.column("vector").to_pylist())))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(chat_model), local_files_only=True).float().eval()
    task = Task("chat")
    items = [task.encode_example(tokenizer, rows[f"c{i}"]["text"], rows[f"c{i}"]["loss_spans"], 64) for i in range(3)]
    want = Featurizer(model, FeaturizerConfig(dim=1024, correction="none"), task=task).featurize(
        collate(items, pad_id(tokenizer))).vectors["uncorrected"]
    torch.testing.assert_close(torch.stack([got[f"c{i}"] for i in range(3)]), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("record, message", [
    ({"id": "b", "text": "no messages here"}, "missing field 'messages'"),
    ({"id": "b", "messages": [{"role": "user", "content": "hello"}]}, "field 'messages' has no assistant turn"),
    ({"id": "b", "messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": " "}]},
     "field 'messages'[1]: the assistant turn is empty"),
    ({"id": "b", "messages": [{"role": "user", "text": "hello"}]}, "field 'messages'[0] must be an object"),
    ({"id": "b", "messages": [{"role": 3, "content": "hello"}]}, "field 'messages'[0] must be an object"),
    ({"id": "b", "messages": "hello"}, "field 'messages' must be a non-empty list"),
    ({"id": "b", "messages": [{"role": "user", "content": "river " * 70}, {"role": "assistant", "content": "fine"}]},
     "no assistant token lies within the first 64 tokens"),  # the tiny model's context is 64
])
def test_bad_chat_records_stop_with_one_line_and_lose_nothing(tmp_path, chat_model, record, message):
    db = tmp_path / "db"
    run("init", db, "--model", chat_model)
    run("ingest", "corpus", db, write_jsonl(tmp_path / "ok.jsonl", [{"id": "a", "messages": CONVERSATIONS[1]}]),
        "--messages-field", "messages")
    before = snapshot(db)
    path = write_jsonl(tmp_path / "bad.jsonl", [{"id": "g", "messages": CONVERSATIONS[0]}, record])
    line = error_line(run("ingest", "corpus", db, path, "--messages-field", "messages", ok=False))
    assert f"{path}:2: {message}" in line
    assert snapshot(db) == before
    assert "added 1 examples" in run("ingest", "corpus", db, path, "--messages-field", "messages", "--skip-bad").output


def test_a_tokenizer_without_a_chat_template_names_the_fix(tmp_path):
    plain_model = model_dir(tmp_path / "plain_model")  # no chat template
    db = tmp_path / "db"
    run("init", db, "--model", plain_model)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"id": "c", "messages": CONVERSATIONS[1]}])
    before = snapshot(db)
    line = error_line(run("ingest", "corpus", db, path, "--messages-field", "messages", ok=False))
    assert "has no chat template" in line and "'chat_template'" in line and line.startswith("Error: --chat-template ")
    assert str(plain_model) in line
    assert snapshot(db) == before
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    run("ingest", "corpus", db, path, "--messages-field", "messages", "--chat-template", template)
    assert connect(db).table("examples").column("loss_spans").to_pylist() == [
        render(word_tokenizer(chat_template=CHATML), CONVERSATIONS[1], "x", 1)[1]]
    nomodel = tmp_path / "nomodel"
    run("init", nomodel)
    line = error_line(run("ingest", "corpus", nomodel, path, "--messages-field", "messages", ok=False))
    assert "--model" in line


def test_a_template_that_does_not_render_prefixes_is_refused(tmp_path):
    tokenizer = word_tokenizer(chat_template="{% for m in messages|reverse %}{{ m['content'] }} {% endfor %}")
    with pytest.raises(Exception, match="prefixes"):
        render(tokenizer, CONVERSATIONS[0], "chat.jsonl", 3)
