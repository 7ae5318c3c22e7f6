"""The featurizer (and the featurize benchmark) import and run with torch and transformers alone:
a GPU machine with nothing else installed can run them. Each check runs in a fresh interpreter
where the database-side packages are made unimportable (sys.modules[name] = None)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATABASE_SIDE = ("lancedb", "lance", "pyarrow", "duckdb", "tantivy", "click", "pandas", "polars", "ray")
BLOCK = f"import sys\nfor name in {DATABASE_SIDE!r}:\n    sys.modules[name] = None\n"


def run(code: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", BLOCK + code, *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_featurizer_imports_and_featurizes_with_torch_and_transformers_only():
    code = """
import torch
sys.path.insert(0, "tests")
import trackstar_db.featurizer
from trackstar_db.featurizer import Featurizer, FeaturizerConfig
from tiny_models import make_model, random_batch
featurizer = Featurizer(make_model("gpt2"), FeaturizerConfig(dim=1024, correction="none"))
out = featurizer.featurize(random_batch(4))
assert out.vectors["uncorrected"].shape == (4, featurizer.layout.dim) and torch.isfinite(out.vectors["uncorrected"]).all()
import trackstar_db.gradients.memory, trackstar_db.gradients.pipeline, trackstar_db.gradients.loop, trackstar_db.gradients.setup
import trackstar_db.gradients.loader, trackstar_db.models.load, trackstar_db.store.checkpoints
loaded = sorted({m.split(".")[0] for m in sys.modules if sys.modules[m] is not None})
print(" ".join(loaded))
"""
    loaded = run(code).stdout.split()
    assert "torch" in loaded and "transformers" in loaded
    assert not set(DATABASE_SIDE) & set(loaded)


def test_featurize_benchmark_runs_with_torch_and_transformers_only():
    code = """
import runpy
sys.argv = ["bench_featurize.py"] + sys.argv[1:]
runpy.run_path("benchmarks/bench_featurize.py", run_name="__main__")
"""
    out = run(code, "--layers", "1", "--width", "32", "--vocab", "64", "--batch", "2", "--seq", "8",
              "--batches", "1", "--repeats", "1", "--dim", "1024", "--plan-gib", "1", "--threads", "1").stdout
    assert "memory plan for 1 GiB free" in out
    assert "ratio featurize / train step:" in out
    for line in ("featurize", "train step (AdamW)"):
        row = next(r for r in out.splitlines() if r.startswith(line))
        assert float(row[len(line):].split()[0]) > 0  # tokens/s


def test_the_store_loads_neither_torch_nor_transformers():
    """`import trackstar_db, trackstar_db.store` (and every module of store/ and the model
    description) leaves torch and transformers unloaded: models/load.py is the only way in."""
    code = """
import importlib, pkgutil, sys
import trackstar_db, trackstar_db.store
first = sorted(n for n in ("torch", "transformers") if n in sys.modules)
for module in pkgutil.iter_modules(trackstar_db.store.__path__):
    try:
        importlib.import_module("trackstar_db.store." + module.name)
    except ModuleNotFoundError as error:  # a database package this machine lacks (tantivy, ...)
        if error.name in ("torch", "transformers"):
            raise
import trackstar_db.models.source, trackstar_db.models.context, trackstar_db.models.adapters
print(first, sorted(n for n in ("torch", "transformers") if n in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["[]", "[]"]
    for path in (ROOT / "trackstar_db" / "store").glob("*.py"):  # not even behind a function
        text = path.read_text(encoding="utf-8")
        assert "import transformers" not in text and "from transformers" not in text, path.name
