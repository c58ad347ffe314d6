"""The named grids, each named by the question it answers (model, backend, what is compared), and CPU grids.

BlockLLM runs are long enough (200 steps, patience 50) to include a few reselections, whose scoring
steps run backward through the whole model: the run-mean tokens/s counts them, the median does not.
"""

from __future__ import annotations

import math

from .grid import RunSpec
from .memory_model import llama_tensors, model_shape

BLOCKLLM_STEPS = 200
# Used when the launcher has it (BlockLLMConfig.step_in_backward): the 7B <= 15 GiB recipe.
IN_BACKWARD = (("step_in_backward", "true"),)
STATES_8BIT = (("states", "bnb_8bit"),)
# The launcher's default since --checkpoint_scoring_steps: runs without checkpointing recompute activations
# on BlockLLM's scoring steps. Configurations measured before say they did not (the key stays the same).
SCORING_NOT_CHECKPOINTED = (("checkpoint_scoring_steps", "false"),)
SCORING_CHECKPOINTED = (("checkpoint_scoring_steps", "true"),)


def badam_shape_sparsity(model: str) -> float:
    """The sparsity whose budget is one decoder layer when embeddings are not candidates (rounded up
    at the 6th decimal, so the budget never exceeds one layer and greedy selection takes just one)."""
    tensors = llama_tensors(model_shape(model))
    layer = sum(t.numel for t in tensors if t.layer == 0)
    candidates = sum(t.numel for t in tensors if not t.embedding)
    return math.ceil((1 - layer / candidates) * 1e6) / 1e6


def llama7b_optimizers() -> list[RunSpec]:
    """LLaMA-7B, GaLore's config, batch 4, seq 256, checkpointing, pure bf16: every peer beside BlockLLM."""
    common = dict(model="7b", batch_size=4, checkpointing=True)
    s = badam_shape_sparsity("7b")
    layers = model_shape("7b").layers
    return [
        RunSpec("adamw", "adamw", **common),
        RunSpec("adamw8bit", "adamw8bit", **common),
        RunSpec("torchao_adamw8bit", "torchao_adamw8bit", **common),
        RunSpec("torchao_adamw4bit", "torchao_adamw4bit", **common),
        # GaLore's README recipe for 7B on one GPU.
        RunSpec("galore8bit_layerwise r1024", "galore8bit_layerwise", **common,
                flags=(("rank", "1024"), ("update_proj_gap", "500"))),
        RunSpec("badam", "badam", **common),  # the top layer throughout (switch every 50)
        # Through every layer once, 4 steps each (BAdam's switch costs a gc.collect, so not every step):
        # the run mean weighs every backward depth alike, as a long run does.
        RunSpec("badam all layers", "badam", **common, steps=4 * layers + 3, flags=(("switch_block_every", "4"),)),
        RunSpec("blockllm s=0.9 8-bit", "blockllm", **common, steps=BLOCKLLM_STEPS,
                flags=(("sparsity", "0.9"),) + STATES_8BIT, optional=IN_BACKWARD),
        RunSpec("blockllm s=0.9 8-bit emb=candidate", "blockllm", **common, steps=BLOCKLLM_STEPS,
                flags=(("sparsity", "0.9"), ("embeddings", "candidate")) + STATES_8BIT, optional=IN_BACKWARD),
        RunSpec("blockllm BAdam's shape 8-bit", "blockllm", **common, steps=BLOCKLLM_STEPS,
                flags=(("sparsity", str(s)), ("embeddings", "never"), ("granularity", "layer")) + STATES_8BIT,
                optional=IN_BACKWARD),
    ]


def llama7b_blockllm_vs_badam(every: int = 10, steps: int = 330, order: str = "descending") -> list[RunSpec]:
    """BlockLLM at BAdam's shape against BAdam over a run long enough for both to visit many layers.

    In 200 steps with patience 50 BlockLLM picks 3-4 layers, the bottom ones (the largest gradient norms at
    initialisation), so those runs measure full-depth backwards only. Never-visited layers rank first, so over
    many reselections it goes through the layers as BAdam's cycle does. BlockLLM's patience and BAdam's switch
    interval are both ``every``; BlockLLM pays a scoring step per reselection. Default: patience 10 and 330
    steps, ~30 reselections. ``7b-1gpu-blockllm-vs-badam-p50``: the default patience 50 over 1000 steps (~20 layers),
    against BAdam visiting layers in random order (a descending cycle cut at 20 layers would skip the deep ones).
    """
    common = dict(model="7b", batch_size=4, checkpointing=True, steps=steps)
    badam_flags = (("switch_block_every", str(every)),) + ((("switch_mode", order),) if order != "descending" else ())
    order_label = "" if order == "descending" else f" {order}"
    return [
        RunSpec(f"badam switch every {every}{order_label}", "badam", **common, flags=badam_flags),
        RunSpec(f"blockllm BAdam's shape 8-bit patience {every}", "blockllm", **common,
                flags=(("sparsity", str(badam_shape_sparsity("7b"))), ("embeddings", "never"), ("granularity", "layer"),
                       ("patience", str(every))) + STATES_8BIT, optional=IN_BACKWARD),
    ]


def llama1b_blockllm_vs_adamw() -> list[RunSpec]:
    """LLaMA-1B, batch 16, no checkpointing: AdamW's peak against BlockLLM s = 0.9, with the scoring steps
    not checkpointed (measured first) and checkpointed (--checkpoint_scoring_steps, the scoring step's peak).

    Without checkpointing the peak depends on how deep backward goes. BAdam training only the bottom layer
    (ascending order, no switch within the run) measures the floor of any optimizer that trains layer 0,
    since every layer above it keeps what backward needs to pass through it; only the top layer, the other end.
    """
    common = dict(model="1b", batch_size=16, checkpointing=False)
    blockllm = dict(steps=BLOCKLLM_STEPS, optional=IN_BACKWARD)
    no_ckpt, ckpt = SCORING_NOT_CHECKPOINTED, SCORING_CHECKPOINTED
    return [
        RunSpec("adamw", "adamw", **common),
        RunSpec("blockllm s=0.9", "blockllm", **common, **blockllm, flags=(("sparsity", "0.9"),) + no_ckpt),
        RunSpec("blockllm s=0.9 8-bit", "blockllm", **common, **blockllm,
                flags=(("sparsity", "0.9"),) + STATES_8BIT + no_ckpt),
        RunSpec("blockllm s=0.9 8-bit emb=never", "blockllm", **common, **blockllm,
                flags=(("sparsity", "0.9"), ("embeddings", "never")) + STATES_8BIT + no_ckpt),
        RunSpec("blockllm s=0.9 8-bit ckpt-scoring", "blockllm", **common, **blockllm,
                flags=(("sparsity", "0.9"),) + STATES_8BIT + ckpt),
        RunSpec("blockllm s=0.9 8-bit emb=never ckpt-scoring", "blockllm", **common, **blockllm,
                flags=(("sparsity", "0.9"), ("embeddings", "never")) + STATES_8BIT + ckpt),
        # switch_block_every (50) > steps (10): one layer throughout.
        RunSpec("badam bottom layer only", "badam", **common, flags=(("switch_mode", "ascending"),)),
        RunSpec("badam top layer only", "badam", **common),
    ]


def zero123_blockllm_vs_adamw() -> list[RunSpec]:
    """130M and 1B under ZeRO-1/2/3, bf16, checkpointing: BlockLLM s = 0.5 and 0.9 against AdamW."""
    specs = []
    for model in ("130m", "1b"):
        for stage in (1, 2, 3):
            common = dict(model=model, batch_size=16, checkpointing=True, backend=f"zero{stage}")
            specs += [RunSpec("adamw", "adamw", **common)]
            specs += [RunSpec(f"blockllm s={s}", "blockllm", **common, steps=BLOCKLLM_STEPS, flags=(("sparsity", s),))
                      for s in ("0.5", "0.9")]
    return specs


def fsdp2_blockllm_vs_adamw() -> list[RunSpec]:
    """1B under FSDP2, bf16, checkpointing: BlockLLM s = 0.9 (fp32 and torchao 8-bit states) against AdamW."""
    common = dict(model="1b", batch_size=16, checkpointing=True, backend="fsdp2")
    return [
        RunSpec("adamw", "adamw", **common),
        RunSpec("blockllm s=0.9", "blockllm", **common, steps=BLOCKLLM_STEPS, flags=(("sparsity", "0.9"),)),
        RunSpec("blockllm s=0.9 8-bit", "blockllm", **common, steps=BLOCKLLM_STEPS,
                flags=(("sparsity", "0.9"), ("states", "torchao_8bit"))),
    ]


SCALING_GPUS = (1, 2, 4, 8)


def scaling(models: tuple[tuple[str, int], ...], gpu_counts, steps: int, blockllm_steps: int, blockllm_flags=(),
            **common) -> list[RunSpec]:
    """ZeRO-3 and FSDP2 at each GPU count (outermost, so the 1-GPU baselines come first): AdamW against
    BlockLLM s = 0.9; models as (size, batch per GPU)."""
    return [spec for gpus in gpu_counts for model, batch in models for backend in ("zero3", "fsdp2") for spec in (
        RunSpec("adamw", "adamw", model, batch, backend, gpus=gpus, steps=steps, **common),
        RunSpec("blockllm s=0.9", "blockllm", model, batch, backend, gpus=gpus, steps=blockllm_steps,
                flags=(("sparsity", "0.9"),) + blockllm_flags, **common))]


def zero3_fsdp2_scaling() -> list[RunSpec]:
    """LLaMA-1B (batch 16 per GPU) and 7B (batch 4 per GPU), bf16, checkpointing, under ZeRO-3 and FSDP2 on
    1, 2, 4 and 8 GPUs: per-GPU peak, tokens/s per GPU and scaling efficiency."""
    specs = scaling((("1b", 16), ("7b", 4)), SCALING_GPUS, steps=10, blockllm_steps=BLOCKLLM_STEPS, checkpointing=True)
    # The 7B <= 10 GiB per GPU target needs 8-bit states (the memory model puts fp32 states at ~15 GiB on 2
    # GPUs): bitsandbytes under ZeRO-3, torchao under FSDP2 (bitsandbytes cannot take DTensors).
    specs += [RunSpec("blockllm s=0.9 8-bit", "blockllm", "7b", 4, backend, gpus=gpus, steps=BLOCKLLM_STEPS,
                      checkpointing=True, flags=(("sparsity", "0.9"), ("states", states)))
              for gpus in SCALING_GPUS for backend, states in (("zero3", "bnb_8bit"), ("fsdp2", "torchao_8bit"))]
    return specs


def cpu_scaling_dryrun() -> list[RunSpec]:
    """1b-7b-zero3-fsdp2-scaling's shape on the CPU with the tiny model, 1 and 2 processes: the scripts end to end
    (patience 2, so a reselection happens), not a measurement of scaling."""
    return scaling((("tiny", 2),), (1, 2), steps=6, blockllm_steps=6, blockllm_flags=(("patience", "2"),),
                   checkpointing=True, seq_len=64, dtype="fp32", warmup=2)


def cpu_smoke() -> list[RunSpec]:
    """Two tiny configurations for CPU tests: the whole pipeline in seconds (peak = process RSS)."""
    common = dict(model="tiny", batch_size=2, seq_len=64, dtype="fp32", steps=4, warmup=1)
    return [
        RunSpec("adamw", "adamw", **common),
        RunSpec("blockllm s=0.5", "blockllm", **common, flags=(("sparsity", "0.5"), ("patience", "2"))),
    ]


# Named by the question each answers: <model(s)>-<backend>-<what is compared>; results/<name>.{json,md,png}.
PRESETS = {"7b-1gpu-optimizers": llama7b_optimizers,
           "7b-1gpu-blockllm-vs-badam-p10": llama7b_blockllm_vs_badam,
           "7b-1gpu-blockllm-vs-badam-p50": lambda: llama7b_blockllm_vs_badam(every=50, steps=1000, order="random"),
           "1b-1gpu-blockllm-vs-adamw": llama1b_blockllm_vs_adamw,
           "130m-1b-zero123-blockllm-vs-adamw": zero123_blockllm_vs_adamw,
           "1b-fsdp2-blockllm-vs-adamw": fsdp2_blockllm_vs_adamw,
           "1b-7b-zero3-fsdp2-scaling": zero3_fsdp2_scaling,
           "tiny-cpu-scaling-dryrun": cpu_scaling_dryrun,
           "cpu-smoke": cpu_smoke}
