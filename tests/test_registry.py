"""Every method is one registry entry with capabilities: one lookup, one "unknown method" error
wherever a method is named, a runner for each, and one-prompt refusals that say why."""

import pytest
from click.testing import CliRunner

from trackstar_db.cli import main
from trackstar_db.errors import ParameterError, TrackstarError
from trackstar_db.ladder import ALL_METHODS, KRONECKER, LADDER, REGISTRY, get_method, lookup
from trackstar_db.retrieval.methods import expand
from trackstar_db.retrieval.runners import RUNNERS, Request, run


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_every_method_has_a_runner_and_consistent_capabilities():
    assert list(REGISTRY) == list(ALL_METHODS) and len(set(ALL_METHODS)) == len(ALL_METHODS)
    for method in REGISTRY.values():
        assert method.runner in RUNNERS, method
        assert (method.spec is not None) == (method.runner in ("gradient", "kronecker-proj")), method
        assert (method.runner == "gradient") == method.serves_ann, method
        assert method.needs_factors == (method.runner in ("kronecker-proj", "rerank")), method
        assert method.serves_prompt == (method.refuses_prompt is None)
        assert not (method.needs_texts and method.spec is not None)
    assert [m.spec for m in REGISTRY.values() if m.spec] == list(LADDER) + list(KRONECKER)
    # 'all': everything but the checkpoint and factor methods (the embedding one only with its package)
    every = expand(["all"], installed=lambda name: True)
    assert every == [m.name for m in REGISTRY.values() if not m.needs_checkpoints and not m.needs_factors]
    assert "embedding" not in expand(["all"], installed=lambda name: name != "embedding")


def test_unknown_method_is_one_error_everywhere(tiny_db):
    expected = f"unknown method 'nonsense'; methods: {', '.join(ALL_METHODS)}"
    for call in (lambda: lookup("nonsense"), lambda: get_method("nonsense"), lambda: expand(["nonsense"]),
                 lambda: tiny_db.retrieve("nonsense"), lambda: tiny_db.query("a", "b", method="nonsense")):
        with pytest.raises(TrackstarError) as caught:
            call()
        assert str(caught.value) == expected
    for args in (("retrieve", tiny_db.path, "--method", "nonsense"),
                 ("query", tiny_db.path, "--prompt", "a", "--target", "b", "--method", "nonsense")):
        result = cli(*args)
        assert result.exit_code == 1 and result.output.strip() == f"Error: {expected}", result.output
    with pytest.raises(TrackstarError, match="bm25 is not a gradient method"):
        get_method("bm25")


@pytest.mark.parametrize("method", ["tracin-cp", "tracin-cp-cos", "tracin-cp-opt"])
def test_one_prompt_tracin_cp_refuses_with_its_reason(tiny_db, method):
    with pytest.raises(TrackstarError) as caught:
        tiny_db.query("As the records show, X was born in", "Y", method=method)
    assert str(caught.value) == REGISTRY[method].refuses_prompt
    assert "final checkpoint only" in str(caught.value) and "ingest gradients --split queries" not in str(caught.value)
    result = cli("query", tiny_db.path, "--prompt", "X was born in", "--target", "Y", "--method", method)
    assert result.exit_code == 1 and "final checkpoint only" in result.output


def test_ann_only_where_the_method_serves_one(tiny_db):
    with pytest.raises(TrackstarError, match="an ANN index serves the gradient methods, not bm25"):
        run(tiny_db, lookup("bm25"), Request(["q"], ["q"], 3, ann=object()))


def test_library_errors_name_parameters_and_the_cli_names_flags(tiny_db):
    with pytest.raises(ParameterError) as caught:
        tiny_db.query("a", "b", k=0)
    assert str(caught.value) == "k must be >= 1, not 0" and caught.value.parameter == "k"
    with pytest.raises(ParameterError, match="^run_id 'bm25': that run exists"):
        tiny_db.retrieve("bm25", k=2)
        tiny_db.retrieve("bm25", k=2)
    result = cli("query", tiny_db.path, "--prompt", "a", "--target", "b", "--k", 0)
    assert result.output.strip() == "Error: --k must be >= 1, not 0"
    result = cli("retrieve", tiny_db.path, "--method", "bm25", "--k", 2)
    assert result.output.strip().startswith("Error: --run 'bm25': that run exists")
