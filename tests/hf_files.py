"""Tiny Hugging Face models written by transformers' own save_pretrained (config.json + model.safetensors)."""

from pathlib import Path

import torch

TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128)


def tiny_llama(folder: Path, *, tie: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Save a randomly initialised tiny LlamaForCausalLM in ``folder``; return it (eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(LlamaConfig(**TINY_LLAMA, tie_word_embeddings=tie), dtype=dtype).eval()
    model.save_pretrained(folder)
    return model


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits
