"""Tiny local checkpoints (config, random weights, a word-level tokenizer) saved to a directory,
as a user's `init --model DIR` would find them; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from trackstar_db.testbed.vocab import build_tokenizer


def save_checkpoint(out: Path, texts: list[str], family: str = "llama", context: int = 64, seed: int = 0):
    """Save a random `family` ('llama': GQA, tied embeddings; 'gpt2') model and its tokenizer
    trained on `texts` to `out`. Returns (model, tokenizer)."""
    tokenizer = build_tokenizer(texts, out, model_max_length=10**30)  # the model's context is the only cap
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if family == "llama":
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=context, tie_word_embeddings=True, **ids)
    else:
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=context, **ids)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    model.save_pretrained(str(out))
    return model, tokenizer


def sentences(n: int, seed: int = 0) -> list[str]:
    """Plain sentences over a small vocabulary (no facts, no ids)."""
    g = torch.Generator().manual_seed(seed)
    words = ("the river city old north mill bridge stone king song winter light road market "
             "harbor tower garden forest valley school").split()
    out = []
    for i in range(n):
        length = int(torch.randint(5, 12, (1,), generator=g))
        picks = torch.randint(0, len(words), (length,), generator=g).tolist()
        out.append(" ".join(words[j] for j in picks).capitalize() + f" number {i} .")
    return out
