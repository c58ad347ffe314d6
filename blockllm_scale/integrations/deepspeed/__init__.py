"""DeepSpeed ZeRO-0/1/2/3 with BlockLLM (and with the baselines, which need no help).

Why a new DeepSpeed engine per block: ZeRO decides once, inside ``deepspeed.initialize``, which
parameters get fp32 master partitions, Adam states and gradient hooks: those with ``requires_grad``
at that moment. Toggling ``requires_grad`` later crashes ZeRO-1/2 and silently trains the wrong
tensors under ZeRO-3 (DeepSpeed #5639). So :class:`BlockLLMEngine` builds a fresh engine over the
selected blocks at every block switch, and the fp32 masters and Adam states on each rank cover only
the selected blocks (divided by the ranks under ZeRO-1/2/3). A switch, under every stage:

1. BlockLLM picks the new blocks and sets ``requires_grad``, then calls the engine's ``selection_changed()``
   (the engine took the update over with ``BlockLLM.hand_over_update``: ``blockllm_scale/interface.py``).
2. Blocks that stay selected keep their Adam state (and, in bf16, their fp32 master partition) as
   the old engine left it. Each block is its own param group, so its flat partition has the same
   layout in the next engine and the state moves over as it is, with no resharding.
3. The old engine is destroyed, the references DeepSpeed 0.19.8 leaves behind are cut
   (``workarounds_0_19_8.py``) and the garbage is collected, so no engine, optimizer, partition or
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
the JSON; ``launch/pretrain.py --ds_config`` uses ``blockllm_scale.launcher.backends.deepspeed``.

The modules, one concern each: ``config`` (the JSON and its checks), ``processes`` (the process group),
``engine`` (BlockLLMEngine and ``initialize``), ``workarounds_0_19_8`` (what DeepSpeed 0.19.8's
``engine.destroy()`` leaves behind; delete it when DeepSpeed releases an engine completely).
"""

from .config import BATCH_KEYS, SECTION, blockllm_section, check_batch_sizes, check_config, load_config
from .engine import BlockLLMEngine, block_param_groups, initialize
from .processes import init_distributed
from .workarounds_0_19_8 import release_engine

__all__ = ["BATCH_KEYS", "SECTION", "BlockLLMEngine", "block_param_groups", "blockllm_section", "check_batch_sizes",
           "check_config", "init_distributed", "initialize", "load_config", "release_engine"]
