"""Checkpoints given as a base model plus a PEFT adapter (LoRA), loaded for attribution.

A model directory holding `adapter_config.json` is a PEFT adapter: its `base_model_name_or_path`
must be a local directory (relative paths are taken from the adapter directory; nothing is
downloaded). models/load.py opens the base with transformers and the adapter on top with peft
(`pip install 'trackstar-db[peft]'`) as trainable, so the base weights are frozen
(requires_grad False) and the adapter weights are not. This module only reads paths.

What is tracked: the featurizer tracks every 2-D weight of an nn.Linear / Conv1D / nn.Embedding
that requires grad (featurizer/tracked.py), so for a LoRA adapter that is exactly its
`lora_A` and `lora_B` matrices (nn.Linear each; lora_B's gradient includes the alpha / r
scaling), plus any module the adapter trains in full (`modules_to_save`) that is one of those
kinds. Base weights, biases and norms are not tracked; the manifest lists the tracked names.
The vectors are the adapter's per-example gradients, as fine-tuning would take them.
"""

from __future__ import annotations

import json
from pathlib import Path

from trackstar_db.errors import TrackstarError

CONFIG = "adapter_config.json"


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def base_path(path: str | Path) -> Path:
    """The local base model directory an adapter names."""
    path = Path(path)
    try:
        base = json.loads((path / CONFIG).read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (OSError, ValueError, KeyError) as exc:
        raise TrackstarError(f"{path / CONFIG}: no readable base_model_name_or_path ({exc})") from None
    base = Path(base) if Path(base).is_absolute() else (path / base)
    if not base.is_dir():
        raise TrackstarError(f"{path / CONFIG}: base_model_name_or_path {str(base)!r} is not a local directory "
                             "(models are never downloaded; point it at the base checkpoint)")
    return base.resolve()


def tokenizer_path(path: str | Path) -> Path:
    """The adapter directory when it carries a tokenizer, else the base model's."""
    path = Path(path)
    return path if (path / "tokenizer_config.json").is_file() else base_path(path)
