"""bf16 weights without losing small updates: BlockLLM's fp32 copies of its trained blocks (only those), the
baselines' fp32 master weights, stochastic rounding, and pure bf16 only when asked for."""

from __future__ import annotations

import copy

import pytest
import torch

from blockllm_scale.baselines.master_weights import Fp32MasterWeights
from blockllm_scale import BlockLLM
from blockllm_scale.config import ConfigError

# An RMSNorm-like gain of 1.0 in bf16 (spacing 2^-7 there) and Adam steps of 1e-3: each update is below half
# a bf16 step, so plain bf16 arithmetic rounds every one of them away.
LR, STEPS = 1e-3, 20


def gain_model() -> torch.nn.Module:
    model = torch.nn.Module()
    model.norm = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    model.proj = torch.nn.Parameter(torch.full((64, 64), 0.5, dtype=torch.bfloat16))
    return model


def train(model, optimizer, steps: int = STEPS) -> None:
    for step in range(steps):
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(step)).bfloat16()
        loss = ((x * model.norm) @ model.proj).float().pow(2).mean()
        loss.backward()
        if isinstance(optimizer, BlockLLM):
            optimizer.record_loss(loss)
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("weight_update, moves", [("fp32_master", True), ("round_to_nearest", False)])
def test_blockllm_fp32_copies_keep_updates_that_bf16_rounds_away(weight_update, moves):
    model = gain_model()
    opt = BlockLLM(model.named_parameters(), lr=LR, sparsity=0.0, weight_update=weight_update)
    train(model, opt)
    assert (not torch.equal(model.norm.detach(), torch.ones_like(model.norm))) == moves
    if moves:  # 20 steps of ~1e-3 each: about 2e-2, a few bf16 steps, landed
        assert (model.norm.detach().float() - 1).abs().max() > 1e-2
        assert opt.master_numel() == model.norm.numel() + model.proj.numel()
    else:
        assert opt.master_numel() == 0


def test_blockllm_keeps_fp32_copies_of_its_trained_blocks_only():
    torch.manual_seed(0)
    layers = torch.nn.Sequential(*[torch.nn.Linear(32, 32, bias=False) for _ in range(4)]).bfloat16()
    opt = BlockLLM(layers.named_parameters(), lr=LR, sparsity=0.5, strategy="random", patience=1)
    trained = {p for _, p in opt.trained_named_parameters()}
    assert 0 < len(trained) < 4 and opt.master_numel() == sum(p.numel() for p in trained)


def test_blockllm_fp32_copies_travel_in_the_checkpoint():
    whole, first = gain_model(), gain_model()
    opt_whole = BlockLLM(whole.named_parameters(), lr=LR, sparsity=0.0)
    train(whole, opt_whole)
    opt_first = BlockLLM(first.named_parameters(), lr=LR, sparsity=0.0)
    train(first, opt_first, STEPS // 2)
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(opt_first.state_dict())
    resumed = gain_model()
    resumed.load_state_dict(saved_model)
    opt_resumed = BlockLLM(resumed.named_parameters(), lr=LR, sparsity=0.0)
    opt_resumed.load_state_dict(saved_opt)
    for step in range(STEPS // 2, STEPS):  # the same batches as the uninterrupted run's second half
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(step)).bfloat16()
        loss = ((x * resumed.norm) @ resumed.proj).float().pow(2).mean()
        loss.backward()
        opt_resumed.record_loss(loss)
        opt_resumed.step()
        opt_resumed.zero_grad()
    assert torch.equal(resumed.norm, whole.norm) and torch.equal(resumed.proj, whole.proj)


def test_baseline_fp32_master_weights_keep_small_updates_and_resume_exactly():
    pure, mastered = gain_model(), gain_model()
    train(pure, torch.optim.AdamW(pure.parameters(), lr=LR, weight_decay=0.0))
    assert torch.equal(pure.norm.detach(), torch.ones_like(pure.norm)), "plain bf16 AdamW lost every update"
    opt = Fp32MasterWeights(torch.optim.AdamW(mastered.parameters(), lr=LR, weight_decay=0.0))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    train(mastered, opt, STEPS // 2)
    saved_model, saved_opt = copy.deepcopy(mastered.state_dict()), copy.deepcopy(opt.state_dict())
    saved_sched = copy.deepcopy(scheduler.state_dict())
    for _ in range(STEPS // 2):
        scheduler.step()
    # Resume into fresh objects: the schedule must reach the wrapped optimizer after load_state_dict too.
    resumed = gain_model()
    resumed.load_state_dict(saved_model)
    opt_resumed = Fp32MasterWeights(torch.optim.AdamW(resumed.parameters(), lr=LR, weight_decay=0.0))
    sched_resumed = torch.optim.lr_scheduler.LambdaLR(opt_resumed, lambda step: 1.0 / (1 + step))
    opt_resumed.load_state_dict(saved_opt)
    sched_resumed.load_state_dict(saved_sched)
    for _ in range(STEPS // 2):
        sched_resumed.step()
    assert opt_resumed.optimizer.param_groups[0]["lr"] == pytest.approx(LR / (1 + STEPS // 2))
    assert opt_resumed.optimizer.param_groups[0]["lr"] == opt.optimizer.param_groups[0]["lr"]
    assert not torch.equal(mastered.norm.detach(), torch.ones_like(mastered.norm))


def test_embeddings_always_beyond_the_budget_is_one_clear_error():
    model = torch.nn.Module()
    model.embed_tokens = torch.nn.Parameter(torch.zeros(100, 8))
    model.proj = torch.nn.Parameter(torch.zeros(8, 8))
    with pytest.raises(ConfigError, match=r"embeddings='always' trains 93% of the parameters, more than sparsity 0.5"):
        BlockLLM(model.named_parameters(), sparsity=0.5, embeddings="always")
    BlockLLM(model.named_parameters(), sparsity=0.05, embeddings="always")  # 95% fits


def test_stochastic_rounding_needs_torchao_states():
    with pytest.raises(ConfigError, match="stochastic_rounding"):
        BlockLLM(gain_model().named_parameters(), weight_update="stochastic_rounding", states="bnb_8bit")


def test_stochastic_rounding_lands_small_updates_on_average_without_fp32_copies():
    model = gain_model()
    opt = BlockLLM(model.named_parameters(), lr=LR, sparsity=0.0, weight_update="stochastic_rounding")
    train(model, opt)
    assert opt.master_numel() == 0 and model.norm.dtype == torch.bfloat16
    # Each entry moved by whole bf16 steps at random; on average about as far as the fp32 updates went.
    moved = (model.norm.detach().float() - 1).abs().mean().item()
    assert 5e-3 < moved < 5e-2


def test_scoring_steps_see_the_trained_blocks_gradients_when_fp32_copies_take_them():
    # With fp32 copies, the update frees each bf16 gradient; the scoring step must still rank the trained
    # blocks by their real gradient norms (a zero would push them out at every reselection).
    torch.manual_seed(0)
    layers = torch.nn.Sequential(*[torch.nn.Linear(32, 32, bias=False) for _ in range(4)]).bfloat16()
    opt = BlockLLM(layers.named_parameters(), lr=LR, sparsity=0.5, patience=1, granularity="parameter")
    seen = []
    original = opt._select_from_norms
    opt._select_from_norms = lambda norms: (seen.append((set(opt._trained_indices()), list(norms))), original(norms))
    for step in range(4):
        x = torch.randn(8, 32, generator=torch.Generator().manual_seed(step))
        loss = layers(x.bfloat16()).float().pow(2).mean()
        loss.backward()
        opt.record_loss(1.0 + step)  # a rising loss: every step after the first window reselects
        opt.step()
        opt.zero_grad()
    scored_with_trained = [(trained, norms) for trained, norms in seen if trained]
    assert scored_with_trained, "a scoring step while blocks were being trained"
    for trained, norms in scored_with_trained:
        assert all(norms[i] > 0 for i in trained), (trained, norms)
