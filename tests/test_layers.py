"""The stage order holds: the import contract in pyproject.toml ([tool.importlinter], checked by
import-linter) passes on this tree, fails on a copy given one import that runs back up, and
docs/architecture.md lists the same layers in the same order."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")

pytest.importorskip("importlinter")


def lint(package_parent: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([str(LINT), "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")], cwd=package_parent,
                          env=env, capture_output=True, text=True, timeout=300)


def layers() -> list[str]:
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    (contract,) = settings["contracts"]
    return contract["layers"]


def test_the_layer_contract_holds():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def test_an_import_back_up_breaks_the_contract(tmp_path):
    """The same checker on a copy where the store imports the handle (api.py, four layers up)."""
    shutil.copytree(ROOT / "trackstar_db", tmp_path / "trackstar_db", ignore=shutil.ignore_patterns("__pycache__"))
    lock = tmp_path / "trackstar_db" / "store" / "lock.py"
    lock.write_text(lock.read_text(encoding="utf-8") + "\n\ndef _handle():\n    from trackstar_db.api import Database\n\n"
                    "    return Database\n", encoding="utf-8")
    result = lint(tmp_path)
    assert result.returncode == 1
    assert "trackstar_db.store is not allowed to import trackstar_db.api" in result.stdout
    assert "trackstar_db.store.lock -> trackstar_db.api" in result.stdout


def test_every_package_and_module_of_trackstar_db_has_a_layer():
    named = {name.strip("() ") for layer in layers() for name in layer.split("|")}
    present = {p.stem for p in (ROOT / "trackstar_db").glob("*.py") if p.stem not in ("__init__", "__main__")}
    present |= {p.name for p in (ROOT / "trackstar_db").iterdir() if (p / "__init__.py").is_file()}
    assert present == named


def test_docs_architecture_states_the_same_order():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = re.search(r"## Layers\n.*?\n```\n(.*?)```", text, re.DOTALL)
    assert block, "docs/architecture.md has no '## Layers' block"
    documented = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.split("#")[0].strip()]
    assert documented == layers()


# -- imports written inside functions ------------------------------------------------------------
# Such an import says why on its line: "# heavy: PACKAGE[, PACKAGE]" (it keeps a heavy third-party
# package out of its module's import, hence out of start-up) or "# cycle: MODULE" (MODULE imports
# this one at its top). Every other import belongs at the top of its module.

HEAVY = {"torch", "transformers", "lancedb", "lance", "duckdb", "tantivy", "fastapi", "starlette", "uvicorn",
         "matplotlib", "ray", "boto3", "botocore", "peft", "scipy", "polars", "pandas", "pyarrow", "numpy",
         "safetensors", "tqdm"}
REASON = re.compile(r"#\s*(heavy|cycle):\s*([\w.]+(?:\s*,\s*[\w.]+)*)")


def unexplained_local_imports(source: str, where: str = "<source>") -> list[str]:
    """'where:line: problem' for each import inside a function without a true reason on its line:
    no '# heavy:' / '# cycle:' marker, a heavy package not in HEAVY, a '# heavy: P' on an import of P
    that the module already makes at its top, or a '# cycle:' naming no module of trackstar_db."""
    import ast

    tree, lines = ast.parse(source), source.splitlines()
    at_top = set()  # the modules imported at the top, and their packages
    for node in tree.body:
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        for name in names:
            parts = name.split(".")
            at_top |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    problems, seen = [], set()
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.lineno in seen:
                continue
            seen.add(node.lineno)
            line = lines[node.lineno - 1]
            reason = REASON.search(line)
            if reason is None:
                problems.append(f"{where}:{node.lineno}: no '# heavy: PACKAGE' or '# cycle: MODULE': {line.strip()}")
                continue
            names = [name.strip() for name in reason.group(2).split(",")]
            if reason.group(1) == "cycle":
                missing = [n for n in names if not (ROOT / Path(*n.split("."))).with_suffix(".py").is_file()]
                if missing:
                    problems.append(f"{where}:{node.lineno}: '# cycle:' names no module: {', '.join(missing)}")
                continue
            unknown = sorted(name for name in names if name.split(".")[0] not in HEAVY)  # torch.distributed: a heavy part
            if unknown:
                problems.append(f"{where}:{node.lineno}: not a heavy package: {', '.join(unknown)}")
            imported = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                        else [node.module or ""] if not node.level else [])
            already = {name for name in names if name in at_top
                       and any(module == name or module.startswith(name + ".") for module in imported)}
            if already:
                problems.append(f"{where}:{node.lineno}: {', '.join(sorted(already))} is imported at the top already")
    return problems


def test_every_import_inside_a_function_says_why():
    problems = []
    for path in sorted((ROOT / "trackstar_db").rglob("*.py")):
        problems += unexplained_local_imports(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert not problems, "\n".join(problems)


def test_the_local_import_check_finds_each_kind_of_problem():
    source = ("import torch\n\n\ndef f():\n    from trackstar_db.ladder import LADDER\n"
              "    import json  # heavy: json\n    import torch  # heavy: torch\n"
              "    from trackstar_db.api import Database  # cycle: trackstar_db.nowhere\n"
              "    import duckdb  # heavy: duckdb\n    import torch.distributed as dist  # heavy: torch.distributed\n"
              "    from torch.distributed.fsdp import fully_shard  # heavy: torch\n")
    problems = unexplained_local_imports(source)
    assert [p.split(":")[1] for p in problems] == ["5", "6", "7", "8", "11"], problems
    assert "no '# heavy: PACKAGE'" in problems[0] and "not a heavy package: json" in problems[1]
    assert "torch is imported at the top already" in problems[2] and "names no module" in problems[3]
    assert "torch is imported at the top already" in problems[4]


def test_the_cli_starts_without_a_heavy_package():
    """`import trackstar_db.cli` and `trackstar-db --help` (every command registered) load none of HEAVY."""
    code = ("import sys\nfrom trackstar_db.cli import main\n"
            "try:\n    main(['--help'], prog_name='trackstar-db')\nexcept SystemExit as exit:\n    assert exit.code == 0\n"
            f"print(sorted(name for name in {sorted(HEAVY)!r} if name in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Usage: trackstar-db" in result.stdout
    assert result.stdout.splitlines()[-1] == "[]"
