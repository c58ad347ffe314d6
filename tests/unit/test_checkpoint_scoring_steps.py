"""--checkpoint_scoring_steps: the launcher recomputes activations on BlockLLM's scoring steps only.

In-process launcher runs (fp32, CPU, tiny LLaMA), instrumented through the model and optimizer the
launcher builds: recomputation changes nothing numerically, and it really happens on scoring steps
(and on them only).
"""

import json
import re
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
from blockllm_scale.launcher import train as pretrain  # noqa: E402
from blockllm_scale.launcher import metrics as metrics_module  # noqa: E402

# Patience 2 with half the parameters frozen: several reselections (each one a scoring step) in 8 steps.
COMMON = ["--model", "tiny", "--steps", "8", "--batch_size", "2", "--grad_accum", "2", "--seq_len", "32",
          "--eval_every", "0", "--sparsity", "0.5", "--patience", "2", "--embeddings", "candidate", "--lr", "3e-3"]


def instrumented_run(monkeypatch, out_dir: Path, *flags: str) -> dict:
    """One launcher run; per micro-batch forward: (scoring step?, calls of the top decoder layer's MLP).

    HF checkpoints a decoder layer's ``forward``, so the MLP inside it runs again when backward
    recomputes the layer: twice per micro-batch on a checkpointed step, once otherwise.
    """
    built = {}
    forwards: list[list] = []
    weights: list[dict] = []  # the parameters each forward saw

    def before_forward(module, args):
        forwards.append([built["optimizer"].scoring_step, 0])
        weights.append({n: p.detach().clone() for n, p in module.named_parameters()})

    def build_model(*args, **kwargs):
        model = original_build_model(*args, **kwargs)
        model.register_forward_pre_hook(before_forward)
        # A pre-hook: the recomputation stops early, once it has what backward needs (torch's
        # non-reentrant checkpoint), so the MLP's forward hooks do not run a second time.
        model.model.layers[-1].mlp.register_forward_pre_hook(lambda module, args: forwards[-1].__setitem__(
            1, forwards[-1][1] + 1))
        built["model"] = model
        return model

    def build_optimizer(*args, **kwargs):
        built["optimizer"] = original_build_optimizer(*args, **kwargs)
        return built["optimizer"]

    original_build_model, original_build_optimizer = pretrain.build_model, pretrain.build_optimizer
    monkeypatch.setattr(pretrain, "build_model", build_model)
    monkeypatch.setattr(pretrain, "build_optimizer", build_optimizer)
    losses = pretrain.train_loop(pretrain.parse_args([*COMMON, "--out_dir", str(out_dir), *flags]))
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    params = {n: p.detach().clone() for n, p in built["model"].named_parameters()}
    return {"losses": losses, "records": records, "params": params, "forwards": forwards, "weights": weights}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads on a busy 2-core machine
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            on = instrumented_run(monkeypatch, tmp_path_factory.mktemp("on"))  # the default
        with pytest.MonkeyPatch.context() as monkeypatch:
            off = instrumented_run(monkeypatch, tmp_path_factory.mktemp("off"), "--no-checkpoint_scoring_steps")
    finally:
        torch.set_num_threads(threads)
    return on, off


def test_checkpointed_scoring_steps_change_nothing_numerically(runs):
    on, off = runs
    assert on["losses"] == off["losses"] and len(on["losses"]) == 8
    assert on["params"].keys() == off["params"].keys()
    assert all(torch.equal(on["params"][n], off["params"][n]) for n in on["params"])
    # Reselections after step 0's selection, each preceded by a scoring step, or this would prove little.
    assert sum(r["reselected"] for r in on["records"][1:]) >= 1


def test_activations_are_recomputed_on_scoring_steps_only(runs):
    on, off = runs
    assert len(on["forwards"]) == len(off["forwards"]) == 8 * 2  # steps x micro-batches
    scoring = [s for s, _ in on["forwards"]]
    assert scoring == [s for s, _ in off["forwards"]]
    assert scoring[:2] == [True, True] and sum(scoring[2:]) >= 2  # step 0 and at least one reselection
    assert [count for _, count in on["forwards"]] == [2 if s else 1 for s in scoring]
    assert [count for _, count in off["forwards"]] == [1] * len(scoring)


def test_each_record_describes_its_own_step(runs):
    """metrics.jsonl: scoring_step is whether that step's forwards ran as a scoring step; selected_fraction
    is the share of parameters that step's update changed; reselected marks the step whose update made a
    new selection, which with norm-based scores is a scoring step."""
    on, _ = runs
    scoring = [s for s, _ in on["forwards"][::2]]  # the first of each step's 2 micro-batches
    assert [r["scoring_step"] for r in on["records"]] == scoring
    assert [r["reselected"] for r in on["records"]] == scoring
    before = on["weights"][::2]
    after = before[1:] + [on["params"]]
    total = sum(p.numel() for p in on["params"].values())
    for record, old, new in zip(on["records"], before, after):
        changed = sum(p.numel() for n, p in new.items() if not torch.equal(p, old[n]))
        assert record["selected_fraction"] == pytest.approx(changed / total), record["step"]
    assert on["records"][0]["selected_fraction"] == 0.0  # step 1 only scores: embeddings are candidates here


def test_every_field_of_a_record_is_documented_in_one_place(runs):
    cells = re.findall(r"^\| (`[^|]+`) \|", metrics_module.__doc__, re.MULTILINE)
    documented = {name.strip("`") for cell in cells for name in cell.split(", ")}
    on, _ = runs
    assert set().union(*on["records"]) <= documented
    assert {"eval_loss", "eval_perplexity"} <= documented  # the fields of evaluating steps (none here)


def test_the_toggle_reaches_the_model_inside_a_wrapper():
    model = pretrain.build_model("tiny")
    engine = types.SimpleNamespace(module=model)  # DeepSpeed's engines hold the HF model in .module
    optimizer = pretrain.BlockLLM(model.named_parameters(), sparsity=0.5)
    train = pretrain.TrainConfig()

    def checkpointing() -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())

    assert optimizer.scoring_step
    pretrain.checkpoint_this_step(engine, torch.optim.SGD(model.parameters()), train)  # not BlockLLM
    assert not checkpointing()
    pretrain.checkpoint_this_step(engine, optimizer, train)
    assert checkpointing()
    # Enabling must not leave HF's input-requires-grad hook behind: every sparse step's backward
    # would then run through the frozen layers below the selected ones.
    assert not getattr(model, "_require_grads_hooks", None)
    pretrain.checkpoint_this_step(engine, optimizer, pretrain.TrainConfig(checkpoint_scoring_steps=False))
    assert not checkpointing()
    optimizer.selection.scoring = False  # as after step 0
    pretrain.checkpoint_this_step(engine, optimizer, pretrain.TrainConfig(activation_checkpointing=True))
    assert checkpointing()
    pretrain.checkpoint_this_step(engine, optimizer, train)
    assert not checkpointing()
