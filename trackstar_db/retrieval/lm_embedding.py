"""FTRACE's embedding baseline: the attributed model's own hidden states, compared by cosine.

Akyurek et al. (2022) compare training examples and queries by the representations of the model
being attributed. Here: each text (an example, or a query's prompt and target joined as
embedding.query_text joins them) is encoded like a training example (tokenize.encode_text,
cut at the model's context by the tokenizer models/load.open_model caps), run through the database's model, and the hidden states of one
layer are averaged over the real tokens (attention mask 1, the position-0 bos token excluded:
its state is the same for every text), then L2-normalised, so a dot product is the cosine.

Layer: `LAYER` = "input" (hidden_states[0]: token plus position embeddings, before any block),
chosen by benchmarks/lm_embedding_layers.py on the demo world over "middle" and "final" (figures:
benchmarks/RESULTS.md). The states after the blocks are, mean-pooled, nearly the same direction
for every text, so their cosine ranks examples almost at random.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from trackstar_db.errors import TrackstarError
from trackstar_db.models.load import open_model
from trackstar_db.store.checkpoints import source

LAYER = "input"
LAYERS = ("input", "middle", "final")


def layer_index(n_layers: int, layer: str | int) -> int:
    """Index into the model's hidden_states tuple (0 = embeddings, n_layers = the last block)."""
    if layer == "input":
        return 0
    if layer == "final":
        return n_layers
    if layer == "middle":
        return max(1, n_layers // 2)
    if isinstance(layer, int) and 0 <= layer <= n_layers:
        return layer
    raise TrackstarError(f"lm-embedding layer must be 'input', 'middle', 'final' or 0..{n_layers}, not {layer!r}")


@torch.inference_mode()
def embed(model, tokenizer, texts: Sequence[str], layer: str | int = LAYER, batch_size: int = 64) -> torch.Tensor:
    """Unit-norm mean-pooled hidden states [n, hidden] (float32, on the model's device) of `texts`;
    `tokenizer` as models/load.open_model gives it (capped at the model's context)."""
    from trackstar_db.featurizer.tokenize import collate, encode_text, pad_id  # heavy: transformers

    device = next(model.parameters()).device
    index = layer_index(model.config.num_hidden_layers, layer)
    skip_first = tokenizer.bos_token_id is not None
    out = []
    for start in range(0, len(texts), batch_size):
        items = [encode_text(tokenizer, t) for t in texts[start:start + batch_size]]
        batch = collate(items, pad_id(tokenizer))
        mask = batch["attention_mask"].to(device)
        hidden = model(input_ids=batch["input_ids"].to(device), attention_mask=mask,
                       output_hidden_states=True).hidden_states[index].float()  # [b, tokens, h]
        weight = mask.clone()
        if skip_first:
            weight[:, 0] = 0
        weight = weight.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1)
        norms = torch.linalg.vector_norm(mean, dim=1, keepdim=True)
        if bool((norms == 0).any()) or not bool(torch.isfinite(norms).all()):
            raise TrackstarError(f"lm-embedding: a text near position {start} has a zero or non-finite embedding")
        out.append(mean / norms)
    return torch.cat(out) if out else torch.zeros((0, model.config.hidden_size))


def example_batches(db, model, tokenizer, layer: str | int = LAYER, rows: int = 2048
                    ) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(ids, embeddings) of every example, in batches, for retrieval.topk.search."""
    for batch in db.dataset("examples").to_batches(columns=["example_id", "text"], batch_size=rows):
        yield batch.column("example_id").to_pylist(), embed(model, tokenizer, batch.column("text").to_pylist(), layer)


def top_k(db, texts: Sequence[str], k: int, device: str = "cpu", layer: str | int = LAYER):
    """Top-k examples by cosine of the database model's embeddings of `texts` (queries) and of each example."""
    from trackstar_db.store.vectors import scan_progress  # heavy: pyarrow

    from .topk import search  # heavy: pyarrow

    model, tokenizer = open_model(source(db).with_dtype("float32"), device)
    queries = embed(model, tokenizer, list(texts), layer)
    batches = scan_progress(example_batches(db, model, tokenizer, layer), db.count("examples"), "lm-embedding")
    return search(queries, batches, k, opponents=False)
