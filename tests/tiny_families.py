"""Tiny random-weight configs of the Hugging Face causal-LM families a user brings (dense and
mixture-of-experts), built from their config classes: nothing is downloaded.

make_family(name, vocab, seed) -> a float32 model in eval mode with eager attention.
"""

from __future__ import annotations

import torch
import transformers

# hidden 32, 2 layers, 4 heads (2 KV), vocab 64 unless a family needs otherwise
BASE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, intermediate_size=48)
MOE = dict(num_experts_per_tok=2)  # top-2 of 4 experts

DENSE = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3", "phi", "olmo2", "gpt_neox", "gpt2",
         "falcon", "stablelm", "starcoder2", "granite", "cohere")
EXPERTS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3", "llama4_text", "deepseek_v2",
           "glm4_moe", "phimoe", "granitemoe")


def _config(name: str):
    if name == "gpt2":
        return transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64)
    if name == "falcon":
        return transformers.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         new_decoder_architecture=True, num_kv_heads=2)
    if name == "gpt_neox":
        return transformers.GPTNeoXConfig(**{k: v for k, v in BASE.items() if k != "num_key_value_heads"})
    if name == "phi":
        return transformers.PhiConfig(**BASE)
    if name == "gemma2" or name == "gemma3_text":
        return transformers.AutoConfig.for_model(name, head_dim=8, **BASE)
    if name == "mixtral":
        return transformers.MixtralConfig(num_local_experts=4, **MOE, **BASE)
    if name == "qwen2_moe":
        return transformers.Qwen2MoeConfig(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                           **MOE, **BASE)
    if name == "qwen3_moe":
        return transformers.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=16, head_dim=8, **MOE, **BASE)
    if name == "olmoe":
        return transformers.OlmoeConfig(num_experts=4, **MOE, **BASE)
    if name == "gpt_oss":
        return transformers.GptOssConfig(num_local_experts=4, head_dim=8, layer_types=["full_attention"] * 2,
                                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **MOE, **BASE)
    if name == "deepseek_v3":
        return transformers.DeepseekV3Config(n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=16,
                                             first_k_dense_replace=1, n_group=2, topk_group=1, q_lora_rank=16,
                                             kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                                             **MOE, **dict(BASE, num_key_value_heads=4))
    if name == "deepseek_v2":
        return transformers.DeepseekV2Config(n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=16,
                                             first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
                                             qk_rope_head_dim=8, v_head_dim=8, **MOE, **dict(BASE, num_key_value_heads=4))
    if name == "glm4_moe":
        return transformers.Glm4MoeConfig(n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=16,
                                          first_k_dense_replace=1, n_group=2, topk_group=1, head_dim=8, **MOE, **BASE)
    if name == "phimoe":
        return transformers.PhimoeConfig(num_local_experts=4, **MOE, **BASE)
    if name == "granitemoe":
        return transformers.GraniteMoeConfig(num_local_experts=4, **MOE, **BASE)
    if name == "llama4_text":
        return transformers.Llama4TextConfig(num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1,
                                             intermediate_size_mlp=48, head_dim=8, **dict(BASE, intermediate_size=16))
    return transformers.AutoConfig.for_model(name, **BASE)


def make_family(name: str, vocab: int = 64, seed: int = 0, **ids) -> torch.nn.Module:
    """A tiny `name` model with random weights (seeded), float32, eval mode, eager attention."""
    config = _config(name)
    config.vocab_size = vocab
    for key, value in dict(dict(bos_token_id=1, eos_token_id=2, pad_token_id=0), **ids).items():
        setattr(config, key, value)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # routers and some gains start at zero: random values make routing and gradients real
        for name_, param in model.named_parameters():
            if param.abs().sum() == 0 and param.dim() >= 1:
                param.normal_(0, 0.2 if param.dim() >= 2 else 0.02)
    return model
