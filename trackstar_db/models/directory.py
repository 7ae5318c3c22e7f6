"""The one model-directory rule: what a checkpoint directory must hold, and what identifies it.

A checkpoint has a config.json holding a JSON object, safetensors weights (pickled
pytorch_model.bin files are never loaded: unpickling can run code), and a tokenizer. A PEFT
adapter directory (adapter_config.json) is checked the same way, its tokenizer possibly in its base.
`validate` checks it when it is recorded (init, train, attach) and again before it is loaded, so a
bad one is one line naming the file, never a traceback of the model libraries. `fingerprint`
hashes the config and the same weight files `validate` accepts (`weight_files`: never a *.bin,
never the optimizer state), so what is fingerprinted is what is loaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from trackstar_db.errors import TrackstarError
from trackstar_db.files import file_digest, read_json

from . import adapters

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
OPTIMIZER_FILE = "optimizer.safetensors"  # beside the weights, not one of them (featurizer/optimizer_state.py)


def _config_object(path: Path) -> dict:
    config = read_json(path, "model config")
    if not isinstance(config, dict):
        raise TrackstarError(f"{path}: must hold a JSON object, not a {type(config).__name__}")
    return config


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def config_file(folder: Path) -> Path:
    """The directory's config.json (an adapter's adapter_config.json), or one line saying it has none."""
    config = folder / (adapters.CONFIG if adapters.is_adapter(folder) else "config.json")
    if not config.is_file():
        raise TrackstarError(f"{folder}: not a model directory (no config.json)")
    return config


def weight_files(folder: Path) -> list[Path]:
    """The weights a checkpoint is loaded from (*.safetensors but the optimizer state), or one line
    saying why there are none: pickled *.bin weights are refused, never loaded nor fingerprinted."""
    weights = sorted(w for w in folder.glob("*.safetensors") if w.name != OPTIMIZER_FILE)
    pickled = sorted(folder.glob("*.bin"))
    if not weights and pickled:
        raise TrackstarError(f"{pickled[0]}: pickled PyTorch weights are not read; only safetensors weights are "
                             "(save the model with save_pretrained(..., safe_serialization=True))")
    if not weights:
        raise TrackstarError(f"{folder}: no weight files (*.safetensors)")
    return weights


def validate(model_dir: str | Path, tokenizer: str | Path | None = None) -> Path:
    """`model_dir` resolved, or a TrackstarError naming what is wrong with it; `tokenizer`: where
    its tokenizer is when not beside it (default: the directory, or an adapter's base)."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise TrackstarError(f"{folder}: no such model directory")
    _config_object(config_file(folder))
    weight_files(folder)
    adapter = adapters.is_adapter(folder)
    tokenizer = Path(tokenizer) if tokenizer is not None else adapters.tokenizer_path(folder) if adapter else folder
    if not has_tokenizer(tokenizer):
        raise TrackstarError(f"{tokenizer}: no tokenizer ({', '.join(TOKENIZER_FILES)}); save the tokenizer beside "
                             "the model (tokenizer.save_pretrained)")
    return folder.resolve()


def fingerprint(model_dir: str | Path) -> str:
    """Fingerprint of a local checkpoint: its config and its weight files (`weight_files`); an
    adapter's includes its base's."""
    model_dir = Path(model_dir)
    config = config_file(model_dir)
    base = fingerprint(adapters.base_path(model_dir)) if adapters.is_adapter(model_dir) else ""
    digest = hashlib.sha256(config.read_bytes() + base.encode())
    for weight in weight_files(model_dir):
        digest.update(weight.name.encode())
        digest.update(file_digest(weight).encode())
    return digest.hexdigest()[:16]
