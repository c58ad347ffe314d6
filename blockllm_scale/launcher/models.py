"""LLaMA model sizes used for the memory/throughput experiments.

The 60m..7b shapes are GaLore's pre-training configs (configs/llama_*.json in
the GaLore repository), so our results line up with the numbers in that paper
and in BlockLLM's. Models are plain transformers LlamaForCausalLM instances.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

GALORE_VOCAB_SIZE = 32000
SHIPPED_TOKENIZER_VOCAB_SIZE = 8192

MODEL_SIZES: dict[str, dict[str, int]] = {
    # CPU-sized smoke-test model for the shipped 8192-token tokenizer: a few dozen
    # steps at seq 128, batch 8 take seconds on two cores. intermediate = 64 * 8/3,
    # rounded up to a multiple of 16, the usual LLaMA ratio.
    "tiny": dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_hidden_layers=2,
                 vocab_size=SHIPPED_TOKENIZER_VOCAB_SIZE, max_position_embeddings=1024),
    # LLaMA-60M's proportions at CPU size, for quality tests: the shipped 8192-token vocabulary, embeddings and
    # LM head 57% of the parameters (60M: 56%), 8 decoder layers.
    "mini": dict(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_hidden_layers=8,
                 vocab_size=SHIPPED_TOKENIZER_VOCAB_SIZE, max_position_embeddings=1024),
    "60m": dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_hidden_layers=8,
                vocab_size=GALORE_VOCAB_SIZE, max_position_embeddings=1024),
    "130m": dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_hidden_layers=12,
                 vocab_size=GALORE_VOCAB_SIZE, max_position_embeddings=1024),
    "350m": dict(hidden_size=1024, intermediate_size=2736, num_attention_heads=16, num_hidden_layers=24,
                 vocab_size=GALORE_VOCAB_SIZE, max_position_embeddings=1024),
    "1b": dict(hidden_size=2048, intermediate_size=5461, num_attention_heads=32, num_hidden_layers=24,
               vocab_size=GALORE_VOCAB_SIZE, max_position_embeddings=1024),
    # GaLore's llama_7b.json is the one config with max_sequence_length 2048.
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32,
               vocab_size=GALORE_VOCAB_SIZE, max_position_embeddings=2048),
}


def llama_config(size: str, vocab_size: int | None = None) -> LlamaConfig:
    """LlamaConfig for a named size; vocab_size replaces the size's default vocabulary."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; known sizes: {', '.join(MODEL_SIZES)}")
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1):
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    shape = dict(MODEL_SIZES[size])
    if vocab_size is not None:
        shape["vocab_size"] = vocab_size
    return LlamaConfig(
        **shape,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        # bos=0 / eos=1 as in GaLore's configs, which is also the order of the
        # shipped tokenizer's special tokens (<s>, </s>, <unk>, <pad>).
        bos_token_id=0,
        eos_token_id=1,
        # GaLore's pad_token_id=-1 is not copied: as an embedding padding_idx it
        # would silently freeze the last vocabulary row. Batches are packed, so no padding.
        pad_token_id=None,
        # Untied, as in GaLore: the input embedding and LM head are separate
        # matrices, which matters when an optimizer treats blocks independently.
        tie_word_embeddings=False,
        use_cache=False,  # training only; the KV cache just costs memory here
    )


def build_model(size: str, vocab_size: int | None = None, dtype: torch.dtype = torch.float32,
                attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    """A freshly initialised LlamaForCausalLM of the named size.

    Parameters are created directly in `dtype` (not cast after an fp32 init), so a
    bf16 7b never needs fp32 memory. Inside `with torch.device("meta"):` no memory
    is allocated at all, which is how large sizes are inspected cheaply.
    """
    config = llama_config(size, vocab_size)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    assert isinstance(model, LlamaForCausalLM), type(model)  # the auto mapping for "llama"
    return model


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (works for meta-device models too)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
