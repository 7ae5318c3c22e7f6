"""The front door: every CLI command and every serve route is one verb of the handle
(trackstar_db.Database) plus formatting. The tables below list each command and route with the
verb it calls; a new command or route without an entry fails here, and so does a command or
route whose code no longer calls its verb (read from its source, route handlers followed through
the service), or a verb the handle lacks. A representative set of commands is also run as a user
types it with its verb replaced by a recorder: the verb is called once, with the flags' values.

A few entries name no verb, each with its reason: what runs before a handle can open the
directory (migrate), what builds a database from nothing by chaining verbs (demo, one layer above
the handle), the server itself (its routes are verbs) and the routes about the server or the page
rather than the database.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import click
import pyarrow as pa
import pytest
from click.testing import CliRunner

from trackstar_db.api import Database
from trackstar_db.cli import main

# command (as typed, subcommands after their group) -> the verb(s) of the handle it calls
COMMANDS = {
    "init": ("create", "attach"),  # Database.create, then attach per --checkpoint
    "info": "info",
    "ingest corpus": "ingest_corpus",
    "ingest facts": "ingest_facts",
    "ingest gradients": "ingest_gradients",
    "train": "train",
    "fit": "fit",
    "fit-factors": "fit_factors",
    "retrieve": "retrieve",
    "tail-patch": "tail_patch",
    "eval": "evaluate",
    "query": "query",
    "sql": "sql",
    "export": "export_run",
    "import": "import_run",
    "report": "write_report",
    "check": "check",
    "rebuild-bm25": "rebuild_bm25",
    "index": "build_index",
    "plan": "plan",  # without a DB: trackstar_db.verbs.scale.plan(None, ...), the same function
    "select": "select",
    "rank": "self_influence",
    "validate": "validate",
    "qld": "query_loss_difference",
    "simfluence record": "simfluence_record",
    "simfluence fit": "simfluence_fit",
    "simfluence simulate": "simulate",
    "simfluence eval": "simfluence_evaluate",
}
NOT_VERBS = {
    "migrate": "rewrites a directory of an earlier format, which no handle of this version can open yet",
    "demo": "builds a database from nothing by chaining the verbs above (demo.py sits one layer above the handle)",
    "serve": "the server: each of its routes is a verb (ROUTES)",
}

# "METHOD path" -> the verb its handler calls on the served snapshot (a Database)
ROUTES = {
    "POST /api/query": "query",
    "POST /api/tokens": "token_contributions",
    "POST /api/sql": "sql",
    "GET /api/evaluation": "evaluate",
    "GET /api/runs": "table",
    "GET /api/examples/{example_id}": "table",
    "GET /api/queries": "sql",
}
ROUTES_NOT_VERBS = {
    "GET /": "the explorer page (a static file)",
    "GET /static/explorer.css": "the one stylesheet (report/page.py)",
    "GET /static": "the page's static files",
    "GET /openapi.json": "FastAPI's description of the routes",
    "GET /api/health": "the server's own state (uptime, queue, model loaded)",
    "GET /api/version": "the server's snapshot (version id, pending renewal)",
    "POST /api/query/batch": "query, one line at a time (the model worker batches them: PromptAttributor.attribute_many)",
    "GET /api/methods": "the registry's servability per method (serve/service.servable_methods), not a verb yet",
}

HANDLE_CALL = re.compile(r"\b(?:handle|_open\(db\)|db)\.(\w+)\(")


def commands(group: click.Group = main, prefix: str = "") -> dict[str, click.Command]:
    """Every command of the CLI by the words a user types, subgroups walked."""
    found = {}
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found |= commands(command, f"{prefix}{name} ")
        else:
            found[f"{prefix}{name}"] = command
    return found


def verbs_of(entry) -> tuple[str, ...]:
    return entry if isinstance(entry, tuple) else (entry,)


def handle_calls(source: str) -> set[str]:
    """The public methods of the handle that `source` calls on a handle."""
    return {name for name in HANDLE_CALL.findall(source) if not name.startswith("_") and hasattr(Database, name)}


def test_every_command_has_an_entry():
    typed = set(commands())
    assert typed - set(COMMANDS) - set(NOT_VERBS) == set(), "a command without an entry in COMMANDS or NOT_VERBS"
    assert (set(COMMANDS) | set(NOT_VERBS)) - typed == set(), "an entry for a command that no longer exists"
    assert not set(COMMANDS) & set(NOT_VERBS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_calls_its_verb_and_no_other(name):
    source = inspect.getsource(commands()[name].callback)  # unwraps decorators (ann_flags)
    for verb in verbs_of(COMMANDS[name]):
        assert callable(getattr(Database, verb, None)), f"{name}: the handle has no verb {verb!r}"
    called = handle_calls(source)
    assert called == set(verbs_of(COMMANDS[name])) - {"create"}, (name, called)
    if "create" in verbs_of(COMMANDS[name]):
        assert "Database.create(" in source


@pytest.mark.parametrize("name", sorted(NOT_VERBS))
def test_commands_that_are_not_verbs_open_no_handle(name):
    source = inspect.getsource(commands()[name].callback)
    assert "_open(" not in source and not handle_calls(source), name


# -- the commands run as typed, each verb replaced by a recorder ----------------------------------------

RETURNS = {
    "export_run": lambda *a, **k: Path("out.jsonl"),
    "import_run": lambda *a, **k: 7,
    "write_report": lambda *a, **k: Path("report/index.html"),
    "build_index": lambda *a, **k: {"table": "ann_trackstar", "source": {"rows": 3, "table": "t", "table_version": 1},
                                    "dim": 8, "write_seconds": 0.0, "index_seconds": 0.0},
    "plan": lambda *a, **k: pa.table({"item": ["disk"]}),
    "train": lambda *a, **k: None,
    "attach": lambda *a, **k: "step-1",
    "simfluence_record": lambda *a, **k: ["run-0", "run-1"],
    "simulate": lambda *a, **k: pa.table({"step": [0]}),
    "simfluence_evaluate": lambda *a, **k: pa.table({"method": ["constant"]}),
    "self_influence": lambda *a, **k: pa.table({"example_id": ["e"]}),
    "check": lambda *a, **k: pa.table({"table": pa.array([], pa.string())}),
    "evaluate": lambda *a, **k: pa.table({"method": ["bm25"]}),
    "sql": lambda *a, **k: pa.table({"x": [1]}),
}


@pytest.fixture
def recorded(tmp_path, monkeypatch):
    """An empty database and a recorder in place of each verb of RETURNS: {verb: [(args, kwargs)]}."""
    assert CliRunner().invoke(main, ["init", str(tmp_path / "db")]).exit_code == 0
    calls: dict[str, list] = {}
    for verb, answer in RETURNS.items():
        def recorder(self, *args, _verb=verb, _answer=answer, **kwargs):
            assert isinstance(self, Database)
            calls.setdefault(_verb, []).append((args, kwargs))
            return _answer(*args, **kwargs)

        monkeypatch.setattr(Database, verb, recorder)
    return tmp_path, calls


CASES = [
    (["export", "{db}", "--run", "bm25", "--out", "{tmp}/out.jsonl"], "export_run",
     (("bm25", Path("{tmp}/out.jsonl")), {})),
    (["import", "{db}", "{tmp}/in.jsonl", "--method", "bm25"], "import_run",
     ((Path("{tmp}/in.jsonl"), "bm25", None), {})),
    (["report", "{db}", "--out", "{tmp}/report", "--samples", "3"], "write_report",
     ((Path("{tmp}/report"), None, 3), {})),
    (["index", "{db}", "--method", "trackstar", "--kind", "ivf_flat", "--device", "cpu"], "build_index",
     (("trackstar", "ivf_flat"), {"num_partitions": None, "num_sub_vectors": None, "device": "cpu"})),
    (["plan", "{db}", "--dim", "1024", "--rows", "5"], "plan", None),
    (["train", "{db}", "--out", "{tmp}/model", "--epochs", "2", "--seed", "3"], "train", None),
    (["simfluence", "record", "{db}", "--runs", "2", "--steps", "4"], "simfluence_record", None),
    (["simfluence", "simulate", "{db}", "--curriculum", "{tmp}/c.jsonl"], "simulate",
     ((Path("{tmp}/c.jsonl"), "linear", None), {})),
    (["simfluence", "eval", "{db}", "--holdout", "0.5"], "simfluence_evaluate", ((0.5, 1.0), {})),
    (["rank", "{db}", "--k", "4"], "self_influence", ((), {"variant": "corrected", "mix": "train", "k": 4})),
    (["check", "{db}"], "check", ((), {})),
    (["init", "{tmp}/db2", "--checkpoint", "step-1"], "attach", (("step-1",), {})),
    (["eval", "{db}", "--by", "bucket"], "evaluate", (("bucket",), {})),
    (["sql", "{db}", "SELECT 1"], "sql", (("SELECT 1",), {"vectors": False})),
]


def _fill(value, tmp: Path):
    if isinstance(value, (list, tuple)):
        return type(value)(_fill(v, tmp) for v in value)
    if isinstance(value, dict):
        return {k: _fill(v, tmp) for k, v in value.items()}
    if isinstance(value, Path):
        return Path(str(value).format(tmp=tmp))
    if isinstance(value, str):
        return value.format(tmp=tmp, db=tmp / "db")
    return value


@pytest.mark.parametrize("argv, verb, expected", CASES, ids=[" ".join(c[0][:2]) for c in CASES])
def test_a_command_as_typed_calls_its_verb_once(recorded, argv, verb, expected):
    tmp, calls = recorded
    (tmp / "in.jsonl").write_text("")
    result = CliRunner().invoke(main, _fill(argv, tmp), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert len(calls.get(verb, [])) == 1, calls
    assert sum(len(c) for c in calls.values()) == 1, f"{argv[0]} called more than its verb: {calls}"
    if expected is not None:
        assert calls[verb][0] == _fill(expected, tmp)


def test_plan_train_and_record_hand_their_flags_to_the_verb(recorded):
    tmp, calls = recorded
    run = lambda *argv: CliRunner().invoke(main, _fill(list(argv), tmp), catch_exceptions=False)  # noqa: E731
    assert run("plan", "{db}", "--dim", "2048", "--rows", "5", "--blocks", "2").exit_code == 0
    (args, kwargs), = calls["plan"]
    assert args == (2048,) and kwargs["rows"] == 5 and kwargs["blocks"] == 2 and kwargs["model_dir"] is None
    assert run("train", "{db}", "--out", "{tmp}/model", "--epochs", "2", "--arch", "llama").exit_code == 0
    (args, kwargs), = calls["train"]
    assert args == (tmp / "model",) and kwargs["epochs"] == 2 and kwargs["architecture"] == "llama"
    assert run("simfluence", "record", "{db}", "--runs", "2", "--subset", "0.25").exit_code == 0
    (args, kwargs), = calls["simfluence_record"]
    assert kwargs["runs"] == 2 and kwargs["subset"] == 0.25


def test_plan_without_a_database_is_the_verbs_function():
    """`plan` with no DB answers through the same function the verb calls, with a database of no examples."""
    from trackstar_db.verbs.scale import plan

    typed = CliRunner().invoke(main, ["plan", "--dim", "1024", "--rows", "1000", "--format", "json"])
    assert typed.exit_code == 0, typed.output
    table = plan(None, 1024, rows=1000)
    assert len(typed.output.strip().splitlines()) == table.num_rows


# -- the server's routes --------------------------------------------------------------------------------


def routes(tmp_path) -> dict[str, object]:
    pytest.importorskip("fastapi")
    from trackstar_db.serve import app

    assert CliRunner().invoke(main, ["init", str(tmp_path / "db")]).exit_code == 0
    found = {}
    for route in app(tmp_path / "db").routes:
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if method != "HEAD":
                found[f"{method} {route.path}"] = route
    return found


def reached_verbs(function, depth: int = 3) -> set[str]:
    """The handle verbs a route handler calls on a database, following the service's methods it names."""
    from trackstar_db.serve.service import Service

    seen, verbs, todo = set(), set(), [(function, 0)]
    while todo:
        fn, level = todo.pop()
        source = inspect.getsource(fn)
        verbs |= handle_calls(source)
        if level < depth:
            for name in re.findall(r"\b[sS]ervice\.(\w+)", source):
                target = getattr(Service, name, None)
                if callable(target) and name not in seen:
                    seen.add(name)
                    todo.append((target, level + 1))
    return verbs


def test_every_route_has_an_entry_and_calls_its_verb(tmp_path):
    found = routes(tmp_path)
    assert set(found) - set(ROUTES) - set(ROUTES_NOT_VERBS) == set(), "a route without an entry"
    assert (set(ROUTES) | set(ROUTES_NOT_VERBS)) - set(found) == set(), "an entry for a route that no longer exists"
    for key, verb in ROUTES.items():
        assert callable(getattr(Database, verb, None)), key
        assert verb in reached_verbs(found[key].endpoint), (key, verb, reached_verbs(found[key].endpoint))
