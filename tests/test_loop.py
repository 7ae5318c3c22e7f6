"""The featurize loop (gradients/loop.py) with torch and transformers alone, as on a GPU machine
without the database packages: every id reaches the sink once, with the vector it gets when
featurized alone, whatever the batching (token budget or fixed rows), pipelined or not, on the
CPU or (pinned, non-blocking) on CUDA."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_model, random_items

from trackstar_db.featurizer import Featurizer, FeaturizerConfig
from trackstar_db.featurizer.tokenize import collate
from trackstar_db.gradients.loop import featurize_chunks

CONFIG = FeaturizerConfig(dim=1024, correction="none")
TOL = 1e-4  # row-relative, float32 vectors of one example featurized in different batch shapes


class ListSink:
    """A sink that keeps what the loop hands it; flushed: how many times flush() ran."""

    def __init__(self):
        self.rows, self.flushed = {}, 0

    def add(self, ids, out):
        for i, row in zip(ids, out.vectors["uncorrected"]):
            assert i not in self.rows, f"{i} reached the sink twice"
            self.rows[i] = row.clone()

    def flush(self):
        self.flushed += 1


def chunks(n=37, per_chunk=10):
    items = random_items(n, seed=3, min_len=3, max_len=20)
    ids = [f"e{i:03d}" for i in range(n)]
    return [(ids[i:i + per_chunk], items[i:i + per_chunk]) for i in range(0, n, per_chunk)], dict(zip(ids, items))


def alone(featurizer, items):
    return {i: featurizer.featurize(collate([item])).vectors["uncorrected"][0] for i, item in items.items()}


def close(a, b):
    return float((a.cpu() - b.cpu()).norm()) <= TOL * float(b.norm())


@pytest.mark.parametrize("pipeline", [True, False])
@pytest.mark.parametrize("batch_tokens", [60, None])
def test_every_id_reaches_the_sink_once_with_its_own_vector(pipeline, batch_tokens):
    featurizer = Featurizer(make_model("gpt2"), CONFIG)
    parts, items = chunks()
    sink = ListSink()
    batches = list(featurize_chunks(featurizer, parts, sink, pad=0, batch_tokens=batch_tokens, batch_size=6,
                                    pipeline=pipeline, queue_depth=2))
    assert sink.flushed == 1 and sorted(sink.rows) == sorted(items)
    assert sum(b.rows for b in batches) == len(items)
    assert sum(b.tokens for b in batches) == sum(len(item.input_ids) for item in items.values())
    if batch_tokens is not None:  # the budget holds, except for an item longer than it alone
        assert all(b.rows * b.tensors["input_ids"].shape[1] <= batch_tokens or b.rows == 1 for b in batches)
        assert len({b.rows for b in batches}) > 1  # short items share batches, long ones do not
    reference = alone(featurizer, items)
    assert all(close(sink.rows[i], reference[i]) for i in items)


def test_an_error_in_the_sink_stops_the_loop():
    featurizer = Featurizer(make_model("gpt2"), CONFIG)
    parts, _ = chunks()

    class Broken(ListSink):
        def add(self, ids, out):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        list(featurize_chunks(featurizer, parts, Broken(), pad=0, batch_tokens=60, batch_size=6, pipeline=True))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pipelined_loop_equals_the_cpu_vectors():
    cpu = Featurizer(make_model("gpt2"), CONFIG)
    cuda = Featurizer(make_model("gpt2").to("cuda"), CONFIG, device="cuda")
    parts, items = chunks(200, 50)
    sink = ListSink()
    batches = list(featurize_chunks(cuda, parts, sink, pad=0, batch_tokens=256, batch_size=32, pipeline=True))
    assert all(b.tensors["input_ids"].is_pinned() for b in batches)
    reference = alone(cpu, items)
    assert sorted(sink.rows) == sorted(items)
    assert all(float((sink.rows[i] - reference[i]).norm()) <= 1e-3 * float(reference[i].norm()) for i in items)
