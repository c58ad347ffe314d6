"""Row ranges of a tensor larger than the whole budget (selection.split_oversize_tensors): LLaMA-60M's embeddings
are 28% of the parameters each, more than sparsity 0.9 trains in all. Split into ranges of rows, they are
trained within the budget, with Adam state for the trained rows only, exactly as AdamW would train those rows;
scores are per range; a resumed run equals the uninterrupted one; backends that step whole tensors get none."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

from blockllm_scale import BlockLLM
from blockllm_scale import selection as sel
from blockllm_scale.scoring import GradNormScorer


class TinyLM(nn.Module):
    """Embeddings and head much larger than the layers (as in LLaMA-60M), names a LLaMA's."""

    def __init__(self, vocab: int = 96, hidden: int = 8, layers: int = 3, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(vocab, hidden, dtype=dtype)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden, dtype=dtype) for _ in range(layers))
        self.lm_head = nn.Linear(hidden, vocab, bias=False, dtype=dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        logits = self.lm_head(x).float()
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def batch(step: int, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (4, 12), generator=torch.Generator().manual_seed(step))


def train(model: nn.Module, opt: BlockLLM, steps: range, record=None) -> list[float]:
    losses = []
    for step in steps:
        loss = model(batch(step))
        loss.backward()
        opt.record_loss(loss)
        if record is not None:
            record(opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# ----- the split itself ----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(30))
def test_row_ranges_cover_each_oversize_matrix_within_the_budget(seed):
    rng = random.Random(seed)
    shapes = [torch.Size((rng.randint(1, 300), rng.randint(1, 40))) if rng.random() < 0.7 else torch.Size((rng.randint(1, 500),))
              for _ in range(rng.randint(1, 8))]
    blocks = [sel.Block(f"t{i}", (i,), s.numel()) for i, s in enumerate(shapes)]
    if len(blocks) > 2:  # a multi-tensor block (a decoder layer) is never split
        blocks = [sel.Block("layer", (0, 1), shapes[0].numel() + shapes[1].numel())] + blocks[2:]
    candidates = {i for i in range(len(blocks)) if rng.random() < 0.8}
    budget = rng.randint(1, sum(b.numel for b in blocks))
    split = sel.split_oversize_tensors(blocks, shapes, budget, candidates)
    out = iter(split)
    for index, block in enumerate(blocks):
        shape = shapes[block.members[0]]
        if index not in candidates or block.numel <= budget or len(block.members) > 1 or len(shape) != 2 \
                or shape[1] > budget:
            assert next(out) == block  # untouched, in its place
            continue
        pieces = []
        while len(pieces) == 0 or pieces[-1].rows[1] < shape[0]:
            pieces.append(next(out))
        largest_fitting = max([b.numel for i, b in enumerate(blocks) if i in candidates and b.numel <= budget],
                              default=budget)
        limit = max(shape[1], min(int(budget * sel.RANGE_SHARE_OF_BUDGET), largest_fitting))
        assert all(p.numel <= limit for p in pieces)
        assert [p.rows[0] for p in pieces][0] == 0 and pieces[-1].rows[1] == shape[0]
        assert all(a.rows[1] == b.rows[0] for a, b in zip(pieces, pieces[1:]))  # contiguous, no overlap
        assert all(p.members == block.members and 0 < p.numel <= budget for p in pieces)
        assert all(p.numel == (p.rows[1] - p.rows[0]) * shape[1] for p in pieces)
        assert sum(p.numel for p in pieces) == block.numel
    assert next(out, None) is None


def test_no_split_when_every_block_fits_or_the_masked_variant_trims():
    model = TinyLM()
    assert not BlockLLM(model.named_parameters(), sparsity=0.5).splits_rows  # 768 < budget 1 042
    assert BlockLLM(model.named_parameters(), sparsity=0.9).splits_rows
    assert not BlockLLM(model.named_parameters(), sparsity=0.9, variant="masked").splits_rows


# ----- training with row ranges ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trained_rows_stay_within_the_budget_and_frozen_rows_do_not_move(dtype):
    model = TinyLM(dtype=dtype)
    opt = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.9, patience=2)
    assert opt.splits_rows
    trained_rows = set()

    def check(o: BlockLLM) -> None:
        assert sum(o.blocks[b].numel for b in o.selection.selected) <= o.budget
        trained = sum(o.blocks[b].numel for b in o.selection.selected)
        # Adam state (two moments) for exactly what is trained, once every selected block has stepped
        if o.state_numel():
            assert o.state_numel() <= 2 * trained

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(12):
        selected_rows = [opt.blocks[b] for b in opt.selection.selected if opt.blocks[b].rows is not None]
        trained_rows.update((b.name.split("[")[0], b.rows) for b in selected_rows)
        train(model, opt, range(step, step + 1), record=check)
    assert opt.selection.reselections >= 3 and trained_rows  # row ranges were chosen
    for name, param in model.named_parameters():
        moved = (param.detach() != before[name]).any(dim=-1) if param.dim() == 2 else None
        if name in ("embed_tokens.weight", "lm_head.weight"):
            ranges = [rows for n, rows in trained_rows if n == name]
            mask = torch.zeros(param.shape[0], dtype=torch.bool)
            for a, b in ranges:
                mask[a:b] = True
            assert not moved[~mask].any(), f"{name}: rows outside every trained range moved"


def test_a_row_range_is_stepped_exactly_as_adamw_would_step_those_rows():
    model = TinyLM()
    opt = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.9, patience=100, weight_decay=0.1)
    train(model, opt, range(1))  # step 0 scores and selects
    ranged = [opt.blocks[b] for b in opt.selection.selected if opt.blocks[b].rows is not None]
    if not ranged:  # make one row range of the head the selection, as a switch would
        head = next(b for b, block in enumerate(opt.blocks) if block.rows is not None and "lm_head" in block.name)
        opt._switch_to([head])
        ranged = [opt.blocks[head]]
    block = ranged[0]
    (a, b), param = block.rows, dict(model.named_parameters())[block.name.split("[")[0]]
    reference_rows = param.detach()[a:b].clone().requires_grad_()
    reference = torch.optim.AdamW([reference_rows], lr=1e-2, weight_decay=0.1)
    for step in range(1, 4):
        loss = model(batch(step))
        loss.backward()
        reference_rows.grad = param.grad[a:b].clone()
        reference.step()
        opt.record_loss(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.testing.assert_close(param.detach()[a:b], reference_rows.detach(), rtol=0, atol=1e-7)
    assert opt.state[opt._stepped((opt._names.index(block.name.split("[")[0]), block.rows))]["exp_avg"].shape == (b - a, 8)


@pytest.mark.parametrize("settings", [{}, {"dtype": torch.bfloat16}, {"dtype": torch.bfloat16, "step_in_backward": True},
                                      {"strategy": "random"}])
def test_a_resumed_run_with_row_ranges_equals_the_uninterrupted_one(settings):
    settings = dict(settings)
    dtype = settings.pop("dtype", torch.float32)
    whole_model = TinyLM(dtype=dtype)
    whole = BlockLLM(whole_model.named_parameters(), lr=1e-2, sparsity=0.9, patience=2, **settings)
    ranges = []
    record = lambda o: ranges.extend(o.blocks[b].name for b in o.selection.selected if o.blocks[b].rows)  # noqa: E731
    train(whole_model, whole, range(5), record)
    saved_model, saved_opt = copy.deepcopy(whole_model.state_dict()), copy.deepcopy(whole.state_dict())
    expected = train(whole_model, whole, range(5, 12), record)
    assert ranges  # row ranges were trained, before and after the checkpoint

    resumed_model = TinyLM(dtype=dtype)
    resumed_model.load_state_dict(saved_model)
    resumed = BlockLLM(resumed_model.named_parameters(), lr=1e-2, sparsity=0.9, patience=2, **settings)
    resumed.load_state_dict(saved_opt)
    assert train(resumed_model, resumed, range(5, 12)) == expected
    for (name, p), q in zip(whole_model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), name


# ----- scores ---------------------------------------------------------------------------------------
def test_scores_per_row_range_are_the_norms_of_those_rows():
    weight = nn.Parameter(torch.randn(10, 3))
    other = nn.Parameter(torch.randn(4))
    scorer = GradNormScorer()
    scorer.start([weight, other], [False, False], [[(0, 4), (4, 10)], None])
    ((weight * torch.arange(30.0).view(10, 3)).sum() + (other ** 2).sum()).backward()
    norms = scorer.finish()
    grad = torch.arange(30.0).view(10, 3)
    assert norms[0] == pytest.approx([grad[:4].norm().item(), grad[4:].norm().item()])
    assert norms[1] == pytest.approx((2 * other.detach()).norm().item())


def test_a_kept_tensors_norm_is_counted_once_when_it_steps_in_backward():
    """step_in_backward with fp32 copies: the hook used to record a trained tensor's gradient twice (its own
    observe, then the copy's), a sqrt(2) larger score for what was already trained."""
    model = TinyLM(vocab=16, layers=6, dtype=torch.bfloat16)  # embeddings 37%: "always" fits s=0.5
    reference = copy.deepcopy(model)
    opt = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.5, embeddings="always", step_in_backward=True)
    seen = []
    original = opt._select_from_norms
    opt._select_from_norms = lambda norms: (seen.append(dict(zip(opt._scored, norms))), original(norms))[1]
    model(batch(0, vocab=16)).backward()
    opt.record_loss(1.0)
    opt.step()
    reference(batch(0, vocab=16)).backward()
    index = opt._names.index("embed_tokens.weight")
    expected = reference.embed_tokens.weight.grad.float().norm().item()
    assert seen and seen[0][index] == pytest.approx(expected, rel=1e-3)


# ----- backends that step whole tensors ---------------------------------------------------------------
class Owner:
    def live_optimizer(self):
        return None

    def selection_changed(self) -> None:
        pass


def test_a_backend_that_owns_the_update_gets_whole_tensors():
    model = TinyLM()
    opt = BlockLLM(model.named_parameters(), sparsity=0.9)
    assert opt.splits_rows
    opt.hand_over_update(Owner())
    assert not opt.splits_rows and all(block.rows is None for block in opt.blocks)
    assert {n for n, _ in opt.trained_named_parameters()} <= {n for n, _ in model.named_parameters()}


def test_llama_60m_shaped_model_at_s09_trains_about_a_tenth_on_every_step():
    """The quality guard's "mini" (embeddings and head 57% of the parameters, like LLaMA-60M): whole, either
    embedding alone was 2.8x the s=0.9 budget, and steps that trained one trained 0.28 of the model."""
    from blockllm_scale.launcher.models import build_model

    torch.manual_seed(0)
    model = build_model("mini")
    opt = BlockLLM(model.named_parameters(), lr=1e-3, sparsity=0.9, patience=3)
    fractions, embedding_steps = [], 0
    for step in range(16):
        ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(step))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.record_loss(loss)
        if not opt.scoring_step:
            fractions.append(opt.selected_fraction)
            embedding_steps += any(opt.blocks[b].rows for b in opt.selection.selected)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert max(fractions) <= 0.1 + 1e-6 and sum(fractions) / len(fractions) >= 0.085, fractions
    assert embedding_steps >= len(fractions) // 2  # the embeddings' rows are trained, within the budget


def test_the_paper_settings_train_whole_tensors_and_reach_the_launcher_as_flags():
    from blockllm_scale.config import PAPER_SETTINGS
    from blockllm_scale.launcher.cli import parse_args, settings_as_flags

    model = TinyLM()
    assert not BlockLLM(model.named_parameters(), sparsity=0.9, **PAPER_SETTINGS).splits_rows
    parsed = parse_args(settings_as_flags(PAPER_SETTINGS))["blockllm"]
    assert {k: getattr(parsed, k) for k in PAPER_SETTINGS} == PAPER_SETTINGS
    assert parse_args(settings_as_flags({"row_ranges": True}))["blockllm"].row_ranges


def test_gradient_clipping_over_all_parameters_sees_only_the_trained_rows():
    """As a frozen tensor has no gradient, a split tensor's untrained rows have a zero one (the Trainer clips
    over model.parameters()); a scoring step keeps every row's, which its scores need."""
    model = TinyLM()
    opt = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.9, patience=100)
    train(model, opt, range(1))  # step 0 scores and selects
    head = [b for b, block in enumerate(opt.blocks) if block.rows is not None and "lm_head" in block.name]
    layer = next(b for b, block in enumerate(opt.blocks) if block.rows is None and block.name.startswith("layers."))
    opt._switch_to([head[1], layer])  # one range of the head and a layer, as a switch would choose
    model(batch(1)).backward()
    a, b = opt.blocks[head[1]].rows
    grad = model.lm_head.weight.grad
    assert grad[a:b].abs().sum() > 0 and grad[:a].abs().sum() == 0 and grad[b:].abs().sum() == 0
    trained = [p.grad for _, p in opt.trained_named_parameters()]
    everything = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.nn.utils.get_total_norm(everything) == torch.nn.utils.get_total_norm(trained)
    opt.zero_grad(set_to_none=True)
    opt.selection.scoring = True
    opt._apply_selection()
    model(batch(2)).backward()
    assert (model.lm_head.weight.grad.abs().sum(dim=1) > 0).all()  # every row, for the scores
