"""Texts and prompts longer than the model's context: capped at it, never an IndexError.

A text keeps its start (its vector equals that of its first context-1 words), a query keeps its
end (the prompt is cut from the left, the target kept whole), and the manifest records the cap."""

import json

import pytest
from click.testing import CliRunner

from tiny_checkpoints import save_checkpoint, sentences
from trackstar_db.cli import main
from trackstar_db.featurizer.tokenize import IGNORE, encode_query, encode_text
from trackstar_db.models.context import cap_tokenizer

CONTEXT = 32


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("context")
    texts = sentences(40)
    long_text = " ".join(texts[:12])  # far more than CONTEXT words
    model, tokenizer = save_checkpoint(root / "model", texts, family="gpt2", context=CONTEXT)
    return root, texts, long_text, model, tokenizer


def test_encodings_are_capped_at_the_model_context(checkpoint):
    _, texts, long_text, model, tokenizer = checkpoint
    assert cap_tokenizer(tokenizer, model.config, 512) == CONTEXT
    text = encode_text(tokenizer, long_text, 512)
    assert len(text.input_ids) == CONTEXT
    assert text.input_ids == encode_text(tokenizer, " ".join(long_text.split()[:CONTEXT - 1]), 512).input_ids
    query = encode_query(tokenizer, long_text, "winter light", 512)
    target = tokenizer("winter light", add_special_tokens=False)["input_ids"]
    assert len(query.input_ids) == CONTEXT and query.input_ids[-len(target):] == target
    assert query.labels == [IGNORE] * (CONTEXT - len(target)) + target
    prompt_end = tokenizer(long_text, add_special_tokens=False)["input_ids"][-(CONTEXT - len(target)):]
    assert query.input_ids[:-len(target)] == prompt_end  # the prompt keeps its end
    with pytest.raises(ValueError, match="context"):
        encode_query(tokenizer, "the", " ".join(["river"] * CONTEXT), 512)


def test_long_texts_and_prompts_run_end_to_end(checkpoint, tmp_path):
    root, texts, long_text, _, _ = checkpoint
    corpus = tmp_path / "corpus.jsonl"
    prefix = " ".join(long_text.split()[:CONTEXT - 1])  # what the cap keeps of long_text
    rows = [{"id": "long", "text": long_text}, {"id": "prefix", "text": prefix}]
    rows += [{"id": f"s{i}", "text": t} for i, t in enumerate(texts)]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    db = tmp_path / "db"
    run("init", db, "--model", root / "model")
    run("ingest", "corpus", db, corpus, "--id-field", "id")
    run("ingest", "gradients", db, "--correction", "estimated", "--dim", 1024, "--device", "cpu")
    manifest = json.loads((db / "manifest.json").read_text())
    assert manifest["featurizer"]["context_cap"] == CONTEXT
    import trackstar_db

    handle = trackstar_db.connect(db)
    table = handle.table("grads_train_corrected", columns=["id", "vector", "n_tokens"]).to_pylist()
    by_id = {r["id"]: r for r in table}
    assert by_id["long"]["n_tokens"] == CONTEXT - 1
    assert by_id["long"]["vector"] == pytest.approx(by_id["prefix"]["vector"], rel=1e-4, abs=1e-6)
    out = run("query", db, "--prompt", long_text, "--target", "winter light", "--method", "opt-cos", "--k", 3)
    assert "method: opt-cos" in out
