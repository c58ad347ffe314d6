"""The baselines through the launcher's own train loop on CPU: each trains the tiny model, GaLore's
param groups are the paper's, and the CUDA-only ones say so in one line."""

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
from blockllm_scale.baselines import BASELINES  # noqa: E402
from blockllm_scale.baselines.galore import GaloreConfig, galore_param_groups  # noqa: E402
from blockllm_scale.baselines.in_backward import StepInBackward  # noqa: E402
from blockllm_scale.config import ConfigError  # noqa: E402
from blockllm_scale.launcher.models import build_model  # noqa: E402
from blockllm_scale.launcher import train as pretrain  # noqa: E402

TINY = ["--model", "tiny", "--steps", "3", "--batch_size", "4", "--seq_len", "32", "--eval_every", "0",
        "--lr", "1e-2", "--device", "cpu"]
CUDA_ONLY = ("galore8bit", "galore8bit_layerwise")
TORCHAO = ("torchao_adamw8bit", "torchao_adamw4bit")


def train(tmp_path, *flags: str) -> list[float]:
    return pretrain.train_loop(pretrain.parse_args([*TINY, "--out_dir", str(tmp_path), *flags]))


@pytest.mark.parametrize("name", [n for n in BASELINES if n not in CUDA_ONLY + TORCHAO])
def test_cpu_baselines_train_the_tiny_model(name, tmp_path):
    if name == "badam":
        pytest.importorskip("badam", reason="badam is an optional peer (pip install 'blockllm-scale[peers]')")
    losses = train(tmp_path, "--optimizer", name)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 1e-3, losses


@pytest.mark.parametrize("name", TORCHAO)
def test_torchao_baselines_train_with_low_bit_states(name, tmp_path, monkeypatch):
    # torchao compiles one kernel per tensor shape, tens of seconds each on 2 CPU cores; eager runs the
    # same arithmetic (the compiled path runs in the GPU benchmark). Synthetic tokens and a 512-token
    # vocabulary keep the eager quantization of the embedding cheap; they carry no signal to learn, so
    # the loss only has to move.
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kwargs: fn)
    losses = train(tmp_path, "--optimizer", name, "--dataset", "synthetic", "--vocab_size", "512")
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses))) and len(set(losses)) == 3
    layer = torch.nn.Linear(64, 64, bias=False)  # 4096 elements: the smallest tensor torchao quantizes
    optimizer = BASELINES[name](layer, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    layer(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    bits = name.removeprefix("torchao_adamw")
    assert type(optimizer.state[layer.weight]["exp_avg"]).__name__ == f"OptimState{bits}"


def test_galore_projects_exactly_the_attention_and_mlp_weights():
    model = build_model("tiny")
    names = {id(p): n for n, p in model.named_parameters()}
    plain, projected = galore_param_groups(model, GaloreConfig(rank=8, update_proj_gap=50, scale=0.5, proj_type="left"))
    projected_names = sorted(names[id(p)] for p in projected["params"])
    expected = sorted(f"model.layers.{i}.{m}.weight" for i in range(2) for m in
                      ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    assert projected_names == expected
    assert (projected["rank"], projected["update_proj_gap"], projected["scale"], projected["proj_type"]) == (8, 50, 0.5, "left")
    plain_names = {names[id(p)] for p in plain["params"]}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= plain_names
    assert "rank" not in plain and len(plain_names) + len(expected) == len(names)


@pytest.mark.parametrize("name", CUDA_ONLY)
def test_cuda_only_baselines_fail_in_one_line_on_cpu(name, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main([*TINY, "--out_dir", str(tmp_path), "--optimizer", name])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if "error:" in line] == [
        f"pretrain.py: error: --optimizer {name} needs CUDA (galore-torch's GaLoreAdamW8bit calls "
        "torch.cuda.synchronize()); the model is on cpu"]


@pytest.mark.parametrize("flags, name", [(["--rank", "0"], "--rank"), (["--proj_type", "diag"], "--proj_type"),
                                         (["--scale", "-1"], "--scale"), (["--switch_mode", "up"], "--switch_mode"),
                                         (["--switch_block_every", "0"], "--switch_block_every")])
def test_baseline_settings_are_validated(flags, name, tmp_path, capsys):
    with pytest.raises(SystemExit):
        pretrain.main([*TINY, "--out_dir", str(tmp_path), *flags])
    assert name in capsys.readouterr().err


def test_step_in_backward_wrapper_equals_the_whole_model_optimizer():
    """A per-parameter AdamW stepped in backward, driven like any optimizer (no-op step, LR scheduler,
    zero_grad), takes exactly the whole-model AdamW's steps and leaves no gradient behind."""
    torch.manual_seed(0)
    reference = build_model("tiny")
    hooked = build_model("tiny")
    hooked.load_state_dict(reference.state_dict())
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, foreach=False)
    hook_opt = StepInBackward([(p, torch.optim.AdamW([p], lr=1e-2)) for p in hooked.parameters()])
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1 / (1 + step)) for o in (ref_opt, hook_opt)]
    ids = torch.randint(0, 8192, (2, 16))
    for _ in range(3):
        for model, opt, schedule in zip((reference, hooked), (ref_opt, hook_opt), schedules):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            schedule.step()
            opt.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in hooked.parameters())
    for a, b in zip(reference.parameters(), hooked.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    state = hook_opt.state_dict()
    hook_opt.load_state_dict(state)
    assert hook_opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)


def test_launcher_refuses_accumulation_for_an_optimizer_stepping_in_backward():
    class InBackward:
        steps_in_backward = True

    train = pretrain.TrainConfig(grad_accum=2, optimizer="galore8bit_layerwise")
    with pytest.raises(ConfigError, match="cannot accumulate gradients"):
        pretrain.check_steps_in_backward(InBackward(), train, backend=None)
