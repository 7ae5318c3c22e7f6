"""Issue 15, as a user types it: a Llama-family checkpoint (GQA, tied embeddings, random
weights) and a plain text corpus without facts: init, ingest corpus, ingest gradients, fit,
query. Without optimizer state (--correction estimated) and with one (optimizer.safetensors)."""

import json

import pytest
import torch
from click.testing import CliRunner

from tiny_checkpoints import save_checkpoint, sentences
from trackstar_db.cli import main


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _with_adamw_state(model_dir, model, tokenizer, texts):
    """Two AdamW steps on the corpus, then the weights and optimizer.safetensors saved."""
    from trackstar_db.featurizer import optimizer_state
    from trackstar_db.featurizer.tokenize import collate, encode_text, pad_id

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = collate([encode_text(tokenizer, t) for t in texts[:16]], pad_id(tokenizer))
    for _ in range(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(str(model_dir))
    optimizer_state.save(optimizer_state.from_torch_adam(optimizer, dict(model.named_parameters())), model_dir)


@pytest.mark.parametrize("with_state", [False, True], ids=["no-optimizer-state", "optimizer-state"])
def test_corpus_without_facts_end_to_end(tmp_path, with_state):
    torch.set_num_threads(1)
    texts = sentences(60)
    model_dir = tmp_path / "llama"
    model, tokenizer = save_checkpoint(model_dir, texts, family="llama", context=64)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["num_key_value_heads"] < config["num_attention_heads"] and config["tie_word_embeddings"]
    if with_state:
        _with_adamw_state(model_dir, model, tokenizer, texts)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    db = tmp_path / "db"

    run("init", db, "--model", model_dir)
    assert "added 60 examples" in run("ingest", "corpus", db, corpus)
    args = ["ingest", "gradients", db, "--dim", 1024, "--device", "cpu"]
    out = run(*(args if with_state else args + ["--correction", "estimated"]))
    assert f"correction: {'adam-factored' if with_state else 'estimated'}" in out
    out = run("fit", db, "--mix", "train")
    assert "grads_train_corrected.train" in out and "mixed" not in out
    out = run("query", db, "--prompt", "The old river", "--target", "bridge", "--k", 3)
    assert "(method: r-train)" in out
    proponents = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(proponents) >= 3

    out = run("fit", db)  # the task mix, with no queries: one line says it fell back
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "R_train" in notes[0]
    assert "(method: r-train)" in run("query", db, "--prompt", "The old river", "--target", "bridge", "--k", 3)
    assert "no problems found" in run("check", db)
