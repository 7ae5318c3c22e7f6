"""The one factory that turns a ModelSource into (model, tokenizer).

Every user of a model comes through `open_model`: the gradient worker and the Ray actor (through
gradients/loader.py), TracIn-CP, the one-prompt query and token contributions, tail-patch,
lm-embedding and the testbed's scoring; `open_tokenizer` is the same tokenizer without the weights
(token counts at corpus ingest, Simfluence's runs). It checks the directory and its fingerprint, loads the
weights in the source's dtype from the local directory only (no hub access), applies a PEFT
adapter over its local base (adapter weights trainable, base frozen), puts the model in eval mode
on `device`, and caps the tokenizer at the model's context (models/context.py), so every caller
cuts encodings at the same length.
"""

from __future__ import annotations

from pathlib import Path

from trackstar_db.errors import TrackstarError

from .adapters import base_path
from .context import cap_tokenizer
from .directory import validate
from .source import ModelSource


def load_adapter_model(path: str | Path, dtype: str = "float32"):
    """The base model (weights in `dtype`) with the adapter at `path` applied, adapter weights trainable."""
    from transformers import AutoModelForCausalLM

    try:
        from peft import PeftModel
    except ImportError:
        raise TrackstarError(f"{path}: a PEFT adapter needs peft: pip install 'trackstar-db[peft]'") from None
    base = AutoModelForCausalLM.from_pretrained(base_path(path), local_files_only=True, dtype=dtype)
    model = PeftModel.from_pretrained(base, str(path), is_trainable=True)
    if not any(p.requires_grad for p in model.parameters()):
        raise TrackstarError(f"{path}: the adapter has no trainable weights to attribute")
    return model


def open_tokenizer(source: ModelSource):
    """The tokenizer of `source` alone (counting tokens needs no weights); an adapter's own, else its base's."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source.tokenizer_path()), local_files_only=True)


def open_model(source: ModelSource, device: str = "cpu"):
    """(model, tokenizer) of `source`: eval mode on `device`, tokenizer capped at the model's context."""
    from transformers import AutoModelForCausalLM

    if source.path.is_dir():  # config an object, safetensors weights (never a pickle), a tokenizer
        validate(source.path, source.tokenizer_path())
    source.check()
    dtype = source.weights_dtype()
    tokenizer = open_tokenizer(source)
    if source.adapter:  # base + PEFT adapter: the adapter weights are tracked
        model = load_adapter_model(source.path, dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(source.path), local_files_only=True, dtype=dtype)
    model = model.to(device).eval()
    cap_tokenizer(tokenizer, model.config)
    return model, tokenizer
