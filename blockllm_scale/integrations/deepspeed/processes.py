"""Joining the launcher's process group for DeepSpeed (NCCL on GPUs, gloo on CPU), and its device and logs."""

from __future__ import annotations

import contextlib
import logging
import os

import torch
import torch.distributed as dist

from ...parallel import free_port


def init_distributed() -> None:
    """Join the launcher's process group (NCCL on GPUs, gloo on CPU); a bare ``python`` run is one rank."""
    if dist.is_initialized():
        return
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if on_cpu():
        # DeepSpeed compiles its shared-memory all-reduce op on first use (45-120 s); gloo needs none.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="gloo")
    else:
        get_accelerator().set_device(int(os.environ["LOCAL_RANK"]))
        deepspeed.init_distributed()


def on_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def current_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


@contextlib.contextmanager
def quiet(enabled: bool):
    """DeepSpeed logs its configuration (and warns about it) at every initialize: the first one says it all."""
    from deepspeed.utils import logger

    level = logger.level
    if enabled:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
