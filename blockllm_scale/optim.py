"""BlockLLM as a ``torch.optim.Optimizer``.

Each step trains only the selected blocks: every other parameter has ``requires_grad=False``, so
autograd allocates no gradient for it and backward stops below the lowest selected layer. The Adam
moments of the selected blocks live in a library AdamW (``states.py``) rebuilt at every block switch.

Feeding the loss: call ``optimizer.record_loss(loss)`` once per micro-batch before ``step()`` (or
pass a ``closure`` to ``step``). This also works where DeepSpeed, accelerate or the HF Trainer call
``step()`` for you, since the loss is handed over separately.

What scoring costs: the gradient norms that decide a reselection come from one "scoring step" (the
step after the patience rule fires, and step 0). That step runs backward through the whole model and
holds one extra gradient at a time (``scoring.py``); every other step is a plain sparse step. The
selection made from step t's gradients is trained from step t + 1 on, so step 0 measures and updates
only what is always trained (embeddings with ``embeddings="always"``).

State kept across a reselection: moments of blocks that stay selected are kept; those of blocks that
leave are dropped (the paper re-initialises the whole optimizer). Keeping costs no memory and makes
``sparsity=0`` exactly AdamW.
"""

from __future__ import annotations

import random
import warnings
from collections import defaultdict
from dataclasses import asdict
from typing import Any, Callable, Iterable

import torch

from . import selection as sel
from .config import BlockLLMConfig, ConfigError
from .interface import GuardedParamGroups, UpdateOwner
from .parallel import average_grad_over_ranks, mean_over_ranks
from .scoring import GradNormScorer, is_dtensor
from .states import ADAM_KEYS, build_adam, copy_hyperparameters, state_dtypes, state_numel


class BlockLLM(torch.optim.Optimizer):
    """BlockLLM (block coordinate descent with greedy, gradient-norm / visit-frequency selection).

    ``params``: ``model.named_parameters()``, or param-group dicts whose "params" are (name, tensor)
    pairs. Parameters that arrive frozen stay frozen. ``lr, betas, eps, weight_decay`` are AdamW's and
    live in ``param_groups`` (LR schedulers work as usual); every other keyword is a
    :class:`BlockLLMConfig` field (sparsity, patience, granularity, variant, strategy, embeddings,
    states, seed).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, **settings: Any):
        _check_adam_arguments(lr, betas, eps, weight_decay)
        self.config = BlockLLMConfig.from_dict(settings)
        groups, self._names = _split_named_groups(params)
        super().__init__(groups, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self._refuse_direct_deepspeed()
        self.scorer = GradNormScorer(reduce_grad=average_grad_over_ranks)
        self._reduce_loss: Callable[[float], float] = mean_over_ranks
        self._inner: torch.optim.Optimizer | None = None
        self._inner_sources: list[tuple[int, int]] = []  # per inner group: (outer group index, selected-at step)
        # weight_update="fp32_master": unit -> fp32 copy of a trained low-precision tensor (or of its trained
        # rows), which the inner AdamW updates in its place. A unit is (flat index, rows): _trained_units.
        self._masters: dict[tuple, torch.Tensor] = {}
        # step_in_backward: one AdamW per trained unit, stepped by a hook inside backward.
        self._per_tensor: dict[tuple, torch.optim.Optimizer] = {}
        self._step_hooks: list = []
        self._row_hooks: list = []  # zero the gradient rows of split tensors that no trained range covers
        self._masks: dict[int, torch.Tensor] = {}
        self._scored: list[int] = []  # flat indices of the tensors the scorer is measuring
        self._pending_losses: list[torch.Tensor | float] = []
        self._warned_no_loss = False
        # Set by hand_over_update: the backend (DeepSpeed) that steps the trained blocks for us.
        self._owner: UpdateOwner | None = None
        # Trained row ranges without an fp32 copy (see selection.split_oversize_tensors) -> (the parameter, the
        # view of its rows that Adam steps).
        self._row_views: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._make_blocks(split_rows=not any(is_dtensor(p) for p in self._flat_params()))

    def _make_blocks(self, split_rows: bool) -> None:
        """Blocks, budget and a fresh selection. Row ranges (for tensors larger than the whole budget) need
        BlockLLM to step the trained blocks itself on whole local tensors: not under DeepSpeed or FSDP2."""
        numels = [p.numel() for p in self._flat_params()]
        self.blocks = sel.group_into_blocks(self._names, numels, self.config.granularity)
        self._always, self._candidates = self._classify_blocks()
        self.budget = self._candidate_budget()
        # (the masked variant's masks trim an oversize block themselves)
        if split_rows and self.config.row_ranges and self.config.variant == "approximate":
            shapes = [p.shape for p in self._flat_params()]
            self.blocks = sel.split_oversize_tensors(self.blocks, shapes, self.budget, set(self._candidates))
            self._always, self._candidates = self._classify_blocks()
        self.selection = sel.SelectionState(visits=[0] * len(self.blocks), since=[-1] * len(self.blocks))
        self._rng = random.Random(self.config.seed)
        # before training only: nothing stepped yet, and copies made of tensors a wrapper may since have replaced
        self._masters, self._row_views, self._per_tensor, self._inner = {}, {}, {}, None
        self._block_of_unit = {(i, block.rows): b for b, block in enumerate(self.blocks) for i in block.members}
        ranges: dict[int, list[tuple[int, int]]] = {}
        for block in self.blocks:
            if block.rows is not None:
                ranges.setdefault(block.members[0], []).append(block.rows)
        self._row_ranges = {i: sorted(r) for i, r in ranges.items()}  # split tensors: scored range by range
        self._choose_initial_blocks()

    @property
    def splits_rows(self) -> bool:
        """True when some block is a range of rows of a tensor too large for the whole budget."""
        return bool(self._row_ranges)

    def _refuse_direct_deepspeed(self) -> None:
        """Make ``deepspeed.initialize(optimizer=BlockLLM(...))`` a one-line error inside that call (no
        per-step cost): see ``interface.GuardedParamGroups``. Nothing here imports deepspeed."""
        self.param_groups = GuardedParamGroups(self.param_groups)

    # ----- what is trained ------------------------------------------------------------------
    def _flat_params(self) -> list[torch.Tensor]:
        # Always read from param_groups: accelerate/FSDP2 swap the tensors in place there.
        return [p for group in self.param_groups for p in group["params"]]

    def _classify_blocks(self) -> tuple[list[int], list[int]]:
        always, candidates = [], []
        for index, block in enumerate(self.blocks):
            embedding = any(sel.is_embedding(self._names[i]) for i in block.members)
            if embedding and self.config.embeddings == "always":
                always.append(index)
            elif not (embedding and self.config.embeddings == "never"):
                candidates.append(index)
        if not candidates and not always:
            raise ValueError("BlockLLM: nothing to train (every parameter is an embedding and embeddings='never')")
        return always, candidates

    def _candidate_budget(self) -> int:
        always = sum(self.blocks[b].numel for b in self._always)
        total = sum(block.numel for block in self.blocks)
        budget = sel.selection_budget(total, self.config.sparsity, always_trained=always)
        if budget < 0:
            raise ConfigError(f"embeddings='always' trains {always / total:.0%} of the parameters, more than sparsity "
                              f"{self.config.sparsity} allows ({1 - self.config.sparsity:.0%}): lower the sparsity "
                              "or use embeddings='candidate'")
        return budget

    @property
    def _selects_everything(self) -> bool:
        return self.budget >= sum(self.blocks[b].numel for b in self._candidates)

    def _trained_units(self) -> list[Unit]:
        """What Adam steps: (flat parameter index, None) for a whole tensor, (index, (start, stop)) for rows."""
        blocks = list(self._always) + list(self.selection.selected)
        units = {(i, self.blocks[b].rows) for b in blocks for i in self.blocks[b].members}
        return sorted(units, key=lambda unit: (unit[0], unit[1] or (-1, -1)))

    def _trained_indices(self) -> set[int]:
        return {i for i, _ in self._trained_units()}

    def _unit_name(self, unit: Unit) -> str:
        index, rows = unit
        return self._names[index] if rows is None else f"{self._names[index]}[{rows[0]}:{rows[1]}]"

    def trained_named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        trained = self._trained_indices()
        return [(n, p) for i, (n, p) in enumerate(zip(self._names, self._flat_params())) if i in trained]

    @property
    def steps_in_backward(self) -> bool:
        """True when the update happens inside backward (``step()`` only keeps the selection): the
        launcher then refuses gradient accumulation and backends that own the gradients."""
        return self.config.step_in_backward

    @property
    def scoring_step(self) -> bool:
        """True when the next forward/backward is a scoring step (step 0 with a norm-based strategy, and
        the step after the patience rule fires): every candidate is trainable then, so backward runs
        through the whole model and keeps full-depth activations, the run's memory peak without
        activation checkpointing. A launcher reads it before the step's forward to recompute activations
        on these steps only (launch/pretrain.py, ``--checkpoint_scoring_steps``)."""
        return self.selection.scoring

    @property
    def selected_fraction(self) -> float:
        """Share of all parameters handed to BlockLLM that this step trains."""
        # Block sizes were taken at construction: ZeRO-3 empties the tensors it partitions later.
        trained = set(self._always) | set(self.selection.selected)
        return sum(self.blocks[b].numel for b in trained) / sum(block.numel for block in self.blocks)

    @property
    def lowest_trained_layer(self) -> int | None:
        """The lowest decoder layer this step trains (-1: the input embeddings; None: no layer), which sets
        how deep backward goes and so most of a sparse step's time and activation memory."""
        trained = self._trained_indices()
        return sel.lowest_trained_layer([n for i, n in enumerate(self._names) if i in trained])

    def adam_optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers holding the live Adam state of the trained blocks: BlockLLM's own AdamW(s), or the
        one a backend steps after ``hand_over_update``."""
        delegated = self._owner.live_optimizer() if self._owner is not None else None
        return list(self._per_tensor.values()) + [o for o in (self._inner, delegated) if o is not None]

    def observe_gradient(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        """On a scoring step, record a trained parameter's gradient as a backend holds it (DeepSpeed keeps
        them in its own partitions and clears them in its step, before ``step()`` reads them)."""
        self.scorer.observe(param, grad)

    def state_numel(self) -> int:
        """Elements in Adam moment tensors right now (only the trained blocks have any)."""
        return sum(state_numel(o) for o in self.adam_optimizers())

    def state_dtypes(self) -> set[str]:
        return set().union(*(state_dtypes(o) for o in self.adam_optimizers()))

    def rebind_parameters(self) -> None:
        """Pick up tensors that a wrapper put into ``param_groups`` in place of the originals.

        FSDP2's ``fully_shard`` and accelerate's ``prepare`` replace parameters with sharded
        DTensors; the inner AdamW and the scorer's hooks still point at the old tensors until this
        re-applies the selection to the new ones. Call it after the swap, before the first step.
        """
        if any(o.state for o in self.adam_optimizers()):
            raise RuntimeError("BlockLLM.rebind_parameters() after a step would drop the Adam state; call it before training")
        if self.splits_rows and any(is_dtensor(p) for p in self._flat_params()):
            self._make_blocks(split_rows=False)  # rows of a sharded tensor are not this rank's to step
        else:
            self._apply_selection(carry_state=False)

    def hand_over_update(self, owner: UpdateOwner) -> None:
        """Let a backend own the Adam update of the trained blocks (DeepSpeed's ZeRO optimizers must).

        From then on ``step()`` only keeps the selection bookkeeping (visits, losses, scoring and
        reselection) and BlockLLM builds no AdamW of its own: after every block switch it calls
        ``owner.selection_changed()``, and the owner builds an optimizer over
        ``trained_named_parameters()`` and steps it. ``owner.live_optimizer()`` is that optimizer, so
        ``state_numel`` and ``state_dtypes`` keep measuring the live state. Call it once, before training.
        """
        if self.config.variant == "masked" or self.config.step_in_backward:
            raise ConfigError("variant='masked' and step_in_backward need BlockLLM to step itself; "
                              "a backend that owns the update (DeepSpeed) supports neither")
        if self._owner is not None:
            raise RuntimeError("BlockLLM.hand_over_update: the update already belongs to a backend")
        self._owner = owner
        self._inner, self._inner_sources, self._masters = None, [], {}  # the backend keeps its own masters
        if self.splits_rows:  # the backend steps whole tensors
            if self.selection.step:
                raise RuntimeError("BlockLLM.hand_over_update: call it before training")
            self._make_blocks(split_rows=False)

    # ----- selection --------------------------------------------------------------------------
    def _choose_initial_blocks(self) -> None:
        if self._selects_everything:
            self.selection.selected = list(self._candidates)
        elif self.config.strategy == "random":
            self.selection.selected = self._greedy(sel.random_order(len(self._candidates), self._rng))
        else:
            self.selection.scoring = True  # step 0 measures every gradient norm
        self._apply_selection()

    def _greedy(self, candidate_order: list[int]) -> list[int]:
        numels = [self.blocks[b].numel for b in self._candidates]
        reach = self.config.variant == "masked"  # the masks trim the last block's overshoot
        return [self._candidates[i] for i in sel.greedy_select(candidate_order, numels, self.budget, reach)]

    def _select_from_norms(self, scored_norms: list) -> None:
        param_norms = [0.0] * len(self._names)  # tensors never scored (embeddings="never") stay at 0
        range_norms: dict[tuple[int, tuple[int, int]], float] = {}
        for index, norm in zip(self._scored, scored_norms):
            if index in self._row_ranges:  # one norm per range of its rows
                range_norms.update({(index, rows): value for rows, value in zip(self._row_ranges[index], norm)})
            else:
                param_norms[index] = norm

        def block_norm(block: sel.Block) -> float:
            if block.rows is not None:
                return range_norms.get((block.members[0], block.rows), 0.0)
            return sum(param_norms[i] ** 2 for i in block.members) ** 0.5

        block_norms = [block_norm(self.blocks[b]) for b in self._candidates]
        if self.config.strategy == "rms_over_visits":
            block_norms = sel.root_mean_square(block_norms, [self.blocks[b].numel for b in self._candidates])
        visits = [self.selection.visits[b] for b in self._candidates]
        order = sel.rank_by_score(block_norms, visits, use_visits=self.config.strategy != "norm")
        self._switch_to(self._greedy(order))

    def _switch_to(self, blocks: list[int]) -> None:
        for b in set(blocks) - set(self.selection.selected):
            self.selection.since[b] = self.selection.step
        self.selection.selected = blocks
        self.selection.reselections += 1
        self._apply_selection()
        if self._owner is not None:
            self._owner.selection_changed()

    def _apply_selection(self, carry_state: bool = True) -> None:
        """Set requires_grad, free gradients of frozen tensors, rebuild the AdamW of the trained ones."""
        trained = self._trained_indices()
        scoring = self.selection.scoring
        candidates = {i for b in self._candidates for i in self.blocks[b].members}
        params = self._flat_params()
        for index, param in enumerate(params):
            param.requires_grad_(index in trained or (scoring and index in candidates))
            if index not in trained:
                param.grad = None
        self._masks = {i: m for i, m in self._masks.items() if i in trained}
        self._rebuild_inner(carry_state)
        self._zero_frozen_rows(params, scoring)
        if scoring:
            self._scored = sorted(trained | candidates)
            self.scorer.start([params[i] for i in self._scored], [i in trained for i in self._scored],
                              [self._row_ranges.get(i) for i in self._scored])

    def _zero_frozen_rows(self, params: list[torch.Tensor], scoring: bool) -> None:
        """Rows of a split tensor that no trained range covers get a zero gradient, as a frozen tensor gets
        none: gradient clipping over ``model.parameters()`` (the HF Trainer's, a user's loop) then measures
        only what is trained. Not on a scoring step, whose scores need every row's gradient."""
        for handle in self._row_hooks:
            handle.remove()
        self._row_hooks = []
        if scoring or not self._row_ranges:
            return
        trained_rows: dict[int, list[tuple[int, int]]] = {}
        for index, rows in self._trained_units():
            if rows is not None:
                trained_rows.setdefault(index, []).append(rows)
        for index, ranges in trained_rows.items():
            frozen = torch.ones(params[index].shape[0], 1, dtype=torch.bool, device=params[index].device)
            for start, stop in ranges:
                frozen[start:stop] = False
            self._row_hooks.append(params[index].register_post_accumulate_grad_hook(_zero_rows(frozen)))

    def _rebuild_inner(self, carry_state: bool) -> None:
        if self._owner is not None:
            return  # the backend rebuilds its optimizer in selection_changed()
        units = self._trained_units()
        self._sync_stepped(units, carry_state)
        if self.config.step_in_backward:
            self._rebuild_per_tensor(units, carry_state)
            return
        old = self._inner
        # One inner group per (outer group, selected-at step): blocks selected together warm up together.
        grouped: dict[tuple[int, int], list[torch.Tensor]] = {}
        sources = self._group_of_each_tensor()
        for unit in units:
            grouped.setdefault((sources[unit[0]], self._selected_at(unit)), []).append(self._stepped(unit))
        self._inner_sources = list(grouped)
        groups = [{**{k: self.param_groups[source][k] for k in ADAM_KEYS}, "params": tensors}
                  for (source, _), tensors in grouped.items()]
        self._inner = self._build_adam(groups) if groups else None
        if carry_state and old is not None and self._inner is not None:
            for tensor in (p for g in groups for p in g["params"]):
                if tensor in old.state:
                    self._inner.state[tensor] = old.state[tensor]

    def _build_adam(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        rounding = self.config.weight_update == "stochastic_rounding"
        return build_adam(self.config.states, groups, stochastic_rounding=rounding)

    def _group_of_each_tensor(self) -> list[int]:
        return [g for g, group in enumerate(self.param_groups) for _ in group["params"]]

    def _selected_at(self, unit: Unit) -> int:
        """The step the unit's block was selected at; -1 for blocks trained from the start."""
        return self.selection.since[self._block_of_unit[unit]] if self.selection.since else -1

    def _lr_factor(self, selected_at: int) -> float:
        """block_warmup_steps: a linear ramp over a newly selected block's first steps, whose Adam moments
        start from zero (blocks trained from the start are warmed up by the run's own schedule)."""
        warmup = self.config.block_warmup_steps
        if warmup == 0 or selected_at < 0:
            return 1.0
        return min(1.0, (self.selection.step - selected_at + 1) / warmup)

    # ----- what Adam steps: the parameter, a view of its trained rows, or an fp32 copy of either -------
    def _sync_stepped(self, units: list[Unit], carry_state: bool) -> None:
        """fp32 copies (weight_update="fp32_master") of trained bf16/fp16 units: copies of units that stay are
        kept (they hold what rounding into the weights lost), those of units that leave are dropped. Row
        ranges without a copy are stepped through a view of the parameter's rows, kept while they stay (Adam's
        state is keyed by that tensor)."""
        params = self._flat_params()
        kept_masters = self._masters if carry_state else {}
        kept_views = self._row_views
        self._masters, self._row_views = {}, {}
        copies = self.config.weight_update == "fp32_master"
        for unit in units:
            index, rows = unit
            param = params[index]
            if copies and param.dtype in (torch.bfloat16, torch.float16):
                self._masters[unit] = kept_masters[unit] if unit in kept_masters else _rows(param, rows).detach().float()
            elif rows is not None:
                owner, view = kept_views.get(unit, (None, None))
                self._row_views[unit] = (param, view if owner is param else _rows(param.detach(), rows))

    def _stepped(self, unit: Unit) -> torch.Tensor:
        """The tensor Adam updates for ``unit``: its fp32 master, a view of its rows, or the parameter itself."""
        if unit in self._masters:
            return self._masters[unit]
        if unit in self._row_views:
            return self._row_views[unit][1]
        return self._flat_params()[unit[0]]

    def _grads_to_stepped(self, units, observe_freed: bool) -> None:
        """Hand each stepped tensor its part of the parameter's gradient; a parameter whose gradient an fp32
        copy takes over is freed (on a scoring step ``observe_freed`` first records its norm, once)."""
        params = self._flat_params()
        freed: set[int] = set()
        for unit in units:
            index, rows = unit
            if unit not in self._masters and rows is None:
                continue  # the parameter is stepped with its own gradient
            grad = params[index].grad
            part = None if grad is None else _rows(grad, rows)
            if unit in self._masters:
                if grad is not None and observe_freed and self.selection.scoring and index not in freed:
                    self.scorer.observe(params[index], grad)  # its norm is read after this frees it
                self._masters[unit].grad = None if part is None else part.float()
                freed.add(index)
            else:
                self._row_views[unit][1].grad = part
        for index in freed:
            params[index].grad = None  # the fp32 copies replace it: no need to hold both

    def _stepped_to_weights(self, units) -> None:
        params = self._flat_params()
        for unit in units:
            index, rows = unit
            if unit in self._masters:
                _rows(params[index], rows).copy_(self._masters[unit])
                self._masters[unit].grad = None
            elif rows is not None:
                self._row_views[unit][1].grad = None

    def master_numel(self) -> int:
        """Elements held in fp32 master copies right now (only trained low-precision tensors have one)."""
        return sum(m.numel() for m in self._masters.values())

    def _rebuild_per_tensor(self, units: list[Unit], carry_state: bool) -> None:
        """One AdamW per trained unit, stepped the moment its tensor's gradient is ready (then freed)."""
        for handle in self._step_hooks:
            handle.remove()
        old = self._per_tensor if carry_state else {}
        sources = self._group_of_each_tensor()
        params = self._flat_params()
        self._per_tensor, self._step_hooks = {}, []
        for unit in units:
            group = self.param_groups[sources[unit[0]]]
            self._per_tensor[unit] = old.get(unit) or self._build_adam(
                [{**{k: group[k] for k in ADAM_KEYS}, "params": [self._stepped(unit)]}])
        for index in sorted({i for i, _ in units}):
            its_units = [u for u in units if u[0] == index]
            group = self.param_groups[sources[index]]
            self._step_hooks.append(params[index].register_post_accumulate_grad_hook(
                self._backward_stepper(its_units, group)))

    def _backward_stepper(self, units: list[Unit], group: dict):
        @torch.no_grad()
        def step_and_free(param: torch.Tensor) -> None:
            if self.selection.scoring:
                self.scorer.observe(param, param.grad)  # once: the copies below do not observe again
            self._grads_to_stepped(units, observe_freed=False)
            for unit in units:
                optimizer = self._per_tensor[unit]
                # read at every step, so LR schedulers reach it
                factor = self._lr_factor(self._selected_at(unit))
                copy_hyperparameters({**group, "lr": group["lr"] * factor}, optimizer.param_groups[0], ADAM_KEYS)
                optimizer.step()
            self._stepped_to_weights(units)
            param.grad = None

        return step_and_free

    # ----- the step ---------------------------------------------------------------------------
    def record_loss(self, loss: torch.Tensor | float) -> None:
        """Hand over this micro-batch's loss; the mean over a step's micro-batches drives reselection."""
        # Tensors are kept (detached) and read at step(): one device sync per step, not per micro-batch.
        self._pending_losses.append(loss.detach() if torch.is_tensor(loss) else float(loss))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            self.record_loss(loss)
        self._update_trained_blocks()
        self._advance_selection()
        self._publish_state()
        return loss

    def _publish_state(self) -> None:
        """``self.state[p]`` is the live Adam state (exp_avg, exp_avg_sq, step) of each trained parameter ``p``,
        the very dicts of the library AdamW that holds them, as every torch optimizer exposes its state;
        frozen parameters have none. (A backend that owns the update, DeepSpeed, keeps them itself.)"""
        params = self._flat_params()
        published = {}
        for unit in self._trained_units():
            holder = self._per_tensor.get(unit) or self._inner
            state = holder.state.get(self._stepped(unit)) if holder is not None else None
            if state:  # a row range's state is published under the tensor that holds those rows
                published[params[unit[0]] if unit[1] is None else self._stepped(unit)] = state
        self.state = defaultdict(dict, published)

    def _update_trained_blocks(self) -> None:
        if self._inner is None:
            return
        for inner_group, (source, selected_at) in zip(self._inner.param_groups, self._inner_sources):
            outer = self.param_groups[source]
            scaled = {**outer, "lr": outer["lr"] * self._lr_factor(selected_at)}
            copy_hyperparameters(scaled, inner_group, ADAM_KEYS)
        units = self._trained_units()
        if self.config.variant == "masked":
            self._draw_fresh_masks()
        self._grads_to_stepped(units, observe_freed=True)
        # the masked variant never has row ranges (selection.split_oversize_tensors): whole tensors only
        before = {i: self._stepped((i, None)).detach().clone() for i in self._masks}
        self._inner.step()
        for i, mask in self._masks.items():  # masked variant: only the masked entries move
            stepped = self._stepped((i, None))
            stepped.copy_(torch.where(mask, stepped, before[i]))
        self._stepped_to_weights(units)

    def _draw_fresh_masks(self) -> None:
        """The masked variant: Adam on the whole block (moments stay dense), but only masked entries move.

        Masks are drawn from the first gradient a block sees after selection (its top |g| entries,
        so that the trained entries total the budget) and kept until the block leaves. Blocks that
        stay selected across a reselection keep their masks, so new blocks share what is left.
        """
        selected = {i for b in self.selection.selected for i in self.blocks[b].members}
        params = self._flat_params()
        fresh = [i for i in sorted(selected) if i not in self._masks and params[i].grad is not None]
        if fresh:
            held = sum(int(self._masks[i].sum()) for i in selected if i in self._masks)
            fresh_numel = sum(params[i].numel() for i in fresh)
            keep_fraction = min(1.0, max(0, self.budget - held) / fresh_numel)
            for i in fresh:
                self._masks[i] = sel.top_magnitude_mask(params[i].grad, keep_fraction)

    def _advance_selection(self) -> None:
        state = self.selection
        for b in state.selected:
            state.visits[b] += 1
        state.step += 1
        loss = self._take_step_loss()
        if loss is not None and state.step > 1:
            state.losses.append(loss)  # step 0 selects unconditionally and starts H empty (Algorithm 1)
        if state.scoring:
            state.scoring = False
            self._select_from_norms(self.scorer.finish())
        elif loss is not None and not self._selects_everything and sel.should_reselect(state.losses, self.config.patience):
            state.losses = []
            if self.config.strategy == "random":
                self._switch_to(self._greedy(sel.random_order(len(self._candidates), self._rng)))
            else:
                state.scoring = True
                self._apply_selection()

    def _take_step_loss(self) -> float | None:
        if not self._pending_losses:
            if not self._warned_no_loss and not self._selects_everything:
                warnings.warn("BlockLLM.step() got no loss: call optimizer.record_loss(loss) each step, "
                              "or the selection never changes", stacklevel=3)
                self._warned_no_loss = True
            return None
        tensors = [x.reshape(()).double() for x in self._pending_losses if torch.is_tensor(x)]
        values = iter(torch.stack(tensors).cpu().tolist() if tensors else [])
        losses = [next(values) if torch.is_tensor(x) else x for x in self._pending_losses]
        loss = sum(losses) / len(losses)
        self._pending_losses = []
        return self._reduce_loss(loss)

    # ----- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self.selection.rng_state = self._rng.getstate()
        params = self._flat_params()
        return {
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
            "names": list(self._names),
            "selection": asdict(self.selection),
            "inner": self._inner.state_dict() if self._inner is not None else None,
            "per_tensor": {self._unit_name(u): o.state_dict() for u, o in self._per_tensor.items()},
            "masks": {self._names[i]: m.to(params[i].device) for i, m in self._masks.items()},
            "masters": {self._unit_name(u): m for u, m in self._masters.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if list(state_dict["names"]) != self._names:
            raise ValueError("BlockLLM.load_state_dict: the checkpoint was saved for different parameters")
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.selection = sel.SelectionState(**state_dict["selection"])
        if self.selection.rng_state is not None:
            self._rng.setstate(_as_rng_state(self.selection.rng_state))
        params = self._flat_params()
        index = {n: i for i, n in enumerate(self._names)}
        self._masks = {index[n]: m.to(params[index[n]].device) for n, m in state_dict["masks"].items()}
        self.scorer.finish()
        self._apply_selection(carry_state=False)
        unit_of = {self._unit_name(u): u for u in self._trained_units()}
        for name, saved in state_dict.get("masters", {}).items():  # what rounding into bf16 weights lost
            self._masters[unit_of[name]].copy_(saved)
        if self._inner is not None and state_dict["inner"] is not None:
            self._inner.load_state_dict(state_dict["inner"])
        for name, saved in state_dict.get("per_tensor", {}).items():
            self._per_tensor[unit_of[name]].load_state_dict(saved)
        self._publish_state()


Unit = tuple  # (flat parameter index, (start, stop) rows or None): see BlockLLM._trained_units


def _rows(tensor: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
    return tensor if rows is None else tensor[rows[0]:rows[1]]


def _zero_rows(frozen: torch.Tensor):
    def hook(param: torch.Tensor) -> None:
        if param.grad is not None:  # (step_in_backward has stepped and freed it already)
            param.grad.masked_fill_(frozen, 0)

    return hook


def _as_rng_state(saved) -> tuple:
    # random.Random states survive torch.save as tuples but come back from JSON as lists.
    version, internal, gauss = saved
    return (version, tuple(internal), gauss)


def _check_adam_arguments(lr, betas, eps, weight_decay) -> None:
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")


def _split_named_groups(params: Iterable) -> tuple[list[dict[str, Any]], list[str]]:
    """Turn named parameters (or groups of them) into plain param groups plus a parallel name list."""
    items = list(params)
    raw_groups = items if items and isinstance(items[0], dict) else [{"params": items}]
    groups, names = [], []
    for raw in raw_groups:
        tensors = []
        for entry in raw["params"]:
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)):
                raise ValueError("params must be named: pass model.named_parameters(), not model.parameters()")
            name, tensor = entry
            if tensor.requires_grad:
                names.append(name)
                tensors.append(tensor)
        if tensors:
            groups.append({**{k: v for k, v in raw.items() if k != "params"}, "params": tensors})
    if not groups:
        raise ValueError("params: the model has nothing trainable (every parameter has requires_grad=False)")
    return groups, names
