"""A tiny word-level tokenizer (optionally with a ChatML-style chat template) and a tiny random
GPT-2 checkpoint directory that uses it, for the task, chat and dataset-directory tests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from trackstar_db.testbed.vocab import build_tokenizer

WORDS = ("the river runs north past a mill where Ada keeps bees and the mill wheel turns slowly "
         "what does Ada keep honey bees answer question why is sky blue because light scatters "
         "hello how are you fine thanks tell me about rivers they flow to sea").split()
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TURN_MARKERS = ["<|im_start|>", "<|im_end|>", "system", "user", "assistant"]


def word_tokenizer(out_dir: Path | None = None, chat_template: str | None = None):
    """A word-level fast tokenizer over WORDS (+ the role names and ChatML markers)."""
    tokenizer = build_tokenizer([" ".join(WORDS + TURN_MARKERS[2:])], model_max_length=64)
    tokenizer.add_special_tokens({"additional_special_tokens": TURN_MARKERS[:2]})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def model_dir(out_dir: Path, chat_template: str | None = None, seed: int = 0) -> Path:
    """out_dir holding a 2-layer random GPT-2 (float32 safetensors) and word_tokenizer()."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = word_tokenizer(out_dir, chat_template)
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tokenizer),
                                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(out_dir))
    return out_dir
