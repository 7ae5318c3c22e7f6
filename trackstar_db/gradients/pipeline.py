"""The ingest pipeline: tokenizing ahead of the model, batches by a token budget, writes behind it.

    plan chunks --[tokenizer thread: encode, bucket, collate, pin]--> bounded queue
                --[caller: featurize on the device]--> bounded queue
                --[writer thread: wait for the device->host copy, Committer.add -> Lance appends]

- `token_batches` packs one planner chunk into batches by a token budget with length
  bucketing: items sorted longest first (stable, so ties keep the chunk's id order) are taken
  greedily while rows x longest <= batch_tokens and rows <= batch_size; an item longer than
  the budget goes alone. Neighbours have similar lengths, so padding stays small.
- `ahead(iterable, depth)` runs a generator on a daemon thread into a bounded queue; its
  exception comes out of the consumer's loop.
- `Writer` hands featurized batches to a callback on a background thread through a bounded
  queue (back-pressure: at most `depth` batches wait); an error in it stops the run at the
  next `put`. `Writer(..., threaded=False)` is the synchronous path (same code, no threads).

A kill loses the batches in the queues and the Committer's buffer, never a committed row; the
rerun's plan (plan.missing) featurizes exactly those ids again.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from trackstar_db.featurizer.tokenize import Encoded, collate

_END = object()


@dataclass
class Batch:
    """ids [rows]; tensors: input_ids, attention_mask, labels [rows, width] (pinned on CUDA)."""

    ids: list[str]
    tensors: dict[str, torch.Tensor]

    @property
    def rows(self) -> int:
        return len(self.ids)

    @property
    def tokens(self) -> int:
        """Input tokens, padding excluded."""
        return int(self.tensors["attention_mask"].sum())


def token_batches(ids: list[str], items: list[Encoded], batch_tokens: int | None,
                  batch_size: int) -> list[tuple[list[str], list[Encoded]]]:
    """Split one chunk into (ids, items) batches. batch_tokens None: fixed batches of
    batch_size rows in the given order (the pre-pipeline behaviour)."""
    if batch_tokens is None:
        return [(ids[i: i + batch_size], items[i: i + batch_size]) for i in range(0, len(ids), batch_size)]
    order = sorted(range(len(items)), key=lambda i: -len(items[i].input_ids))
    batches: list[tuple[list[str], list[Encoded]]] = []
    rows: list[int] = []
    width = 0
    for i in order:
        length = len(items[i].input_ids)
        if rows and (len(rows) + 1 > batch_size or (len(rows) + 1) * max(width, length) > batch_tokens):
            batches.append(([ids[r] for r in rows], [items[r] for r in rows]))
            rows, width = [], 0
        rows.append(i)
        width = max(width, length)
    if rows:
        batches.append(([ids[r] for r in rows], [items[r] for r in rows]))
    return batches


def make_batches(chunks: Iterable[tuple[list[str], list[Encoded]]], batch_tokens: int | None,
                 batch_size: int, pad: int, pin: bool = False) -> Iterator[Batch]:
    """Batches of every encoded chunk (ids, items), collated; pinned host memory when `pin`."""
    for ids, items in chunks:
        for batch_ids, batch_items in token_batches(ids, items, batch_tokens, batch_size):
            tensors = collate(batch_items, pad)
            if pin:
                tensors = {k: v.pin_memory() for k, v in tensors.items()}
            yield Batch(batch_ids, tensors)


def ahead(iterable: Iterable, depth: int = 4) -> Iterator:
    """Iterate `iterable` on a daemon thread, `depth` items ahead of the consumer."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        iterator = iter(iterable)
        try:
            for item in iterator:
                if not offer(item):
                    return
            offer(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            offer(_Failure(exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="trackstar-tokenize", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


@dataclass
class _Failure:
    error: BaseException


class Writer:
    """put(*args) calls write(*args) on a background thread (threaded) or at once (not)."""

    def __init__(self, write: Callable, depth: int = 4, threaded: bool = True):
        self._write = write
        self._error: BaseException | None = None
        self._thread = None
        if threaded:
            self._queue: queue.Queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._run, name="trackstar-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if self._error is None:  # after an error, drain so put() never blocks
                try:
                    self._write(*item)
                except BaseException as exc:
                    self._error = exc

    def _check(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def put(self, *item) -> None:
        self._check()
        if self._thread is None:
            self._write(*item)
        else:
            self._queue.put(item)

    def close(self) -> None:
        """Wait until every batch put so far is written; raise the writer's error, if any."""
        if self._thread is not None:
            self._queue.put(_END)
            self._thread.join()
            self._thread = None
        self._check()

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.close()
        elif self._thread is not None:  # stop behind the caller's error, which wins
            self._queue.put(_END)
            self._thread.join()
            self._thread = None
