"""Tiny seeded causal LMs (random init, no downloads) and random token batches, for tests.

make_model("gpt2" | "llama" | "gptneox", seed) -> a model in eval mode, vocab VOCAB.
random_batch(n, seed, query_fraction) -> a collate()d batch of right-padded examples of varied
length; "query" examples carry loss on their last tokens only (target-only labels).
"""

from __future__ import annotations

import torch
import transformers

from trackstar_db.featurizer.tokenize import IGNORE, Encoded, collate

VOCAB = 64
FAMILIES = ("gpt2", "llama", "gptneox")


def make_config(family: str):
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gpt2":
        return transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, **common)
    if family == "llama":
        return transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64, **common)
    if family == "gptneox":
        return transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=64, **common)
    raise ValueError(f"unknown tiny model family {family!r}")


def make_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = make_config(family)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.float().eval()


def random_items(n: int, seed: int = 0, min_len: int = 4, max_len: int = 12,
                 query_fraction: float = 0.25, vocab: int = VOCAB) -> list[Encoded]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = [1] + torch.randint(3, vocab, (length - 1,), generator=g).tolist()
        if i < round(n * query_fraction):
            target = int(torch.randint(1, 3, (1,), generator=g))  # target-only loss
            labels = [IGNORE] * (length - target) + ids[length - target:]
        else:
            labels = [IGNORE] + ids[1:]
        items.append(Encoded(ids, labels))
    return items


def random_batch(n: int, seed: int = 0, **kwargs) -> dict[str, torch.Tensor]:
    return collate(random_items(n, seed, **kwargs), pad_id=0)
