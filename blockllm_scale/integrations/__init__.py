"""BlockLLM under a parallel backend, in your own training loop: one module per backend.

``deepspeed``: ``initialize`` (DeepSpeed ZeRO-0..3, an engine rebuilt at each block switch). ``fsdp2``:
``shard_model`` and distributed checkpoints (torch ``fully_shard``). ``hf``: ``BlockLLMTrainer`` (the Hugging
Face Trainer). ``accelerate``: what ``accelerate launch`` tells a process. Each talks to BlockLLM through the
interface in ``blockllm_scale/interface.py`` only; the core never imports these modules. Each needs its
extra (``pip install "blockllm-scale[deepspeed]"``, ``[fsdp]``, ``[hf]``). The launcher's backends
(``launch/pretrain.py``) are built on these in ``blockllm_scale.launcher.backends``.
"""
