"""DeepSpeed ZeRO-0/1/2/3 with BlockLLM (and with the baselines, which need no help).

Why a new DeepSpeed engine per block: ZeRO decides once, inside ``deepspeed.initialize``, which
parameters get fp32 master partitions, Adam states and gradient hooks: those with ``requires_grad``
at that moment. Toggling ``requires_grad`` later crashes ZeRO-1/2 and silently trains the wrong
tensors under ZeRO-3 (DeepSpeed #5639). So :class:`BlockLLMEngine` builds a fresh engine over the
selected blocks at every block switch, and the fp32 masters and Adam states on each rank cover only
the selected blocks (divided by the ranks under ZeRO-1/2/3). A switch, under every stage:

1. BlockLLM picks the new blocks and sets ``requires_grad``; its ``on_reselect`` callback lands here.
2. Blocks that stay selected keep their Adam state (and, in bf16, their fp32 master partition) as
   the old engine left it. Each block is its own param group, so its flat partition has the same
   layout in the next engine and the state moves over as it is, with no resharding.
3. The old engine is destroyed, the references DeepSpeed 0.19.8 leaves behind are cut
   (:func:`release_engine`) and the garbage is collected, so no engine, optimizer, partition or
   hook outlives the switch, and its memory is free before the next engine allocates.
4. A new library AdamW (torch, bitsandbytes or torchao: ``states``) over the selected blocks goes
   into ``deepspeed.initialize``; a step pre-hook hands the kept state to the new partitions. Frozen
   weights are not touched (ZeRO-3 keeps their shards where they are).

The scoring step that picks the next blocks reads the trained blocks' gradients from ZeRO
(``safe_get_full_grad``) before DeepSpeed's step clears them; every other candidate's gradient is
all-reduced, measured and freed by BlockLLM's hooks, outside ZeRO. A step 0 that only scores (no
block selected yet) runs on the plain module: ZeRO cannot start without a trainable tensor.

In your own loop (``torchrun`` / ``deepspeed`` launcher, CUDA+NCCL or CPU+gloo)::

    from blockllm_scale import BlockLLM
    from blockllm_scale.integrations import deepspeed as blockllm_ds

    optimizer = BlockLLM(model.named_parameters(), lr=1e-3, sparsity=0.9)
    engine, optimizer, _, _ = blockllm_ds.initialize(model=model, optimizer=optimizer, config="configs/ds/zero2.json")
    for input_ids in batches:
        loss = engine(input_ids=input_ids, labels=input_ids).loss
        engine.backward(loss)          # also hands the loss to BlockLLM's reselection rule
        engine.step()
    engine.save_checkpoint("ckpt")     # BlockLLM's selection travels with it; load_checkpoint restores it

Or leave ``optimizer`` out and put BlockLLM's settings in the config's "blockllm" section (with an
"optimizer": {"type": "AdamW", "params": {...}} for lr and friends). configs/ds/README.md describes
the JSON; ``launch/pretrain.py --ds_config`` uses :class:`DeepSpeedBackend`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import socket
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import BlockLLMConfig, ConfigError
from ..optim import BlockLLM
from ..states import build_adam, copy_hyperparameters, state_dtypes, state_numel_by_dtype

SECTION = "blockllm"  # BlockLLM's settings inside a DeepSpeed JSON
BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
_ADAM_KEYS = ("lr", "betas", "eps", "weight_decay")
_BLOCK, _SOURCE = "blockllm_block", "blockllm_source"  # tags on our param groups
# What a DeepSpeedEngine counts; a rebuilt engine continues the count (checkpoint tags, logging).
_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")
_MONITORS = ("tensorboard", "wandb", "csv_monitor", "comet")
DIRECT_INITIALIZE = ("BlockLLM was passed to deepspeed.initialize directly; DeepSpeed's optimizers cannot follow "
                     "block switches: use blockllm_scale.integrations.deepspeed.initialize(model=..., optimizer=..., "
                     "config=...) with the same arguments")


class GuardedParamGroups(list):
    """BlockLLM's ``param_groups``: a list that makes ``deepspeed.initialize(optimizer=BlockLLM(...))`` an error.

    That call trains the wrong tensors or crashes deep inside DeepSpeed (ZeRO-1/2 swap the groups'
    params for flat fp32 partitions, ZeRO-3 empties them, ZeRO-0 steps BlockLLM unchanged; none
    follows a block switch). Under every stage it first rewrites the client optimizer's groups
    wholesale (``optimizer.param_groups[:] = ...`` in ``DeepSpeedEngine._configure_optimizer``,
    0.19.8), which nothing else does to an optimizer (torch, accelerate, transformers): refusing
    that assignment is the error, inside ``deepspeed.initialize``, at no cost per step. Appending a
    group, replacing one by index and editing a group in place (LR schedulers, FSDP2's rebind) pass.
    """

    def __setitem__(self, index, value):
        if isinstance(index, slice):
            raise ConfigError(DIRECT_INITIALIZE)
        super().__setitem__(index, value)


# ----- the JSON ---------------------------------------------------------------------------------
def load_config(config) -> tuple[dict, str]:
    """A shallow copy of a DeepSpeed config (path or dict) and a name for error messages."""
    if isinstance(config, (str, os.PathLike)):
        try:
            return json.loads(Path(config).read_text()), Path(config).name
        except json.JSONDecodeError as error:
            raise ConfigError(f"{config}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"config must be a path or a dict, got {type(config).__name__}")
    return dict(config), "DeepSpeed config"


def check_config(config: dict, name: str, *, world_size: int, on_cpu: bool, client_optimizer: bool,
                 blockllm: bool, client_scheduler: bool = False) -> None:
    """One clear line for what DeepSpeed would reject deep inside, or get silently wrong."""
    _check_zero_section(config.get("zero_optimization", {}), name)
    if client_optimizer and "optimizer" in config:
        raise ConfigError(f'{name}: remove the "optimizer" section: the optimizer is passed in '
                          "(BlockLLM or --optimizer), and DeepSpeed would build a second one")
    if "scheduler" in config and (blockllm or client_scheduler):
        why = "the launcher schedules the LR itself" if client_scheduler else \
            "it would restart at every block switch; pass a torch scheduler over BlockLLM as lr_scheduler"
        raise ConfigError(f'{name}: remove the "scheduler" section: {why}')
    for key in ("fp16", "bf16", "bfloat16"):
        enabled = config[key].get("enabled", False) if isinstance(config.get(key), dict) else False
        if not isinstance(enabled, bool):
            raise ConfigError(f"{name}: {key}.enabled must be true or false; got {enabled!r}")
    fp16, bf16 = _precision_enabled(config, "fp16"), _precision_enabled(config, "bf16")
    if fp16 and bf16:
        raise ConfigError(f"{name}: fp16 and bf16 are both enabled; choose one")
    if fp16 and on_cpu:
        raise ConfigError(f'{name}: fp16 does not run on CPU; use "bf16" or fp32')
    if fp16 and blockllm:
        raise ConfigError(f"{name}: fp16 loss scaling skips overflowing steps that BlockLLM would still count; "
                          'use "bf16"')
    offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
    if client_optimizer and offload.get("device", "none") != "none" and config.get("zero_force_ds_cpu_optimizer", True):
        raise ConfigError(f"{name}: zero_optimization.offload_optimizer wants DeepSpeed's CPU Adam, but the optimizer "
                          'is passed in; add "zero_force_ds_cpu_optimizer": false to offload it anyway (slow)')
    check_batch_sizes(config, name, world_size)


def _check_zero_section(zero: Any, name: str) -> None:
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    if not isinstance(zero, dict):
        raise ConfigError(f"{name}: zero_optimization must be an object, got {zero!r}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"{name}: zero_optimization.stage must be 0, 1, 2 or 3; got {stage!r}")
    try:  # DeepSpeed's own schema, checked now instead of deep inside initialize
        DeepSpeedZeroConfig(**zero)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"{name}: zero_optimization.{where}: {first['msg']} (got {first.get('input')!r})") from None


def _precision_enabled(config: dict, key: str) -> bool:
    sections = [config.get(key)] + ([config.get("bfloat16")] if key == "bf16" else [])  # DeepSpeed's old name
    return any(isinstance(s, dict) and s.get("enabled") is True for s in sections)


def check_batch_sizes(config: dict, name: str, world_size: int) -> None:
    """DeepSpeed's rule train_batch_size = micro batch x accumulation x world size, one line per way to break it."""
    values = {key: config.get(key) for key in BATCH_KEYS}
    for key, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            hint = ' ("auto" is filled in by launch/pretrain.py only)' if value == "auto" else ""
            raise ConfigError(f"{name}: {key} must be a positive integer{hint}; got {value!r}")
    micro, accum, total = values.values()
    if total is None:
        if micro is None:
            raise ConfigError(f"{name}: give train_batch_size or train_micro_batch_size_per_gpu")
        return
    if total % world_size:
        raise ConfigError(f"{name}: train_batch_size {total} is not divisible by the world size {world_size}")
    per_rank = total // world_size
    for key, value in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", accum)):
        if value is not None and per_rank % value:
            raise ConfigError(f"{name}: train_batch_size {total} / world size {world_size} = {per_rank} "
                              f"is not a multiple of {key} {value}")
    if micro is not None and accum is not None and micro * accum != per_rank:
        raise ConfigError(f"{name}: train_batch_size {total} is not train_micro_batch_size_per_gpu {micro} x "
                          f"gradient_accumulation_steps {accum} x world size {world_size}")


def blockllm_section(config: dict, name: str) -> dict | None:
    """The "blockllm" section, checked (an unknown or misspelt key is an error naming it)."""
    section = config.get(SECTION)
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ConfigError(f'{name}: "{SECTION}" must be an object, got {section!r}')
    try:
        BlockLLMConfig.from_dict(section)
    except ConfigError as error:
        raise ConfigError(f"{name}: {SECTION}: {error}") from None
    return section


# ----- processes --------------------------------------------------------------------------------
def init_distributed() -> None:
    """Join the launcher's process group (NCCL on GPUs, gloo on CPU); a bare ``python`` run is one rank."""
    if dist.is_initialized():
        return
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if _on_cpu():
        # DeepSpeed compiles its shared-memory all-reduce op on first use (45-120 s); gloo needs none.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="gloo")
    else:
        get_accelerator().set_device(int(os.environ["LOCAL_RANK"]))
        deepspeed.init_distributed()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _on_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def _device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


@contextlib.contextmanager
def _quiet(enabled: bool):
    """DeepSpeed logs its configuration (and warns about it) at every initialize: the first one says it all."""
    from deepspeed.utils import logger

    level = logger.level
    if enabled:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# ----- engines ----------------------------------------------------------------------------------
def block_param_groups(blockllm: BlockLLM) -> list[dict]:
    """One param group per (trained block, BlockLLM param group), tagged, with that group's AdamW settings.

    A group per block gives each block its own flat partition in ZeRO, so a block that stays
    selected has the same partition layout in the next engine and keeps its Adam state (step count
    included) exactly as it would in plain BlockLLM.
    """
    flat = [p for g in blockllm.param_groups for p in g["params"]]
    source = [index for index, g in enumerate(blockllm.param_groups) for _ in g["params"]]
    trained = {id(p) for _, p in blockllm.trained_named_parameters()}
    groups = []
    for b, block in enumerate(blockllm.blocks):
        by_source: dict[int, list] = {}
        for i in block.members:
            if id(flat[i]) in trained:
                by_source.setdefault(source[i], []).append(flat[i])
        for s, params in sorted(by_source.items()):
            outer = blockllm.param_groups[s]
            groups.append({**{k: outer[k] for k in _ADAM_KEYS}, "params": params, _BLOCK: b, _SOURCE: s})
    return groups


def _key(group: dict) -> tuple[int, int]:
    return group[_BLOCK], group[_SOURCE]


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


class BlockLLMEngine:
    """What ``deepspeed.initialize`` returns, for BlockLLM: a DeepSpeedEngine rebuilt at every block switch.

    ``forward``/``backward``/``step``/``save_checkpoint``/``load_checkpoint`` work as on a
    DeepSpeedEngine; any other attribute is the current DeepSpeedEngine's. ``optimizer`` is the
    BlockLLM (its ``state_numel()``/``state_dtypes()`` measure the live ZeRO state of this rank).
    """

    def __init__(self, model, blockllm: BlockLLM, config: dict, lr_scheduler=None, init_kwargs: dict | None = None):
        self.module, self.optimizer, self.lr_scheduler = model, blockllm, lr_scheduler
        self._config = {"zero_allow_untested_optimizer": True, **config}  # every client optimizer is "untested"
        self._init_kwargs = init_kwargs or {}
        # In 16-bit runs the fp32 master partition of a kept block must move over too: the new engine
        # would otherwise start it from the rounded 16-bit weights.
        self._keep_masters = _precision_enabled(config, "bf16") or _precision_enabled(config, "fp16")
        self._engine = self._client = None
        self._kept: dict = {}  # group key -> [(shape, old flat or None, state)] not yet handed over
        self._stepped: dict = {}  # group key -> flat tensors the live client optimizer has stepped
        self._trained: set[int] = set()
        self._output_hooks: list = []  # weakrefs to DeepSpeed's hooks on forward outputs (see _rebuild)
        self._logged_dtypes: set[str] = set()
        self._accumulation_steps = _accumulation_steps(self._config)
        self._counters = dict.fromkeys(_COUNTERS, 0)  # carried from engine to engine
        self._monitor = None  # DeepSpeed's monitor (wandb, tensorboard...) of the first engine, reused
        self.rebuilds = 0
        blockllm.delegate_update(lambda: self._client)
        blockllm.on_reselect.append(lambda _: self._rebuild())
        self._rebuild()

    # --- the engine-like surface ---
    def __call__(self, *args, **kwargs):
        if self._engine is None:
            return self.module(*args, **kwargs)
        output = self._engine(*args, **kwargs)
        self._output_hooks = [ref for ref in self._output_hooks if ref() is not None]
        self._output_hooks += [weakref.ref(manager) for manager in _backward_hook_managers(output)]
        return output

    forward = __call__

    def __getattr__(self, name: str):
        if name.startswith("__") or "_engine" not in self.__dict__:
            raise AttributeError(name)
        engine = self.__dict__["_engine"]
        return getattr(self.__dict__["module"] if engine is None else engine, name)

    def train(self, mode: bool = True) -> "BlockLLMEngine":
        (self.module if self._engine is None else self._engine).train(mode)
        return self

    def eval(self) -> "BlockLLMEngine":
        return self.train(False)

    @property
    def ds_engine(self):
        """The DeepSpeedEngine of the current selection (replaced at every switch)."""
        return self._engine

    @property
    def client_optimizer(self) -> torch.optim.Optimizer:
        """The library AdamW DeepSpeed steps for the current selection."""
        return self._client

    def backward(self, loss: torch.Tensor, record_loss: bool = True, **kwargs):
        """DeepSpeed's backward; ``record_loss`` also hands the loss to BlockLLM's reselection rule."""
        if record_loss:
            self.optimizer.record_loss(loss)
        if self._engine is None:  # nothing trained yet: step 0 only scores (see _rebuild)
            return (loss / self._accumulation_steps).backward()
        zero0_scoring = self.optimizer.selection.scoring and self._engine.zero_optimization_stage() == 0
        if zero0_scoring:
            # ZeRO-0 all-reduces every parameter with requires_grad and fills missing gradients with
            # zeros: on a scoring step that would be a zero gradient for every candidate at once.
            self._engine.enable_backward_allreduce = False
        try:
            result = self._engine.backward(loss, **kwargs)
        finally:
            self._engine.enable_backward_allreduce = True
        if zero0_scoring and self._engine.is_gradient_accumulation_boundary():
            trained = [p.grad.data for p in self.module.parameters() if id(p) in self._trained and p.grad is not None]
            self._engine.buffered_allreduce_fallback(grads=trained)
        return result

    def step(self) -> None:
        """DeepSpeed's step; at an accumulation boundary also BlockLLM's bookkeeping (and a switch)."""
        boundary = self.is_gradient_accumulation_boundary()
        if self._engine is None:
            self._counters["micro_steps"] += 1
            if boundary:
                self._counters["global_steps"] += 1
                self._counters["global_samples"] += self._config.get("train_batch_size", 0)
                self.optimizer.step()  # scores, selects, builds the first engine
            return
        if not boundary:
            self._engine.step()  # DeepSpeed counts micro-steps here
            return
        self._update_selected_blocks()
        self.optimizer.step()  # selection bookkeeping; a switch rebuilds the engine
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self._log_state_dtypes()

    def _update_selected_blocks(self) -> None:
        for group in self._client.param_groups:  # LR schedulers act on BlockLLM's param groups
            copy_hyperparameters(self.optimizer.param_groups[group[_SOURCE]], group, _ADAM_KEYS)
        if self.optimizer.selection.scoring:
            self._observe_trained_gradients()
        self._engine.step()

    def is_gradient_accumulation_boundary(self) -> bool:
        if self._engine is None:
            return (self._counters["micro_steps"] + 1) % self._accumulation_steps == 0
        return self._engine.is_gradient_accumulation_boundary()

    def _observe_trained_gradients(self) -> None:
        # ZeRO holds the trained gradients in its own partitions and clears them in step(): the
        # scorer reads their norms now, assembled across ranks.
        from deepspeed.utils import safe_get_full_grad

        for _, param in self.optimizer.trained_named_parameters():
            grad = safe_get_full_grad(param)
            if grad is not None:
                self.optimizer.scorer.observe(param, grad)

    def _log_state_dtypes(self) -> None:
        """Log the Adam state dtypes found on the live tensors (not assumed from the setting)."""
        found = state_dtypes(self._client)
        if found and found != self._logged_dtypes and dist.get_rank() == 0:
            numels = ", ".join(f"{dtype} {n:,}" for dtype, n in sorted(state_numel_by_dtype(self._client).items()))
            print(f"[blockllm] Adam states of the selected blocks (states={self.optimizer.config.states}), "
                  f"elements by dtype on rank 0: {numels}", flush=True)
        self._logged_dtypes = found or self._logged_dtypes

    def memory_report(self) -> dict:
        """What this rank holds for the selected blocks, measured on the live tensors."""
        flats = [f for fs in self._stepped.values() for f in fs]
        trained = [p for _, p in self.optimizer.trained_named_parameters()]
        return {"state_numel": self.optimizer.state_numel(), "master_numel": sum(f.numel() for f in flats),
                "selected_numel": sum(getattr(p, "ds_numel", p.numel()) for p in trained),
                "world_size": dist.get_world_size(),
                "stage": None if self._engine is None else self._engine.zero_optimization_stage()}

    # --- the rebuild ---
    def _rebuild(self, kept: dict | None = None) -> None:
        groups = block_param_groups(self.optimizer)
        keys = {_key(g) for g in groups}
        kept = self._take_kept(keys) if kept is None else kept
        trained = {id(p) for g in groups for p in g["params"]}
        old, self._engine, self._client = self._engine, None, None
        if old is not None:
            self._counters = {name: getattr(old, name) for name in _COUNTERS}
            release_engine(old, [p for p in self.module.parameters() if id(p) in self._trained - trained])
            _cut_output_hooks(self._output_hooks)
            self._output_hooks, self._stepped, old = [], {}, None
            # ZeRO-1/2 engines sit in reference cycles: collect now, or their partitions and buffers
            # would still be allocated while the next engine allocates its own.
            gc.collect()
        self._kept, self._trained = kept, trained
        if not groups:
            # Only before the first selection (step 0 scores with embeddings not "always"): ZeRO cannot
            # run without a trainable tensor, and with no engine yet the model is still a plain module.
            return
        self._client = build_adam(self.optimizer.config.states, groups)
        self._client.register_step_pre_hook(self._before_client_step)
        self._engine = self._new_engine()
        self.rebuilds += 1

    def _new_engine(self):
        """deepspeed.initialize over the selected blocks, continuing the previous engine's counters and
        monitor (a second wandb/tensorboard/csv monitor per switch would start a new run or file)."""
        import deepspeed

        config = self._config
        if self._monitor is not None:
            config = {k: v for k, v in config.items() if k not in _MONITORS}
        with _quiet(self.rebuilds > 0):
            engine = deepspeed.initialize(model=self.module, optimizer=self._client, config=config,
                                          **self._init_kwargs)[0]
        if self._monitor is None:
            self._monitor = engine.monitor
        engine.monitor = self._monitor
        for name, value in self._counters.items():
            setattr(engine, name, value)
        return engine

    def _take_kept(self, keys: set) -> dict:
        """Adam state (and 16-bit runs' fp32 masters) of the groups that stay, moved over, not copied."""
        kept = {k: v for k, v in self._kept.items() if k in keys}  # handed over at no step yet
        for key, flats in self._stepped.items():
            if key in keys:
                kept[key] = [(f.shape, f if self._keep_masters else None, self._client.state[f]) for f in flats]
        return kept

    def _before_client_step(self, optimizer, args, kwargs) -> None:
        """Note which flat partitions each block's group steps; on their first step, seed the kept state.

        DeepSpeed steps our optimizer with its own flat fp32 partitions in our (tagged) groups:
        ZeRO-1/2 one group at a time, ZeRO-3 one sub-group at a time, ZeRO-0 all at once.
        """
        for group in optimizer.param_groups:
            stepped = self._stepped.setdefault(_key(group), [])
            for flat in group["params"]:
                if any(flat is seen for seen in stepped):
                    continue
                stepped.append(flat)
                pending = self._kept.get(_key(group))
                if pending:
                    _seed(optimizer, flat, *pending.pop(0), block=group[_BLOCK])

    # --- checkpoints ---
    def save_checkpoint(self, save_dir, tag=None, client_state=None, **kwargs):
        """DeepSpeed's checkpoint plus BlockLLM's selection (rank 0) and any state not yet handed over."""
        tag = str(tag if tag is not None else f"global_step{self._engine.global_steps}")
        saved = self._engine.save_checkpoint(save_dir, tag=tag, client_state=client_state or {}, **kwargs)
        directory = Path(save_dir) / tag
        directory.mkdir(parents=True, exist_ok=True)
        rank = dist.get_rank()
        if rank == 0:
            scheduler = self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None
            torch.save({"blockllm": self.optimizer.state_dict(), "lr_scheduler": scheduler},
                       directory / "blockllm_selection.pt")
        torch.save({"kept": self._kept}, directory / f"blockllm_rank{rank}.pt")
        dist.barrier()
        return saved

    def load_checkpoint(self, load_dir, tag=None, **kwargs):
        """Rebuild the engine for the saved selection, then let DeepSpeed load into it."""
        if tag is None:
            tag = (Path(load_dir) / "latest").read_text().strip()
        directory = Path(load_dir) / str(tag)
        shared = torch.load(directory / "blockllm_selection.pt", weights_only=False)
        self.optimizer.load_state_dict(shared["blockllm"])
        if self.lr_scheduler is not None and shared["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(shared["lr_scheduler"])
        # Kept state not yet handed over when the checkpoint was taken (right after a switch); _seed
        # moves it to the partitions' device. Frozen weights are DeepSpeed's (ZeRO-2/3: frozen fragments).
        mine = torch.load(directory / f"blockllm_rank{dist.get_rank()}.pt", map_location="cpu", weights_only=False)
        self._rebuild(kept=mine["kept"])
        return self._engine.load_checkpoint(load_dir, tag=tag, **kwargs)


def _backward_hook_managers(output) -> list:
    """DeepSpeed 0.19.8 hangs backward hooks that call into the engine on a forward's output tensors
    (kept in ``tensor._backward_hook_managers``): a loss the caller still holds after a switch would
    keep the old engine alive, and with it its partitions."""
    if torch.is_tensor(output):
        return list(getattr(output, "_backward_hook_managers", ()))
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (list, tuple)) else ()
    return [manager for value in values for manager in _backward_hook_managers(value)]


def _cut_output_hooks(refs: list) -> None:
    for ref in refs:
        manager = ref()
        if manager is not None:
            manager.remove_hooks()
            manager.preprocess_once_fn = manager.preprocess_per_tensor_fn = None


def _accumulation_steps(config: dict) -> int:
    if "gradient_accumulation_steps" in config:
        return config["gradient_accumulation_steps"]
    micro, total = config.get("train_micro_batch_size_per_gpu"), config.get("train_batch_size")
    return total // (micro * dist.get_world_size()) if micro and total else 1


def _seed(optimizer, flat: torch.Tensor, shape, old_flat, state: dict, block: int) -> None:
    if shape != flat.shape:
        raise RuntimeError(f"DeepSpeed laid out block {block} as {tuple(flat.shape)} in the new engine, "
                           f"{tuple(shape)} before: its Adam state cannot move over")
    if old_flat is not None and old_flat is not flat:
        flat.data.copy_(old_flat.data)
    # Moments (from a checkpoint: on the host) go where the partition is; 0-dim step counters stay
    # where the optimizer keeps them (torch: on the host).
    optimizer.state[flat] = {k: v.to(flat.device) if torch.is_tensor(v) and v.dim() else v for k, v in state.items()}


def initialize(model, optimizer=None, config=None, model_parameters=None, lr_scheduler=None, **kwargs):
    """``deepspeed.initialize`` that knows BlockLLM: same arguments, same ``(engine, optimizer, _, scheduler)``.

    * ``optimizer=BlockLLM(...)``: the engine is a :class:`BlockLLMEngine`.
    * no optimizer and a "blockllm" section in ``config``: BlockLLM is built from that section and the
      config's "optimizer" params (AdamW: lr, betas, eps, weight_decay) over ``model.named_parameters()``.
    * any other optimizer: plain ``deepspeed.initialize`` (after the same config checks).
    ``lr_scheduler`` (a torch scheduler over the BlockLLM) is stepped at every optimizer step.
    """
    import deepspeed

    config, name = load_config(config)
    section = blockllm_section(config, name)
    config.pop(SECTION, None)
    init_distributed()
    adam = _adam_settings(config.pop("optimizer", None), name) if optimizer is None and section is not None else None
    if isinstance(optimizer, BlockLLM) and section is not None:
        differing = sorted(k for k, v in section.items() if getattr(optimizer.config, k) != v)
        if differing:
            raise ConfigError(f'{name}: "{SECTION}".{differing[0]} differs from the BlockLLM passed in; '
                              "give BlockLLM's settings in one place")
    is_blockllm = adam is not None or isinstance(optimizer, BlockLLM)
    check_config(config, name, world_size=dist.get_world_size(), on_cpu=_on_cpu(),
                 client_optimizer=is_blockllm or optimizer is not None, blockllm=is_blockllm)
    if not is_blockllm:
        return deepspeed.initialize(model=model, optimizer=optimizer, config=config, model_parameters=model_parameters,
                                    lr_scheduler=lr_scheduler, **kwargs)
    if "training_data" in kwargs:
        raise ConfigError("training_data: the engine is rebuilt at every block switch; build the data loader yourself")
    if adam is not None:
        optimizer = BlockLLM(model.named_parameters(), **adam, **section)
    return BlockLLMEngine(model, optimizer, config, lr_scheduler, kwargs), optimizer, None, lr_scheduler


def _adam_settings(spec: dict | None, name: str) -> dict:
    """lr, betas, eps and weight_decay from a DeepSpeed "optimizer" section (Adam/AdamW) for BlockLLM."""
    spec = spec or {"type": "AdamW", "params": {}}
    if str(spec.get("type", "")).lower() not in ("adam", "adamw"):
        raise ConfigError(f'{name}: optimizer.type must be "AdamW" with a "{SECTION}" section; '
                          f'got {spec.get("type")!r}')
    params = dict(spec.get("params", {}))
    unknown = sorted(set(params) - set(_ADAM_KEYS) - {"adam_w_mode", "torch_adam", "fused"})
    if unknown:
        raise ConfigError(f"{name}: optimizer.params.{unknown[0]} is not an AdamW setting BlockLLM takes")
    if params.get("adam_w_mode") is False:
        raise ConfigError(f"{name}: BlockLLM's update is AdamW (decoupled weight decay); drop adam_w_mode: false")
    return {k: params[k] for k in _ADAM_KEYS if k in params}


# ----- the launcher's backend -------------------------------------------------------------------
class DeepSpeedBackend:
    """``launch/pretrain.py --ds_config FILE``: BlockLLM or a baseline under DeepSpeed ZeRO-0..3.

    Settings: the JSON's batch sizes ("auto" or absent: from --batch_size / --grad_accum and the
    world size), its bf16 switch (--dtype follows it) and its "blockllm" section win over the flags'
    defaults; a flag given a different value is an error naming both (see configs/ds/README.md).
    """

    engine_type = BlockLLMEngine  # what prepare() wraps a BlockLLM in

    def __init__(self, train):
        self.config, self.name = load_config(train.ds_config)
        self.section = blockllm_section(self.config, self.name)
        self.config.pop(SECTION, None)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by every launcher; checked before joining
        self._fill_from_flags(train, world_size)
        check_config(self.config, self.name, world_size=world_size, on_cpu=_on_cpu(), client_optimizer=True,
                     blockllm=train.optimizer == "blockllm", client_scheduler=True)
        init_distributed()
        self.rank, self.world_size, self.device = dist.get_rank(), dist.get_world_size(), _device()
        self.engine = self.scheduler = None

    def _fill_from_flags(self, train, world_size: int) -> None:
        """Replace "auto" (or absent) batch sizes and bf16 switch by the flags' values; check the rest."""
        filled = {"train_micro_batch_size_per_gpu": train.batch_size, "gradient_accumulation_steps": train.grad_accum}
        for key, value in filled.items():
            if self.config.get(key, "auto") == "auto":
                self.config[key] = value
        if self.config.get("train_batch_size", "auto") == "auto":
            self.config["train_batch_size"] = (self.config["train_micro_batch_size_per_gpu"]
                                               * self.config["gradient_accumulation_steps"] * world_size)
        # DeepSpeed 0.19.8 clips at 1.0 unless told otherwise; the launcher's other backends never clip.
        self.config.setdefault("gradient_clipping", 0.0)
        if isinstance(self.config.get("bf16"), dict) and self.config["bf16"].get("enabled") == "auto":
            self.config["bf16"] = {**self.config["bf16"], "enabled": train.dtype == "bf16"}
        check_batch_sizes(self.config, self.name, world_size)

    def resolve_settings(self, train, blockllm: BlockLLMConfig):
        """The launcher's TrainConfig and BlockLLMConfig with the JSON's values adopted (called before the
        model and optimizer are built)."""
        flag_dtype = train.dtype
        train = dataclasses.replace(
            train,
            batch_size=_adopt(train, "batch_size", self.config["train_micro_batch_size_per_gpu"],
                              f"train_micro_batch_size_per_gpu in {self.name}"),
            grad_accum=_adopt(train, "grad_accum", self.config["gradient_accumulation_steps"],
                              f"gradient_accumulation_steps in {self.name}"),
            dtype=_adopt(train, "dtype", "bf16" if _precision_enabled(self.config, "bf16") else "fp32",
                         f"the bf16 section of {self.name}"))
        if train.dtype != flag_dtype and self.rank == 0:
            print(f"[deepspeed] {self.name} enables bf16: bf16 weights and compute, fp32 master weights and "
                  "Adam states (--dtype bf16)", flush=True)
        if self.section is None or train.optimizer != "blockllm":
            if self.section is not None and self.rank == 0:
                print(f'[deepspeed] --optimizer {train.optimizer}: the "{SECTION}" section of {self.name} '
                      "does not apply", flush=True)
            return train, blockllm
        if "seed" in self.section:
            raise ConfigError(f"{self.name}: {SECTION}.seed: the launcher seeds BlockLLM from --seed")
        return train, dataclasses.replace(blockllm, **{k: _adopt(blockllm, k, v, f"{SECTION}.{k} in {self.name}")
                                                       for k, v in self.section.items()})

    def prepare(self, model, optimizer, scheduler):
        import deepspeed

        self.scheduler = scheduler
        if isinstance(optimizer, BlockLLM):
            self.engine = self.engine_type(model, optimizer, self.config)
        else:
            config = {"zero_allow_untested_optimizer": True, **self.config}
            self.engine = deepspeed.initialize(model=model, optimizer=optimizer, config=config)[0]
        return self.engine, optimizer, scheduler

    def forward(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        input_ids = input_ids.to(self.device, non_blocking=True)
        return self.engine(input_ids=input_ids, labels=input_ids).loss

    def backward(self, loss: torch.Tensor, accumulation_steps: int) -> None:
        # DeepSpeed divides by its gradient_accumulation_steps itself; the train loop hands BlockLLM the loss.
        if isinstance(self.engine, BlockLLMEngine):
            self.engine.backward(loss, record_loss=False)
        else:
            self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # DeepSpeed wants a step() per micro-batch; it only counts here

    def step(self) -> None:
        self.engine.step()
        self.scheduler.step()

    def save(self, directory, client_state: dict) -> None:
        state = {**client_state, "scheduler": self.scheduler.state_dict()}
        self.engine.save_checkpoint(str(directory), tag="deepspeed", client_state=state)

    def load(self, directory) -> dict:
        _, client_state = self.engine.load_checkpoint(str(directory), tag="deepspeed")
        self.scheduler.load_state_dict(client_state.pop("scheduler"))
        return client_state


def _adopt(settings, field: str, chosen, where: str):
    """The JSON's value wins over a flag left at its default; a flag set to something else is an error."""
    given = getattr(settings, field)
    default = {f.name: f.default for f in dataclasses.fields(settings)}[field]
    if given != chosen and given != default:
        raise ConfigError(f"--{field} {given} conflicts with {where} = {chosen!r}: set it in one place")
    return chosen
