"""Run under ``torchrun --standalone --nproc_per_node 2``: the DeepSpeed configurations test_deepspeed.py
checks, batched into two launches (a launch costs ~20 s of imports on 2 cores).

    deepspeed_driver.py OUT main     plain references (rank 0, before the process group exists, so
                                     BlockLLM's collectives are no-ops), ZeRO-0..3 runs through the
                                     real train loop (fp32, bf16, AdamW, 8-bit), and direct uses of
                                     blockllm_scale.integrations.deepspeed: block switches, leaks,
                                     activation checkpointing
    deepspeed_driver.py OUT resume   new processes resume "main"'s checkpoints taken right after a
                                     block switch and train on

Each rank writes ``OUT/<phase>_rank<r>.json``.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import weakref
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "dist"))
from blockllm_scale.launcher import train as pretrain  # noqa: E402
from blockllm_scale import BlockLLM  # noqa: E402
from deepspeed_cases import (ACCUM, ACCUM_RUNS, ALWAYS, BF16_RUNS, CANDIDATE, COMMON, FP32_RUNS,  # noqa: E402
                             PER_RANK_BATCH, RESUMED)
from blockllm_scale.integrations import deepspeed as bds  # noqa: E402
from blockllm_scale.launcher.backends.deepspeed import DeepSpeedBackend  # noqa: E402
from blockllm_scale.launcher.models import llama_config  # noqa: E402

class CheckedEngine(bds.BlockLLMEngine):
    """Records, right after every DeepSpeed update, what this rank holds for the selected blocks."""

    log: list[dict] = []

    def _update_selected_blocks(self) -> None:
        super()._update_selected_blocks()
        report = self.memory_report()
        report.update(reselections=self.optimizer.selection.reselections, rebuilds=self.rebuilds,
                      global_steps=self.ds_engine.global_steps,
                      state_dtypes=sorted(self.optimizer.state_dtypes()),
                      trained=sorted(n for n, _ in self.optimizer.trained_named_parameters()))
        self.log.append(report)


class CheckedBackend(DeepSpeedBackend):
    engine_type = CheckedEngine


def ds_config(out: Path, stage: int, bf16: bool = False, **extra) -> str:
    """A config file like configs/ds/zeroN.json; fp32 unless bf16."""
    config = json.loads((REPO / "configs" / "ds" / f"zero{stage}.json").read_text())
    config["bf16"] = {"enabled": bf16}
    if stage == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every tensor
    config.update(extra)
    path = out / f"rank{os.environ['RANK']}_zero{stage}_{'bf16' if bf16 else 'fp32'}.json"
    path.write_text(json.dumps(config))
    return str(path)


def train(out_dir: Path, *flags: str) -> dict:
    CheckedEngine.log = []
    losses = pretrain.train_loop(pretrain.parse_args([*COMMON, "--out_dir", str(out_dir), *flags]))
    return {"losses": losses, "steps": CheckedEngine.log}


def plain_references(out: Path) -> dict:
    batch = ["--batch_size", str(PER_RANK_BATCH * int(os.environ["WORLD_SIZE"])), "--backend", "plain"]
    return {"plain_candidate": train(out / "plain_candidate", *batch, *CANDIDATE),
            "plain_always": train(out / "plain_always", *batch, *ALWAYS),
            "plain_accum": train(out / "plain_accum", "--batch_size", str(int(os.environ["WORLD_SIZE"])),
                                 "--grad_accum", "2", "--backend", "plain", *CANDIDATE),
            "plain_bf16": train(out / "plain_bf16", *batch, *CANDIDATE, "--dtype", "bf16"),
            "plain_bf16_always": train(out / "plain_bf16_always", *batch, *ALWAYS, "--dtype", "bf16"),
            "plain_adamw": train(out / "plain_adamw", *batch, "--optimizer", "adamw", "--steps", "3")}


def launcher_runs(out: Path) -> dict:
    results = {}
    ds = ["--batch_size", str(PER_RANK_BATCH)]
    for name, (stage, embeddings) in FP32_RUNS.items():
        save = ["--save_every", "3"] if name in RESUMED else []  # step 3 follows a switch
        results[name] = train(out / name, *ds, *embeddings, *save, "--ds_config", ds_config(out, stage))
    for name, stage in ACCUM_RUNS.items():
        results[name] = train(out / name, *ACCUM, *CANDIDATE, "--ds_config", ds_config(out, stage))
    for name, (stage, embeddings) in BF16_RUNS.items():  # the shipped bf16 configs themselves
        results[name] = train(out / name, *ds, *embeddings, "--ds_config", str(REPO / "configs" / "ds" / f"zero{stage}.json"))
    results["adamw_zero2"] = train(out / "adamw_zero2", *ds, "--optimizer", "adamw", "--steps", "3",
                                   "--ds_config", ds_config(out, 2))
    results["bnb_8bit_zero2"] = train(out / "bnb_8bit", *ds, *ALWAYS, "--steps", "2",
                                      "--ds_config", str(REPO / "configs" / "ds" / "zero2_8bit.json"))
    return results


# ----- direct uses of the Python API --------------------------------------------------------------
def small_llama(layers: int = 3):
    from transformers import LlamaForCausalLM

    config = llama_config("tiny", vocab_size=512)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def api_config(stage: int) -> dict:
    zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
    return {"train_micro_batch_size_per_gpu": PER_RANK_BATCH, "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0, "zero_optimization": zero}


def batch(step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + int(os.environ["RANK"]))
    return torch.randint(0, 512, (PER_RANK_BATCH, 16), generator=generator)


def full_values(model) -> dict:
    """Every weight in full (ZeRO-3 gathers its shards for the copy)."""
    import deepspeed

    params = list(model.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        return {name: p.detach().clone() for name, p in params}


def weight_storage_bytes(model) -> int:
    """Bytes of the distinct storages the weights (and ZeRO-3 shards) live in: views into an old
    engine's flat buffer would count the whole buffer."""
    storages = {}
    for p in model.parameters():
        for tensor in (p.data, getattr(p, "ds_tensor", None)):
            if tensor is not None and tensor.numel():
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


def switching_run(stage: int, steps: int = 7) -> dict:
    """Random selection with patience 1 switches blocks at every step: 7 steps, 7 engines."""
    model = small_llama()
    initial = full_values(model)
    optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.8, patience=1, strategy="random",
                         embeddings="candidate", seed=1)
    CheckedEngine.log = []
    engine = CheckedEngine(model, optimizer, api_config(stage))
    replaced, offloads, trained_ever, storage = [], [], set(), []
    gc.disable()
    for step in range(steps):
        ds = engine.ds_engine  # and DeepSpeed's ZeRO optimizer, our AdamW, ZeRO-3's parameter offload
        replaced += [weakref.ref(obj) for obj in (ds, ds.optimizer, engine.client_optimizer)]
        offloads += [weakref.ref(ds.optimizer.parameter_offload)] if stage == 3 else []
        del ds
        trained_ever |= {n for n, _ in optimizer.trained_named_parameters()}
        loss = engine(input_ids=batch(step), labels=batch(step)).loss
        engine.backward(loss)
        engine.step()
        storage.append(weight_storage_bytes(model))
    # The automatic collector is off: every replaced engine and optimizer must have been freed by the
    # rebuild itself. The last loss's autograd graph (cyclic) holds ZeRO-3's backward functions, and
    # through them the last parameter offload, until it is dropped and collected.
    old_alive = sum(r() is not None for r in replaced)
    del loss
    gc.enable()
    gc.collect()
    old_alive += sum(r() is not None for r in offloads)
    final = full_values(model)
    never = [n for n in initial if n not in trained_ever]
    # Every engine and client optimizer recorded above was replaced by the switch after its step.
    return {"steps": CheckedEngine.log, "rebuilds": engine.rebuilds,
            "old_alive": old_alive, "old_tracked": len(replaced) + len(offloads),
            "storage_bytes": storage, "model_bytes": sum(p.numel() * 4 for p in initial.values()),
            "frozen_untouched": bool(never) and all(torch.equal(initial[n], final[n]) for n in never),
            "trained_moved": all(not torch.equal(initial[n], final[n]) for n in trained_ever)}


def checkpointing_grads(stage: int, steps: int = 4) -> list[dict]:
    """Only middle-layer tensors train (a new random half of layer 1 at every step, so every step after
    the first runs on a rebuilt engine), with non-reentrant activation checkpointing."""
    from deepspeed.utils import safe_get_full_grad

    model = small_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()  # as launch/pretrain.py does: backward may stop above layer 0
    for name, param in model.named_parameters():
        param.requires_grad_("layers.1." in name)
    optimizer = BlockLLM(model.named_parameters(), lr=1e-3, sparsity=0.5, patience=1, strategy="random", seed=2)
    engine, *_ = bds.initialize(model=model, optimizer=optimizer, config=api_config(stage))
    calls = {i: 0 for i in range(3)}
    for i, layer in enumerate(model.model.layers):  # inside the checkpointed forward: recomputes count
        layer.self_attn.q_proj.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    engine.train()
    records = []
    for step in range(steps):
        calls.update({i: 0 for i in calls})
        trained = {n for n, _ in optimizer.trained_named_parameters()}
        loss = engine(input_ids=batch(step), labels=batch(step)).loss
        engine.backward(loss)
        records.append({"selected_grad_norms": {n: float(safe_get_full_grad(p).norm())
                                                for n, p in model.named_parameters() if n in trained},
                        "frozen_with_grad": [n for n, p in model.named_parameters() if n not in trained and p.grad is not None],
                        "forward_calls": dict(calls), "rebuilds": engine.rebuilds})
        engine.step()
    return records


def from_config_section() -> dict:
    """initialize() without an optimizer: BlockLLM from the JSON's "blockllm" and "optimizer" sections."""
    config = {**api_config(2), "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "weight_decay": 0.01}},
              "blockllm": {"sparsity": 0.7, "strategy": "random", "patience": 1}}
    engine, optimizer, _, _ = bds.initialize(model=small_llama(), config=config)
    losses = []
    for step in range(3):
        loss = engine(input_ids=batch(step), labels=batch(step)).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    group = optimizer.param_groups[0]
    return {"type": type(optimizer).__name__, "sparsity": optimizer.config.sparsity, "lr": group["lr"],
            "weight_decay": group["weight_decay"], "rebuilds": engine.rebuilds, "losses": losses}


def main(out: Path, phase: str) -> None:
    rank = int(os.environ["RANK"])
    results = {}
    seconds = results["seconds"] = {}
    start = time.perf_counter()
    if phase == "main":
        if rank == 0:
            results.update(plain_references(out))
        seconds["plain"] = time.perf_counter() - start
        pretrain.make_backend = lambda train_config: CheckedBackend(train_config)
        results.update(launcher_runs(out))
        seconds["launcher"] = time.perf_counter() - start - seconds["plain"]
        results["switching"] = {stage: switching_run(stage) for stage in (0, 1, 2, 3)}
        seconds["switching"] = time.perf_counter() - start - seconds["plain"] - seconds["launcher"]
        results["checkpointing"] = {stage: checkpointing_grads(stage) for stage in (0, 1, 2, 3)}
        results["from_config_section"] = from_config_section()
    else:
        pretrain.make_backend = lambda train_config: CheckedBackend(train_config)
        for name in RESUMED:
            stage, embeddings = FP32_RUNS[name]
            step = json.loads((out / "resume_points.json").read_text())[name]
            results[name] = train(out / f"{name}_resumed", "--batch_size", str(PER_RANK_BATCH), *embeddings,
                                  "--ds_config", ds_config(out, stage),
                                  "--resume", str(out / name / "checkpoints" / f"step_{step}"))
    results["world_size"] = torch.distributed.get_world_size()
    (out / f"{phase}_rank{rank}.json").write_text(json.dumps(results))
    sys.stdout.flush()
    os._exit(0)  # skip the interpreter's slow teardown of torch/DeepSpeed/transformers (seconds per process)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
