"""The quality guard: BlockLLM's defaults must train about as well as AdamW and better than random block choice.

A small LLaMA with LLaMA-60M's proportions (``mini``: embeddings and LM head 57% of the parameters, 8 decoder
layers) pre-trains on the shipped corpus for a few hundred steps, at sparsity 0.5, with fixed seeds: the same
batches, schedule and evaluation rows for every optimizer. This is a direction check on a CPU, not the
GPU-scale evidence (benchmarks/quality.py); its bounds hold with room on this machine and fail for the
rules that trained badly there (see MARGIN_OVER_ADAMW).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from blockllm_scale import BlockLLM
from blockllm_scale.launcher.data import DataConfig, build_datasets, make_batches
from blockllm_scale.launcher.models import build_model

STEPS, WARMUP, BATCH, SEQ, LR, EVAL_ROWS = 300, 30, 16, 64, 1e-3, 256
SPARSITY = 0.5
# Eval loss of the defaults may exceed AdamW's by this much (nats) at 300 steps, all at lr 1e-3. Measured here
# (2026-12-02): AdamW 5.480; defaults 5.693 (+0.214); random layer blocks 5.772 (+0.293); the paper-literal
# rule (single tensors by raw norm / visits, PAPER_SETTINGS) 5.777 (+0.298). The bound passes the defaults
# and fails both of the others: block coordinate descent at s=0.5 does trail AdamW at equal tokens (see
# benchmarks/results/quality_60m.md for the GPU-scale gap), and this guard keeps it from growing.
MARGIN_OVER_ADAMW = 0.25
# Every tensor type (q/k/v/o, the MLP's three, both norms, final norm, embeddings, LM head) is trained on at
# least this share of steps by the defaults: no type may be starved as raw gradient norms starved q/k/norms
# with single tensors as blocks. Measured: the least-trained type 18% of steps (defaults), 31% (random).
MIN_SHARE_PER_TYPE = 0.15


def tensor_type(name: str) -> str:
    return re.sub(r"layers\.\d+\.", "", name).removesuffix(".weight")


@pytest.fixture(scope="module")
def data():
    train, held_out = build_datasets(DataConfig(dataset="shakespeare", tokenizer="shipped", seq_len=SEQ))
    eval_batch = torch.stack([held_out[i]["input_ids"] for i in range(min(EVAL_ROWS, len(held_out)))])
    return train, eval_batch


def cosine(step: int) -> float:
    if step < WARMUP:
        return (step + 1) / WARMUP
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))


def pretrain(data, optimizer_name: str, **settings) -> dict:
    train, eval_batch = data
    torch.manual_seed(0)
    model = build_model("mini")
    if optimizer_name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    else:
        opt = BlockLLM(model.named_parameters(), lr=LR, sparsity=SPARSITY, **settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    shares: dict[str, int] = {}
    fractions = []
    batches = make_batches(train, BATCH, seed=0)
    for _ in range(STEPS):
        ids = next(batches)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if isinstance(opt, BlockLLM):
            opt.record_loss(loss)
            if not opt.scoring_step:
                fractions.append(opt.selected_fraction)
                for kind in {tensor_type(n) for n, _ in opt.trained_named_parameters()}:
                    shares[kind] = shares.get(kind, 0) + 1
        opt.step()
        scheduler.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        eval_loss = sum(model(input_ids=chunk, labels=chunk).loss.item() for chunk in eval_batch.split(64)) / math.ceil(
            len(eval_batch) / 64)
    return {"eval_loss": eval_loss, "fractions": fractions,
            "shares": {k: v / max(1, len(fractions)) for k, v in shares.items()},
            "types": {tensor_type(n) for n, _ in model.named_parameters()}}


@pytest.fixture(scope="module")
def results(data):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return {"adamw": pretrain(data, "adamw"), "default": pretrain(data, "blockllm"),
                "random": pretrain(data, "blockllm", strategy="random")}
    finally:
        torch.set_num_threads(threads)


def test_defaults_train_no_worse_than_random_blocks(results):
    assert results["default"]["eval_loss"] <= results["random"]["eval_loss"], results


def test_defaults_train_within_a_margin_of_adamw(results):
    gap = results["default"]["eval_loss"] - results["adamw"]["eval_loss"]
    assert gap <= MARGIN_OVER_ADAMW, f"defaults trail AdamW by {gap:.3f} nats (allowed {MARGIN_OVER_ADAMW})"


def test_every_tensor_type_is_trained_on_a_share_of_steps(results):
    run = results["default"]
    starved = {kind: round(run["shares"].get(kind, 0.0), 3) for kind in run["types"]
               if run["shares"].get(kind, 0.0) < MIN_SHARE_PER_TYPE}
    assert not starved, f"tensor types trained on fewer than {MIN_SHARE_PER_TYPE:.0%} of steps: {starved}"


def test_mean_trained_fraction_stays_within_the_budget(results):
    for name in ("default", "random"):
        fractions = results[name]["fractions"]
        mean = sum(fractions) / len(fractions)
        assert 0.9 * (1 - SPARSITY) <= mean <= (1 - SPARSITY) * 1.05, (name, mean)
