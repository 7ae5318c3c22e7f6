"""TracIn-CP (Pruthi et al. 2020) over the checkpoints a training run kept.

    score(z, q) = sum over checkpoints c of lr_c * t(g_c(z)) . t(g_c(q))

with g_c the projected loss gradient (featurizer.per_example.Featurizer, the database's projection
settings) at checkpoint c, lr_c the learning rate recorded in c's optimizer state, and t one
of the variants:

| method        | gradient                        | t               |
|---------------|---------------------------------|-----------------|
| tracin-cp     | uncorrected                     | identity        |
| tracin-cp-cos | uncorrected                     | unit norm       |
| tracin-cp-opt | corrected by c's second moment  | unit norm       |

Each checkpoint is a models.source.ModelSource, featurized through the same factory and
featurizer builder as the gradient worker (gradients/loader.load_featurizer): the stored
model dtype, PEFT adapters, the context rule and the correction the recipe resolves to (a
recipe without one takes settings.default_correction of c's optimizer, as a first run would).

Where the vectors come from (`top_k`):

- stored: when checkpoints are attached to the database (`ingest gradients --checkpoint NAME`,
  store/checkpoints.py), or the model kept none, the sum runs over the attached checkpoints and
  the final one, reading each one's gradient tables (store/gradient_table.py) in batches: one
  scan per checkpoint and block of queries, memory O(queries x examples) per block. A missing or
  incomplete table is refused with the command that writes it.
- in memory: when the model kept intermediate checkpoints (model_dir/checkpoints/step-*,
  `train --checkpoints N`) and none is attached, each is featurized in memory on every call
  (`scores`; a note on stderr says how to store them): fine for the testbed worlds, not for a
  corpus that needs the resumable worker.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch

from trackstar_db import defaults
from trackstar_db.errors import TrackstarError
from trackstar_db.models.source import ModelSource
from trackstar_db.store.checkpoints import attached, kept, stored
from trackstar_db.store.gradient_table import GradientTable
from .methods import unit_normalize

VARIANTS = {"tracin-cp": ("uncorrected", False), "tracin-cp-cos": ("uncorrected", True),
            "tracin-cp-opt": ("corrected", True)}
SCORE_BYTES = 1 << 30  # the [queries, examples] float64 block summed over checkpoints, at most


def checkpoint_featurizer(point: ModelSource, config, variant: str, device: str = "cpu",
                          sample: Callable[[], Sequence] | None = None, task=None):
    """(Featurizer, tokenizer) of checkpoint `point` that makes `variant` ('uncorrected' |
    'corrected') with the database's projection settings `config` and task (featurizer/task.py)."""
    from trackstar_db.featurizer.settings import default_correction  # heavy: transformers
    from trackstar_db.gradients.loader import load_featurizer  # heavy: transformers

    if variant == "uncorrected":
        config = replace(config, correction="none")
    elif config.correction in ("auto", "none"):
        config = replace(config, correction=default_correction(point.optimizer))
    return load_featurizer(point, config, device, sample=sample, task=task)


def _vectors(featurizer, items, pad: int, batch_size: int) -> torch.Tensor:
    from trackstar_db.featurizer.tokenize import collate  # heavy: transformers

    out = [featurizer.featurize(collate(items[i:i + batch_size], pad)).vectors
           for i in range(0, len(items), batch_size)]
    variant = featurizer.variants[0]
    return torch.cat([o[variant] for o in out])


def scores(points: Sequence[ModelSource], texts: Sequence[str], queries: Sequence[tuple[str, str]], config,
           method: str = "tracin-cp", device: str = "cpu", batch_size: int = 16,
           sample: Callable[[], Sequence] | None = None, task=None, spans: Sequence | None = None) -> torch.Tensor:
    """[n_queries, n_texts] TracIn-CP scores of each (prompt, target) query against each training
    text, encoded under `task` (featurizer/task.py; `spans`: the texts' loss spans when masked).
    `sample`: the training texts (or (text, spans) pairs) an 'estimated' correction averages
    over (default: the first gradients.loader.ESTIMATE_SAMPLE of `texts`)."""
    from trackstar_db.featurizer.tokenize import pad_id  # heavy: transformers
    from trackstar_db.gradients.loader import ESTIMATE_SAMPLE  # heavy: transformers

    variant, unit = _check(method)
    if not points:
        raise TrackstarError("TracIn-CP needs at least one checkpoint")
    spans = list(spans) if spans is not None else [None] * len(texts)
    sample = sample or (lambda: list(zip(texts[:ESTIMATE_SAMPLE], spans[:ESTIMATE_SAMPLE])))
    total = torch.zeros((len(queries), len(texts)), dtype=torch.float64)
    for point in points:
        featurizer, tokenizer = checkpoint_featurizer(point, config, variant, device, sample, task)
        pad, cut, encoder = pad_id(tokenizer), featurizer.config.max_length, featurizer.task
        z = _vectors(featurizer, [encoder.encode_example(tokenizer, t, s, cut) for t, s in zip(texts, spans)], pad,
                     batch_size)
        q = _vectors(featurizer, [encoder.encode_query(tokenizer, p, t, cut) for p, t in queries], pad, batch_size)
        if unit:
            z, q = unit_normalize(z), unit_normalize(q)
        total += point.lr * (q.double() @ z.double().T)
    return total


def _check(method: str) -> tuple[str, bool]:
    if method not in VARIANTS:
        raise TrackstarError(f"unknown TracIn-CP method {method!r}; methods: {', '.join(VARIANTS)}")
    return VARIANTS[method]


def _table(db, split: str, variant: str, point: ModelSource, n_rows: int) -> GradientTable:
    table = GradientTable(db, split, variant, point.name).require()
    if table.count() != n_rows:  # an interrupted ingest: resume it rather than sum over part of the corpus
        where = "" if table.is_default else f" --checkpoint {point.name}"
        raise TrackstarError(f"table {table.name} holds {table.count():,} of {n_rows:,} rows; run 'trackstar-db ingest "
                             f"gradients {db.path} --split {split}{where}' to finish it")
    return table


def _query_vectors(table: GradientTable, query_ids: Sequence[str]) -> torch.Tensor:
    import pyarrow.compute as pc  # heavy: pyarrow

    from trackstar_db.store.vectors import to_torch  # heavy: pyarrow

    rows = table.dataset().to_table(columns=["id", "vector"], filter=pc.field("id").isin(list(query_ids)))
    order = pc.index_in(query_ids, value_set=rows.column("id"))
    if order.null_count:
        raise TrackstarError(f"{table.name}: query {query_ids[order.is_null().index(True).as_py()]!r} has no gradient; "
                             f"run 'trackstar-db ingest gradients {table.db.path} --split queries'")
    return to_torch(rows.column("vector").take(order), table.dtype).double()


def stored_scores(db, points: Sequence[ModelSource], example_ids: Sequence[str], query_ids: Sequence[str],
                  method: str = "tracin-cp", batch_rows: int = defaults.STREAM_BATCH_ROWS) -> torch.Tensor:
    """[n_queries, n_examples] TracIn-CP scores from the checkpoints' stored gradient tables
    (examples in the order of `example_ids`)."""
    import pyarrow as pa  # heavy: pyarrow
    import pyarrow.compute as pc  # heavy: pyarrow

    variant, unit = _check(method)
    every = pa.array(list(example_ids), pa.string())
    total = torch.zeros((len(query_ids), len(example_ids)), dtype=torch.float64)
    for point in points:
        q = _query_vectors(_table(db, "queries", variant, point, db.count("queries")), query_ids)
        q = unit_normalize(q) if unit else q
        for ids, z in _table(db, "train", variant, point, len(example_ids)).batches(batch_rows):
            columns = torch.from_numpy(pc.index_in(pa.array(ids, pa.string()), value_set=every).to_numpy(False))
            z = z.double()
            total[:, columns] += point.lr * (q @ (unit_normalize(z) if unit else z).T)
    return total


def _points(db, method: str) -> tuple[str, list[ModelSource]]:
    """('stored' | 'memory', the checkpoints summed over); see the module docstring."""
    model_dir = db.model_info()["path"]
    local = kept(model_dir)
    if attached(db) or len(local) == 1:
        points = stored(db)
        unattached = sorted({p.name for p in local} - {p.name for p in points})
        if unattached:
            print(f"{method}: summing over the attached checkpoints; not attached: {', '.join(unattached)}",
                  file=sys.stderr)
        return "stored", points
    first = local[0].name
    print(f"{method}: featurizing {len(local)} checkpoints in memory (store them with 'trackstar-db ingest gradients "
          f"{db.path} --split train --checkpoint {first}' and --split queries, for each of them)", file=sys.stderr)
    return "memory", local


def _top(score: torch.Tensor, ids: list[str], k: int):
    from .topk import TopKResult  # heavy: pyarrow

    kk = min(k, len(ids))
    best, worst = torch.topk(score, kk, dim=1), torch.topk(score, kk, dim=1, largest=False)
    return TopKResult([[ids[i] for i in row] for row in best.indices.tolist()], best.values.float().numpy().astype(np.float32),
                      [[ids[i] for i in row] for row in worst.indices.tolist()], worst.values.float().numpy().astype(np.float32))


def top_k_stored(db, query_ids: Sequence[str], k: int, method: str = "tracin-cp", device: str = "cpu"):
    """Top-k proponents and opponents (retrieval.topk.TopKResult) of stored queries, by id, over every example."""
    import pyarrow.compute as pc  # heavy: pyarrow

    from trackstar_db.featurizer.config import FeaturizerConfig  # heavy: transformers

    from .topk import TopKResult  # heavy: pyarrow

    _check(method)
    ids = db.table("examples", columns=["example_id"]).column("example_id").to_pylist()
    mode, points = _points(db, method)
    if mode == "stored":
        block = max(1, SCORE_BYTES // (8 * max(1, len(ids))))
        parts = [_top(stored_scores(db, points, ids, query_ids[i:i + block], method), ids, k)
                 for i in range(0, len(query_ids), block)]
        return TopKResult([row for r in parts for row in r.proponent_ids],
                          np.concatenate([r.proponent_scores for r in parts], axis=0),
                          [row for r in parts for row in r.opponent_ids],
                          np.concatenate([r.opponent_scores for r in parts], axis=0))
    rows = db.table("queries", columns=["query_id", "prompt", "target"], filter=pc.field("query_id").isin(list(query_ids)))
    pairs = {q: (p, t) for q, p, t in zip(*(rows.column(c).to_pylist() for c in ("query_id", "prompt", "target")))}
    missing = [q for q in query_ids if q not in pairs]
    if missing:
        raise TrackstarError(f"{method}: query {missing[0]!r} is not in the queries table (ad-hoc queries are not supported)")
    from trackstar_db.gradients.loader import ESTIMATE_SAMPLE, recorded_model_dtype, sample_texts  # heavy: transformers

    entry = db.manifest.get("featurizer")
    config = FeaturizerConfig.from_dict(entry["config"]) if entry else FeaturizerConfig()
    from trackstar_db.featurizer.task import task_of  # heavy: transformers

    task = task_of(db.manifest)
    examples = db.table("examples", columns=["text"] + (["loss_spans"] if task.masked else []))
    spans = examples.column("loss_spans").to_pylist() if task.masked else None
    points = [point.with_dtype(recorded_model_dtype(db)) for point in points]
    return _top(scores(points, examples.column("text").to_pylist(), [pairs[q] for q in query_ids], config, method,
                       device, sample=lambda: sample_texts(db, ESTIMATE_SAMPLE, task.masked), task=task, spans=spans),
                ids, k)
