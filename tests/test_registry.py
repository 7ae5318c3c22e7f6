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


# Comparisons of a method name with a string literal allowed outside the registry (retrieval/runners.py and
# ladder.py), each with its reason. Empty: every caller asks the registry (Method fields, runners.status,
# runners.aggregate, methods.not_installed) instead of naming a method.
NAME_COMPARISONS_ALLOWED: dict[str, str] = {}


def _method_name_comparisons(path):
    """(line, source) of each comparison in `path` of a string literal naming a registered method
    (alone or in a tuple, list or set) with an operand named like a method (method, name,
    first_method, entry.name, methods, names...). A `kind` or `extra` that happens to share a
    method's name (the 'kfac' curvature, the 'embedding' extra) is not a method name."""
    import ast
    import re

    named = re.compile(r"(^|_)(method|methods|name|names)$")

    def literals(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
        return set()

    def identifier(node):
        return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""

    source = path.read_text()
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(literals(o) & set(ALL_METHODS) for o in operands) and any(named.search(identifier(o)) for o in operands):
                out.append((node.lineno, ast.get_source_segment(source, node)))
    return out


def test_no_caller_compares_a_method_name_with_a_literal():
    """The registry is the one place that branches on a method's name: every other module of the
    package asks it (capabilities, status, runners) instead."""
    from pathlib import Path

    import trackstar_db

    root = Path(trackstar_db.__file__).parent
    found = {}
    for path in sorted(root.rglob("*.py")):
        where = path.relative_to(root).as_posix()
        if where in ("retrieval/runners.py", "ladder.py") or where in NAME_COMPARISONS_ALLOWED:
            continue
        if hits := _method_name_comparisons(path):
            found[where] = hits
    assert not found, found


def test_the_scan_finds_a_comparison_it_is_meant_to_find(tmp_path):
    """What select.py did (`method == "bm25"`) and the server's list (`name == "embedding"`) did is found."""
    probe = tmp_path / "probe.py"
    probe.write_text('if method == "bm25" or entry.name in ("tracin-cp", "x") or "embedding" not in names:\n'
                     '    pass\nif kind == "ekfac" or extra == "embedding":\n    pass\n')
    assert sorted(text for _, text in _method_name_comparisons(probe)) == [
        '"embedding" not in names', 'entry.name in ("tracin-cp", "x")', 'method == "bm25"']


def test_status_and_best_method_come_from_the_registry(tiny_db, tiny_db_template, tmp_path):
    """runners.status answers for every method; the server's list and the default rung read it."""
    from databases import with_gradients

    from trackstar_db.retrieval.runners import PREFERENCE, aggregating, best_method, status
    from trackstar_db.serve.service import servable_methods

    bare = {name: status(tiny_db, entry) for name, entry in REGISTRY.items()}
    assert bare["bm25"] is None and bare["lm-embedding"] is None
    assert all(bare[spec.name].startswith("no grads_train_") for spec in LADDER), bare
    assert bare["kfac-proj"] == "no Kronecker factors (trackstar-db fit-factors)"
    with pytest.raises(TrackstarError, match="no gradient method can answer yet"):
        best_method(tiny_db)
    db = with_gradients(tiny_db_template, tmp_path / "grads")
    ready = {name: status(db, entry) for name, entry in REGISTRY.items()}
    assert all(ready[spec.name] is None for spec in LADDER) and ready["ekfac"] is not None
    assert best_method(db) == PREFERENCE[0]
    listed = {m["name"]: m for m in servable_methods(db)}
    assert list(listed) == [name for name, entry in REGISTRY.items() if entry.serves_prompt]
    assert all(m["reason"] == ready[name] and m["available"] == (ready[name] is None) for name, m in listed.items())
    # select's aggregate: the kinds with a mean score over a set of queries (the rungs and BM25)
    assert [m.name for m in aggregating()] == [m.name for m in REGISTRY.values() if m.runner in ("gradient", "bm25")]
    with pytest.raises(TrackstarError, match="embedding has no mean score over a set of queries"):
        from trackstar_db.retrieval.runners import aggregate

        aggregate(db, lookup("embedding"), Request(["q"], ["q"], 3))
