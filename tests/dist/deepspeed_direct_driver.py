"""One process, world size 1 (gloo, CPU): BlockLLM handed straight to ``deepspeed.initialize`` under
ZeRO-0/1/2/3 (fp32), and the supported ``blockllm_scale.integrations.deepspeed.initialize`` beside it.

    python tests/dist/deepspeed_direct_driver.py RESULTS.json

Per stage: the exception ``deepspeed.initialize`` raised (type, message) and, had it not raised,
what the first steps did. One process tries every stage (a process pays ~10 s of imports).
"""

from __future__ import annotations

import json
import sys
import warnings

import torch
import deepspeed
from transformers import LlamaForCausalLM

from blockllm_scale import BlockLLM
from blockllm_scale.integrations import deepspeed as bds
from blockllm_scale.integrations.deepspeed.processes import current_device
from blockllm_scale.launcher.models import llama_config

STAGES = (0, 1, 2, 3)
SETTINGS = dict(lr=1e-2, sparsity=0.5, patience=1, seed=0)


def config(stage: int) -> dict:
    return {"train_batch_size": 2, "gradient_clipping": 0.0, "bf16": {"enabled": False}, "steps_per_print": 10**9,
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}


def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config("tiny", vocab_size=64))


def train(engine, optimizer, steps: int = 4) -> list[float]:
    losses = []
    for step in range(steps):
        ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(step))
        loss = engine(input_ids=ids, labels=ids).loss
        optimizer.record_loss(loss)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def direct(stage: int) -> dict:
    net = model()
    optimizer = BlockLLM(net.named_parameters(), **SETTINGS)
    try:
        engine, *_ = deepspeed.initialize(model=net, optimizer=optimizer,
                                          config={**config(stage), "zero_allow_untested_optimizer": True})
    except Exception as error:  # noqa: BLE001 - the test checks which
        return {"error": type(error).__name__, "message": str(error)}
    try:
        return {"error": None, "losses": train(engine, optimizer)}
    except Exception as error:  # noqa: BLE001
        return {"error": None, "step_error": f"{type(error).__name__}: {error}"}


def wrapped(stage: int) -> dict:
    net = model()
    optimizer = BlockLLM(net.named_parameters(), **SETTINGS)
    engine, optimizer, _, _ = bds.initialize(model=net, optimizer=optimizer, config=config(stage))
    losses = train(engine, optimizer)
    return {"losses": losses, "rebuilds": engine.rebuilds, "reselections": optimizer.selection.reselections}


def placed_before_the_first_engine() -> dict:
    """A bf16 config over an fp32 model: step 0 scores before any DeepSpeedEngine exists (embeddings are
    candidates), so the wrapper itself must put the module where, and in the type, the engines will have it."""
    net = model()
    optimizer = BlockLLM(net.named_parameters(), **SETTINGS)
    bf16 = {**config(2), "bf16": {"enabled": True}}
    engine, optimizer, _, _ = bds.initialize(model=net, optimizer=optimizer, config=bf16)
    placed = {"engine_at_step_0": engine.ds_engine is not None,
              "dtypes": sorted({str(p.dtype) for p in net.parameters()}),
              "devices": sorted({str(p.device) for p in net.parameters()}),
              "expected_device": str(current_device())}
    losses = train(engine, optimizer)
    return {**placed, "losses": losses, "reselections": optimizer.selection.reselections}


def main(out: str) -> None:
    warnings.simplefilter("ignore")
    bds.init_distributed()
    results = {f"direct_zero{s}": direct(s) for s in STAGES}
    results.update({f"wrapped_zero{s}": wrapped(s) for s in (1, 3)})
    results["placed_bf16_zero2"] = placed_before_the_first_engine()
    with open(out, "w") as file:
        json.dump(results, file)


if __name__ == "__main__":
    main(sys.argv[1])
