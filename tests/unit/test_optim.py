"""Behaviour tests of the BlockLLM optimizer on a tiny LLaMA (CPU, fp32, fixed seeds).

The loss that drives the patience rule is often *crafted* here (``record_loss`` of chosen numbers
after backward of the real loss) so that reselection steps are known in advance.
"""

from __future__ import annotations

import copy
import math
import random
import warnings

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import LlamaConfig, LlamaForCausalLM

from blockllm_scale import BlockLLM
from blockllm_scale import selection as sel

VOCAB = 128


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # A tiny model gains nothing from intra-op threads, and on a busy 2-core machine OpenMP waits
    # make each step 10-50x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----- helpers ----------------------------------------------------------------------------------
def tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        tie_word_embeddings=False, attention_dropout=0.0,
    )
    return LlamaForCausalLM(config).float()


def batch(step: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(10_000 * seed + step)
    return torch.randint(0, VOCAB, (4, 16), generator=generator)


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def warmup_cosine(step: int, warmup: int = 5, total: int = 20) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def clones(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def trained_names(opt: BlockLLM) -> set[str]:
    return {n for n, _ in opt.trained_named_parameters()}


def independent_state_numel(opt: BlockLLM) -> int:
    if opt._inner is None:
        return 0
    return sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in opt._inner.state.values())


def selected_numel(opt: BlockLLM) -> int:
    return sum(opt.blocks[b].numel for b in opt.selection.selected)


def expected_greedy(opt: BlockLLM, param_norms, visits, use_visits=True) -> list[int]:
    """The paper's rule, re-implemented independently of selection.py: candidates sorted by
    ||G_l|| / f_l (never-visited first), taken until their sizes reach (1 - s) n."""
    candidates = list(opt._candidates)
    norms = {b: math.sqrt(sum(param_norms[i] ** 2 for i in opt.blocks[b].members)) for b in candidates}

    def score(b):
        if not use_visits or visits[b] == 0:
            return (0, -norms[b])
        return (1, -norms[b] / visits[b])

    ranked = sorted(candidates, key=score)
    chosen, left = [], opt.budget
    for b in ranked:  # blocks that fit in what is left, in rank order (the first alone may overshoot)
        if opt.blocks[b].numel <= left or not chosen:
            chosen.append(b)
            left -= opt.blocks[b].numel
    return chosen


def spy_on_selection(opt: BlockLLM) -> list[tuple[list[float], list[int], list[int]]]:
    """Record (norms, visits, resulting selection) at each norm-based selection."""
    seen = []
    original = opt._select_from_norms

    def spy(param_norms):
        norms, visits = list(param_norms), list(opt.selection.visits)
        original(param_norms)
        seen.append((norms, visits, list(opt.selection.selected)))

    opt._select_from_norms = spy
    return seen


# ----- 1. sparsity = 0 is AdamW --------------------------------------------------------------------
@pytest.mark.parametrize("setup", ["default", "candidate", "groups"])
def test_sparsity_zero_equals_adamw(setup):
    model = tiny_llama()
    reference = copy.deepcopy(model)
    hyper = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    settings = dict(sparsity=0.0, embeddings="candidate" if setup == "candidate" else "always")
    if setup == "groups":
        def split(named):
            named = list(named)
            return [x for x in named if "norm" not in x[0]], [x for x in named if "norm" in x[0]]

        decay, no_decay = split(model.named_parameters())
        ref_decay, ref_no_decay = split(reference.named_parameters())
        assert no_decay and decay
        params = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        ref_params = [{"params": [p for _, p in ref_decay]},
                      {"params": [p for _, p in ref_no_decay], "weight_decay": 0.0}]
    else:
        params, ref_params = model.named_parameters(), reference.parameters()
    opt = BlockLLM(params, **hyper, **settings)
    ref_opt = torch.optim.AdamW(ref_params, **hyper)
    sched, ref_sched = LambdaLR(opt, warmup_cosine), LambdaLR(ref_opt, warmup_cosine)
    start = clones(model)

    for step in range(20):
        ids = batch(step)
        loss = lm_loss(model, ids)
        loss.backward()
        lm_loss(reference, ids).backward()
        opt.record_loss(loss)
        opt.step()
        ref_opt.step()
        sched.step()
        ref_sched.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        worst = max((p - q).abs().max().item()
                    for p, q in zip(model.parameters(), reference.parameters()))
        assert worst <= 1e-6, f"step {step}: max |param - AdamW param| = {worst}"
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref_opt.param_groups]

    moved = max((p.detach() - start[n]).abs().max().item() for n, p in model.named_parameters())
    assert moved > 1e-2, "the comparison is not vacuous: the parameters really moved"
    assert opt.selected_fraction == 1.0
    assert opt.selection.reselections == 0


def test_step_in_backward_with_sparsity_zero_equals_adamw():
    model = tiny_llama()
    reference = copy.deepcopy(model)
    hyper = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    opt = BlockLLM(model.named_parameters(), sparsity=0.0, embeddings="candidate", step_in_backward=True, **hyper)
    ref_opt = torch.optim.AdamW(reference.parameters(), **hyper)
    sched, ref_sched = LambdaLR(opt, warmup_cosine), LambdaLR(ref_opt, warmup_cosine)
    for step in range(8):
        ids = batch(step)
        lm_loss(model, ids).backward()  # steps every tensor inside backward
        assert all(p.grad is None for p in model.parameters()), "gradients are freed inside backward"
        lm_loss(reference, ids).backward()
        opt.step()
        ref_opt.step()
        sched.step()
        ref_sched.step()
        ref_opt.zero_grad()
        worst = max((p - q).abs().max().item() for p, q in zip(model.parameters(), reference.parameters()))
        assert worst <= 1e-6, f"step {step}: {worst}"
    assert opt.state_numel() == 2 * sum(p.numel() for p in model.parameters())


def test_step_in_backward_sparse_steps_touch_only_trained_blocks():
    model = tiny_llama()
    opt = BlockLLM(model.named_parameters(), lr=1e-3, weight_decay=0.01, sparsity=0.8,
                   embeddings="candidate", patience=2, step_in_backward=True)
    seen = spy_on_selection(opt)
    for step in range(7):
        trained = trained_names(opt)
        before = clones(model)
        reselections = opt.selection.reselections
        lm_loss(model, batch(step)).backward()
        opt.record_loss(1.0)
        opt.step()
        for name, p in model.named_parameters():
            assert p.grad is None
            assert torch.equal(p.detach(), before[name]) != (name in trained), (step, name)
        if opt.selection.reselections == reselections:  # no switch: every trained tensor has moments
            expected = 2 * sum(p.numel() for n, p in model.named_parameters() if n in trained)
            assert opt.state_numel() == expected, step
    # Scoring steps saw the norms of the trained (already freed) tensors as well as the others.
    assert len(seen) >= 3 and all(all(n > 0 for n in norms) for norms, _, _ in seen)


# ----- 2. sparse steps ----------------------------------------------------------------------------
def test_sparse_steps_touch_only_trained_blocks_and_keep_state_small():
    model = tiny_llama()
    reference = tiny_llama()  # full-gradient twin for checking the scoring norms
    opt = BlockLLM(model.named_parameters(), lr=1e-3, weight_decay=0.01, sparsity=0.8,
                   embeddings="candidate", patience=3)
    params = dict(model.named_parameters())
    seen = spy_on_selection(opt)

    # Step 0: a scoring step that trains nothing.
    assert opt.selection.scoring and opt.selection.selected == [] and trained_names(opt) == set()
    assert opt.state_numel() == 0 and opt.selection.reselections == 0
    assert all(p.requires_grad for p in model.parameters()), "every candidate is measured at step 0"

    total = sum(p.numel() for p in model.parameters())
    assert opt.budget == -(-total * 2 // 10)  # ceil(0.2 n) in integers
    switches = 0
    scoring_steps = []
    for step in range(12):
        scoring = opt.selection.scoring
        trained = trained_names(opt)
        ids = batch(step)
        if scoring:
            scoring_steps.append(step)
            reference.load_state_dict(model.state_dict())
            reference.zero_grad()
            lm_loss(reference, ids).backward()
            true_norms = [dict(reference.named_parameters())[n].grad.norm().item() for n in opt._names]

        loss = lm_loss(model, ids)
        loss.backward()
        opt.record_loss(1.0)  # crafted constant loss: with m = 3 the rule fires every third step
        for name, p in params.items():
            if name in trained:
                assert p.requires_grad and p.grad is not None, (step, name)
            elif scoring:  # measured, then its gradient freed at once by the scoring hook
                assert p.requires_grad and p.grad is None, (step, name)
            else:
                assert not p.requires_grad and p.grad is None, (step, name)

        before = clones(model)
        old_inner, old_selected = opt._inner, list(opt.selection.selected)
        reselections = opt.selection.reselections
        opt.step()
        opt.zero_grad()

        for name, p in params.items():
            if name in trained:
                assert not torch.equal(p.detach(), before[name]), f"step {step}: trained {name} did not move"
            else:
                assert torch.equal(p.detach(), before[name]), f"step {step}: frozen {name} changed"

        trained_after = [p for n, p in params.items() if n in trained_names(opt)]
        state_keys = set(opt._inner.state) if opt._inner is not None else set()
        if opt.selection.reselections == reselections:  # no switch in this step
            assert opt.selection.selected == old_selected
            expected = 2 * sum(params[n].numel() for n in trained)
            assert opt.state_numel() == expected
            assert independent_state_numel(opt) == expected
            assert state_keys == {params[n] for n in trained}
        else:  # switched: moments kept for blocks that stay, dropped for blocks that leave
            switches += 1
            stay = [params[n] for n in trained if n in trained_names(opt)]
            assert state_keys == set(stay)
            for p in stay:
                assert opt._inner.state[p]["exp_avg"] is old_inner.state[p]["exp_avg"]
            assert opt.state_numel() == independent_state_numel(opt) == 2 * sum(p.numel() for p in stay)
            # Newly selected tensors are trainable again, the rest frozen with no gradient.
            for p in model.parameters():
                assert p.requires_grad == any(p is q for q in trained_after)
                assert p.requires_grad or p.grad is None

            # The selection used the norms measured on this scoring step, by the paper's rule.
            norms, visits, chosen = seen[-1]
            assert scoring
            assert norms == pytest.approx(true_norms, rel=1e-5, abs=1e-9)
            assert sorted(chosen) == sorted(expected_greedy(opt, norms, visits))
            chosen_numel = sum(opt.blocks[b].numel for b in chosen)
            assert opt.budget == sel.selection_budget(total, 0.8)
            # Within the budget, and full up to the smallest block left out.
            assert chosen_numel <= opt.budget or len(chosen) == 1
            left_out = [opt.blocks[b].numel for b in opt._candidates if b not in chosen]
            assert not left_out or chosen_numel + min(left_out) > opt.budget

        if step == 0:
            assert all(torch.equal(p.detach(), before[n]) for n, p in params.items()), "step 0 updates nothing"
            assert opt.selection.selected and opt.selection.reselections == 1 and not opt.selection.scoring

    assert scoring_steps == [0, 4, 7, 10]  # H starts empty after step 0, then m = 3 losses per window
    assert switches == 4 and len(seen) == 4


def test_step0_with_embeddings_always_trains_only_the_embeddings():
    # embeddings="always" trains embeddings/lm_head from step 0 on, within the budget (28% of this model,
    # so sparsity 0.6 leaves 12% for the rest); the scoring step 0 moves nothing else.
    model = tiny_llama()
    opt = BlockLLM(model.named_parameters(), lr=1e-3, sparsity=0.6, patience=3, embeddings="always")
    total = sum(p.numel() for p in model.parameters())
    always = sum(p.numel() for n, p in model.named_parameters() if sel.is_embedding(n))
    assert opt.budget == sel.selection_budget(total, 0.6) - always
    before = clones(model)
    lm_loss(model, batch(0)).backward()
    opt.record_loss(1.0)
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == {"model.embed_tokens.weight", "lm_head.weight"}
    assert opt.selection.selected and not any(sel.is_embedding(opt.blocks[b].name) for b in opt.selection.selected)


def test_moments_survive_for_blocks_that_stay_selected():
    # strategy="norm" (no visit penalty) tends to keep the same high-norm blocks.
    model = tiny_llama()
    opt = BlockLLM(model.named_parameters(), lr=1e-3, sparsity=0.7, embeddings="always", patience=2,
                   strategy="norm")
    kept = 0
    for step in range(10):
        lm_loss(model, batch(step)).backward()
        opt.record_loss(1.0)
        old_inner, old_trained = opt._inner, {p for _, p in opt.trained_named_parameters()}
        steps_before = {p: int(s["step"]) for p, s in old_inner.state.items()} if old_inner else {}
        reselections = opt.selection.reselections
        opt.step()
        opt.zero_grad()
        if opt.selection.reselections != reselections:
            now = {p for _, p in opt.trained_named_parameters()}
            for p in now & old_trained:
                assert opt._inner.state[p]["step"] == steps_before.get(p, 0) + 1
                kept += 1
            for p in old_trained - now:
                assert p not in opt._inner.state
    assert kept > 0, "no block stayed selected across a switch: the test did not exercise anything"


# ----- 4. patience rule and the random strategy --------------------------------------------------
def test_patience_rule_through_the_optimizer():
    model = tiny_llama()
    opt = BlockLLM(model.named_parameters(), sparsity=0.8, embeddings="candidate", patience=3)
    # step: crafted loss, then the expected history H and whether the rule fires at this step.
    plan = [
        (10.0, [], False),               # step 0: the scoring step; the paper resets H at t = 0
        (9.0, [9.0], False),             # fewer than m values
        (8.0, [9.0, 8.0], False),
        (7.5, [9.0, 8.0, 7.5], False),   # 7.5 < mean(9, 8, 7.5)
        (9.0, [], True),                 # 9 >= mean(8, 7.5, 9) = 8.17: fires, H reset
        (6.0, [6.0], False),             # scoring step of the reselection
        (20.0, [6.0, 20.0], False),      # a big rise, but only 2 values since the reset
        (1.0, [6.0, 20.0, 1.0], False),  # 1 < 9
        (7.0, [6.0, 20.0, 1.0, 7.0], False),  # 7 < mean(20, 1, 7)
        (7.0, [], True),                 # 7 >= mean(1, 7, 7) = 5
        (3.0, [3.0], False),
        (3.0, [3.0, 3.0], False),
        (3.0, [], True),                 # equal to the mean fires
        (3.0, [3.0], False),
    ]
    expected_reselections = 0
    for step, (loss_value, history, fires) in enumerate(plan):
        was_scoring = opt.selection.scoring
        previous = list(opt.selection.losses)
        loss = lm_loss(model, batch(step))
        loss.backward()
        opt.record_loss(loss_value)
        opt.step()
        opt.zero_grad()
        expected_reselections += was_scoring
        assert opt.selection.losses == history, step
        assert opt.selection.scoring == fires, step
        assert opt.scorer.active == fires, step
        assert opt.selection.reselections == expected_reselections, step
        if not was_scoring and step > 0:  # the optimizer applies the pure rule to H with this step's loss appended
            assert fires == sel.should_reselect(previous + [loss_value], 3), step
    assert expected_reselections == 4


def test_random_strategy_needs_no_scoring_step_and_is_seeded():
    def run(seed: int) -> list[list[int]]:
        model = tiny_llama()
        torch_state, py_state = torch.get_rng_state(), random.getstate()
        opt = BlockLLM(model.named_parameters(), lr=1e-3, sparsity=0.8, embeddings="candidate",
                       patience=2, strategy="random", seed=seed)
        assert not opt.selection.scoring and not opt.scorer.active and opt.selection.selected
        history = [list(opt.selection.selected)]
        for step in range(7):
            trained = trained_names(opt)
            # Within the budget, or one block larger than the whole budget, alone (greedy_select).
            assert sum(opt.blocks[b].numel for b in opt.selection.selected) <= opt.budget or len(opt.selection.selected) == 1
            lm_loss(model, batch(step)).backward()
            opt.record_loss(1.0)  # m = 2, constant loss, H empty after step 0: fires at steps 2, 4, 6
            before = clones(model)
            opt.step()
            opt.zero_grad()
            assert not opt.selection.scoring and not opt.scorer.active
            changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
            assert changed == trained, f"step {step}: the random strategy trains from step 0"
            history.append(list(opt.selection.selected))
        assert opt.selection.reselections == 3
        assert torch.equal(torch.get_rng_state(), torch_state), "the global torch RNG was touched"
        assert random.getstate() == py_state, "the global random RNG was touched"
        return history

    first, again, other = run(3), run(3), run(4)
    assert first == again
    assert first != other
    assert len({tuple(s) for s in first}) > 1, "the selection changes at reselections"


# ----- 5. masked variant --------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["norm_over_visits", "random"])
def test_masked_variant_trains_the_budget_and_masks_persist(strategy):
    model = tiny_llama()
    opt = BlockLLM(model.named_parameters(), lr=1e-3, weight_decay=0.1, sparsity=0.8,
                   embeddings="candidate", patience=2, variant="masked", strategy=strategy, seed=1,
                   granularity="parameter")
    params = dict(model.named_parameters())
    used_masks: list[dict[str, torch.Tensor]] = []
    masked_step = opt._update_trained_blocks

    def spy():  # the masks in force during the update (a switch at the end of step() drops some)
        masked_step()
        used_masks.append({opt._names[i]: m for i, m in opt._masks.items()})

    opt._update_trained_blocks = spy
    previous_masks: dict[str, torch.Tensor] = {}
    partial_overlaps = short_steps = on_budget_steps = 0
    drawn_for: set[int] = set()  # the selection whose new masks are in `drawn`
    drawn: set[str] = set()
    for step in range(12):
        old_selected = set(opt.selection.selected)
        opt_selected_in_step = list(opt.selection.selected)
        ids = batch(step)
        lm_loss(model, ids).backward()
        opt.record_loss(1.0)
        grads = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
        before = clones(model)
        trained = trained_names(opt)
        used_masks.clear()
        opt.step()
        masks = used_masks[0] if used_masks else {}
        if not trained:
            assert not masks
        else:
            assert set(masks) == trained
            changed = {n: p.detach() != before[n] for n, p in params.items()}
            for name, mask in masks.items():
                # Only masked entries move, and (weight decay > 0) every masked entry moves.
                assert torch.equal(changed[name], mask), (step, name)
                if name in previous_masks:
                    assert torch.equal(mask, previous_masks[name]), f"mask of {name} changed while selected"
                else:  # a fresh mask holds the largest |gradient| entries of its first gradient
                    g = grads[name].abs()
                    if (~mask).any():
                        assert g[mask].min() >= g[~mask].max()
            assert not any(changed[n].any() for n in params if n not in trained)
            n_changed = sum(int(c.sum()) for c in changed.values())
            assert n_changed == sum(int(m.sum()) for m in masks.values())
            # The budget, up to per-tensor rounding of the kept count (one entry per masked tensor).
            # Only exception: kept masks of blocks that stay selected were trimmed for an earlier
            # selection, and the new blocks are too small to make up the rest; then they are whole.
            assert n_changed <= opt.budget + len(masks), (step, n_changed, opt.budget)
            if set(opt_selected_in_step) != drawn_for:  # a new selection trains from this step
                drawn_for, drawn = set(opt_selected_in_step), set()
            drawn |= {n for n in masks if n not in previous_masks}
            if n_changed < opt.budget - len(masks):
                assert drawn and all(bool(masks[n].all()) for n in drawn), (step, n_changed, opt.budget)
                short_steps += 1
            else:
                on_budget_steps += 1
        opt.zero_grad()
        if old_selected and set(opt.selection.selected) != old_selected and old_selected & set(opt.selection.selected):
            partial_overlaps += 1
        previous_masks = {n: m.clone() for n, m in masks.items()}
        for name in list(previous_masks):  # masks are dropped when their block leaves
            if name not in trained_names(opt):
                del previous_masks[name]
                assert name not in {opt._names[i] for i in opt._masks}
    assert on_budget_steps >= 6
    if strategy == "random":
        assert partial_overlaps > 0, "no reselection kept part of the selection: retained masks untested"


# ----- 6. checkpoints -------------------------------------------------------------------------------
CHECKPOINT_CASES = {
    "fp32": dict(),
    "masked": dict(variant="masked"),
    "random": dict(strategy="random", seed=5),
    "layer": dict(granularity="layer", sparsity=0.5),
    "bnb_8bit": dict(states="bnb_8bit"),
    "step_in_backward": dict(step_in_backward=True),
}


def _make(case: str, model_seed: int):
    settings = dict(sparsity=0.8, embeddings="candidate", patience=2)
    settings.update(CHECKPOINT_CASES[case])
    model = tiny_llama(model_seed, hidden=64 if case == "bnb_8bit" else 32)
    opt = BlockLLM(model.named_parameters(), lr=2e-3, weight_decay=0.05, **settings)
    sched = LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
    return model, opt, sched


def _train(model, opt, sched, steps):
    losses, flags = [], []
    opt.dtypes_seen = set()
    for step in steps:
        loss = lm_loss(model, batch(step, seed=7))
        loss.backward()
        opt.record_loss(loss)  # the real loss: the rule fires whenever the loss does not fall
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        flags.append((opt.selection.scoring, opt.selection.reselections))
        opt.dtypes_seen |= opt.state_dtypes()
    return losses, flags


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_state_dict_round_trip_resumes_exactly(case, tmp_path):
    if case == "bnb_8bit":
        pytest.importorskip("bitsandbytes")
    total = 16
    model, opt, sched = _make(case, 0)
    full_losses, flags = _train(model, opt, sched, range(total))
    full_params = clones(model)
    if case == "bnb_8bit":
        # bitsandbytes keeps fp32 moments for tensors under 4096 elements, 8-bit ones above.
        assert opt.dtypes_seen == {"torch.uint8", "torch.float32"}, opt.dtypes_seen
    else:
        assert opt.dtypes_seen == {"torch.float32"}
    # Resume from a point after a reselection, once with a scoring step pending if there is one.
    after_reselection = [k + 1 for k in range(total - 2) if flags[k][1] >= 2]
    pending = [k for k in after_reselection if flags[k - 1][0]]
    idle = [k for k in after_reselection if not flags[k - 1][0]]
    assert after_reselection, f"no reselection within {total} steps: {flags}"
    points = sorted({pending[0] if pending else idle[0], idle[0] if idle else pending[-1]})
    if case != "random":
        assert pending, "no checkpoint with a scoring step pending was exercised"

    for k in points:
        model, opt, sched = _make(case, 0)
        first, _ = _train(model, opt, sched, range(k))
        assert first == full_losses[:k]
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()},
                   tmp_path / f"ckpt{k}.pt")
        del model, opt, sched

        model, opt, sched = _make(case, 123)  # different initial weights: the load must matter
        saved = torch.load(tmp_path / f"ckpt{k}.pt")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        rest, _ = _train(model, opt, sched, range(k, total))
        assert rest == full_losses[k:], f"resumed at {k}: losses differ"
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), full_params[name]), f"resumed at {k}: {name} differs"


def test_load_rejects_a_checkpoint_of_other_parameters():
    model = tiny_llama()
    opt = BlockLLM(model.named_parameters(), sparsity=0.8)
    state = opt.state_dict()
    other = BlockLLM(list(model.named_parameters())[1:], sparsity=0.8)
    with pytest.raises(ValueError, match="different parameters"):
        other.load_state_dict(state)


def test_bnb_8bit_states_are_8bit_for_big_tensors():
    pytest.importorskip("bitsandbytes")
    model = tiny_llama(hidden=64)
    opt = BlockLLM(model.named_parameters(), sparsity=0.0, states="bnb_8bit")
    lm_loss(model, batch(0)).backward()
    opt.step()
    big = [s for p, s in opt._inner.state.items() if p.numel() >= 4096]
    assert big and all(s["state1"].dtype == torch.uint8 and s["state2"].dtype == torch.uint8 for s in big)
    assert "torch.uint8" in opt.state_dtypes()


def test_bnb_8bit_states_step_as_bitsandbytes_without_waiting_for_the_device(monkeypatch):
    # Our AdamW8bit drops bitsandbytes' per-tensor device synchronisation and nothing else.
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.optim import optimizer as bnb_optimizer

    from blockllm_scale.states import build_adam

    waits = []
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: waits.append(t))
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 128), (300,), (96, 64)]  # 8-bit moments from 4096 elements on, fp32 below
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    hyper = dict(lr=1e-2, weight_decay=0.1)
    opt_ours = build_adam("bnb_8bit", [{"params": ours, **hyper}])
    opt_theirs = bnb.optim.AdamW8bit([{"params": theirs, **hyper}])
    for _ in range(4):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for a, b, g in zip(ours, theirs, grads):
            a.grad, b.grad = g.clone(), g.clone()
        opt_theirs.step()
        assert len(waits) == len(shapes), "the reference is no longer bitsandbytes' waiting step"
        waits.clear()
        opt_ours.step()
        assert not waits
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    assert {s["state1"].dtype for s in opt_ours.state.values()} == {torch.uint8, torch.float32}


def test_state_accounting_ignores_step_counters():
    # AdamW keeps a scalar "step" tensor per parameter; it is no moment and must not be counted.
    model = tiny_llama()
    opt = BlockLLM(model.named_parameters(), sparsity=0.0, embeddings="candidate")
    lm_loss(model, batch(0)).backward()
    opt.step()
    numel = sum(p.numel() for p in model.parameters())
    assert opt.state_numel() == independent_state_numel(opt) == 2 * numel
    assert opt.state_dtypes() == {"torch.float32"}


def test_state_accounting_of_torchao_8bit_states():
    subclass = pytest.importorskip("torchao.optim.subclass_8bit")
    from blockllm_scale.states import state_dtypes, state_numel

    moment = subclass.OptimState8bit.zeros((64, 128))

    class Holder:  # a stand-in for a torchao AdamW8bit after a step (compiling one takes ~40 s)
        state = {0: {"step": torch.tensor(3.0), "exp_avg": moment, "exp_avg_sq": moment}}

    assert state_numel(Holder()) == 2 * 64 * 128
    assert state_dtypes(Holder()) == {"torch.uint8"}


# ----- 8. missing loss warning --------------------------------------------------------------------
def _steps_with_warnings(opt, model, record: bool, steps: int = 4):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            loss = lm_loss(model, batch(step))
            loss.backward()
            if record:
                opt.record_loss(loss)
            opt.step()
            opt.zero_grad()
    return [w for w in caught if "record_loss" in str(w.message)]


def test_warns_once_when_no_loss_is_recorded():
    model = tiny_llama()
    opt = BlockLLM(model.named_parameters(), sparsity=0.8)
    found = _steps_with_warnings(opt, model, record=False)
    assert len(found) == 1
    assert issubclass(found[0].category, UserWarning)


@pytest.mark.parametrize("sparsity, record", [(0.8, True), (0.0, False)])
def test_no_warning_with_a_loss_or_when_training_everything(sparsity, record):
    model = tiny_llama()
    opt = BlockLLM(model.named_parameters(), sparsity=sparsity)
    assert _steps_with_warnings(opt, model, record=record) == []


def test_closure_records_the_loss():
    model = tiny_llama()
    opt = BlockLLM(model.named_parameters(), sparsity=0.8, patience=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(3):
            def closure():
                opt.zero_grad()
                loss = lm_loss(model, batch(step))
                loss.backward()
                return loss

            returned = opt.step(closure)
            if step > 0:  # step 0's loss starts no history (Algorithm 1 resets H at t = 0)
                assert opt.selection.losses[-1] == returned.item()
    assert len(opt.selection.losses) == 2


# ----- 9. LR schedulers reach the inner AdamW --------------------------------------------------
def test_scheduler_lr_reaches_the_inner_adamw():
    model = tiny_llama()
    base = 1e-2
    groups = [{"params": [x for x in model.named_parameters() if "norm" not in x[0]]},
              {"params": [x for x in model.named_parameters() if "norm" in x[0]], "lr": 2 * base}]
    opt = BlockLLM(groups, lr=base, weight_decay=0.0, sparsity=0.7, embeddings="candidate", patience=2)
    factors = [1.0, 0.3, 0.6, 0.15, 0.9, 0.45, 0.25, 0.7]
    sched = LambdaLR(opt, lambda s: factors[s])
    fresh_checks = 0
    for step in range(len(factors) - 1):
        lr_now = [g["lr"] for g in opt.param_groups]
        assert lr_now == pytest.approx([base * factors[step], 2 * base * factors[step]])
        lm_loss(model, batch(step)).backward()
        opt.record_loss(1.0)
        inner = opt._inner
        fresh = [p for g in inner.param_groups for p in g["params"] if p not in inner.state] if inner else []
        group_of = {p: j for j, g in enumerate(opt.param_groups) for p in g["params"]}
        before = {p: p.detach().clone() for p in fresh}
        opt.step()
        if inner is not None:
            assert inner.param_groups, step
            for g in inner.param_groups:
                source = group_of[g["params"][0]]
                assert g["lr"] == lr_now[source], step
        # Adam's first update of a parameter is lr * g / (|g| + eps): its largest entry is the lr.
        for p in fresh:
            largest = (p.detach() - before[p]).abs().max().item()
            assert largest == pytest.approx(lr_now[group_of[p]], rel=1e-3), step
            fresh_checks += 1
        sched.step()
        opt.zero_grad()
    assert fresh_checks >= 3


def test_embeddings_never_are_neither_scored_nor_trained():
    # Regression: the scorer measures only candidates, and its norms must map back to the right
    # tensors when some tensors (never-trained embeddings) are not scored at all.
    model = tiny_llama()
    opt = BlockLLM(model.named_parameters(), sparsity=0.5, patience=1, embeddings="never")
    embeddings = {n: p.detach().clone() for n, p in model.named_parameters() if sel.is_embedding(n)}
    for step in range(6):
        loss = lm_loss(model, batch(step))
        loss.backward()
        opt.record_loss(loss)
        opt.step()
        opt.zero_grad()
    assert opt.selection.reselections >= 2
    chosen = {opt.blocks[b].name for b in opt.selection.selected}
    assert chosen and not any(sel.is_embedding(name) for name in chosen)
    assert all(torch.equal(p.detach(), embeddings[n]) for n, p in model.named_parameters() if n in embeddings)


def test_scoring_step_property_says_when_the_next_backward_scores():
    model = tiny_llama()
    opt = BlockLLM(model.named_parameters(), lr=1e-3, sparsity=0.5, patience=2, embeddings="candidate")
    assert opt.scoring_step  # step 0 measures every gradient norm
    # Crafted losses: H starts empty after step 0; 5.0 then 6.0 >= their mean fires the rule at step 2.
    for step, (loss_value, scoring_after) in enumerate([(10.0, False), (5.0, False), (6.0, True), (6.0, False)]):
        lm_loss(model, batch(step)).backward()
        opt.record_loss(loss_value)
        opt.step()
        opt.zero_grad()
        assert opt.scoring_step == scoring_after == opt.selection.scoring, step
    with pytest.raises(AttributeError):
        opt.scoring_step = True  # read-only


def test_step_loss_is_the_mean_of_the_micro_batch_losses_tensors_and_numbers_alike():
    # Tensors are read at step() (one device sync per step); the mean is taken in float64 either way.
    model = tiny_llama()
    opt = BlockLLM(model.named_parameters(), lr=1e-3, sparsity=0.5, patience=50)
    for step, micro in enumerate([[1.0], [torch.tensor(2.0), 4.0, torch.tensor([6.0], dtype=torch.bfloat16)]]):
        lm_loss(model, batch(step)).backward()
        for loss in micro:
            opt.record_loss(loss)
        opt.step()
        opt.zero_grad()
    assert opt.selection.losses == [4.0]  # step 0's loss is not kept (H starts empty)


def test_scoring_norm_accumulates_in_fp32_without_an_fp32_copy():
    """The scorer's squared norm of a bf16 gradient is accurate to fp32 accumulation, and no fp32 tensor
    larger than the result is made (an fp32 copy would add 4-8 bytes per element: 1 GiB at 7B)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from blockllm_scale.scoring import square_sum

    class LargestFloat32(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if torch.is_tensor(t) and t.dtype == torch.float32:
                    self.largest = max(self.largest, t.numel())
            return out

    grad = torch.randn(1000, 37, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    exact = grad.double().pow(2).sum().item()
    with LargestFloat32() as spy:
        squared = square_sum(grad)
    assert spy.largest == 1
    assert squared.dtype == torch.float32 and squared.item() == pytest.approx(exact, rel=1e-5)
    # fp64 gradients keep their precision.
    assert square_sum(grad.double()).dtype == torch.float64


def test_optimizer_state_holds_the_trained_blocks_moments():
    # optimizer.state[p] is where torch tools look: at sparsity 0 it equals torch AdamW's own state; when
    # sparse, it holds exactly the trained parameters, whose moments are the live ones the update uses.
    model = tiny_llama()
    reference = copy.deepcopy(model)
    opt = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.0)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    assert not opt.state
    for step in range(3):
        for m, o in ((model, opt), (reference, ref_opt)):
            loss = lm_loss(m, batch(step))
            loss.backward()
            if o is opt:
                o.record_loss(loss)
            o.step()
            o.zero_grad()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert set(opt.state[p]) == set(ref_opt.state[q])
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], ref_opt.state[q][key])

    sparse = tiny_llama()
    opt = BlockLLM(sparse.named_parameters(), lr=1e-2, sparsity=0.7, patience=1, granularity="parameter")
    for step in range(6):
        loss = lm_loss(sparse, batch(step))
        loss.backward()
        opt.record_loss(loss)
        opt.step()
        trained = dict(opt.trained_named_parameters())
        assert set(opt.state) <= set(trained.values())
        if not opt.scoring_step and step > 1:
            stepped = [p for p in trained.values() if opt.state.get(p)]
            assert stepped, "a sparse step leaves the trained blocks' moments in optimizer.state"
            assert all(opt.state[p] is opt._inner.state[p] for p in stepped)  # the live dicts, not copies
        opt.zero_grad()
