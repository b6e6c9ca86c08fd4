"""Tiny, randomly initialised models of every supported architecture, for tests that need no Hub.

    lm = tiny_model("gpt2", tokenizer)   # a HookedLM with 2 blocks, d_model 64

They share a real tokenizer (the default model's), so prompts, subjects and targets behave as in
real use; only the weights are random.
"""

from __future__ import annotations

import torch

from .errors import InvalidArgumentError
from .model import HookedLM

ARCHITECTURES = ("gpt2", "gpt_neox", "llama", "gptj", "qwen2")


def tiny_config(arch: str, vocab_size: int, n_layers: int = 2, d_model: int = 64, n_heads: int = 4):
    import transformers as tf

    common = dict(vocab_size=vocab_size)
    if arch == "gpt2":
        return tf.GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=n_heads, n_positions=256, **common)
    if arch == "gptj":
        return tf.GPTJConfig(n_layer=n_layers, n_embd=d_model, n_head=n_heads, n_positions=256,
                             rotary_dim=d_model // n_heads // 2, **common)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(num_hidden_layers=n_layers, hidden_size=d_model, num_attention_heads=n_heads,
                                intermediate_size=4 * d_model, max_position_embeddings=256, **common)
    if arch == "llama":
        return tf.LlamaConfig(num_hidden_layers=n_layers, hidden_size=d_model, num_attention_heads=n_heads,
                              num_key_value_heads=n_heads // 2, intermediate_size=3 * d_model,
                              max_position_embeddings=256, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(num_hidden_layers=n_layers, hidden_size=d_model, num_attention_heads=n_heads,
                              num_key_value_heads=n_heads // 2, intermediate_size=3 * d_model,
                              max_position_embeddings=256, **common)
    raise InvalidArgumentError(f"unknown tiny architecture {arch!r}; choose from {ARCHITECTURES}")


def tiny_model(arch: str, tokenizer, *, n_layers: int = 2, d_model: int = 64, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> HookedLM:
    """A randomly initialised ``arch`` model wrapped as a :class:`HookedLM`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch, len(tokenizer), n_layers=n_layers, d_model=d_model)
    hf = AutoModelForCausalLM.from_config(cfg).to(dtype)
    return HookedLM.from_hf(hf, tokenizer, name=f"tiny-{arch}")
