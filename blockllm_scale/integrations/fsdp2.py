"""torch FSDP2 (``fully_shard``) with BlockLLM or any torch optimizer.

Every decoder layer and the root are sharded over a 1-D data-parallel mesh (CUDA + NCCL, or CPU +
gloo). Parameters become sharded DTensors; BlockLLM keeps working on them unchanged: only the selected
block has ``requires_grad``, so only its shards get a (reduce-scattered) gradient and only they enter
the inner AdamW, whose state is therefore sharded DTensors too (``states="torchao_8bit"`` keeps them
in 8 bits; bitsandbytes cannot handle DTensors).

In your own loop::

    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from blockllm_scale import BlockLLM
    from blockllm_scale.integrations.fsdp2 import init_mesh, shard_model

    mesh = init_mesh()                          # torchrun env -> process group + 1-D mesh
    model = shard_model(model.to(mesh.device_type), mesh,
                        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    optimizer = BlockLLM(model.named_parameters(), lr=1e-3, sparsity=0.9)   # after sharding
    for input_ids in batches:
        loss = model(input_ids=input_ids, labels=input_ids).loss
        optimizer.record_loss(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

Build BlockLLM after ``shard_model`` (or call ``optimizer.rebind_parameters()`` once the tensors in
its ``param_groups`` were swapped, as :func:`rebind_optimizer` does). Checkpoints: :func:`save_dcp` /
:func:`load_dcp` (torch.distributed.checkpoint; BlockLLM's selection travels beside the shards).

Mixed precision trap (torch <= 2.13): FSDP2 fixes each layer's gradient dtypes at its lazy init from
the parameters trainable *then*; a layer frozen at that moment and trained later fails in backward.
:func:`shard_model` therefore runs the lazy init once with every parameter trainable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..optim import BlockLLM


def init_mesh(device_type: str | None = None) -> DeviceMesh:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU) and return a 1-D mesh over it."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return init_device_mesh(device_type, (dist.get_world_size(),))


def decoder_layers(model: nn.Module, class_names: Iterable[str] | None = None) -> list[nn.Module]:
    """The repeated blocks to shard one by one: modules of the named classes (default: the classes a
    HF model lists in ``_no_split_modules``, e.g. LlamaDecoderLayer)."""
    names = set(class_names or getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no module of class {', '.join(sorted(names)) or '(none given)'} "
                         "to shard per layer")
    return layers


def shard_model(model: nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy | None = None,
                reshard_after_forward: bool = True, example_inputs: dict | None = None,
                layer_classes: Iterable[str] | None = None) -> nn.Module:
    """``fully_shard`` each decoder layer (see :func:`decoder_layers`), then the root (embeddings,
    final norm, head).

    ``example_inputs`` (default: a HF model's ``dummy_inputs``) feed one no-grad forward that runs
    FSDP2's lazy init while every parameter is trainable (the mixed-precision trap above).
    """
    mp_policy = mp_policy or MixedPrecisionPolicy()
    for layer in decoder_layers(model, layer_classes):
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    _lazy_init_all_trainable(model, example_inputs, torch.device(mesh.device_type, local_device_index(mesh)))
    return model


def local_device_index(mesh: DeviceMesh) -> int | None:
    return torch.cuda.current_device() if mesh.device_type == "cuda" else None


@torch.no_grad()
def _lazy_init_all_trainable(model: nn.Module, example_inputs: dict | None, device: torch.device) -> None:
    inputs = example_inputs if example_inputs is not None else getattr(model, "dummy_inputs", None)
    if inputs is None:
        raise ValueError("shard_model: pass example_inputs (one small batch) for FSDP2's lazy init")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for param, _ in flags:
        param.requires_grad_(True)
    try:  # fork_rng: a model with dropout must not draw random numbers a run without FSDP2 would not
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()})
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def rebind_optimizer(optimizer: torch.optim.Optimizer, names_before: dict[int, str], model: nn.Module) -> None:
    """Swap an optimizer built before sharding onto the sharded parameters (matched by name).

    ``names_before`` maps ``id(parameter)`` to its name, recorded before ``shard_model``. Nothing may
    be cached outside ``param_groups``: BlockLLM re-derives its inner AdamW and hooks from them.
    """
    sharded = dict(model.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [sharded[names_before[id(p)]] for p in group["params"]]
    if _blockllm(optimizer) is not None:
        optimizer.rebind_parameters()


def unquantized_states(optimizer: BlockLLM) -> list[str]:
    """Trained parameters whose Adam state torchao silently left in fp32 on this rank.

    torchao quantizes a moment only when its *local shard* holds >= 4096 elements, a multiple of its
    block size (256); sharding can push small tensors below that. Checked on the live state.
    """
    found = []
    for name, param in optimizer.trained_named_parameters():
        for adam in optimizer.adam_optimizers():
            moment = adam.state.get(param, {}).get("exp_avg")
            if moment is not None:
                local = moment.to_local() if isinstance(moment, DTensor) else moment
                if getattr(local, "codes", None) is None:
                    found.append(name)
    return found


def _trainer_file(directory: Path, rank: int) -> Path:
    return Path(directory) / f"trainer_rank{rank}.pt"


def _blockllm(optimizer: torch.optim.Optimizer) -> BlockLLM | None:
    """The optimizer if it is a BlockLLM (whose Adam state lives in inner optimizers), else None."""
    return optimizer if isinstance(optimizer, BlockLLM) else None


def _adams_of(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """The optimizers whose tensors go into the distributed checkpoint: BlockLLM's inner AdamW(s)."""
    blockllm = _blockllm(optimizer)
    return blockllm.adam_optimizers() if blockllm is not None else [optimizer]


def _selection_state(optimizer: BlockLLM) -> dict:
    """BlockLLM's state_dict without the Adam tensors (those go through DCP)."""
    return {k: v for k, v in optimizer.state_dict().items() if k not in ("inner", "per_tensor")}


def save_dcp(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict) -> None:
    """Shards (model + Adam state) via torch.distributed.checkpoint; ``extra`` and BlockLLM's
    selection (small, identical on every rank) beside them in one file per rank."""
    directory = Path(directory)
    state = {"model": get_model_state_dict(model)}
    adams = _adams_of(optimizer)
    if adams:
        stateless = [adam for adam in adams if not adam.state]
        state["optim"] = get_optimizer_state_dict(model, adams)
        _drop_placeholder_state(stateless, model, state["optim"])
    dcp.save(state, checkpoint_id=str(directory / "dcp"))
    if _blockllm(optimizer) is not None:
        extra = {**extra, "blockllm": _selection_state(optimizer)}
    torch.save(extra, _trainer_file(directory, dist.get_rank()))


def load_dcp(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Counterpart of :func:`save_dcp`; returns ``extra``. The selection is restored first, so the
    inner AdamW already holds the selected block when its shards are read."""
    directory = Path(directory)
    extra = torch.load(_trainer_file(directory, dist.get_rank()), weights_only=False)
    if _blockllm(optimizer) is not None:
        optimizer.load_state_dict({**extra.pop("blockllm"), "inner": None, "per_tensor": {}})
    state = {"model": get_model_state_dict(model)}
    adams = _adams_of(optimizer)
    if adams:
        # get_optimizer_state_dict allocates state for every trained tensor (by a zero-lr step);
        # a block selected just before the save had none yet, and must have none after the load.
        state["optim"] = _saved_entries_only(get_optimizer_state_dict(model, adams), directory / "dcp")
    dcp.load(state, checkpoint_id=str(directory / "dcp"))
    set_model_state_dict(model, state["model"])
    if adams:
        # strict=False: tensors without saved state keep none (load_state_dict replaces the placeholders)
        set_optimizer_state_dict(model, adams, state["optim"], options=StateDictOptions(strict=False))
    return extra


def _drop_placeholder_state(stateless: list[torch.optim.Optimizer], model: nn.Module, optim_state: dict) -> None:
    """Undo what get_optimizer_state_dict did to optimizers that had no state: it gives them some by a
    zero-lr step (torch's _init_optim_state), so Adam's step count would be 1 before the first real
    update, whose bias correction would then differ from a run that never saved. Blocks selected just
    before a save (at step 1, or after a switch that kept no block) have no state and must keep none,
    in this run and in the checkpoint."""
    names = {id(p): n for n, p in model.named_parameters()}
    for adam in stateless:
        adam.state.clear()
        for group in adam.param_groups:
            for param in group["params"]:
                optim_state["state"].pop(names[id(param)], None)


def _saved_entries_only(optim_state: dict, checkpoint: Path) -> dict:
    saved = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    optim_state["state"] = {fqn: entry for fqn, entry in optim_state["state"].items()
                            if all(f"optim.state.{fqn}.{key}" in saved for key in entry)}
    return optim_state
