"""Model sizes: GaLore's LLaMA shapes, parameter counts, and a trainable tiny model."""

import math

import pytest
import torch

from blockllm_scale.launcher.models import MODEL_SIZES, build_model, count_parameters

# (hidden, intermediate, heads, layers) from GaLore's configs/llama_*.json, written out
# here independently of MODEL_SIZES so a typo in either one fails the test.
GALORE_SHAPES = {
    "60m": (512, 1376, 8, 8),
    "130m": (768, 2048, 12, 12),
    "350m": (1024, 2736, 16, 24),
    "1b": (2048, 5461, 32, 24),
    "7b": (4096, 11008, 32, 32),
}


def llama_parameter_count(vocab, hidden, intermediate, layers):
    """Untied embedding + LM head, per layer q/k/v/o + gate/up/down + two RMSNorms, final norm."""
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    return 2 * vocab * hidden + layers * per_layer + hidden


def build_on_meta(size, **kwargs):
    with torch.device("meta"):  # shapes only, no memory: even 7b builds instantly
        return build_model(size, **kwargs)


@pytest.mark.parametrize("size", list(GALORE_SHAPES))
def test_galore_sizes_have_the_expected_shapes_and_counts(size):
    hidden, intermediate, heads, layers = GALORE_SHAPES[size]
    model = build_on_meta(size)
    config = model.config
    assert (config.hidden_size, config.intermediate_size) == (hidden, intermediate)
    assert (config.num_attention_heads, config.num_hidden_layers) == (heads, layers)
    assert config.vocab_size == 32000 and not config.tie_word_embeddings
    assert count_parameters(model) == llama_parameter_count(32000, hidden, intermediate, layers)


@pytest.mark.parametrize("size, millions", [("60m", 58.1), ("130m", 134.1), ("350m", 368.0),
                                            ("1b", 1339.1), ("7b", 6738.4)])
def test_parameter_counts_match_the_published_sizes(size, millions):
    assert count_parameters(build_on_meta(size)) / 1e6 == pytest.approx(millions, abs=0.1)


def test_vocab_override_and_untied_head():
    model = build_on_meta("60m", vocab_size=8192)
    assert model.model.embed_tokens.weight.shape == (8192, 512)
    assert model.lm_head.weight.shape == (8192, 512)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert count_parameters(model) == llama_parameter_count(8192, 512, 1376, 8)


def test_dtype_and_attention_implementation_are_applied():
    model = build_on_meta("130m", dtype=torch.bfloat16, attn_implementation="eager")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "eager"
    assert build_on_meta("tiny").config._attn_implementation == "sdpa"


def test_unknown_size_is_rejected_with_the_known_sizes():
    with pytest.raises(ValueError, match="'13b'") as excinfo:
        build_model("13b")
    assert all(size in str(excinfo.value) for size in MODEL_SIZES)


def test_count_parameters_can_skip_frozen_ones():
    model = build_on_meta("tiny")
    model.model.embed_tokens.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - 8192 * 64


@pytest.fixture
def one_cpu_thread():
    # For a model this small, two OpenMP threads on a shared 2-core runner spend more
    # time synchronising than computing (measured ~10x slower under load).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_tiny_model_gives_a_finite_initial_loss_and_learns(one_cpu_thread):
    torch.manual_seed(0)
    model = build_model("tiny")
    assert model.config.vocab_size == 8192  # sized for the shipped tokenizer
    batch = torch.randint(4, 8192, (8, 128))
    loss = model(input_ids=batch, labels=batch).loss
    assert torch.isfinite(loss)
    # Small initial weights give near-uniform predictions: loss close to ln(vocab).
    assert abs(loss.item() - math.log(8192)) < 0.5
    # Memorising one small fixed batch must lower the loss: gradients reach every block.
    small = batch[:2, :32]
    initial = model(input_ids=small, labels=small).loss.item()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(8):
        optimizer.zero_grad()
        model(input_ids=small, labels=small).loss.backward()
        optimizer.step()
    assert model(input_ids=small, labels=small).loss.item() < initial - 1.0
