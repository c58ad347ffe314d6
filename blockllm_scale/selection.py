"""BlockLLM's selection rules, as pure functions on names, sizes and numbers.

Nothing here knows about optimizers, devices or processes: the optimizer (``optim.py``) and the
distributed backends feed in gradient norms and losses and apply the decisions. Paper references are to
BlockLLM (Ramesh et al.), §2 and Algorithms 1-2.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Sequence

import torch

# A decoder layer of a Hugging Face model: "model.layers.3.mlp.up_proj.weight" -> "model.layers.3".
_LAYER_PREFIX = re.compile(r"^(.*?\blayers?\.\d+)\.")
# Token embeddings and the output head: the biggest single tensors of a small LLaMA.
_EMBEDDING_NAME = re.compile(r"(embed|lm_head|\bwte\b|\bwpe\b)")


@dataclass(frozen=True)
class Block:
    """The unit that is selected or frozen together: one parameter tensor, one decoder layer, or a range of
    rows of one tensor too large for the whole budget (``rows``: [start, stop) of its single member)."""

    name: str
    members: tuple[int, ...]  # indices into the optimizer's flat parameter list
    numel: int
    rows: tuple[int, int] | None = None


def is_embedding(name: str) -> bool:
    return bool(_EMBEDDING_NAME.search(name))


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor belongs to ("model.layers.3.mlp.up_proj.weight" -> 3), else None."""
    match = _LAYER_PREFIX.match(name)
    return int(match.group(1).rsplit(".", 1)[1]) if match else None


def lowest_trained_layer(names: Sequence[str]) -> int | None:
    """How far down a backward pass that trains ``names`` must go: the lowest decoder layer among them,
    -1 when an input embedding is among them (backward reaches the bottom), None when no tensor is in a
    layer (only the head or the final norm: backward stops above every layer)."""
    if any(is_embedding(n) and "lm_head" not in n for n in names):  # an input embedding
        return -1
    layers = [i for i in map(layer_index, names) if i is not None]
    return min(layers) if layers else None


def group_into_blocks(names: Sequence[str], numels: Sequence[int], granularity: str) -> list[Block]:
    """One block per tensor ("parameter"), or all tensors of a decoder layer together ("layer").

    Tensors outside any decoder layer (embeddings, final norm, head) stay blocks of their own.
    Blocks keep the order in which their first member appears.
    """
    members: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        match = _LAYER_PREFIX.match(name) if granularity == "layer" else None
        members.setdefault(match.group(1) if match else name, []).append(index)
    return [Block(key, tuple(idx), sum(numels[i] for i in idx)) for key, idx in members.items()]


# Row ranges are cut to about this share of the budget: small enough that a step's selection (a decoder layer
# is 54% of LLaMA-60M's s=0.9 budget) can fill what the larger blocks leave, so s trains about (1 - s) n.
# Measured on the CPU (LLaMA-60M-shaped, s=0.9, 300 steps): 1/4 trained 0.081 per step, 1/8 0.093, 1/16 0.097,
# at eval losses within 0.02 nats of each other.
RANGE_SHARE_OF_BUDGET = 1 / 16


def split_oversize_tensors(blocks: Sequence[Block], shapes: Sequence[torch.Size], budget: int,
                           candidates: set[int]) -> list[Block]:
    """Candidate blocks that are one matrix larger than the whole ``budget`` become ranges of its rows of at
    most ``budget * RANGE_SHARE_OF_BUDGET`` parameters each (at least one row, and never more than the largest
    candidate that fits); every other block stays as it is, in its place.

    Why: LLaMA-60M's token embeddings and LM head are 28% of the parameters each, more than sparsity 0.9
    trains in all (10%). Whole, such a block is either never trained or trained alone at 2.8 times the
    budget (``greedy_select``'s oversize rule), so that s would not mean what it says. Rows of an
    embedding are tokens; a row range trains (and keeps Adam state and fp32 copies for) those tokens only.
    Backward still computes the tensor's whole gradient (autograd cannot produce part of it), freed with
    the others at ``zero_grad``: at 60M, 33 MB in bf16.
    """
    fitting = [b.numel for i, b in enumerate(blocks) if i in candidates and b.numel <= budget]
    piece = min(int(budget * RANGE_SHARE_OF_BUDGET), max(fitting, default=budget))
    out: list[Block] = []
    for index, block in enumerate(blocks):
        shape = shapes[block.members[0]]
        if (index not in candidates or block.numel <= budget or len(block.members) != 1 or len(shape) != 2
                or shape[1] > budget):
            out.append(block)
            continue
        rows, cols = shape
        count = math.ceil(rows / max(1, piece // cols))  # so that no range holds more rows than that
        bounds = [rows * k // count for k in range(count + 1)]
        out += [Block(f"{block.name}[{a}:{b}]", block.members, (b - a) * cols, (a, b)) for a, b in zip(bounds, bounds[1:])]
    return out


def selection_budget(total_numel: int, sparsity: float, always_trained: int = 0) -> int:
    """Parameters the selected candidates may hold: n_s = (1 - s) * n trained per step (Algorithm 2), less
    the ``always_trained`` ones (embeddings="always"), which count against the same budget.

    Computed exactly from the decimal the user wrote: in floats (1 - 0.7) * 1000 is 300.00000000000006,
    whose ceiling would train one parameter (or one more block) too many.
    """
    return math.ceil((1 - Fraction(repr(float(sparsity)))) * total_numel) - always_trained


def root_mean_square(norms: Sequence[float], numels: Sequence[int]) -> list[float]:
    """||G|| / sqrt(numel) per block: the gradient's root mean square entry.

    Why: raw norms grow with a block's size and differ ~50x between tensor types (embeddings, value/output
    and MLP weights >> query/key >> norms), so ranking by them trains a few types nearly always and the rest
    almost never. Adam's step is about the same size per entry whatever the gradient's scale, so what a block
    gains per trained parameter follows its typical entry, not its total.
    """
    return [norm / math.sqrt(numel) if numel else 0.0 for norm, numel in zip(norms, numels)]


def should_reselect(losses: Sequence[float], patience: int) -> bool:
    """The patience rule (Algorithm 1): reselect once the loss history holds at least m values and
    the newest loss is >= the mean of the last m (the newest included)."""
    if len(losses) < patience:
        return False
    window = losses[-patience:]
    return losses[-1] >= sum(window) / patience


def rank_by_score(norms: Sequence[float], visits: Sequence[int], use_visits: bool = True) -> list[int]:
    """Block indices in descending score order.

    The paper's score is ||G_l|| / f_l with f_l = visits_l / T. T is shared by all blocks, so the
    order is that of ||G_l|| / visits_l; a block never visited has f_l = 0, an infinite score, and
    goes first (larger norm first among those). With ``use_visits=False`` the score is ||G_l||
    alone (the paper's Appendix E.5 ablation).
    """

    def key(i: int) -> tuple[int, float]:
        if not use_visits:
            return (0, -norms[i])
        if visits[i] == 0:
            return (0, -norms[i])
        return (1, -norms[i] / visits[i])

    return sorted(range(len(norms)), key=key)


def random_order(count: int, rng: random.Random) -> list[int]:
    """Uniformly shuffled block order (the paper's random-selection ablation, Appendix E.5)."""
    order = list(range(count))
    rng.shuffle(order)
    return order


def greedy_select(order: Sequence[int], numels: Sequence[int], budget: int, reach: bool = False) -> list[int]:
    """Take blocks in ``order`` that fit in what is left of ``budget`` (Algorithm 2's greedy pass), so that
    sparsity s trains at most (1 - s) n parameters; a block that does not fit is passed over for smaller
    ones further down the order. When the first block in the order is larger than the whole budget, it is
    taken alone, so that no block is untrainable.

    ``reach=True`` is the paper's literal pass, used by the masked variant, which trims the overshoot to the
    exact budget: blocks in order until their sum reaches the budget, the last one overshooting it. Whole
    blocks cannot be trimmed, and with decoder layers or embeddings as blocks (an embedding is 28% of
    LLaMA-60M) that overshoot trained 0.67 of the parameters at s=0.5: hence the default.
    """
    chosen: list[int] = []
    left = budget
    for i in order:
        if left <= 0:
            break
        if reach or numels[i] <= left or not chosen:  # nothing chosen yet: an oversize top block alone
            chosen.append(i)
            left -= numels[i]
    return sorted(chosen)


def top_magnitude_mask(values: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Boolean mask of the ``keep_fraction`` largest-magnitude entries (the masked variant, §2).

    The threshold tau is the (1 - keep_fraction) quantile of |values|; ties at tau are kept, except
    at tau = 0 (most entries have no gradient, e.g. embedding rows of tokens absent from the batch):
    keeping every zero would keep the whole tensor, so exactly the requested count is kept then.
    """
    if keep_fraction >= 1.0:
        return torch.ones_like(values, dtype=torch.bool)
    magnitudes = values.detach().abs().flatten().float()
    keep = max(1, round(keep_fraction * magnitudes.numel()))
    threshold = magnitudes.kthvalue(magnitudes.numel() - keep + 1).values
    if threshold > 0:
        return values.detach().abs() >= threshold
    mask = torch.zeros(magnitudes.numel(), dtype=torch.bool, device=values.device)
    mask[magnitudes.topk(keep).indices] = True
    return mask.view(values.shape)


@dataclass
class SelectionState:
    """Everything the selection decisions depend on; saved in checkpoints so resumes are exact."""

    selected: list[int] = field(default_factory=list)  # block indices being trained
    visits: list[int] = field(default_factory=list)  # steps each block was trained
    losses: list[float] = field(default_factory=list)  # loss history H since the last reselection
    step: int = 0
    scoring: bool = False  # the coming backward measures every candidate's gradient norm
    reselections: int = 0
    rng_state: tuple | None = None  # random.Random state for the random-selection ablation
    since: list[int] = field(default_factory=list)  # per block: the step it was last selected at (-1: never)
