"""Options declared once (issue 30, item 3).

- Each verb's options dataclass carries its rules (option_checks.ruled); every click option and
  every field of the server's request models that has a counterpart rule applies that rule
  (walked here, command by command and field by field, so a new option with other bounds fails).
- The library's errors name parameters, the command line's name flags: no string raised outside
  cli/ names a --flag except inside a quoted command to run ('trackstar-db ingest gradients DB
  --split queries', 'python train.py --data {data}': a command suggestion, not a complaint about a
  parameter), and no raised message names one of the project's classes.
- The bad-option cases (k, fraction, dim, damping, checkpoint name, device, ...) are refused by the
  library naming the parameter and by the command line naming the flag, in one line.
"""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from trackstar_db import option_checks as rules
from trackstar_db.errors import ParameterError

ROOT = Path(__file__).resolve().parents[1] / "trackstar_db"
FLAG = re.compile(r"--[a-z]")


# -- the rules themselves -------------------------------------------------------------------------
def test_rules_refuse_at_their_bounds_and_say_why():
    assert rules.K.problem(1) is None and rules.K.problem(rules.K_MAX) is None
    assert rules.K.problem(0) == "must be >= 1, not 0"
    assert rules.K.problem(rules.K_MAX + 1) == "must be <= 100,000, not 100001"
    assert rules.K.problem(True) == "must be an integer, not True" and rules.K.problem(2.0) is not None
    assert rules.FRACTION.problem(1.0) is None and rules.FRACTION.problem(0.0) == "must be in (0, 1], not 0.0"
    assert rules.PROPER_FRACTION.problem(0.999) is None
    assert rules.PROPER_FRACTION.problem(1.0) == "must be in (0, 1), not 1.0"
    assert rules.DAMPING.problem(0) is None and rules.DAMPING.problem(-0.5) == "must be >= 0, not -0.5"
    assert rules.DAMPING.problem(math.inf) == "must be a finite number >= 0, not inf"
    assert rules.DAMPING.problem(math.nan) is not None
    assert rules.MODELS.problem(1) == "must be >= 2 (a correlation needs two subsets), not 1"
    assert rules.IDENTIFIER.problem("step-0004") is None
    for bad in ("", "-x", "a/b", "..", "a b", "x" * 65):
        assert rules.IDENTIFIER.problem(bad) is not None, bad
    assert rules.TEXT.problem(" ") == "must be non-empty"
    assert rules.TEXT.problem("x" * (rules.TEXT_MAX + 1)) == "must be at most 20,000 characters, not 20,001"
    assert rules.Choice(("a", "b")).problem("c") == "must be one of a, b, not 'c'"


def test_one_rule_per_concept():
    """The disagreements issue 30 found are one rule each now."""
    from trackstar_db.featurizer.config import MAX_DIM, MIN_DIM
    from trackstar_db.store import checkpoints

    assert (MIN_DIM, MAX_DIM) == (rules.DIM.low, rules.DIM.high)
    assert checkpoints.NAME.pattern == rules.IDENTIFIER.regex  # 64 characters, not 200
    with pytest.raises(ParameterError, match=r"^checkpoint must be letters"):
        checkpoints.check_name("x" * 65)


# -- click options and request fields against the dataclasses' rules -----------------------------
def _verbs():
    from trackstar_db.cost_plan import Plan
    from trackstar_db.featurizer.config import FeaturizerConfig
    from trackstar_db.gradients.factors import FactorOptions
    from trackstar_db.gradients.fit import FitOptions
    from trackstar_db.gradients.worker import GradientJob
    from trackstar_db.retrieval.ann import AnnOptions
    from trackstar_db.retrieval.ann_build import IndexOptions
    from trackstar_db.retrieval.runs import RetrieveOptions
    from trackstar_db.selection.select import SelectOptions
    from trackstar_db.simfluence.record import RecordOptions
    from trackstar_db.sources.corpus import CorpusOptions
    from trackstar_db.tailpatch.patcher import TailPatchConfig
    from trackstar_db.testbed.train import TrainConfig
    from trackstar_db.validate.options import ValidateOptions
    from trackstar_db.validate.qld import QLDOptions

    # the one-prompt query takes plain arguments, checked with these rules (retrieval/adhoc.py)
    query = {"k": rules.K}
    return {
        ("validate",): [ValidateOptions],
        ("ingest", "gradients"): [GradientJob, FeaturizerConfig],
        ("ingest", "corpus"): [CorpusOptions],
        ("retrieve",): [RetrieveOptions, AnnOptions],
        ("query",): [query, AnnOptions],
        ("select",): [SelectOptions, AnnOptions],
        ("fit",): [FitOptions],
        ("fit-factors",): [FactorOptions],
        ("train",): [TrainConfig],
        ("tail-patch",): [TailPatchConfig],
        ("simfluence", "record"): [RecordOptions],
        ("qld",): [QLDOptions],
        ("rank",): [{"k": rules.K}],  # Database.self_influence's k
        ("plan",): [Plan],
        ("index",): [IndexOptions],
        # Simfluence's fit and evaluation take plain arguments, checked with these rules (simfluence/)
        ("simfluence", "fit"): [{"ridge": rules.POSITIVE_NUMBER}],
        ("simfluence", "eval"): [{"ridge": rules.POSITIVE_NUMBER, "holdout": rules.PROPER_FRACTION}],
    }


def _command(path: tuple[str, ...]) -> click.Command:
    from trackstar_db.cli import main

    command = main
    for name in path:
        command = command.commands[name]
    return command


def _parameter_of(option: click.Option) -> str:
    """The library parameter an option stands for: its flag without dashes ('--arch' also 'architecture')."""
    from trackstar_db.cli.common import FLAGS

    flag = option.opts[0]
    return next((p for p, f in FLAGS.items() if f == flag), flag.lstrip("-").replace("-", "_"))


def _agrees(param_type, rule) -> str | None:
    """What differs between a click type and a rule, or None."""
    if getattr(param_type, "rule", None) is not None:
        return None if param_type.rule == rule else f"applies {param_type.rule!r}, the field {rule!r}"
    if isinstance(param_type, click.Choice):
        if not isinstance(rule, rules.Choice):
            return f"is a choice, the field {rule!r}"
        return None if set(param_type.choices) == set(rule.values) else \
            f"offers {sorted(param_type.choices)}, the field {sorted(rule.values)}"
    if isinstance(param_type, (click.IntRange, click.FloatRange)) and isinstance(rule, rules.Range):
        ours = (param_type.min, param_type.max, param_type.min_open, param_type.max_open,
                isinstance(param_type, click.IntRange))
        theirs = (rule.low, rule.high, rule.low_open, rule.high_open, rule.integer)
        return None if ours == theirs else f"bounds {ours}, the field {theirs}"
    return f"is {param_type!r}, which applies no rule; the field has {rule!r}"


def test_every_click_option_with_a_counterpart_field_applies_its_rule():
    from trackstar_db.option_checks import rules_of

    checked, problems = [], []
    for path, sources in _verbs().items():
        command = _command(path)
        found = {}
        for source in sources:
            found.update(source if isinstance(source, dict) else rules_of(source))
        matched = set()
        for option in command.params:
            if not isinstance(option, click.Option):
                continue
            rule = found.get(_parameter_of(option))
            if rule is None:
                continue
            matched.add(_parameter_of(option))
            problem = _agrees(option.type, rule)
            checked.append(f"{' '.join(path)} {option.opts[0]}")
            if problem:
                problems.append(f"{' '.join(path)} {option.opts[0]} {problem}")
        assert matched, f"{' '.join(path)}: no option matched its dataclasses' ruled fields"
    assert not problems, "\n".join(problems)
    assert len(checked) >= 40, checked  # the walk reaches the options (a renamed one would drop out)


def test_the_check_can_fail():
    """A click option with other bounds than its field is caught (the walk's comparison is live)."""
    assert _agrees(click.FloatRange(0.0, 1.0, min_open=True), rules.PROPER_FRACTION) is not None
    assert _agrees(click.Choice(["a"]), rules.Choice(("a", "b"))) is not None
    assert _agrees(click.STRING, rules.IDENTIFIER) is not None
    from trackstar_db.cli.types import click_type

    assert _agrees(click_type(rules.COUNT), rules.K) is not None
    assert _agrees(click_type(rules.K), rules.K) is None


def _pydantic_agrees(model, field: str, rule) -> list[str]:
    """Probe a request model's field at the rule's edges: pydantic and the rule must agree."""
    from pydantic import ValidationError

    base = {name: "x" for name, info in model.model_fields.items() if info.is_required()}
    if isinstance(rule, rules.Text):
        probes = ["", "x", "x" * rule.high, "x" * (rule.high + 1)]
    else:
        probes = [rule.low + d for d in (-1, 0, 1)] if rule.low is not None else []
        probes += [rule.high + d for d in (-1, 0, 1)] if rule.high is not None else []
    differ = []
    for value in probes:
        try:
            model(**{**base, field: value})
            served = True
        except ValidationError:
            served = False
        if served != (rule.problem(value) is None):
            differ.append(f"{model.__name__}.{field}={str(value)[:12]}: served {served}, rule {rule.problem(value)}")
    return differ


def test_request_models_of_the_server_take_the_library_rules():
    pytest.importorskip("fastapi")
    from trackstar_db.retrieval.ann import AnnOptions
    from trackstar_db.retrieval.runs import RetrieveOptions
    from trackstar_db.serve.routes import QueryRequest, TokensRequest

    counterparts = {(QueryRequest, "k"): rules.rule_of(RetrieveOptions, "k"),
                    (QueryRequest, "prompt"): rules.TEXT, (QueryRequest, "target"): rules.TEXT,
                    (QueryRequest, "control_target"): rules.TEXT,
                    (TokensRequest, "prompt"): rules.TEXT, (TokensRequest, "target"): rules.TEXT}
    for name in ("nprobes", "refine_factor", "ef"):
        counterparts[(QueryRequest, name)] = rules.rule_of(AnnOptions, name)
    problems = [p for (model, field), rule in counterparts.items() for p in _pydantic_agrees(model, field, rule)]
    assert not problems, "\n".join(problems)
    # the walk is live: a field with other bounds is caught
    from pydantic import BaseModel, Field

    class Looser(BaseModel):
        prompt: str = "p"
        target: str = "t"
        k: int = Field(10, ge=1, le=1000)

    assert _pydantic_agrees(Looser, "k", rules.K)


# -- no flag outside cli/, no class name in a message ---------------------------------------------
def _template(node) -> str | None:
    """A string literal's text, each {} of an f-string as '{}'."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def _raised_texts(source: str):
    """(line, text) of every outermost string literal inside a raise statement or an error's call."""
    tree = ast.parse(source)
    seen = set()
    for node in ast.walk(tree):
        roots = []
        if isinstance(node, ast.Raise) and node.exc is not None:
            roots.append(node.exc)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")).endswith("Error"):
            roots.append(node)
        for root in roots:
            for sub in ast.walk(root):
                if id(sub) in seen:
                    continue
                text = _template(sub)
                if text is not None:
                    seen.update(id(inner) for inner in ast.walk(sub))
                    yield sub.lineno, text


# a --flag is a command suggestion when it sits inside a quoted command the user can run
_COMMAND = re.compile(r"'(?:trackstar-db|python) [^']*'")


def flag_complaints(source: str) -> list[tuple[int, str]]:
    """(line, text) of raised strings that name a --flag outside a quoted command."""
    return [(line, text) for line, text in _raised_texts(source) if FLAG.search(_COMMAND.sub("", text))]


def _library_files():
    return [p for p in sorted(ROOT.rglob("*.py")) if p.relative_to(ROOT).parts[0] != "cli"]


def test_no_error_outside_cli_names_a_flag():
    found = [f"{path.relative_to(ROOT.parent)}:{line}: {text}" for path in _library_files()
             for line, text in flag_complaints(path.read_text(encoding="utf-8"))]
    assert not found, "\n".join(found)


def test_the_flag_scan_can_fail():
    bad = 'def f(x):\n    if x < 1:\n        raise ValueError(f"--batch-size must be >= 1, not {x}")\n'
    hint = 'def g(db):\n    raise TrackstarError(f"no index; run \'trackstar-db index {db} --method m\'")\n'
    call = 'def h():\n    error = ParameterError("k", "like --k")\n    raise error\n'
    assert flag_complaints(bad) == [(3, "--batch-size must be >= 1, not {}")]
    assert flag_complaints(hint) == []
    assert flag_complaints(call) == [(2, "like --k")]


def _project_classes() -> set[str]:
    names = set()
    for path in ROOT.rglob("*.py"):
        names.update(n.name for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.ClassDef))
    return names


def class_pattern(classes: set[str]) -> re.Pattern:
    """A project class named in a message: a compound name (FeaturizerConfig) anywhere, any class
    name before '.', ':' or '(' (Task.modules); plain words that are also class names (JSON, Task) pass."""
    compound = sorted((c for c in classes if re.fullmatch(r"_?[A-Z][a-z0-9]+[A-Z]\w*", c)), key=len, reverse=True)
    every = sorted(classes, key=len, reverse=True)
    return re.compile(rf"\b(?:{'|'.join(compound)})\b|\b(?:{'|'.join(every)})[.:(]")


def test_no_raised_message_names_a_class_of_the_project():
    classes = _project_classes()
    assert {"FeaturizerConfig", "ValidateOptions", "GradientJob", "TrainConfig"} <= classes
    pattern = class_pattern(classes)
    assert pattern.search("FeaturizerConfig dim must be") and pattern.search("Task.modules must be")
    assert not pattern.search("invalid JSON in the rates file") and not pattern.search("the task's modules")
    found = [f"{path.relative_to(ROOT.parent)}:{line}: {text}" for path in sorted(ROOT.rglob("*.py"))
             for line, text in _raised_texts(path.read_text(encoding="utf-8")) if pattern.search(text)]
    assert not found, "\n".join(found)


# -- the bad-option cases, through the library and the command line ------------------------------
def _library_cases():
    from trackstar_db.devices import resolve_device
    from trackstar_db.featurizer.config import FeaturizerConfig
    from trackstar_db.gradients.factors import FactorOptions
    from trackstar_db.gradients.fit import FitOptions
    from trackstar_db.gradients.worker import GradientJob
    from trackstar_db.retrieval.ann import AnnOptions
    from trackstar_db.retrieval.runs import RetrieveOptions
    from trackstar_db.selection.select import SelectOptions
    from trackstar_db.simfluence.record import RecordOptions
    from trackstar_db.store.checkpoints import check_name
    from trackstar_db.tailpatch.patcher import TailPatchConfig
    from trackstar_db.testbed.train import TrainConfig
    from trackstar_db.validate.options import ValidateOptions

    return [
        ("k", lambda: RetrieveOptions(k=0)), ("k", lambda: RetrieveOptions(k=rules.K_MAX + 1)),
        ("k", lambda: TailPatchConfig(k=0)),
        ("fraction", lambda: SelectOptions(fraction=1.5)), ("fraction", lambda: ValidateOptions(fraction=1.0)),
        ("fraction", lambda: FactorOptions(fraction=0.0)), ("subset", lambda: RecordOptions(subset=0.0)),
        ("top", lambda: SelectOptions(top=3, fraction=0.5)),
        ("dim", lambda: FeaturizerConfig(dim=0)), ("dim", lambda: FeaturizerConfig(dim=rules.DIM.high + 1)),
        ("combine", lambda: FeaturizerConfig(combine="mean")), ("eps", lambda: FeaturizerConfig(eps=-1.0)),
        ("damping", lambda: FitOptions(damping=-1.0)), ("damping", lambda: FactorOptions(damping=math.nan)),
        ("crossing_k", lambda: FitOptions(crossing_k=0)),
        ("checkpoint", lambda: check_name("../x")), ("name", lambda: ValidateOptions(name="a b")),
        ("device", lambda: resolve_device("gpu")), ("device", lambda: GradientJob(device="gpu")),
        ("device", lambda: ValidateOptions(device="tpu")),
        ("batch_size", lambda: GradientJob(batch_size=0)), ("split", lambda: GradientJob(split="dev")),
        ("models", lambda: ValidateOptions(models=1)), ("schedule", lambda: ValidateOptions(schedule="fast")),
        ("train_command", lambda: ValidateOptions(train_command="x {out}")),
        ("nprobes", lambda: AnnOptions(nprobes=0)), ("epochs", lambda: TrainConfig(epochs=0)),
        ("final_lr", lambda: TrainConfig(lr=1e-3, final_lr=1e-2)),
    ]


def test_the_library_names_the_parameter_never_a_flag_or_a_class():
    classes = _project_classes()
    for parameter, call in _library_cases():
        with pytest.raises(ParameterError) as refused:
            call()
        message = str(refused.value)
        assert refused.value.parameter == parameter and message.startswith(f"{parameter} "), message
        assert not FLAG.search(_COMMAND.sub("", message)) and not class_pattern(classes).search(message), message


@pytest.mark.parametrize("argv,flag", [
    (["query", "DB", "--prompt", "a", "--target", "b", "--k", "0"], "--k"),
    (["retrieve", "DB", "--method", "bm25", "--k", "100001"], "--k"),
    (["select", "DB", "--fraction", "0", "--out", "OUT"], "--fraction"),
    (["validate", "DB", "--fraction", "1"], "--fraction"),
    (["validate", "DB", "--models", "1"], "--models"),
    (["validate", "DB", "--name", "a b"], "--name"),
    (["ingest", "gradients", "DB", "--dim", "0"], "--dim"),
    (["ingest", "gradients", "DB", "--dim", "70000"], "--dim"),
    (["fit", "DB", "--damping", "-1"], "--damping"),
    (["fit-factors", "DB", "--damping", "inf"], "--damping"),
    (["query", "DB", "--prompt", "a", "--target", "b", "--device", "gpu"], "--device"),
])
def test_the_command_line_names_the_flag_in_one_line(tmp_path, argv, flag):
    """Refused by the option's click type, before the database is opened (DB need not exist)."""
    from trackstar_db.cli import main

    files = {"DB": str(tmp_path / "db"), "OUT": str(tmp_path / "out.jsonl")}
    result = CliRunner().invoke(main, [files.get(a, a) for a in argv])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith(f"Error: {flag} must be "), result.output
    classes = _project_classes()
    assert not class_pattern(classes).search(lines[0]), lines[0]


def test_a_library_refusal_reaches_the_command_line_with_its_flags(tiny_db):
    """Errors the click types cannot see (two options together, a bound the database sets) are the
    library's ParameterError, printed with the flags of every parameter they name."""
    from trackstar_db.cli import main

    db = str(tiny_db.path)
    odd = tiny_db.path.parent / "step 4!"  # a checkpoint directory whose name cannot suffix a table name
    odd.mkdir()
    (odd / "config.json").write_text((Path(tiny_db.manifest["model"]["path"]) / "config.json").read_text())
    cases = [(["init", db, "--checkpoint", str(odd)],
              "Error: --checkpoint must be letters, digits, '-' and '_' (starting with a letter or digit, at most "
              "64 characters), not 'step 4!'"),
             (["select", db, "--top", "3", "--fraction", "0.5", "--out", str(tiny_db.path.parent / "s.jsonl")],
              "Error: --top or --fraction: give exactly one of them"),
             (["ingest", "corpus", db, str(tiny_db.path.parent / "none.jsonl"), "--chat-template",
               str(Path(__file__))], "Error: --chat-template needs --messages-field")]
    for argv, line in cases:
        result = CliRunner().invoke(main, argv)
        errors = [text for text in result.output.splitlines() if text.startswith("Error")]
        assert result.exit_code != 0 and errors == [line] and "Traceback" not in result.output, result.output


def test_parameters_the_library_names_are_flags_of_the_command_line():
    """Every parameter a ParameterError names (first argument or `others`, as a literal) is the flag of
    some command, so the CLI's line names a real flag; the few that only Python callers pass are listed."""
    from trackstar_db.cli import main
    from trackstar_db.cli.common import flag

    def options(group):
        for command in group.commands.values():
            if isinstance(command, click.Group):
                yield from options(command)
            else:
                yield from (o for p in command.params if isinstance(p, click.Option) for o in p.opts)

    flags = set(options(main))
    named = set()
    for path in _library_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "ParameterError" and node.args:
                first = node.args[0]
                if isinstance(first, ast.Constant):
                    named.add(first.value)
                for keyword in node.keywords:
                    if keyword.arg == "others" and isinstance(keyword.value, ast.Tuple):
                        named.update(e.value for e in keyword.value.elts if isinstance(e, ast.Constant))
    python_only = {"d_model", "n_head",  # TrainConfig's architecture: the testbed's own, no option
                   "pairs"}  # the (prompt, target) pairs of a library call (rerank.score_examples)
    missing = sorted(p for p in named - python_only if flag(p) not in flags)
    assert len(named) >= 20, named
    assert not missing, missing
