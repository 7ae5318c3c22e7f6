"""Featurize a model too large for one device: its parameters sharded across processes (FSDP2).

    torchrun --nproc-per-node N --no-python trackstar-db ingest gradients DB --shard-model --device cuda

Every process (rank r of N) holds 1/N of each parameter (torch.distributed.fsdp.fully_shard,
one group per transformer block plus the root group for embeddings, final norm and head); a
block's parameters are all-gathered just before its forward, freed after it, and gathered again
for its backward. The featurizer is the single-device one, unchanged: its forward hooks see
each tracked module's input and output as usual (FSDP gathers the weight before the module
runs) and its projections are regenerated from (seed, name, side) on every rank, so a rank's
vectors are those the unsharded model gives.

Data: each rank featurizes its own shard of the ids (crc32(id) % N == r, gradients/plan.py),
as `--shard r/N` does, and its Committer appends them under the database's writer lock; a
rerun plans only the ids still missing, so a killed run resumes exactly as the single-device
worker does. FSDP's all-gathers need every rank in every forward and backward, so the ranks
move in lockstep (`Lockstep`): before each step they agree, with one all-reduce, whether any
rank still has a batch; a rank whose shard is done runs a one-row dummy batch and drops it.

Failing whole: a rank that raises records "rank r of N: cause" in the process group's store
before it ends; a rank that dies (kill -9, out of memory) is seen by the others through its pid
(ranks on one host) or the store going away (rank 0 holds it). Every rank runs a `RankWatch`
thread that polls both once a second: on a failure it reports one line naming the failed rank
and its cause and ends its own process within RANK_GRACE seconds, even when it is blocked inside
a collective that will never complete; a collective that fails first (gloo sees the closed
connection) is reported with the same line. A rank alive but stuck is ended by the process
group's timeout (TRACKSTAR_RANK_TIMEOUT, RANK_TIMEOUT seconds). The rows committed so far stay:
every commit is an atomic Lance append, so the rerun plans only the ids still missing.

Why FSDP2 rather than a device map: a device map (one process, layers spread over the GPUs of
one node) runs one GPU at a time and stops at one node; FSDP2 keeps every GPU busy on its own
examples, reaches across nodes under torchrun or Slurm, and also runs on CPU processes (gloo),
which is how it is tested without a GPU.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from trackstar_db.errors import ParameterError, TrackstarError, first_line


def block_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks: the children of the longest nn.ModuleList in the model
    (GPT-2's transformer.h, GPT-NeoX's gpt_neox.layers, Llama's model.layers)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    return list(max(lists, key=len)) if lists else []


def shard_model(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """fully_shard each block, then the root (the rest: embeddings, final norm, head, tied
    weights together), over `mesh`; the shards move to the mesh's device."""
    from torch.distributed.fsdp import fully_shard  # heavy: torch.distributed

    for block in block_modules(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@dataclass
class Rank:
    """This process's place: rank, world size, and the device its shards live on."""

    rank: int
    world: int
    device: torch.device

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world


def init_ranks(device: str = "auto") -> Rank:
    """Join (or start) the process group torchrun or Slurm describes: NCCL on GPUs, gloo on CPU.
    Without a launcher, a world of one (this process alone)."""
    import torch.distributed as dist  # heavy: torch.distributed

    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:  # srun: map Slurm's variables onto torch's
        env.setdefault("RANK", env["SLURM_PROCID"])
        env.setdefault("WORLD_SIZE", env["SLURM_NTASKS"])
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29511")
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise ParameterError("device", f"{device}: no CUDA GPU is available here")
        index = int(env.get("LOCAL_RANK", "0")) if device in ("auto", "cuda") else torch.device(device).index or 0
        if index >= torch.cuda.device_count():  # a launcher that shows each task its one GPU (srun --gpus-per-task=1)
            index = 0
        torch.cuda.set_device(index)
        where = torch.device("cuda", index)
    else:
        where = torch.device("cpu")
    if not dist.is_initialized():
        timeout = float(env.get("TRACKSTAR_RANK_TIMEOUT", RANK_TIMEOUT))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=_dt.timedelta(seconds=timeout))
    return Rank(dist.get_rank(), dist.get_world_size(), where)


RANK_TIMEOUT = 600.0  # seconds a collective may wait for a rank that is alive but stuck
RANK_GRACE = 3.0  # seconds between seeing a failed rank and ending this one
_FAILED, _PLACE = "trackstar/failed", "trackstar/rank/"


class RankFailure(TrackstarError):
    """Another rank (or this one) failed: the message names the rank and the cause."""

    whole_line = True  # the CLI shows it as written, even where the cause is a full disk


class RankWatch:
    """Watches the other ranks of a sharded run (see the module doc); a context manager.

    On entry this rank records its host and pid in the process group's store. `failed(exc)`
    records this rank's own failure for the others. A thread polls every `interval` seconds for
    a failure recorded by another rank, a dead pid of a rank on this host, or the store gone (rank
    0 ended); it then gives the main thread `grace` seconds to report the same line (a failed
    collective) and otherwise writes it to stderr itself and ends the process (exit status 1)."""

    def __init__(self, rank: Rank, interval: float = 1.0, grace: float = RANK_GRACE, exit=None):
        import torch.distributed as dist  # heavy: torch.distributed

        self.rank, self.interval, self.grace = rank, interval, grace
        self._exit = exit or os._exit
        self._store = dist.distributed_c10d._get_default_store()
        self._host = socket.gethostname()
        self._stop = threading.Event()
        self._reported = threading.Lock()
        self.cause: str | None = None
        self._thread = threading.Thread(target=self._watch, name=f"rank-watch-{rank.rank}", daemon=True)

    def __enter__(self) -> "RankWatch":
        self._store.set(f"{_PLACE}{self.rank.rank}", json.dumps({"host": self._host, "pid": os.getpid()}))
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def failed(self, exc: BaseException) -> None:
        """Record this rank's failure for the others (best effort: the store may be gone)."""
        self._stop.set()  # this rank's own record is not another's failure
        if isinstance(exc, RankFailure):
            return
        try:
            self._store.set(_FAILED, f"rank {self.rank.rank} of {self.rank.world} failed: "
                                     f"{type(exc).__name__}: {first_line(exc)}")
        except Exception:
            pass

    def other_failure(self) -> str | None:
        """The line naming another rank's failure, if one is known now."""
        try:
            if self._store.check([_FAILED]):
                return self._store.get(_FAILED).decode()
            for other in range(self.rank.world):
                if other == self.rank.rank or not self._store.check([f"{_PLACE}{other}"]):
                    continue
                place = json.loads(self._store.get(f"{_PLACE}{other}"))
                if place["host"] == self._host and not _alive(place["pid"]):
                    return (f"rank {other} of {self.rank.world} (pid {place['pid']}) died without a word "
                            "(killed: kill -9, out of memory or its host)")
        except Exception as exc:  # the store is rank 0's: it is gone with rank 0
            if self.rank.rank != 0:
                return f"rank 0 of {self.rank.world} is gone (its store answers no more: {type(exc).__name__})"
        return None

    def line(self, cause: str) -> str:
        return (f"sharded featurization stopped: {cause}; rank {self.rank.rank} stopped with it. Rerun the same "
                "command: it resumes from the last commit")

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            cause = self.other_failure()
            if cause is None:
                continue
            self.cause = cause
            if self._stop.wait(self.grace):  # the main thread reported it and is on its way out
                return
            if self._reported.acquire(blocking=False):
                print(f"Error: {self.line(cause)}", file=sys.stderr, flush=True)
                self._exit(1)
            return

    def report(self, exc: BaseException) -> RankFailure | None:
        """For the main thread: the RankFailure to raise when `exc` came from another rank's
        failure (a collective that failed), else None (this rank's own error, recorded)."""
        deadline = time.monotonic() + self.grace
        cause = self.cause or self.other_failure()
        while cause is None and time.monotonic() < deadline and _collective_error(exc):
            time.sleep(0.2)  # the dead rank's pid or record may take a moment to show
            cause = self.other_failure()
        if cause is None:
            self.failed(exc)
            return None
        if not self._reported.acquire(blocking=False):
            return None
        self._stop.set()
        return RankFailure(self.line(cause))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (dead, not yet reaped by its launcher) is dead too
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _collective_error(exc: BaseException) -> bool:
    """Did `exc` come from the process group (a peer closed its connection, a timeout)?"""
    return isinstance(exc, RuntimeError) or type(exc).__module__.startswith("torch.distributed")


def mesh_for(rank: Rank):
    from torch.distributed.device_mesh import init_device_mesh  # heavy: torch.distributed

    return init_device_mesh(rank.device.type, (rank.world,))


def dummy_batch(device: torch.device) -> dict[str, torch.Tensor]:
    """One row of two tokens: what a rank with no batch left runs so the others' gathers complete."""
    ids = torch.ones(1, 2, dtype=torch.long, device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class Lockstep:
    """Wraps a rank's batch stream so that every rank runs the same number of featurize steps.

    Each step starts with an all-reduce of "I have a batch"; while any rank has one, the ranks
    without one featurize `dummy_batch` and drop it. Use on the thread that featurizes (the
    collectives must come in the same order on every rank)."""

    def __init__(self, featurizer, device: torch.device):
        self.featurizer = featurizer
        self.device = device
        self.dummy_steps = 0

    def _any(self, mine: bool) -> bool:
        import torch.distributed as dist  # heavy: torch.distributed

        flag = torch.tensor([1 if mine else 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def __call__(self, batches) -> Iterator:
        try:
            for batch in batches:
                self._any(True)
                yield batch
        finally:
            close = getattr(batches, "close", None)
            if close is not None:  # stops the tokenizer thread, as the worker's close does
                close()
        while self._any(False):
            self.featurizer.featurize(dummy_batch(self.device))
            self.dummy_steps += 1


class ShardedModel:
    """The two hooks the gradient worker takes (GradientJob.sharded): `prepare` shards the model
    loaded on the CPU, `lockstep` wraps the batch stream."""

    def __init__(self, rank: Rank):
        self.rank = rank
        self.mesh = mesh_for(rank)
        self.stepper: Lockstep | None = None

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return shard_model(model, self.mesh)

    def lockstep(self, batches, featurizer) -> Iterator:
        self.stepper = Lockstep(featurizer, self.rank.device)
        return self.stepper(batches)


@contextmanager
def process_group(device: str = "auto"):
    """init_ranks(), and the process group destroyed on the way out."""
    import torch.distributed as dist  # heavy: torch.distributed

    rank = init_ranks(device)
    try:
        yield rank
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
