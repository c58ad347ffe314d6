"""Workarounds for DeepSpeed 0.19.8's engine leak: what ``engine.destroy()`` leaves behind when BlockLLM rebuilds
the engine at a block switch. All of it lives here, so that this module can go once DeepSpeed releases an
engine completely (tests/dist/test_deepspeed.py measures the leak: no engine, optimizer or partition may
outlive a switch). Each function names what it cuts and why."""

from __future__ import annotations

import torch


def release_engine(engine, leavers=()) -> None:
    """Destroy a DeepSpeedEngine so that nothing keeps it, its optimizer or its buffers alive.

    ``engine.destroy()`` in DeepSpeed 0.19.8 leaves behind: the engine's forward pre/post hooks on
    the module (closures over the engine); ``param._z3_optimizer`` (ZeRO-3, on every parameter),
    ``param._zero_optimizer`` (ZeRO-1/2) and ``param._hp_grad`` (bf16), which hold the old
    optimizer; ZeRO-3's per-module ``pre_bwd_fn``/``post_bwd_fn``. And the weights of the old
    selection (``leavers``) still view the old engine's buffers: ZeRO-3 keeps every trained shard
    in one buffer, which one frozen shard keeps alive (measured: weight storage grew 2.1x over six
    switches); ZeRO-1/2 flatten per param group.
    """
    engine.destroy()
    for name in ("module_forward_pre_hook", "module_forward_post_hook"):
        handle = getattr(engine, name, None)
        if handle is not None:
            handle.remove()
    for param in engine.module.parameters():
        for attr in ("_z3_optimizer", "_zero_optimizer", "_hp_grad"):
            param.__dict__.pop(attr, None)
        if getattr(param, "_hp_mapping", None) is not None:
            param._hp_mapping = None
    # ZeRO-3 creates a module's backward hook functions once (it skips modules that have them) with
    # closures over the engine's parameter coordinator: left in place, the next engine's backward
    # would report to the dead coordinator, and frozen weights are released before an activation
    # checkpoint's recompute reads them (CheckpointError: recomputed metadata shape [0]).
    for module in engine.module.modules():
        for attr in ("pre_bwd_fn", "post_bwd_fn"):
            module.__dict__.pop(attr, None)
    for param in leavers:
        _own_storage(param)


def _own_storage(param: torch.Tensor) -> None:
    """Give a weight its own storage if it is a view into a larger (flat) buffer."""
    holder = param.ds_tensor if hasattr(param, "ds_tensor") else param  # ZeRO-3 keeps the shard there
    data = holder.data
    if data.untyped_storage().nbytes() > data.numel() * data.element_size():
        holder.data = data.clone()


def backward_hook_managers(output) -> list:
    """DeepSpeed 0.19.8 hangs backward hooks that call into the engine on a forward's output tensors
    (kept in ``tensor._backward_hook_managers``): a loss the caller still holds after a switch would
    keep the old engine alive, and with it its partitions."""
    if torch.is_tensor(output):
        return list(getattr(output, "_backward_hook_managers", ()))
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (list, tuple)) else ()
    return [manager for value in values for manager in backward_hook_managers(value)]


def cut_output_hooks(refs: list) -> None:
    for ref in refs:
        manager = ref()
        if manager is not None:
            manager.remove_hooks()
            manager.preprocess_once_fn = manager.preprocess_per_tensor_fn = None
