"""BlockLLMEngine: a DeepSpeedEngine rebuilt over the selected blocks at every block switch, and
``initialize``, the ``deepspeed.initialize`` that knows BlockLLM (the package docstring says why and how)."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

from ...config import ConfigError
from ...optim import BlockLLM
from ...states import ADAM_KEYS, build_adam, copy_hyperparameters, state_dtypes, state_numel_by_dtype
from .config import (SECTION, accumulation_steps, adam_settings, blockllm_section, check_config, load_config,
                     precision_enabled)
from .processes import current_device, init_distributed, on_cpu, quiet
from .workarounds_0_19_8 import backward_hook_managers, cut_output_hooks, release_engine

_BLOCK, _SOURCE = "blockllm_block", "blockllm_source"  # tags on our param groups
# What a DeepSpeedEngine counts; a rebuilt engine continues the count (checkpoint tags, logging).
_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")
_MONITORS = ("tensorboard", "wandb", "csv_monitor", "comet")


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
            groups.append({**{k: outer[k] for k in ADAM_KEYS}, "params": params, _BLOCK: b, _SOURCE: s})
    return groups


def _key(group: dict) -> tuple[int, int]:
    return group[_BLOCK], group[_SOURCE]


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
        self._keep_masters = precision_enabled(config, "bf16") or precision_enabled(config, "fp16")
        self._engine = self._client = None
        self._kept: dict = {}  # group key -> [(shape, old flat or None, state)] not yet handed over
        self._stepped: dict = {}  # group key -> flat tensors the live client optimizer has stepped
        self._trained: set[int] = set()
        self._output_hooks: list = []  # weakrefs to DeepSpeed's hooks on forward outputs (see _rebuild)
        self._logged_dtypes: set[str] = set()
        self._accumulation_steps = accumulation_steps(self._config)
        self._counters = dict.fromkeys(_COUNTERS, 0)  # carried from engine to engine
        self._monitor = None  # DeepSpeed's monitor (wandb, tensorboard...) of the first engine, reused
        self.rebuilds = 0
        blockllm.hand_over_update(self)  # BlockLLM selects; this engine steps the selected blocks
        self._place_as_deepspeed_would()
        self._rebuild()

    # --- what BlockLLM asks of the backend that owns its update (interface.UpdateOwner) ---
    def live_optimizer(self) -> torch.optim.Optimizer | None:
        return self._client

    def selection_changed(self) -> None:
        self._rebuild()

    # --- the engine-like surface ---
    def __call__(self, *args, **kwargs):
        if self._engine is None:
            return self.module(*args, **kwargs)
        output = self._engine(*args, **kwargs)
        self._output_hooks = [ref for ref in self._output_hooks if ref() is not None]
        self._output_hooks += [weakref.ref(manager) for manager in backward_hook_managers(output)]
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
        zero0_scoring = self.optimizer.scoring_step and self._engine.zero_optimization_stage() == 0
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
            copy_hyperparameters(self.optimizer.param_groups[group[_SOURCE]], group, ADAM_KEYS)
        if self.optimizer.scoring_step:
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
                self.optimizer.observe_gradient(param, grad)

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

    def _place_as_deepspeed_would(self) -> None:
        """The module on this rank's device, its weights in the config's 16-bit type, as every engine will
        have it: step 0 may run it with no engine yet (it only scores), on the device the inputs are on."""
        if any(hasattr(p, "ds_id") for p in self.module.parameters()):
            return  # ZeRO-3's zero.Init placed and partitioned the weights already
        self.module.to(current_device())
        if precision_enabled(self._config, "bf16"):  # weights only: DeepSpeed keeps fp32 buffers (rotary inv_freq)
            for param in self.module.parameters():
                if param.is_floating_point():
                    param.data = param.data.to(torch.bfloat16)

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
            cut_output_hooks(self._output_hooks)
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
        with quiet(self.rebuilds > 0):
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
    adam = adam_settings(config.pop("optimizer", None), name) if optimizer is None and section is not None else None
    if isinstance(optimizer, BlockLLM) and section is not None:
        differing = sorted(k for k, v in section.items() if getattr(optimizer.config, k) != v)
        if differing:
            raise ConfigError(f'{name}: "{SECTION}".{differing[0]} differs from the BlockLLM passed in; '
                              "give BlockLLM's settings in one place")
    is_blockllm = adam is not None or isinstance(optimizer, BlockLLM)
    check_config(config, name, world_size=dist.get_world_size(), on_cpu=on_cpu(),
                 client_optimizer=is_blockllm or optimizer is not None, blockllm=is_blockllm)
    if not is_blockllm:
        return deepspeed.initialize(model=model, optimizer=optimizer, config=config, model_parameters=model_parameters,
                                    lr_scheduler=lr_scheduler, **kwargs)
    if "training_data" in kwargs:
        raise ConfigError("training_data: the engine is rebuilt at every block switch; build the data loader yourself")
    if adam is not None:
        optimizer = BlockLLM(model.named_parameters(), **adam, **section)
    return BlockLLMEngine(model, optimizer, config, lr_scheduler, kwargs), optimizer, None, lr_scheduler
