"""lm-embedding: the attributed model's mean-pooled hidden states, checked against a direct computation."""

import numpy as np
import pytest
import torch


def direct_embedding(model, tokenizer, text, index):
    """One text alone (no padding): bos + tokens + eos, mean of hidden_states[index] after bos, unit norm."""
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = ids[:model.config.n_positions]
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[index][0]
    mean = hidden[1:].double().mean(dim=0)
    return (mean / mean.norm()).numpy()


@pytest.mark.parametrize("layer", ["input", "final"])
def test_retrieval_matches_direct_hidden_state_cosine(tiny_db, layer):
    from trackstar_db.retrieval import lm_embedding
    from trackstar_db.retrieval.embedding import query_text

    from trackstar_db.models.load import open_model
    from trackstar_db.store.checkpoints import source

    model, tokenizer = open_model(source(tiny_db))
    index = lm_embedding.layer_index(model.config.num_hidden_layers, layer)
    assert index == {"input": 0, "final": model.config.num_hidden_layers}[layer]
    assert lm_embedding.layer_index(4, "middle") == 2 and lm_embedding.LAYER == "input"
    examples = tiny_db.table("examples", columns=["example_id", "text"])
    ids, texts = examples.column("example_id").to_pylist(), examples.column("text").to_pylist()
    queries = tiny_db.table("queries", columns=["prompt", "target"]).slice(0, 3).to_pylist()
    query_texts = [query_text(q["prompt"], q["target"]) for q in queries]

    batched = lm_embedding.embed(model, tokenizer, texts[:20] + query_texts, layer, batch_size=7)  # padded batches
    direct = np.stack([direct_embedding(model, tokenizer, t, index) for t in texts[:20] + query_texts])
    np.testing.assert_allclose(batched.numpy(), direct, atol=1e-5)

    all_direct = np.stack([direct_embedding(model, tokenizer, t, index) for t in texts])
    scores = direct[20:] @ all_direct.T                      # cosine of each query with every example
    result = lm_embedding.top_k(tiny_db, query_texts, k=5, layer=layer)
    for row in range(len(queries)):
        expected = np.sort(scores[row])[::-1][:5]
        np.testing.assert_allclose(result.proponent_scores[row], expected, atol=1e-5)
        got = [ids.index(e) for e in result.proponent_ids[row]]
        np.testing.assert_allclose(scores[row, got], expected, atol=1e-5)


def test_lm_embedding_is_a_stored_method(tiny_db):
    from click.testing import CliRunner

    from trackstar_db.cli import main
    from trackstar_db.retrieval.methods import ALL_METHODS, expand

    assert "lm-embedding" in ALL_METHODS and "lm-embedding" in expand(["all"], installed=lambda m: True)
    result = CliRunner().invoke(main, ["retrieve", str(tiny_db.path), "--method", "lm-embedding", "--k", "3",
                                       "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = tiny_db.sql("SELECT query_id, rank, score FROM retrievals WHERE method = 'lm-embedding' ORDER BY query_id, rank")
    prompt0 = tiny_db.sql("SELECT count(*) AS n FROM queries WHERE template = 'prompt0'").column("n")[0].as_py()
    assert prompt0 > 0 and rows.num_rows == 3 * prompt0  # prompt0 queries x k, no other template
    assert set(rows.column("rank").to_pylist()) == {1, 2, 3}
    scores = np.array(rows.column("score").to_pylist()).reshape(-1, 3)
    assert (np.diff(scores, axis=1) <= 1e-6).all() and (np.abs(scores) <= 1 + 1e-5).all()
    from trackstar_db.errors import TrackstarError
    from trackstar_db.retrieval.lm_embedding import layer_index

    with pytest.raises(TrackstarError, match="lm-embedding layer must be 'input', 'middle', 'final' or 0..2, not 'top'"):
        layer_index(2, "top")
    assert [layer_index(2, name) for name in ("input", "middle", "final", 1)] == [0, 1, 2, 1]
