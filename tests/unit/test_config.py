"""Bad input is refused with a ValueError that names the offending argument."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from blockllm_scale import BlockLLM, BlockLLMConfig
from blockllm_scale.config import EMBEDDINGS, GRANULARITIES, STATES, STRATEGIES, VARIANTS


@pytest.fixture
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    return LlamaForCausalLM(config).float()


# ----- the settings dataclass ----------------------------------------------------------------------
def test_defaults_and_every_allowed_value_are_accepted():
    BlockLLMConfig()
    for name, allowed in (("granularity", GRANULARITIES), ("variant", VARIANTS), ("strategy", STRATEGIES),
                          ("embeddings", EMBEDDINGS), ("states", STATES)):
        for value in allowed:
            assert getattr(BlockLLMConfig(**{name: value}), name) == value
    assert BlockLLMConfig(sparsity=0).sparsity == 0
    assert BlockLLMConfig(sparsity=0.999, patience=1).patience == 1


@pytest.mark.parametrize("name, value", [
    ("sparsity", -0.1), ("sparsity", 1.0), ("sparsity", 1.5), ("sparsity", "0.5"), ("sparsity", True),
    ("sparsity", None), ("sparsity", float("nan")),
    ("patience", 0), ("patience", -3), ("patience", 1.5), ("patience", "50"), ("patience", True),
    ("granularity", "block"), ("variant", "exact"), ("strategy", "grad_norm"),
    ("embeddings", "sometimes"), ("states", "fp16"), ("states", "bnb_4bit"),
])
def test_config_rejects_bad_values_naming_them(name, value):
    with pytest.raises(ValueError, match=name):
        BlockLLMConfig(**{name: value})


def test_from_dict_accepts_known_keys_and_names_a_misspelt_one():
    config = BlockLLMConfig.from_dict({"sparsity": 0.5, "patience": 10, "granularity": "layer"})
    assert (config.sparsity, config.patience, config.granularity) == (0.5, 10, "layer")
    with pytest.raises(ValueError, match="'sparsty'"):
        BlockLLMConfig.from_dict({"sparsty": 0.5})
    with pytest.raises(ValueError, match="'granularty'"):
        BlockLLMConfig.from_dict({"sparsity": 0.5, "granularty": "layer"})
    with pytest.raises(ValueError, match="patience"):  # values are still checked
        BlockLLMConfig.from_dict({"patience": 0})


# ----- the optimizer's arguments ---------------------------------------------------------------
@pytest.mark.parametrize("settings, named", [
    (dict(sparsity=-0.1), "sparsity"),
    (dict(sparsity=1.0), "sparsity"),
    (dict(sparsity="0.5"), "sparsity"),
    (dict(patience=0), "patience"),
    (dict(patience=1.5), "patience"),
    (dict(sparsty=0.5), "'sparsty'"),
    (dict(lr=-1e-3), "lr"),
    (dict(betas=(1.0, 0.999)), "betas"),
    (dict(betas=(0.9, -0.1)), "betas"),
    (dict(betas=(0.9,)), "betas"),
    (dict(eps=-1.0), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(granularity="block"), "granularity"),
    (dict(variant="exact"), "variant"),
    (dict(strategy="grad_norm"), "strategy"),
    (dict(embeddings="sometimes"), "embeddings"),
    (dict(states="fp16"), "states"),
    (dict(step_in_backward="yes"), "step_in_backward"),
    (dict(row_ranges="no"), "row_ranges"),
    (dict(step_in_backward=True, variant="masked"), "step_in_backward"),
])
def test_optimizer_rejects_bad_arguments_naming_them(model, settings, named):
    with pytest.raises(ValueError, match=named):
        BlockLLM(model.named_parameters(), **settings)


def test_bad_arguments_leave_the_model_untouched(model):
    with pytest.raises(ValueError):
        BlockLLM(model.named_parameters(), sparsity=0.5, variant="exact")
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_unnamed_parameters_are_refused(model):
    with pytest.raises(ValueError, match="params"):
        BlockLLM(model.parameters(), sparsity=0.5)
    with pytest.raises(ValueError, match="params"):
        BlockLLM([{"params": list(model.parameters())}], sparsity=0.5)


def test_a_model_with_nothing_trainable_is_refused(model):
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="params"):
        BlockLLM(model.named_parameters(), sparsity=0.5)
    with pytest.raises(ValueError, match="params"):
        BlockLLM([], sparsity=0.5)


def test_only_embeddings_with_embeddings_never_is_refused(model):
    named = [(n, p) for n, p in model.named_parameters() if "embed" in n or "lm_head" in n]
    with pytest.raises(ValueError, match="embeddings"):
        BlockLLM(named, sparsity=0.5, embeddings="never")


def test_frozen_parameters_stay_out_and_stay_frozen(model):
    model.model.layers[0].requires_grad_(False)
    opt = BlockLLM(model.named_parameters(), sparsity=0.0)
    assert not any(n.startswith("model.layers.0.") for n in opt._names)
    assert not any(p.requires_grad for p in model.model.layers[0].parameters())
    assert any(n.startswith("model.layers.1.") for n in opt._names)


def test_valid_arguments_are_accepted(model):
    opt = BlockLLM(model.named_parameters(), lr=0.0, betas=(0.0, 0.0), eps=0.0, weight_decay=0.0,
                   sparsity=0.5, patience=1, granularity="layer", variant="masked", strategy="random",
                   embeddings="never", states="fp32", seed=7)
    assert opt.config == BlockLLMConfig(sparsity=0.5, patience=1, granularity="layer", variant="masked",
                                        strategy="random", embeddings="never", states="fp32", seed=7)
