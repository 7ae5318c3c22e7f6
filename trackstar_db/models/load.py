"""The one factory that turns a ModelSource into (model, tokenizer).

Every user of a model comes through `open_model`: the gradient worker and the Ray actor (through
gradients/loader.py), TracIn-CP, the one-prompt query and token contributions, tail-patch,
lm-embedding and the testbed's scoring; `open_tokenizer` is the same tokenizer without the weights
(token counts at corpus ingest, Simfluence's runs). It checks the directory and its fingerprint, loads the
weights in the source's dtype from the local directory only (no hub access), applies a PEFT
adapter over its local base (adapter weights trainable, base frozen), puts the model in eval mode
on `device`, and caps the tokenizer at the model's context (models/context.py), so every caller
cuts encodings at the same length.

The rest of the model session is here too, so nothing else calls transformers' Auto classes:
`open_config` (a config.json alone: shapes on the meta device, a context length),
`model_from_config` (fresh weights from a config: the testbed's and Simfluence's runs, memory
plans), `open_weights` (a run's own output directory, checked by the one directory rule) and
`save_model`. Every one is quiet unless progress is wanted (progress.quiet_transformers): no
"Loading weights" or "Writing model shards" bar lands in a redirected log.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from trackstar_db.errors import TrackstarError, first_line
from trackstar_db.progress import quiet_transformers

from .adapters import base_path
from .context import cap_tokenizer
from .directory import config_file, validate, weight_files
from .source import ModelSource


def load_adapter_model(path: str | Path, dtype: str = "float32"):
    """The base model (weights in `dtype`) with the adapter at `path` applied, adapter weights trainable."""
    from transformers import AutoModelForCausalLM  # heavy: transformers

    try:
        from peft import PeftModel  # heavy: peft
    except ImportError:
        raise TrackstarError(f"{path}: a PEFT adapter needs peft: pip install 'trackstar-db[peft]'") from None
    base = AutoModelForCausalLM.from_pretrained(base_path(path), local_files_only=True, dtype=dtype)
    model = PeftModel.from_pretrained(base, str(path), is_trainable=True)
    if not any(p.requires_grad for p in model.parameters()):
        raise TrackstarError(f"{path}: the adapter has no trainable weights to attribute")
    return model


def open_tokenizer(source: ModelSource | str | Path):
    """The tokenizer of `source` alone (counting tokens needs no weights); an adapter's own, else its
    base's; a path is a directory holding a tokenizer."""
    from transformers import AutoTokenizer  # heavy: transformers

    path = source.tokenizer_path() if isinstance(source, ModelSource) else Path(source)
    with quiet_transformers():
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def open_config(model_dir: str | Path):
    """The transformers config of a local model directory (its config.json; no weights are read),
    or one line naming the directory."""
    from transformers import AutoConfig  # heavy: transformers

    try:
        return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TrackstarError(f"{model_dir}: cannot read the model's config.json ({first_line(exc)})") from None


def model_from_config(config, *, meta: bool = False, dtype: str | None = None):
    """A causal LM built from `config` with fresh weights (the caller seeds torch first); `meta`:
    on the meta device (names and shapes, no memory); `dtype`: cast to it ('float32', ...)."""
    import torch  # heavy: torch
    from transformers import AutoModelForCausalLM  # heavy: transformers

    with torch.device("meta") if meta else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_config(config)
    return model if dtype is None else model.to(getattr(torch, dtype))


def open_weights(model_dir: str | Path, device: str = "cpu", dtype: str = "float32"):
    """The causal LM in a directory that is no recorded source (a training run's own output),
    checked by the one directory rule (a config, safetensors weights), on `device`."""
    from transformers import AutoModelForCausalLM  # heavy: transformers

    config_file(Path(model_dir))
    weight_files(Path(model_dir))
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=dtype)
    return model.to(device)


def open_encoder(model_dir: str | Path, device: str = "cpu"):
    """A sentence encoder (transformers AutoModel, no LM head) from a local directory, eval mode on
    `device`: the embedding baseline's model, a package's files rather than a recorded source."""
    from transformers import AutoModel  # heavy: transformers

    with quiet_transformers():
        model = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
    return model.to(device).eval()


def save_model(model, tokenizer, out: str | Path) -> Path:
    """Write `model` (safetensors) and `tokenizer` to `out`, a directory the one rule accepts."""
    with quiet_transformers():
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
    return Path(out)


def open_model(source: ModelSource, device: str = "cpu"):
    """(model, tokenizer) of `source`: eval mode on `device`, tokenizer capped at the model's context."""
    from transformers import AutoModelForCausalLM  # heavy: transformers

    if source.path.is_dir():  # config an object, safetensors weights (never a pickle), a tokenizer
        validate(source.path, source.tokenizer_path())
    source.check()
    dtype = source.weights_dtype()
    tokenizer = open_tokenizer(source)
    with quiet_transformers():
        if source.adapter:  # base + PEFT adapter: the adapter weights are tracked
            model = load_adapter_model(source.path, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(source.path), local_files_only=True, dtype=dtype)
    model = model.to(device).eval()
    cap_tokenizer(tokenizer, model.config)
    return model, tokenizer
