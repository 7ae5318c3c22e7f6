"""The layer figures of docs/architecture.md, for a checkout: imports that run back up the stage
order (the import contract in pyproject.toml, checked by import-linter) and imports written inside
functions, split into project modules and third-party ones.

    python benchmarks/layer_figures.py [CHECKOUT]      # default: this one

CHECKOUT's trackstar_db is the one analysed (put first on PYTHONPATH), always against this
checkout's contract, so the same rule measures an older tree.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def local_imports(package: Path) -> Counter:
    """Imports inside a function body, by where they lead: 'project' or the top-level package."""
    counts: Counter = Counter()
    for path in package.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        tree, lines = ast.parse(text), text.splitlines()
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom):
                    project = node.level > 0 or (node.module or "").split(".")[0] == "trackstar_db"
                    counts["project" if project else (node.module or "").split(".")[0]] += 1
                    if project and "# heavy:" in lines[node.lineno - 1]:
                        counts["project, marked heavy"] += 1
                    if project and "# cycle:" in lines[node.lineno - 1]:
                        counts["project, marked cycle"] += 1
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        top = alias.name.split(".")[0]
                        counts["project" if top == "trackstar_db" else top] += 1
    return counts


def contract_for(checkout: Path, folder: Path) -> Path:
    """This checkout's contract, with the layers `checkout` lacks marked optional: "(name)"."""
    import tomllib

    settings = tomllib.loads((HERE / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    lines = [f'[importlinter]\nroot_package = {settings["root_package"]}\n']
    for number, contract in enumerate(settings["contracts"]):
        layers = []
        for layer in contract["layers"]:
            names = [name.strip() for name in layer.split("|")]
            present = [name if (checkout / "trackstar_db" / name).with_suffix(".py").exists()
                       or (checkout / "trackstar_db" / name).is_dir() else f"({name})" for name in names]
            layers.append(" | ".join(present))
        lines.append(f"[importlinter:contract:{number}]\nname = {contract['name']}\ntype = {contract['type']}\n"
                     f"containers = {' '.join(contract['containers'])}\nlayers =\n    " + "\n    ".join(layers) + "\n")
    path = folder / ".importlinter"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def arrows_up(checkout: Path) -> tuple[int, str]:
    """(number of import chains that run back up the stage order, the checker's report)."""
    import tempfile

    env = {**os.environ, "PYTHONPATH": str(checkout)}
    with tempfile.TemporaryDirectory() as folder:
        config = contract_for(checkout, Path(folder))
        result = subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache", "--no-logo",
                                 str(config)], capture_output=True, text=True, env=env, cwd=folder)
    report = result.stdout
    if "Contracts:" not in report:
        raise SystemExit(report + result.stderr)
    broken = report[report.find("Broken contracts"):] if "Broken contracts" in report else ""
    return len(re.findall(r"^- ", broken, re.MULTILINE)), broken.strip()


def main() -> None:
    checkout = Path(sys.argv[1] if len(sys.argv) > 1 else HERE).resolve()
    count, broken = arrows_up(checkout)
    local = local_imports(checkout / "trackstar_db")
    third_party = sum(n for name, n in local.items() if not name.startswith("project"))
    print(f"checkout: {checkout}")
    print(f"import chains that run back up the stage order: {count}")
    print(f"imports inside functions: {local['project'] + third_party} ({local['project']} of project modules, "
          f"{local['project, marked heavy']} of them marked '# heavy:', {local['project, marked cycle']} '# cycle:'; "
          f"{third_party} of other packages)")
    if broken:
        print(broken)


if __name__ == "__main__":
    main()
