"""Property tests of BlockLLM's pure selection rules (``blockllm_scale/selection.py``).

Plain numbers, many random instances drawn from fixed seeds (no extra test dependencies).
"""

from __future__ import annotations

import ast
import math
import random
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from blockllm_scale import selection as sel

N_INSTANCES = 500


# ----- greedy_select ----------------------------------------------------------------------------
def test_greedy_select_fits_the_budget_in_rank_order():
    rng = random.Random(1234)
    for _ in range(N_INSTANCES):
        count = rng.randint(1, 12)
        numels = [rng.randint(1, 50) for _ in range(count)]
        order = list(range(count))
        rng.shuffle(order)
        total = sum(numels)
        budget = rng.randint(0, total + 20)  # sometimes above the total
        chosen = sel.greedy_select(order, numels, budget)

        assert chosen == sorted(chosen), "greedy_select returns block indices in ascending order"
        assert len(set(chosen)) == len(chosen)
        chosen_numel = sum(numels[i] for i in chosen)
        alone = len(chosen) == 1 and numels[chosen[0]] > budget
        # Never more than the budget, except the top-ranked block alone when it is larger than the budget.
        assert chosen_numel <= budget or (alone and chosen[0] == order[0] and budget > 0)
        if budget >= total:
            assert chosen == sorted(order), "a budget above the total takes every block"
        if budget == 0:
            assert chosen == []
        # Greedy by rank: every passed-over block was too big for what was left when its turn came.
        left, taken = budget, set()
        for i in order:
            if i in chosen:
                taken.add(i)
                left -= numels[i]
            elif left > 0:
                assert numels[i] > left, "a block that fitted was passed over"
        # Nothing left unchosen would still fit (unless the top block alone overshot the budget).
        if not alone:
            assert all(numels[i] > budget - chosen_numel for i in range(count) if i not in chosen)


def test_greedy_select_reach_is_the_papers_pass():
    # The masked variant's pass: a prefix of the order whose sum reaches the budget, minimal.
    rng = random.Random(4321)
    for _ in range(N_INSTANCES):
        count = rng.randint(1, 12)
        numels = [rng.randint(1, 50) for _ in range(count)]
        order = rng.sample(range(count), count)
        budget = rng.randint(0, sum(numels) + 20)
        chosen = sel.greedy_select(order, numels, budget, reach=True)
        k = len(chosen)
        assert set(chosen) == set(order[:k])
        chosen_numel = sum(numels[i] for i in chosen)
        assert chosen_numel >= min(budget, sum(numels))
        assert not k or chosen_numel - numels[order[k - 1]] < budget


def test_greedy_select_examples():
    # order 2, 0, 1; block sizes 5, 3, 4 (block 2 has 4): budget 4 -> block 2 alone (4 fits exactly);
    # budget 5 -> block 2, then 0 (5) does not fit in 1, nor 1 (3): [2]; budget 7 -> 2 and 1 (4 + 3);
    # budget 9 -> 2 and 0; budget 12 -> all three; budget 3 -> block 2 is larger than the whole budget
    # and first in the order: taken alone, so that no block is untrainable.
    assert sel.greedy_select([2, 0, 1], [5, 3, 4], 4) == [2]
    assert sel.greedy_select([2, 0, 1], [5, 3, 4], 5) == [2]
    assert sel.greedy_select([2, 0, 1], [5, 3, 4], 7) == [1, 2]
    assert sel.greedy_select([2, 0, 1], [5, 3, 4], 9) == [0, 2]
    assert sel.greedy_select([2, 0, 1], [5, 3, 4], 12) == [0, 1, 2]
    assert sel.greedy_select([2, 0, 1], [5, 3, 4], 3) == [2]
    assert sel.greedy_select([2, 0, 1], [5, 3, 4], 0) == []


# ----- selection_budget -------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.5, 0.7, 0.75, 0.8, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("total", [1, 10, 100, 1000, 12345, 10**6, 7 * 10**9])
def test_selection_budget_is_ceil_of_one_minus_s_times_n(sparsity, total):
    # n_s = (1 - s) n, rounded up; computed exactly from the decimal the user wrote. (1 - 0.7) * 1000
    # in floats is 300.00000000000006, which must not become a budget of 301.
    exact = math.ceil((1 - Fraction(repr(sparsity))) * total)
    assert sel.selection_budget(total, sparsity) == exact
    # Always-trained parameters (embeddings="always") count against the same budget.
    assert sel.selection_budget(total, sparsity, always_trained=exact // 2) == exact - exact // 2


def test_root_mean_square_puts_blocks_of_any_size_on_one_scale():
    # A block 100x larger with the same per-entry gradient has a 10x larger norm but the same score.
    assert sel.root_mean_square([10.0, 1.0, 0.0], [100, 1, 0]) == [1.0, 1.0, 0.0]


# ----- rank_by_score ----------------------------------------------------------------------------
def _random_scores(rng: random.Random, count: int):
    norms = [rng.choice([0.0, rng.uniform(0, 10), float(rng.randint(0, 5))]) for _ in range(count)]
    visits = [rng.choice([0, 0, rng.randint(1, 30)]) for _ in range(count)]
    return norms, visits


def test_rank_by_score_unvisited_first_then_norm_over_visits():
    rng = random.Random(99)
    for _ in range(N_INSTANCES):
        count = rng.randint(1, 15)
        norms, visits = _random_scores(rng, count)
        order = sel.rank_by_score(norms, visits)
        assert sorted(order) == list(range(count)), "a permutation of the block indices"
        for a, b in zip(order, order[1:]):
            if visits[a] > 0:
                assert visits[b] > 0, "a never-visited block ranks behind a visited one"
            if visits[a] == 0 and visits[b] == 0:
                assert norms[a] >= norms[b], "never-visited blocks: larger norm first"
            if visits[a] > 0 and visits[b] > 0:
                assert norms[a] / visits[a] >= norms[b] / visits[b], "visited blocks: by ||G|| / visits"


def test_rank_by_score_without_visits_is_by_norm_alone():
    rng = random.Random(7)
    for _ in range(N_INSTANCES):
        count = rng.randint(1, 15)
        norms, visits = _random_scores(rng, count)
        order = sel.rank_by_score(norms, visits, use_visits=False)
        assert sorted(order) == list(range(count))
        assert [norms[i] for i in order] == sorted(norms, reverse=True)


def test_visit_frequency_changes_the_ranking():
    # Block 0: small norm, never visited. Block 1: large norm, visited 10 times.
    norms, visits = [1.0, 5.0], [0, 10]
    assert sel.rank_by_score(norms, visits) == [0, 1]
    assert sel.rank_by_score(norms, visits, use_visits=False) == [1, 0]
    # Both visited: 2/1 = 2 beats 3/3 = 1 although 3 > 2.
    norms, visits = [2.0, 3.0], [1, 3]
    assert sel.rank_by_score(norms, visits) == [0, 1]
    assert sel.rank_by_score(norms, visits, use_visits=False) == [1, 0]


def test_visit_frequency_effect_random_instances():
    # A never-visited block outranks every visited one, whatever the norms; with use_visits=False
    # the block with the larger norm goes first.
    rng = random.Random(5)
    for _ in range(N_INSTANCES):
        small, large = sorted(rng.uniform(0.01, 100) for _ in range(2))
        if small == large:
            continue
        visits = rng.randint(1, 1000)
        assert sel.rank_by_score([small, large], [0, visits]) == [0, 1]
        assert sel.rank_by_score([small, large], [0, visits], use_visits=False) == [1, 0]


# ----- should_reselect --------------------------------------------------------------------------
def _reference_rule(losses, m):
    """len(H) >= m and H[-1] >= mean(H[-m:]), in exact rational arithmetic."""
    if len(losses) < m:
        return False
    window = [Fraction(x) for x in losses[-m:]]
    return Fraction(losses[-1]) >= sum(window) / m


def test_should_reselect_matches_the_patience_rule():
    rng = random.Random(2024)
    fired = not_fired = 0
    for _ in range(3 * N_INSTANCES):
        m = rng.randint(1, 8)
        # Integer losses: float sums are exact, so exact ties with the mean do occur.
        losses = [float(rng.randint(0, 6)) for _ in range(rng.randint(0, 12))]
        expected = _reference_rule(losses, m)
        assert sel.should_reselect(losses, m) is expected, (losses, m)
        fired += expected
        not_fired += not expected
    assert fired > 50 and not_fired > 50  # both outcomes were exercised


def test_should_reselect_boundaries():
    # Fewer than m values never fires, however much the loss rises.
    for m in range(2, 7):
        for length in range(m):
            assert not sel.should_reselect([float(i) for i in range(length)], m)
            assert not sel.should_reselect([1.0] * length, m)
    # Equal to the mean fires (>=).
    assert sel.should_reselect([4.0, 6.0, 5.0], 3)  # mean 5
    assert sel.should_reselect([5.0, 5.0, 5.0], 3)
    assert not sel.should_reselect([4.0, 6.0, 4.5], 3)  # mean 4.833
    # Only the last m values count: old high losses do not mask a rising window.
    assert sel.should_reselect([100.0, 100.0, 1.0, 2.0], 2)
    assert not sel.should_reselect([0.0, 0.0, 3.0, 2.0], 2)
    # m = 1 fires on every value.
    assert sel.should_reselect([3.0], 1)


def test_should_reselect_equal_to_mean_random():
    rng = random.Random(11)
    for _ in range(N_INSTANCES):
        m = rng.randint(2, 9)
        others = [rng.randint(0, 50) for _ in range(m - 1)]
        others[0] += (-sum(others)) % (m - 1)  # make the sum divisible by m - 1
        last = sum(others) // (m - 1)  # then mean(others + [last]) == last exactly
        window = [float(x) for x in others] + [float(last)]
        assert sel.should_reselect(window, m)
        assert not sel.should_reselect(window[:-1] + [last - 0.5], m)


# ----- group_into_blocks ------------------------------------------------------------------------
LLAMA_NAMES = [
    "model.embed_tokens.weight",
    *[f"model.layers.{i}.{t}" for i in (0, 1, 10) for t in (
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight")],
    "model.norm.weight",
    "lm_head.weight",
]


def test_group_into_blocks_layer_granularity():
    numels = [i + 1 for i in range(len(LLAMA_NAMES))]
    blocks = sel.group_into_blocks(LLAMA_NAMES, numels, "layer")
    by_name = {b.name: b for b in blocks}
    assert [b.name for b in blocks] == [
        "model.embed_tokens.weight", "model.layers.0", "model.layers.1", "model.layers.10",
        "model.norm.weight", "lm_head.weight",
    ]
    for layer in ("0", "1", "10"):
        block = by_name[f"model.layers.{layer}"]
        assert [LLAMA_NAMES[i] for i in block.members] == [
            n for n in LLAMA_NAMES if n.startswith(f"model.layers.{layer}.")]
        assert block.numel == sum(numels[i] for i in block.members)
    for single in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert by_name[single].members == (LLAMA_NAMES.index(single),)
    # Every tensor is in exactly one block.
    assert sorted(i for b in blocks for i in b.members) == list(range(len(LLAMA_NAMES)))


def test_group_into_blocks_parameter_granularity():
    numels = [3] * len(LLAMA_NAMES)
    blocks = sel.group_into_blocks(LLAMA_NAMES, numels, "parameter")
    assert [b.name for b in blocks] == LLAMA_NAMES
    assert all(b.members == (i,) and b.numel == 3 for i, b in enumerate(blocks))


def test_is_embedding():
    assert sel.is_embedding("model.embed_tokens.weight")
    assert sel.is_embedding("lm_head.weight")
    assert sel.is_embedding("transformer.wte.weight")
    assert not sel.is_embedding("model.layers.0.mlp.up_proj.weight")
    assert not sel.is_embedding("model.norm.weight")


# ----- top_magnitude_mask -----------------------------------------------------------------------
def test_top_magnitude_mask_keeps_requested_fraction_without_ties():
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(3)
    for _ in range(200):
        shape = (rng.randint(1, 20), rng.randint(1, 20))
        values = torch.randn(shape, generator=gen)  # continuous: no ties
        fraction = rng.uniform(0.0, 0.99)
        mask = sel.top_magnitude_mask(values, fraction)
        assert mask.shape == values.shape and mask.dtype == torch.bool
        assert int(mask.sum()) == max(1, round(fraction * values.numel()))
        kept, dropped = values.abs()[mask], values.abs()[~mask]
        if dropped.numel():
            assert kept.min() > dropped.max(), "the kept entries are the largest in magnitude"


def test_top_magnitude_mask_with_ties():
    gen = torch.Generator().manual_seed(1)
    rng = random.Random(4)
    for _ in range(200):
        values = torch.randint(-3, 4, (rng.randint(1, 30),), generator=gen).float()
        fraction = rng.uniform(0.0, 0.99)
        keep = max(1, round(fraction * values.numel()))
        mask = sel.top_magnitude_mask(values, fraction)
        kept, dropped = values.abs()[mask], values.abs()[~mask]
        if dropped.numel() and kept.numel():
            assert kept.min() >= dropped.max()
        if kept.min() > 0:  # ties at a nonzero threshold are kept
            assert int(mask.sum()) >= keep
            assert int((values.abs() > kept.min()).sum()) < keep
        else:  # ties at zero are not all kept: that would train every zero-gradient entry
            assert int(mask.sum()) == keep


def test_top_magnitude_mask_mostly_zero_gradient_keeps_the_fraction():
    # Embedding gradient of a small batch: most rows are exactly zero. Keeping every entry tied at
    # |g| = 0 would make the mask the whole tensor.
    values = torch.zeros(128, 8)
    values[:10] = torch.randn(10, 8, generator=torch.Generator().manual_seed(2))
    mask = sel.top_magnitude_mask(values, 0.5)
    assert int(mask.sum()) == 512
    assert bool(mask[:10].all()), "the nonzero entries are the largest and are all kept"


def test_top_magnitude_mask_edges():
    values = torch.tensor([0.5, -2.0, 1.0, 0.1])
    assert sel.top_magnitude_mask(values, 1.0).all()
    assert sel.top_magnitude_mask(values, 0.0).tolist() == [False, True, False, False]  # at least one
    assert sel.top_magnitude_mask(values, 0.5).tolist() == [False, True, True, False]


# ----- the module stays pure --------------------------------------------------------------------
FORBIDDEN_IMPORTS = ("torch.distributed", "deepspeed", "transformers", "accelerate")


def _imported_modules(source: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" if base else alias.name for alias in node.names)
        elif isinstance(node, ast.Call) and (getattr(node.func, "id", None) == "__import__"
                                             or getattr(node.func, "attr", None) == "import_module"):
            found.update(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return found


def _is_forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN_IMPORTS)


def test_import_checker_detects_forbidden_imports():
    # The checker itself must be able to fail.
    for source in ("import torch.distributed as dist", "from torch import distributed",
                   "from deepspeed.runtime import zero", "import transformers",
                   "from accelerate import Accelerator", "importlib.import_module('deepspeed')"):
        assert any(_is_forbidden(m) for m in _imported_modules(source)), source
    assert not any(_is_forbidden(m) for m in _imported_modules("import torch\nimport random"))


def test_selection_module_imports_no_distributed_or_frameworks():
    source = Path(sel.__file__).read_text()
    modules = _imported_modules(source)
    assert "torch" in modules  # the parse found the imports at all
    assert not [m for m in modules if _is_forbidden(m)]


def test_lowest_trained_layer_is_how_deep_backward_goes():
    assert sel.layer_index("model.layers.12.mlp.up_proj.weight") == 12 and sel.layer_index("lm_head.weight") is None
    assert sel.lowest_trained_layer(["model.layers.7.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight",
                                     "lm_head.weight"]) == 3
    assert sel.lowest_trained_layer(["model.layers.7.mlp.up_proj.weight", "model.embed_tokens.weight"]) == -1
    assert sel.lowest_trained_layer(["lm_head.weight", "model.norm.weight"]) is None
