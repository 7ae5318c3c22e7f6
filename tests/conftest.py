"""Shared fixtures: a tiny database (world, corpus, facts, a briefly trained model) built once."""

import pytest
from databases import build_tiny, copy_db


@pytest.fixture(scope="session")
def tiny_db_template(tmp_path_factory):
    """A database built from the 'tiny' world with a real (short) AdamW training run recorded."""
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def tiny_db(tiny_db_template, tmp_path):
    """A private copy of the tiny database (and its model) for one test."""
    return copy_db(tiny_db_template, tmp_path)
