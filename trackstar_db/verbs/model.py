"""Verbs about the model a database attributes: attach a checkpoint, train the testbed model."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from trackstar_db.store.checkpoints import attach


class ModelVerbs:
    """attach, train (mixed into api.Database)."""

    def attach(self, checkpoint: str | Path) -> str:
        """Record an intermediate checkpoint (a directory in the model's checkpoints/, or a path) for
        TracIn-CP: its fingerprint, optimizer state and learning rate; returns its name (store/checkpoints.py)."""
        return attach(self, checkpoint)

    def train(self, out_dir: str | Path, *, checkpoints: int = 0, overwrite: bool = False,
              progress: bool | None = None, **config) -> pa.Table | None:
        """Pretrain the small testbed causal LM (AdamW) on the stored examples into `out_dir`, record it
        as the database's model and score the stored queries (testbed/model.py). config: fields of
        testbed.train.TrainConfig (architecture, epochs, seed, ...), None keeping a field's default;
        checkpoints: also keep that many intermediate checkpoints. Returns the fact accuracy table
        (None without queries)."""
        from trackstar_db.testbed.model import train_testbed  # heavy: torch, transformers

        overrides = {name: value for name, value in config.items() if value is not None}
        return train_testbed(self, Path(out_dir), overrides, progress=progress, checkpoints=checkpoints,
                             overwrite=overwrite)
