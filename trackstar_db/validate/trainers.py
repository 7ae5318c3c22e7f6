"""Train one subset's model: the testbed trainer (trackstar_db/testbed/train.py, with the
database model's own training config) or a user's train command that writes a checkpoint.

Both return (model, tokenizer) for the loss measurement; the checkpoint stays in `out`.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from trackstar_db.errors import TrackstarError
from trackstar_db.models.load import open_tokenizer, open_weights
from trackstar_db.store.checkpoints import source

from .options import ValidateOptions


class TestbedTrainer:
    """Trains from scratch with the config the database's model was trained with (its
    train_info.json), the same initialisation and order seed for every subset, so the subset is
    the only difference between two retrained models."""

    name = "testbed"

    def __init__(self, db, options: ValidateOptions):
        from trackstar_db.simfluence.record import RecordOptions, training_setup

        if db.manifest.get("model") is None:
            raise TrackstarError(f"{db.path}: no model recorded; validate retrains the database's model "
                                 "('trackstar-db train' or 'init --model') or runs --train-command")
        try:  # the testbed checkpoint's own config, as Simfluence's recorded runs use it
            config, self.tokenizer, _ = training_setup(db, RecordOptions(init="scratch"))
        except TrackstarError as exc:
            raise TrackstarError(f"{str(exc).split(';')[0]}; validate's testbed trainer needs the testbed's "
                                 "train_info.json: give --train-command for another model") from None
        overrides = {"device": options.device, "threads": options.threads}
        if options.steps is not None:
            overrides["max_steps"] = options.steps
            overrides["warmup"] = min(config.warmup, options.steps)
        if options.epochs is not None:
            overrides["epochs"] = options.epochs
        self.config = replace(config, **overrides)

    def parameters(self) -> dict:
        from dataclasses import asdict

        return {k: v for k, v in asdict(self.config).items() if k not in ("device", "threads")}

    def __call__(self, texts: Sequence[str], out: Path, ids: Sequence[str] = ()):
        from trackstar_db.testbed.train import train_model

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
            raise TrackstarError(f"validate --train-command: cannot run {argv[0]!r}: {exc.strerror}") from None
        finally:
            data.unlink(missing_ok=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no error output"])[-1]
            raise TrackstarError(f"validate --train-command exited with {done.returncode}: {last}")
        if not (out / "config.json").is_file():
            raise TrackstarError(f"validate --train-command: {out}/config.json missing; the command must write a "
                                 "transformers checkpoint to {out}")
        tokenizer = self.tokenizer
        if (out / "tokenizer_config.json").is_file():
            tokenizer = open_tokenizer(out)
        if tokenizer is None:
            raise TrackstarError(f"validate --train-command: {out} holds no tokenizer and the database records no model")
        return _load(out, tokenizer, self.device)


def _load(out: Path, tokenizer, device: str):
    return open_weights(out, device).eval(), tokenizer


def make_trainer(db, options: ValidateOptions):
    return CommandTrainer(db, options) if options.train_command else TestbedTrainer(db, options)
