"""Test helpers that build and copy small databases (conftest's fixtures and module fixtures share them)."""

import shutil
from pathlib import Path

TINY_TRAINING = dict(n_layer=1, d_model=32, n_head=2, max_length=32, batch_size=32, max_steps=30,
                     warmup=5, lr=3e-3, final_lr=1e-3)


def build_tiny(root: Path, **training) -> Path:
    """root/world, root/db (corpus and facts of the 'tiny' world) and root/model, a short AdamW
    training run on the corpus (TINY_TRAINING, updated by `training`) recorded as the db's model."""
    from trackstar_db import Database
    from trackstar_db.sources.corpus import ingest_corpus
    from trackstar_db.sources.facts import ingest_facts
    from trackstar_db.testbed.train import TrainConfig, train_model
    from trackstar_db.testbed.world import generate_world

    world = generate_world(root / "world", seed=0, size="tiny")
    db = Database.create(root / "db")
    ingest_corpus(db, [world.sentences_path], progress=False)
    ingest_facts(db, [world.facts_path], progress=False)
    texts = db.table("examples", columns=["text"]).column("text").to_pylist()
    train_model(texts, root / "model", TrainConfig(**{**TINY_TRAINING, **training}), progress=False)
    db.set_model(root / "model")
    return root


def copy_db(source: Path, root: Path):
    """A private copy of source/db and source/model under root, opened with its model re-pointed."""
    from trackstar_db import connect

    shutil.copytree(source / "model", root / "model")
    shutil.copytree(source / "db", root / "db")
    db = connect(root / "db")
    db.set_model(root / "model")
    return db


def with_gradients(source: Path, root: Path, dim: int = 1024):
    """A private copy of source's tiny database with corrected and uncorrected gradients of the
    train split and the queries (adam-factored correction) and R fitted."""
    from trackstar_db.featurizer.config import FeaturizerConfig
    from trackstar_db.gradients.fit import fit
    from trackstar_db.gradients.worker import GradientJob, ingest_gradients

    db = copy_db(source, root)
    for split in ("train", "queries"):
        ingest_gradients(db, FeaturizerConfig(dim=dim, correction="adam-factored"),
                         GradientJob(split, batch_size=32, device="cpu"), progress=False)
    fit(db)
    return db
