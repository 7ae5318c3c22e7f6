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
