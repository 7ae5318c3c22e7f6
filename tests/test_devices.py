"""One device rule (trackstar_db/devices.py): "auto", "cpu", "cuda" and "cuda:N", applied by every
verb of the handle that takes a device, so `device="auto"` works in each of them (it runs on the
CPU here) and a name outside the rule is one ParameterError naming `device`, never torch's."""

import inspect

import pytest

from trackstar_db.api import Database
from trackstar_db.devices import resolve_device
from trackstar_db.errors import ParameterError

# every verb that takes a device: its own parameter, or a field of the job or options it builds
VERBS = {"ingest_gradients", "retrieve", "tail_patch", "query", "token_contributions", "select", "validate",
         "prompt_attributor", "build_index", "fit_factors", "factor_scores"}


def test_the_rule():
    import torch

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "CUDA", "cuda:", "cuda:x", "cpu:0", "", None, 0):
        with pytest.raises(ParameterError, match=r"^device must be one of auto, cpu, cuda, cuda:N, not "):
            resolve_device(bad)
    if not torch.cuda.is_available():
        for absent in ("cuda", "cuda:0"):
            with pytest.raises(ParameterError, match="no CUDA GPU is available here"):
                resolve_device(absent)


def test_every_verb_that_takes_a_device_is_listed():
    """A new verb with a device parameter must join VERBS (and so the test below)."""
    taking = {name for name, verb in inspect.getmembers(Database, inspect.isfunction)
              if not name.startswith("_") and "device" in inspect.signature(verb).parameters}
    assert taking <= VERBS, taking - VERBS


@pytest.fixture(scope="module")
def db(tiny_db_template, tmp_path_factory):
    from databases import copy_db

    return copy_db(tiny_db_template, tmp_path_factory.mktemp("devices"))


def test_device_auto_in_every_verb(db):
    from trackstar_db.selection.select import Task

    done = set()
    db.ingest_gradients("train", dim=1024, batch_size=32, device="auto", limit=48, progress=False)
    db.ingest_gradients("queries", dim=1024, batch_size=32, device="auto", progress=False)
    done.add("ingest_gradients")
    db.fit()
    run_id, rows = db.retrieve("trackstar", k=3, device="auto")
    assert rows.num_rows > 0
    done.add("retrieve")
    assert db.tail_patch([run_id], k=2, max_queries=2, device="auto").num_rows > 0
    done.add("tail_patch")
    prompt, target = "As the records show, the river", "bridge"
    hits = db.query(prompt, target, k=3, method="trackstar", device="auto")
    assert set(hits.column("kind").to_pylist()) >= {"proponent"} and hits.num_rows >= 3
    done.add("query")
    example_id = hits.column("example_id")[0].as_py()
    assert db.token_contributions(prompt, target, example_id, method="trackstar", device="auto").num_rows > 0
    done.add("token_contributions")
    assert db.select(Task(), top=5, method="trackstar", device="auto").rows.num_rows == 5
    done.add("select")
    assert db.validate(models=2, steps=2, bootstrap=10, device="auto").num_rows > 0
    done.add("validate")
    assert db.prompt_attributor(device="auto").device == resolve_device("auto")
    done.add("prompt_attributor")
    assert db.build_index("trackstar", "ivf_flat", num_partitions=2, device="auto", progress=False)
    done.add("build_index")
    db.fit_factors("kfac", fraction=0.2, device="auto", progress=False)
    done.add("fit_factors")
    ids, scores = db.factor_scores([(prompt, target)], [example_id], device="auto")
    assert list(ids) == [example_id] and tuple(scores.shape) == (1, 1)
    done.add("factor_scores")
    assert done == VERBS


@pytest.mark.parametrize("verb", ["query", "token_contributions", "retrieve", "tail_patch", "select", "validate",
                                  "prompt_attributor"])
def test_a_device_outside_the_rule_is_one_error_naming_device(db, verb):
    from trackstar_db.selection.select import Task

    calls = {
        "query": lambda: db.query("The river", "bridge", k=3, device="gpu"),
        "token_contributions": lambda: db.token_contributions("The river", "bridge", "e0", device="gpu"),
        "retrieve": lambda: db.retrieve("trackstar", k=3, device="gpu"),
        "tail_patch": lambda: db.tail_patch(["none"], device="gpu"),
        "select": lambda: db.select(Task(), top=5, device="gpu"),
        "validate": lambda: db.validate(models=2, steps=2, device="gpu"),
        "prompt_attributor": lambda: db.prompt_attributor(device="gpu"),
    }
    with pytest.raises(ParameterError, match=r"^device must be one of auto, cpu, cuda, cuda:N, not 'gpu'$"):
        calls[verb]()


def test_the_cli_names_the_flag(db):
    from databases import run_cli

    result = run_cli("query", db.path, "--prompt", "The river", "--target", "bridge", "--device", "gpu", ok=False)
    assert result.exit_code == 2  # the library's rule (devices.DEVICE) as the option's type, named as the flag
    assert result.output.strip().splitlines()[-1].endswith("--device must be one of auto, cpu, cuda, cuda:N, not 'gpu'")
