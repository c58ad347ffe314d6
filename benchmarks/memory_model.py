"""Predict a training run's peak GPU memory (``torch.cuda.max_memory_allocated``) from its settings.

peak = persistent + the largest phase. w is the weights' bytes per element (bf16 2, fp32 4), N the
model's parameters, n those trained, T = batch x seq tokens, V the vocabulary.

persistent (held through the whole step)
  weights     N w                                     (/W under ZeRO-3 and FSDP2)
  master      fp32 copies of trained parameters: DeepSpeed with bf16 (4n; /W from ZeRO-1), BAdam (4n), the plain
              backend's --dtype bf16 (fp32_masters: 4n, with fp32 moments and fp32 gradients at the step)
  states      Adam moments of the trained parameters, by format:
                torch AdamW          2 x the moment dtype, which is the parameter's (bf16: 4 bytes/param)
                bitsandbytes 8-bit   2 x (1 + 4/2048) for tensors >= 4096 elements, else 2 x 4
                torchao 8 / 4-bit    2 x (1 + 4/256) / 2 x (0.5 + 4/128) for tensors >= 4096 elements
                                     and a multiple of the block, else 2 w
                GaLore               the moments of the projected gradient (rank x max(rows, cols)) plus
                                     the projector (rank x min(rows, cols), w); plain Adam for the rest
phases (transient; the largest one counts)
  backward    saved activations + the loss's peak, 12 bytes per logit (fp32 log-softmax output, its
              gradient and the NLL gradient: T x V each); optimizers that step inside backward add one
              gradient and its step temporaries
  step        gradients held (n w; /W from ZeRO-2) + fp32 gradients (DeepSpeed, BAdam) + the step's
              temporaries (torch's foreach AdamW: one moment-sized buffer; torchao: fp32 moments of the
              largest tensor; GaLore 8-bit: an SVD of the largest projected weight in fp32). ZeRO-1/2 with
              bf16 go one param group g at a time (stage_1_and_2.py): max(n w + g w + 4g, n w - g w + 4g +
              temporaries of g), g = all trained parameters for one-group optimizers, one block for BlockLLM
              (our DeepSpeed backend gives each block its group)
  scoring     BlockLLM's scoring step: full-depth activations (every candidate trainable) + one gradient;
              with checkpoint_scoring_steps (the launcher's default) the launcher recomputes activations
              on scoring steps only, so without checkpointing this phase takes the checkpointed terms

Activations per token and decoder layer (h hidden, i intermediate, a heads), counted with saved-tensor
hooks on Hugging Face's LlamaForCausalLM (sdpa attention; tests/unit/test_benchmarks.py checks them):
  trained layer             2(4h + w h) + 6 w h + 4 w i + 4a + 8   (bf16: 24h + 8i + 4a + 8)
  frozen, backward passes   8h + 4 w h + 3 w i + 4a + 8            (Linear inputs are not kept)
  below the lowest trained  nothing
  checkpointing             w h per layer (its input); one layer's set while it is recomputed,
                            which comes after the loss's backward (the larger of the two counts)
The lowest trained layer saves 4h + 4 less when nothing below it trains (no fp32 copy of its input).
Outside the layers: the final norm (4h, + w h if trained), the LM head's input (w h if trained), labels
and token ids (8 + 8 if the embedding trains) and the RoPE tables (2 (h/a) w / batch).

What is assumed rather than measured: which tensors BlockLLM selects (the budget is spread evenly over
the layers, and backward reaches layer 0, which holds whenever the embeddings are trained); DeepSpeed's
bf16 layout (fp32 master, fp32 gradients, fp32 moments of the trained parameters, one reduce bucket from
ZeRO-2; ZeRO-3 keeps a full reduce bucket and the fp32 gradient partitions from initialisation, as its
stage3.py allocates them); FSDP2 with bf16 as mixed precision (fp32 sharded parameters, gradients
and moments, bf16 gathered layers and activations); FSDP2 holding two unsharded layers (and, on a scoring
step, two layers' gradients in flight); step temporaries not divided over ranks (one GPU); torchao's
and GaLore's step temporaries (sized to agree with the H100 measurements in benchmarks/results/, not derived);
no CUDA-only workspaces (attention kernels: the H100's 1B batch-16 runs without checkpointing sit ~5%
above the prediction) and no allocator fragmentation (that is the reserved memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from blockllm_scale.config import BlockLLMConfig
from blockllm_scale.selection import selection_budget

GIB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
BACKENDS = ("plain", "zero0", "zero1", "zero2", "zero3", "fsdp2")
# Whole-model optimizers -> the format of their moments (see state_bytes).
STATE_FORMATS = {"adamw": "torch", "adamw8bit": "bnb_8bit", "torchao_adamw8bit": "torchao_8bit",
                 "torchao_adamw4bit": "torchao_4bit"}


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    layer: int | None  # decoder layer index; None for embeddings, final norm and head

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def projected(self) -> bool:
        """GaLore's rule: the weights of the attention and MLP projections."""
        return len(self.shape) == 2 and ("attn" in self.name or "mlp" in self.name)

    @property
    def embedding(self) -> bool:
        return "embed" in self.name or "lm_head" in self.name


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int


def model_shape(model: str, vocab_size: int | None = None) -> Shape:
    from blockllm_scale.launcher.models import MODEL_SIZES

    size = MODEL_SIZES[model]
    return Shape(size["hidden_size"], size["intermediate_size"], size["num_hidden_layers"],
                 size["num_attention_heads"], vocab_size or size["vocab_size"])


def llama_tensors(shape: Shape) -> list[Tensor]:
    """Name and shape of every parameter of the LlamaForCausalLM built by blockllm_scale.launcher.models."""
    h, i = shape.hidden, shape.intermediate
    tensors = [Tensor("model.embed_tokens.weight", (shape.vocab, h), None)]
    for layer in range(shape.layers):
        prefix = f"model.layers.{layer}."
        tensors += [Tensor(prefix + f"self_attn.{p}_proj.weight", (h, h), layer) for p in "qkvo"]
        tensors += [Tensor(prefix + f"mlp.{p}_proj.weight", (i, h), layer) for p in ("gate", "up")]
        tensors += [Tensor(prefix + "mlp.down_proj.weight", (h, i), layer)]
        tensors += [Tensor(prefix + f"{n}.weight", (h,), layer) for n in ("input_layernorm", "post_attention_layernorm")]
    return tensors + [Tensor("model.norm.weight", (h,), None), Tensor("lm_head.weight", (shape.vocab, h), None)]


@dataclass(frozen=True)
class Setup:
    """One benchmark configuration, as far as memory is concerned (field names are launcher flags)."""

    optimizer: str
    model: str
    batch_size: int
    seq_len: int = 256
    vocab_size: int = 0  # 0: the size's own (GaLore's 32000)
    dtype: str = "bf16"
    # Plain backend, bf16: the optimizer steps fp32 copies of what it trains (the launcher's --dtype bf16,
    # BlockLLM's weight_update="fp32_master"); False is --dtype bf16-pure, what the memory suite runs.
    fp32_masters: bool = False
    checkpointing: bool = False
    backend: str = "plain"
    world_size: int = 1
    steps: int = 8
    # BlockLLM's settings: its defaults are BlockLLMConfig's, declared there once.
    sparsity: float = BlockLLMConfig.sparsity
    states: str = BlockLLMConfig.states
    embeddings: str = BlockLLMConfig.embeddings
    strategy: str = BlockLLMConfig.strategy
    step_in_backward: bool = BlockLLMConfig.step_in_backward
    checkpoint_scoring_steps: bool = True  # the launcher's default: scoring steps recompute activations
    rank: int = 128  # GaLore
    switch_block_every: int = 50  # BAdam
    switch_mode: str = "descending"
    reduce_bucket_size: int = 500_000_000  # DeepSpeed ZeRO-2/3 (its default)

    @classmethod
    def from_flags(cls, **values) -> "Setup":
        """Build from launcher-style values (strings welcome); keys that are not fields are ignored."""
        kinds = {f.name: f.type for f in fields(cls)}
        cast = {"int": int, "float": float, "bool": _as_bool, "str": str}
        return cls(**{k: cast[kinds[k]](v) for k, v in values.items() if k in kinds})


@dataclass
class Plan:
    """What an optimizer keeps, in bytes, plus which layers backward reaches (None: not reached, else
    the fraction of the layer's weights trained)."""

    trained: int
    states: int
    grads: int
    step_temp: int = 0
    master: int = 0
    fp32_grads: int = 0
    in_backward: bool = False  # steps and frees each gradient inside backward
    layers: list[float | None] | None = None  # default: every layer fully trained
    head_trained: bool = True
    embedding_trained: bool = True
    scoring: bool = False


@dataclass
class Prediction:
    """peak = weights + master + states + parts[phase]; parts holds every phase's transient bytes."""

    peak: int
    phase: str
    parts: dict[str, int]

    @property
    def peak_gib(self) -> float:
        return self.peak / GIB

    def parts_gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 3) for k, v in self.parts.items()}


def predict(setup: Setup) -> Prediction:
    if setup.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {setup.backend!r}")
    shape = model_shape(setup.model, setup.vocab_size or None)
    tensors = llama_tensors(shape)
    w = DTYPE_BYTES[setup.dtype]
    deepspeed = setup.backend.startswith("zero")
    # FSDP2 with bf16 is mixed precision: the sharded parameters, their gradients and the Adam moments
    # stay fp32; only the gathered layers and the activations are bf16.
    param_w = 4 if setup.backend == "fsdp2" else w
    # BAdam keeps its own fp32 copies (its plan has them); Adam's moments follow the fp32 copies' dtype.
    masters = setup.fp32_masters and setup.backend == "plain" and w == 2 and setup.optimizer != "badam"
    plan = optimizer_plan(setup, tensors, param_w, state_w=4 if deepspeed or masters else param_w)
    parts = {"weights": sum(t.numel for t in tensors) * param_w, "master": plan.master, "states": plan.states}
    tokens = setup.batch_size * setup.seq_len
    logits = 12 * tokens * shape.vocab
    largest = max(t.numel for t in tensors) * w
    in_flight = largest + plan.step_temp if plan.in_backward else 0
    if masters:
        parts["master"] += 4 * plan.trained
        # Each bf16 gradient becomes an fp32 one on its copy and is freed: 4 bytes a trained parameter at the
        # step, not 2 (in backward: one tensor's fp32 gradient in flight).
        plan = replace(plan, grads=4 * plan.trained)
        in_flight += 2 * largest if plan.in_backward else 0
    saved, recompute = activation_bytes(shape, w, setup, plan.layers, plan.head_trained, plan.embedding_trained)
    # The loss's backward comes first, each checkpointed layer's recomputation after it.
    phases = {"backward": saved + max(logits, recompute) + in_flight,
              "step": (0 if plan.in_backward else plan.grads + plan.step_temp) + plan.fp32_grads}
    if plan.scoring:
        scoring_setup = replace(setup, checkpointing=setup.checkpointing or setup.checkpoint_scoring_steps)
        saved, recompute = activation_bytes(shape, w, scoring_setup, None, True, True)
        phases["scoring"] = saved + max(logits, recompute) + largest
    _apply_backend(setup, parts, phases, plan, tensors, w)
    phase = max(phases, key=phases.get)
    persistent = sum(parts.values())
    return Prediction(persistent + phases[phase], phase, {**parts, **phases})


def optimizer_plan(setup: Setup, tensors: list[Tensor], w: int, state_w: int) -> Plan:
    opt, everything = setup.optimizer, sum(t.numel for t in tensors)
    largest = max(t.numel for t in tensors)
    if opt in STATE_FORMATS:
        fmt = STATE_FORMATS[opt]
        states = sum(state_bytes(fmt, t.numel, state_w) for t in tensors)
        temp = {"torch": everything * state_w, "torchao_8bit": 8 * largest, "torchao_4bit": 8 * largest}.get(fmt, 0)
        return Plan(everything, states, everything * w, step_temp=temp)
    if opt.startswith("galore"):
        return _galore_plan(setup, tensors, w, state_w)
    if opt == "badam":
        return _badam_plan(setup, tensors, w)
    if opt == "blockllm":
        return _blockllm_plan(setup, tensors, w, state_w)
    raise ValueError(f"no memory model for optimizer {opt!r}")


def state_bytes(fmt: str, numel: int, w: int) -> int:
    """Bytes of the two Adam moments of one tensor of ``numel`` elements in format ``fmt``."""
    if fmt in ("torch", "fp32"):
        return 2 * numel * w
    if fmt == "bnb_8bit":
        return 2 * (numel + 4 * math.ceil(numel / 2048)) if numel >= 4096 else 8 * numel
    block, bits = {"torchao_8bit": (256, 8), "torchao_4bit": (128, 4)}[fmt]
    if numel >= 4096 and numel % block == 0:
        return 2 * (numel * bits // 8 + 4 * (numel // block))
    return 2 * numel * w


def _galore_plan(setup: Setup, tensors: list[Tensor], w: int, state_w: int) -> Plan:
    fmt = "torch" if setup.optimizer == "galore" else "bnb_8bit"
    states, temp = 0, 0
    for t in tensors:
        if not t.projected:
            states += state_bytes(fmt, t.numel, state_w)
            continue
        rows, cols = t.shape
        rank = min(setup.rank, rows, cols)
        states += state_bytes(fmt, rank * max(rows, cols), state_w) + rank * min(rows, cols) * w
        # The first step's SVD of an fp32 copy (U, S, Vh); 8-bit GaLore also clones the weight.
        k = min(rows, cols)
        temp = max(temp, 4 * (t.numel + (rows + cols) * k) + (t.numel * w if fmt == "bnb_8bit" else 2 * t.numel * w))
    everything = sum(t.numel for t in tensors)
    return Plan(everything, states, everything * w, step_temp=temp, in_backward=setup.optimizer.endswith("layerwise"))


def _badam_plan(setup: Setup, tensors: list[Tensor], w: int) -> Plan:
    """One decoder layer trained, with fp32 master, fp32 gradients and fp32 AdamW moments of it."""
    layers = max(t.layer for t in tensors if t.layer is not None) + 1
    block = sum(t.numel for t in tensors if t.layer == 0)
    # Descending order starts at the top layer; the deepest layer the run reaches sets the depth.
    depth = min(layers, 1 + (setup.steps - 1) // setup.switch_block_every) if setup.switch_mode == "descending" else layers
    kinds = [None] * (layers - depth) + [1.0] + [0.0] * (depth - 1)
    # Its step turns each bf16 gradient into an fp32 one, freeing the bf16 one: 4 bytes are held, not 6.
    return Plan(block, 8 * block, 0, step_temp=4 * block, master=4 * block, fp32_grads=4 * block,
                layers=kinds, head_trained=False, embedding_trained=False)


def _blockllm_plan(setup: Setup, tensors: list[Tensor], w: int, state_w: int) -> Plan:
    always = [t for t in tensors if t.embedding and setup.embeddings == "always"]
    candidates = [t for t in tensors if not (t.embedding and setup.embeddings in ("always", "never"))]
    # The budget counts every parameter, the always-trained ones included (BlockLLM._candidate_budget).
    budget = min(sum(t.numel for t in candidates),
                 selection_budget(sum(t.numel for t in tensors), setup.sparsity, sum(t.numel for t in always)))
    trained = sum(t.numel for t in always) + budget
    fmt = "torch" if setup.states == "fp32" else setup.states
    # The budget is spread over many large tensors: charge it at a large tensor's rate.
    large = 1 << 20
    states = sum(state_bytes(fmt, t.numel, state_w) for t in always) + budget * state_bytes(fmt, large, state_w) // large
    largest = max(t.numel for t in always + candidates)
    temp = (largest if setup.step_in_backward else trained) * state_w if fmt == "torch" else 0
    fraction = budget / max(1, sum(t.numel for t in candidates))
    layers = [fraction] * (max(t.layer for t in tensors if t.layer is not None) + 1)
    scoring = setup.sparsity > 0 and setup.strategy != "random"  # random selection measures no norms
    return Plan(trained, states, trained * w, step_temp=temp, in_backward=setup.step_in_backward, layers=layers,
                head_trained=bool(always), embedding_trained=bool(always), scoring=scoring)


def activation_bytes(shape: Shape, w: int, setup: Setup, layers: list[float | None] | None,
                     head_trained: bool, embedding_trained: bool) -> tuple[int, int]:
    """(bytes saved for backward at its start, bytes of one layer recomputed under checkpointing);
    the module docstring gives the per-token terms. ``layers``: as ``Plan.layers``."""
    h, i, a = shape.hidden, shape.intermediate, shape.heads
    full = 2 * (4 * h + w * h) + 6 * w * h + 4 * w * i + 4 * a + 8
    through = 8 * h + 4 * w * h + 3 * w * i + 4 * a + 8
    layers = [1.0] * shape.layers if layers is None else layers
    per_layer = [0 if f is None else through + f * (full - through) for f in layers]
    reached = [index for index, f in enumerate(layers) if f is not None]
    if reached and not embedding_trained:  # nothing below needs a gradient: no fp32 copy of its input
        per_layer[reached[0]] -= 4 * h + 4
    saved = w * h * len(layers) if setup.checkpointing else sum(per_layer)
    recompute = max(per_layer) if setup.checkpointing else 0
    # Final norm (its fp32 input if backward passes it; its output if its weight trains, taken to go
    # with the head) and the head's input.
    outside = (8 + (8 if embedding_trained else 0) + 2 * (h // a) * w / setup.batch_size  # labels, ids, RoPE
               + (4 * h + 4 if reached else 0) + (2 * w * h if head_trained else 0))
    tokens = setup.batch_size * setup.seq_len
    return int((saved + outside) * tokens), int(recompute * tokens)


def _apply_backend(setup: Setup, parts: dict, phases: dict, plan: Plan, tensors: list[Tensor], w: int) -> None:
    """Shard and add what DeepSpeed (bf16) or FSDP2 keep; plain leaves everything as it is."""
    world = setup.world_size
    largest = max(t.numel for t in tensors)
    if setup.backend.startswith("zero"):
        stage = int(setup.backend[-1])
        sharded = world if stage >= 1 else 1
        # Our DeepSpeed backend gives every trained block its own param group; DeepSpeed's optimizers and
        # torch's foreach AdamW work one group at a time, so their buffers are one block's, not all of them.
        group = min(plan.trained, largest) if setup.optimizer == "blockllm" else plan.trained
        temp = min(plan.step_temp, 4 * largest) if setup.optimizer == "blockllm" else plan.step_temp
        if setup.dtype == "bf16":
            parts["master"] += 4 * plan.trained // sharded
        if setup.dtype == "bf16" and stage in (1, 2):
            # ZeRO-1/2's step (stage_1_and_2.py), per group: flatten its bf16 gradients, cast the flat copy to
            # fp32, free the copy and the group's gradients, step, free the fp32 gradient. Peak: every
            # gradient + one group's flat copy + its fp32 cast, or the fp32 cast + the AdamW temporaries.
            part = group // sharded
            phases["step"] = max(plan.grads + part * w + 4 * part, plan.grads - part * w + 4 * part + temp)
        else:
            phases["step"] += (4 * plan.trained // sharded if setup.dtype == "bf16" else 0) - plan.step_temp + temp
        parts["states"] //= sharded
        if stage == 2:
            phases["step"] -= plan.grads - plan.grads // world - min(setup.reduce_bucket_size, plan.trained) * w
        if stage == 3:
            parts["weights"] //= world
            # ZeRO-3 allocates its reduce bucket (reduce_bucket_size elements, full size whatever the model)
            # and the flat buffer of gradient partitions at initialisation and keeps both.
            parts["buffers"] = setup.reduce_bucket_size * w
            moved = 4 * plan.trained // world if setup.dtype == "bf16" else plan.grads // world
            parts["buffers"] += moved
            phases["step"] -= plan.grads + (moved if setup.dtype == "bf16" else 0)
    elif setup.backend == "fsdp2":
        layer_numel = sum(t.numel for t in tensors if t.layer == 0)
        parts["weights"] = parts["weights"] // world + 2 * layer_numel * w  # two gathered layers, compute dtype
        if "scoring" in phases:
            # A scoring step's gradients reach the hooks only after FSDP2's reduce-scatter, a whole layer at a
            # time: the layer's unsharded gradients (compute dtype) and its fp32 reduce buffer, for the layer
            # being reduced and the one whose backward overlaps it, stand where one gradient stood.
            phases["scoring"] += 2 * layer_numel * (w + 4) - largest * w
        parts["states"] //= world
        phases["step"] -= plan.grads - plan.grads // world


def _as_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes", "on"):
        return True
    if str(value).lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r}")
