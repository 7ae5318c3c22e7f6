"""The model session (models/): one model-directory rule (models/directory.py: what is accepted is
what is fingerprinted) and one way in (models/load.py: nothing else calls transformers' Auto
classes), so a checkpoint the loader refuses cannot be recorded under a fingerprint either."""

import json
import re
from pathlib import Path

import pytest

from trackstar_db.errors import TrackstarError
from trackstar_db.models.directory import fingerprint, validate, weight_files

ROOT = Path(__file__).resolve().parents[1]


def checkpoint(folder: Path, weights=("model.safetensors",)) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (folder / "tokenizer.json").write_text("{}")
    for name in weights:
        (folder / name).write_bytes(name.encode() * 10)
    return folder


def test_what_is_fingerprinted_is_what_is_loaded(tmp_path):
    folder = checkpoint(tmp_path / "m", ("model.safetensors", "optimizer.safetensors", "training_args.bin",
                                         "pytorch_model.bin"))
    assert validate(folder) == folder.resolve()
    assert weight_files(folder) == [folder / "model.safetensors"]
    before = fingerprint(folder)
    for ignored in ("training_args.bin", "pytorch_model.bin", "optimizer.safetensors"):  # never loaded
        (folder / ignored).write_bytes(b"changed")
        assert fingerprint(folder) == before, ignored
    (folder / "model.safetensors").write_bytes(b"other weights")
    assert fingerprint(folder) != before
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert len({before, fingerprint(folder)}) == 2


def test_pickled_weights_alone_are_refused_by_both(tmp_path):
    folder = checkpoint(tmp_path / "m", ("pytorch_model.bin",))
    for check in (validate, fingerprint):
        with pytest.raises(TrackstarError, match=r"pytorch_model.bin: pickled PyTorch weights are not read"):
            check(folder)
    empty = checkpoint(tmp_path / "e", ())
    for check in (validate, fingerprint):
        with pytest.raises(TrackstarError, match=r"no weight files \(\*\.safetensors\)"):
            check(empty)


def test_only_models_load_opens_a_model_tokenizer_or_config():
    auto = re.compile(r"\bAuto(Tokenizer|Config|Model\w*)\.from_(pretrained|config)\b")
    outside = [str(path.relative_to(ROOT)) for path in (ROOT / "trackstar_db").rglob("*.py")
               if path != ROOT / "trackstar_db" / "models" / "load.py" and auto.search(path.read_text(encoding="utf-8"))]
    assert outside == []


def test_a_run_output_opens_through_the_rule(tmp_path):
    """open_weights (a training run's own output) refuses what the rule refuses, before transformers runs."""
    from trackstar_db.models.load import open_weights

    with pytest.raises(TrackstarError, match="pickled PyTorch weights are not read"):
        open_weights(checkpoint(tmp_path / "m", ("pytorch_model.bin",)))
