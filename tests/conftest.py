"""Shared fixtures: a tiny database (world, corpus, facts, a briefly trained model) built once."""

import shutil

import pytest


@pytest.fixture(scope="session")
def tiny_db_template(tmp_path_factory):
    """A database built from the 'tiny' world with a real (short) AdamW training run recorded."""
    from trackstar_db import Database
    from trackstar_db.sources.corpus import ingest_corpus
    from trackstar_db.sources.facts import ingest_facts
    from trackstar_db.testbed.train import TrainConfig, train_model
    from trackstar_db.testbed.world import generate_world

    root = tmp_path_factory.mktemp("tiny")
    world = generate_world(root / "world", seed=0, size="tiny")
    db = Database.create(root / "db")
    ingest_corpus(db, [world.sentences_path], progress=False)
    ingest_facts(db, [world.facts_path], progress=False)
    texts = db.table("examples", columns=["text"]).column("text").to_pylist()
    config = TrainConfig(n_layer=1, d_model=32, n_head=2, max_length=32, batch_size=32, max_steps=30,
                         warmup=5, lr=3e-3, final_lr=1e-3)
    train_model(texts, root / "model", config, progress=False)
    db.set_model(root / "model")
    return root


@pytest.fixture
def tiny_db(tiny_db_template, tmp_path):
    """A private copy of the tiny database (and its model) for one test."""
    from trackstar_db import connect

    shutil.copytree(tiny_db_template / "model", tmp_path / "model")
    shutil.copytree(tiny_db_template / "db", tmp_path / "db")
    db = connect(tmp_path / "db")
    db.set_model(tmp_path / "model")
    return db
