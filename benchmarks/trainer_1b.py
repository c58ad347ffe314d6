"""What BlockLLM saves in the Hugging Face Trainer: LLaMA-1B, bf16, gradient checkpointing, under DeepSpeed ZeRO-2
and under FSDP2, BlockLLM (s=0.9) beside the Trainer's own AdamW on the same data: peak memory, tokens/s and
the eval loss each reaches.

    python benchmarks/trainer_1b.py                                   # GPUs: every visible GPU per run
    python benchmarks/trainer_1b.py --model tiny --steps 4 --seq_len 32 --batch 2 --nproc 2 --stem /tmp/dry   # CPU dry run

Each of the four runs is its own launch (``torchrun`` with ``TrainingArguments(deepspeed=
configs/ds/trainer_zero2.json)``; ``accelerate launch --config_file configs/accelerate/fsdp2.yaml``), running
this file with ``--worker``. Writes ``benchmarks/results/trainer_1b_zero2_fsdp2.{json,md,png}`` (or ``--stem``)
with the device, versions, commit, command and the corpus (its sha256). On CPUs the runs are fp32 without
checkpointing, and accelerate runs the plain Trainer's FSDP config as DDP (the AdamW row is then unsharded).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RUNS = [("zero2", "adamw"), ("zero2", "blockllm"), ("fsdp2", "adamw"), ("fsdp2", "blockllm")]
QUESTION = "trainer_1b_zero2_fsdp2"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="1b", help="a size from blockllm_scale/launcher/models.py")
    parser.add_argument("--dataset", default="shakespeare", help="DataConfig.dataset: the shipped corpus, a file")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8, help="per GPU")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--patience", type=int, default=50)
    parser.add_argument("--warmup_steps", type=int, default=3, help="steps left out of tokens/s")
    parser.add_argument("--eval_rows", type=int, default=256)
    parser.add_argument("--nproc", type=int, default=0, help="processes per run (0: every GPU, or 2 on CPU)")
    parser.add_argument("--backends", default="zero2,fsdp2")
    parser.add_argument("--stem", default=str(REPO / "benchmarks" / "results" / QUESTION))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--optimizer", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ----- one run (inside torchrun / accelerate launch) ---------------------------------------------
def worker(opts: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from transformers import Trainer, TrainingArguments

    from blockllm_scale.launcher.data import DataConfig, build_datasets
    from blockllm_scale.integrations.hf import BlockLLMTrainer, causal_lm_collator, without_zero_init
    from blockllm_scale.launcher.models import build_model
    from blockllm_scale.parallel import end_with_a_barrier

    gpu = torch.cuda.is_available()
    if opts.backend == "zero2" and not gpu:
        import deepspeed

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # a 45-120 s compile gloo does not need
    vocab = 32000 if opts.model not in ("tiny", "mini") else 0  # GaLore's vocabulary for the LLaMA sizes
    train, evaluation = build_datasets(DataConfig(dataset=opts.dataset, seq_len=opts.seq_len, vocab_size=vocab))
    evaluation = torch.utils.data.Subset(evaluation, range(min(opts.eval_rows, len(evaluation))))
    out = Path(opts.result).parent
    args = TrainingArguments(
        output_dir=str(out / f"{opts.backend}_{opts.optimizer}"), max_steps=opts.steps, learning_rate=opts.lr,
        per_device_train_batch_size=opts.batch, per_device_eval_batch_size=opts.batch, lr_scheduler_type="cosine",
        warmup_steps=max(1, opts.steps // 10), bf16=gpu, gradient_checkpointing=gpu, max_grad_norm=1.0,
        save_strategy="no", logging_steps=max(1, opts.steps // 20), report_to=[], seed=0, disable_tqdm=True,
        dataloader_num_workers=0, use_cpu=not gpu,
        deepspeed=str(REPO / "configs" / "ds" / "trainer_zero2.json") if opts.backend == "zero2" else None)
    with without_zero_init(args):
        model = build_model(opts.model, vocab_size=vocab or None)
    clock = Clock(opts.warmup_steps)
    common = dict(model=model, args=args, train_dataset=train, data_collator=causal_lm_collator, callbacks=[clock])
    if opts.optimizer == "blockllm":
        trainer = BlockLLMTrainer(**common, blockllm_settings={"sparsity": opts.sparsity, "patience": opts.patience})
    else:
        trainer = Trainer(**common)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    train_peak = peak_gib(gpu)
    eval_loss = trainer.evaluate(evaluation)["eval_loss"]
    world = dist.get_world_size() if dist.is_initialized() else 1
    peaks = gather_max([train_peak, peak_gib(gpu)], world)
    timed = opts.steps - opts.warmup_steps
    row = {"backend": opts.backend, "optimizer": opts.optimizer, "world_size": world,
           "peak_gib_train": round(peaks[0], 3), "peak_gib_with_eval": round(peaks[1], 3),
           "tokens_per_s": round(timed * opts.batch * opts.seq_len * world / clock.seconds, 1) if timed > 0 else None,
           "eval_loss": round(eval_loss, 4), "train_loss_last": clock.last_loss,
           "distributed_type": str(trainer.accelerator.distributed_type)}
    if opts.optimizer == "blockllm":
        blockllm = trainer.blockllm
        row.update(reselections=blockllm.selection.reselections, trained_fraction=round(blockllm.selected_fraction, 4),
                   state_numel_rank0=blockllm.state_numel())
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(opts.result).write_text(json.dumps(row))
    end_with_a_barrier()  # or the last all_gather can abort a finished rank at exit (blockllm_scale/parallel.py)


def peak_gib(gpu: bool) -> float:
    import torch

    if gpu:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: RSS, not comparable


def gather_max(values: list[float], world: int) -> list[float]:
    import torch
    import torch.distributed as dist

    if world == 1:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class Clock(_callback_base()):
    """Wall time of the steps after the first ``skip`` (compilation, allocator warm-up, the first scoring step)."""

    def __init__(self, skip: int):
        self.skip, self.seconds, self.start, self.last_loss = skip, 0.0, None, None

    def on_step_end(self, args, state, control, **kwargs):
        _synchronize()
        if state.global_step == self.skip:
            self.start = time.perf_counter()
        elif state.global_step > self.skip and self.start is not None:
            self.seconds = time.perf_counter() - self.start

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.last_loss = logs["loss"]


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----- the four launches and the report ----------------------------------------------------------
def launch(opts: argparse.Namespace, backend: str, optimizer: str, result: Path, gpus: int) -> subprocess.CompletedProcess:
    from blockllm_scale.parallel import free_port

    nproc = opts.nproc or gpus or 2
    worker_args = [str(Path(__file__).resolve()), "--worker", "--backend", backend, "--optimizer", optimizer,
                   "--result", str(result), "--model", opts.model, "--dataset", opts.dataset, "--steps", str(opts.steps),
                   "--batch", str(opts.batch), "--seq_len", str(opts.seq_len), "--lr", str(opts.lr),
                   "--sparsity", str(opts.sparsity), "--patience", str(opts.patience),
                   "--warmup_steps", str(opts.warmup_steps), "--eval_rows", str(opts.eval_rows)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if backend == "fsdp2":
        # accelerate's default port 29500 may still be held by an earlier launch; torchrun --standalone picks its own
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(REPO / "configs" / "accelerate" / "fsdp2.yaml"), "--num_processes", str(nproc),
                   "--main_process_port", str(free_port()),
                   *([] if gpus else ["--mixed_precision", "no"]), *worker_args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   *worker_args]
        if not gpus:
            env["DS_ACCELERATOR"] = "cpu"
    if not gpus:
        env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)


def failure(log: str) -> str:
    """The line that says why a launch failed: the rank's own exception, not the launcher's ChildFailedError."""
    raised = [line.strip() for line in log.splitlines()
              if re.match(r"\s*(\[rank\d+\]:\s*)?[\w.]*(Error|Exception)\b.*:", line) and "ChildFailedError" not in line]
    return (raised or [line.strip() for line in log.splitlines() if "Error" in line] or ["no result"])[-1]


def corpus_of(dataset: str) -> dict:
    from blockllm_scale.launcher.data import SHIPPED_CORPUS

    path = SHIPPED_CORPUS if dataset == "shakespeare" else Path(dataset)
    return {"dataset": dataset, "path": str(path), "bytes": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def markdown(data: dict) -> str:
    env, s = data["environment"], data["settings"]
    lines = [f"# {QUESTION}: BlockLLM in the HF Trainer beside AdamW, {s['model']}, ZeRO-2 and FSDP2", "",
             f"- device: {env['device']}; started {env['started']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
             f"- commit: {env['git_commit']}; command: `{env['command']}`",
             f"- corpus: {data['corpus']['dataset']} ({data['corpus']['bytes']:,} bytes, sha256 "
             f"{data['corpus']['sha256'][:16]}...); {s['steps']} steps, batch {s['batch']} x {s['seq_len']} per "
             f"process, lr {s['lr']} cosine; BlockLLM sparsity {s['sparsity']}, patience {s['patience']}",
             f"- peak memory: {env['measured']}; tokens/s over steps after the first {s['warmup_steps']}", "",
             "| backend | optimizer | ranks | peak GiB (train) | tokens/s | eval loss | reselections | trained fraction |",
             "|---|---|---|---|---|---|---|---|"]
    for row in data["runs"]:
        if "error" in row:
            lines.append(f"| {row['backend']} | {row['optimizer']} | failed: {row['error'][:120]} |||||")
            continue
        lines.append(f"| {row['backend']} | {row['optimizer']} | {row['world_size']} | {row['peak_gib_train']} | "
                     f"{row['tokens_per_s']} | {row['eval_loss']} | {row.get('reselections', '–')} | "
                     f"{row.get('trained_fraction', '–')} |")
    for backend, optimizer in unfinished(data):
        lines.append(f"| {backend} | {optimizer} | not run: the sitting ended first |||||")
    return "\n".join(lines) + "\n"


def unfinished(data: dict) -> list[tuple[str, str]]:
    """The runs the command asked for that have no row (a GPU call cut short by its time limit)."""
    backends = data["settings"].get("backends", "zero2,fsdp2").split(",")
    done = {(row["backend"], row["optimizer"]) for row in data["runs"]}
    return [run for run in RUNS if run[0] in backends and run not in done]


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["runs"] if "error" not in r]
    labels = [f"{r['backend']}\n{r['optimizer']}" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, title in zip(axes, ("peak_gib_train", "tokens_per_s", "eval_loss"),
                              ("peak memory (GiB)", "tokens/s", "eval loss")):
        ax.bar(labels, [r[key] or 0 for r in rows], color=["#888" if r["optimizer"] == "adamw" else "#2a7" for r in rows])
        ax.set_title(title)
    missing = [f"{r['backend']} {r['optimizer']}" for r in data["runs"] if "error" in r]
    missing += [f"{b} {o}" for b, o in unfinished(data)]
    fig.suptitle(f"{data['settings']['model']} in the HF Trainer: AdamW vs BlockLLM s={data['settings']['sparsity']} "
                 f"({data['environment']['device']})" + (f"\nno result: {', '.join(missing)}" if missing else ""),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[Path]:
    opts = parse(argv)
    if opts.worker:
        worker(opts)
        return []
    from blockllm_scale.benchmarks.environment import describe, gpu_names

    gpus = len(gpu_names())
    stem = Path(opts.stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    # per-run logs and Trainer folders: beside a --stem of one's own, else in runs/ (not committed)
    default = stem == Path(parse([]).stem)
    work = REPO / "runs" / QUESTION if default else stem.parent / f"{stem.name}.runs"
    work.mkdir(parents=True, exist_ok=True)
    backends = opts.backends.split(",")
    argv_used = [str(Path(__file__).relative_to(REPO)), *(sys.argv[1:] if argv is None else argv)]
    data = {"question": QUESTION, "environment": describe(argv_used, "cuda" if gpus else "cpu"),
            "settings": {k: getattr(opts, k) for k in ("model", "steps", "batch", "seq_len", "lr", "sparsity",
                                                       "patience", "warmup_steps", "eval_rows", "backends")},
            "corpus": corpus_of(opts.dataset), "runs": []}
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")]
    for backend, optimizer in [r for r in RUNS if r[0] in backends]:
        result = work / f"{backend}_{optimizer}.json"
        done = launch(opts, backend, optimizer, result, gpus)
        (work / f"{backend}_{optimizer}.log").write_text(done.stdout + done.stderr)
        if done.returncode == 0 and result.is_file():
            data["runs"].append(json.loads(result.read_text()))
        else:
            data["runs"].append({"backend": backend, "optimizer": optimizer, "error": failure(done.stdout + done.stderr),
                                 "log": str(work / f"{backend}_{optimizer}.log")})
        print(f"[{QUESTION}] {backend} {optimizer}: {data['runs'][-1]}", flush=True)
        # the report after every run: a sitting cut short keeps the runs it finished
        paths[0].write_text(json.dumps(data, indent=2) + "\n")
        paths[1].write_text(markdown(data))
        plot(data, paths[2])
    print(paths[1].read_text())
    return paths


if __name__ == "__main__":
    main()
