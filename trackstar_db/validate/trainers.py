"""Train one subset's model: the testbed trainer (trackstar_db/testbed/train.py, with the
database model's own training config) or a user's train command that writes a checkpoint.

Both return (model, tokenizer) for the loss measurement; the checkpoint stays in `out`.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

from trackstar_db.errors import ParameterError, TrackstarError
from trackstar_db.models.load import open_tokenizer, open_weights
from trackstar_db.store.checkpoints import source

from .options import ValidateOptions


class TestbedTrainer:
    """Trains from scratch with the config the database's model was trained with (its
    train_info.json), the same initialisation and order seed for every subset, so the subset is
    the only difference between two retrained models. The schedule is that config's, scaled to
    a subset of `n_subset` examples (`schedule_for`; options.schedule)."""

    name = "testbed"

    def __init__(self, db, options: ValidateOptions, n_subset: int | None = None):
        from trackstar_db.simfluence.record import RecordOptions, training_setup  # heavy: pyarrow

        if db.manifest.get("model") is None:
            raise ParameterError("train_command", f"not given, and {db.path} records no model to retrain: record one "
                                                  "('trackstar-db train', or 'trackstar-db init DB --model DIR') or "
                                                  "give a train command")
        try:  # the testbed checkpoint's own config, as Simfluence's recorded runs use it
            config, self.tokenizer, _ = training_setup(db, RecordOptions(init="scratch"))
        except TrackstarError as exc:
            raise ParameterError("train_command", f"not given; {str(exc).split(';')[0]}, and validate's testbed "
                                                  "trainer needs the testbed's train_info.json: give a train command "
                                                  "for another model") from None
        info = json.loads((Path(db.manifest["model"]["path"]) / "train_info.json").read_text(encoding="utf-8"))
        n_base = int(info.get("n_examples") or db.count("examples"))
        base_steps = int(info.get("steps") or _total_steps(config, n_base))
        self.base = {"steps": base_steps, "n_examples": n_base, "warmup": config.warmup}
        self.config = replace(schedule_for(config, base_steps, n_base, n_subset or n_base, options),
                              device=options.device, threads=options.threads)

    def parameters(self) -> dict:
        return {k: v for k, v in asdict(self.config).items() if k not in ("device", "threads")}

    def __call__(self, texts: Sequence[str], out: Path, ids: Sequence[str] = ()):
        from trackstar_db.testbed.train import train_model  # heavy: torch

        train_model(texts, out, self.config, self.tokenizer, progress=False)
        return _load(out, self.tokenizer, self.config.device)


class CommandTrainer:
    """Runs `command` (no shell) with {data} = a JSON lines file of the subset (example_id, text)
    and {out} = the directory it must fill with a transformers checkpoint."""

    def __init__(self, db, options: ValidateOptions):
        self.command, self.device = options.train_command, options.device
        self.name = self.command
        model = db.manifest.get("model")
        self.tokenizer = open_tokenizer(source(db)) if model else None

    def parameters(self) -> dict:
        return {"command": self.command}

    def __call__(self, texts: Sequence[str], out: Path, ids: Sequence[str] = ()):
        out.mkdir(parents=True, exist_ok=True)
        data = out.parent / f"{out.name}.jsonl"
        with data.open("w", encoding="utf-8") as handle:
            for example_id, text in zip(ids, texts):
                handle.write(json.dumps({"example_id": example_id, "text": text}) + "\n")
        argv = [part.replace("{data}", str(data)).replace("{out}", str(out)) for part in shlex.split(self.command)]
        try:
            done = subprocess.run(argv, capture_output=True, text=True)
        except OSError as exc:
            raise ParameterError("train_command", f"cannot run {argv[0]!r}: {exc.strerror}") from None
        finally:
            data.unlink(missing_ok=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no error output"])[-1]
            raise ParameterError("train_command", f"exited with {done.returncode}: {last}")
        if not (out / "config.json").is_file():
            raise ParameterError("train_command", f"left no {out}/config.json; the command must write a "
                                                  "transformers checkpoint to {out}")
        tokenizer = self.tokenizer
        if (out / "tokenizer_config.json").is_file():
            tokenizer = open_tokenizer(out)
        if tokenizer is None:
            raise ParameterError("train_command", f"left no tokenizer in {out}, and the database records no model")
        return _load(out, tokenizer, self.device)


def _total_steps(config, n_examples: int) -> int:
    """Optimizer steps testbed/train.py makes for `n_examples` under `config`."""
    total = math.ceil(n_examples / config.batch_size) * config.epochs
    return total if config.max_steps is None else min(total, config.max_steps)


def schedule_for(config, base_steps: int, n_base: int, n_subset: int, options: ValidateOptions):
    """The base model's TrainConfig (it made `base_steps` optimizer steps over `n_base` examples)
    for a model retrained on `n_subset` examples, by options.schedule:

    'scaled' (default): the base's epochs, so the steps per epoch shrink with the subset (the
    usual convention; a base cut short by max_steps keeps its share: base_steps * n_subset /
    n_base), and the warm-up keeps its share of the run (warmup / base_steps of the new total).
    'same-steps': the base's optimizer steps and warm-up, over as many epochs of the subset as
    that takes (equal compute). 'base': the config as it is (a warm-up counted in steps, which a
    short run may never leave). --steps / --epochs replace the total / the epochs; under
    'scaled' the warm-up keeps its share of that total."""
    if options.schedule == "base":
        overrides = {}
        if options.steps is not None:
            overrides.update(max_steps=options.steps, warmup=min(config.warmup, options.steps))
        if options.epochs is not None:
            overrides["epochs"] = options.epochs
        return replace(config, **overrides)
    per_epoch = math.ceil(n_subset / config.batch_size)
    if options.schedule == "same-steps":
        total = options.steps or base_steps
        return replace(config, epochs=options.epochs or math.ceil(total / per_epoch), max_steps=total,
                       warmup=min(config.warmup, total))
    epochs = options.epochs or config.epochs
    if options.steps is not None:
        total = options.steps
    elif config.max_steps is not None and options.epochs is None:
        total = max(1, round(base_steps * n_subset / max(1, n_base)))
    else:
        total = per_epoch * epochs
    share = min(1.0, config.warmup / max(1, base_steps))
    return replace(config, epochs=epochs, max_steps=total, warmup=max(1, round(share * total)) if config.warmup else 0)


def _load(out: Path, tokenizer, device: str):
    return open_weights(out, device).eval(), tokenizer


def make_trainer(db, options: ValidateOptions, n_subset: int | None = None):
    """The trainer of `options` for subsets of `n_subset` examples."""
    return CommandTrainer(db, options) if options.train_command else TestbedTrainer(db, options, n_subset)
