"""Is a directory a checkpoint trackstar-db can load? Checked when it is recorded (init, train,
attach) and again before it is loaded, so a bad one is one line naming the file, never a traceback
of the model libraries.

A checkpoint has a config.json holding a JSON object, safetensors weights (pickled
pytorch_model.bin files are never loaded: unpickling can run code), and a tokenizer. A PEFT
adapter directory (adapter_config.json) is checked the same way, its tokenizer possibly in its base.
"""

from __future__ import annotations

from pathlib import Path

from trackstar_db.errors import TrackstarError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def _config_object(path: Path) -> dict:
    from .manifest import read_json

    config = read_json(path, "model config")
    if not isinstance(config, dict):
        raise TrackstarError(f"{path}: must hold a JSON object, not a {type(config).__name__}")
    return config


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def validate(model_dir: str | Path, tokenizer: str | Path | None = None) -> Path:
    """`model_dir` resolved, or a TrackstarError naming what is wrong with it; `tokenizer`: where
    its tokenizer is when not beside it (default: the directory, or an adapter's base)."""
    from trackstar_db.models import adapters

    folder = Path(model_dir)
    if not folder.is_dir():
        raise TrackstarError(f"{folder}: no such model directory")
    adapter = adapters.is_adapter(folder)
    config = folder / (adapters.CONFIG if adapter else "config.json")
    if not config.is_file():
        raise TrackstarError(f"{folder}: not a model directory (no config.json)")
    _config_object(config)
    weights = [w for w in folder.glob("*.safetensors") if w.name != "optimizer.safetensors"]
    pickled = sorted(folder.glob("*.bin"))
    if not weights and pickled:
        raise TrackstarError(f"{pickled[0]}: pickled PyTorch weights are not read; only safetensors weights are "
                             "(save the model with save_pretrained(..., safe_serialization=True))")
    if not weights:
        raise TrackstarError(f"{folder}: no weight files (*.safetensors)")
    tokenizer = Path(tokenizer) if tokenizer is not None else adapters.tokenizer_path(folder) if adapter else folder
    if not has_tokenizer(tokenizer):
        raise TrackstarError(f"{tokenizer}: no tokenizer ({', '.join(TOKENIZER_FILES)}); save the tokenizer beside "
                             "the model (tokenizer.save_pretrained)")
    return folder.resolve()
