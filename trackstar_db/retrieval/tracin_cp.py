"""TracIn-CP (Pruthi et al. 2020) over the checkpoints a training run kept.

    score(z, q) = sum over checkpoints c of lr_c * t(g_c(z)) . t(g_c(q))

with g_c the projected loss gradient (featurizer.per_example.Featurizer, the database's projection
settings) at checkpoint c, lr_c the learning rate recorded in c's optimizer.safetensors, and t one
of the variants:

| method        | gradient                        | t               |
|---------------|---------------------------------|-----------------|
| tracin-cp     | uncorrected                     | identity        |
| tracin-cp-cos | uncorrected                     | unit norm       |
| tracin-cp-opt | corrected by c's Adam 1/sqrt(V) | unit norm       |

Checkpoints: `checkpoints(model_dir)` = model_dir/checkpoints/step-* (testbed.train keeps them
with `checkpoints=N`) in step order, then model_dir itself. Vectors are computed in memory per
checkpoint (no gradient tables per checkpoint yet): fine for the testbed worlds, not for a corpus
that needs the resumable worker.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from trackstar_db.errors import TrackstarError

VARIANTS = {"tracin-cp": ("uncorrected", False), "tracin-cp-cos": ("uncorrected", True),
            "tracin-cp-opt": ("corrected", True)}


@dataclass(frozen=True)
class Checkpoint:
    name: str
    path: Path
    lr: float


def checkpoints(model_dir: str | Path) -> list[Checkpoint]:
    """The intermediate checkpoints of a run (step order) and the final one, with their learning rates."""
    from trackstar_db.featurizer import optimizer_state

    model_dir = Path(model_dir)
    paths = sorted((model_dir / "checkpoints").glob("step-*")) + [model_dir]
    out = []
    for path in paths:
        state_file = path / "optimizer.safetensors"
        if not state_file.is_file():
            raise TrackstarError(f"{state_file}: missing; TracIn-CP needs each checkpoint's learning rate")
        out.append(Checkpoint("final" if path == model_dir else path.name, path, optimizer_state.load(state_file).lr))
    return out


def _featurizer(checkpoint: Checkpoint, config, variant: str, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trackstar_db.featurizer import optimizer_state
    from trackstar_db.featurizer.per_example import Featurizer
    from trackstar_db.featurizer.second_moment import build_second_moment

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint.path), local_files_only=True, dtype="float32")
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint.path), local_files_only=True)
    context = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if context:
        config = replace(config, max_length=min(config.max_length, int(context)))
    if variant == "uncorrected":
        return Featurizer(model, replace(config, correction="none"), None, device), tokenizer
    config = replace(config, correction="adam-factored" if config.correction in ("auto", "none") else config.correction)
    state = optimizer_state.load(checkpoint.path / "optimizer.safetensors")
    return Featurizer(model, config, build_second_moment(config, model, state, None, device), device), tokenizer


def _vectors(featurizer, items, pad: int, batch_size: int) -> torch.Tensor:
    from trackstar_db.featurizer.tokenize import collate

    out = [featurizer.featurize(collate(items[i:i + batch_size], pad)).vectors
           for i in range(0, len(items), batch_size)]
    variant = featurizer.variants[0]
    return torch.cat([o[variant] for o in out])


def scores(points: Sequence[Checkpoint], texts: Sequence[str], queries: Sequence[tuple[str, str]], config,
           method: str = "tracin-cp", device: str = "cpu", batch_size: int = 16) -> torch.Tensor:
    """[n_queries, n_texts] TracIn-CP scores of each (prompt, target) query against each training text."""
    from trackstar_db.featurizer.tokenize import encode_query, encode_text, pad_id

    from .methods import unit_normalize

    if method not in VARIANTS:
        raise TrackstarError(f"unknown TracIn-CP method {method!r}; methods: {', '.join(VARIANTS)}")
    if not points:
        raise TrackstarError("TracIn-CP needs at least one checkpoint")
    variant, unit = VARIANTS[method]
    total = torch.zeros((len(queries), len(texts)), dtype=torch.float64)
    for point in points:
        featurizer, tokenizer = _featurizer(point, config, variant, device)
        pad, cut = pad_id(tokenizer), featurizer.config.max_length
        z = _vectors(featurizer, [encode_text(tokenizer, t, cut) for t in texts], pad, batch_size)
        q = _vectors(featurizer, [encode_query(tokenizer, p, t, cut) for p, t in queries], pad, batch_size)
        if unit:
            z, q = unit_normalize(z), unit_normalize(q)
        total += point.lr * (q.double() @ z.double().T)
    return total


def top_k(db, query_texts: Sequence[tuple[str, str]], k: int, method: str = "tracin-cp", device: str = "cpu"):
    """Top-k proponents and opponents per query over every example (retrieval.topk.TopKResult)."""
    from trackstar_db.featurizer.config import FeaturizerConfig

    import numpy as np

    from .topk import TopKResult

    entry = db.manifest.get("featurizer")
    config = FeaturizerConfig.from_dict(entry["config"]) if entry else FeaturizerConfig()
    examples = db.table("examples", columns=["example_id", "text"])
    ids, texts = examples.column("example_id").to_pylist(), examples.column("text").to_pylist()
    score = scores(checkpoints(db.model_info()["path"]), texts, query_texts, config, method, device)
    kk = min(k, len(ids))
    best, worst = torch.topk(score, kk, dim=1), torch.topk(score, kk, dim=1, largest=False)
    return TopKResult([[ids[i] for i in row] for row in best.indices.tolist()], best.values.float().numpy().astype(np.float32),
                      [[ids[i] for i in row] for row in worst.indices.tolist()], worst.values.float().numpy().astype(np.float32))


def top_k_stored(db, query_ids: Sequence[str], k: int, method: str = "tracin-cp", device: str = "cpu"):
    """top_k for stored queries of the database, by id (the target-only loss needs prompt and target apart)."""
    import pyarrow.compute as pc

    rows = db.table("queries", columns=["query_id", "prompt", "target"], filter=pc.field("query_id").isin(list(query_ids)))
    pairs = {q: (p, t) for q, p, t in zip(*(rows.column(c).to_pylist() for c in ("query_id", "prompt", "target")))}
    missing = [q for q in query_ids if q not in pairs]
    if missing:
        raise TrackstarError(f"{method}: query {missing[0]!r} is not in the queries table (ad-hoc queries are not supported)")
    return top_k(db, [pairs[q] for q in query_ids], k, method, device)
