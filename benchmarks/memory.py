"""GPU memory and speed of BlockLLM and the baselines, one launcher process per configuration.

    python benchmarks/memory.py --preset 7b-1gpu-optimizers --time_budget 450 --mirror "$OUT"   # a <= 9 min slice
    python benchmarks/memory.py --preset 7b-1gpu-optimizers --list                               # what is done / left
    python benchmarks/memory.py --name my-grid --optimizers adamw blockllm:sparsity=0.9 \\
        --models 60m 130m --backends plain zero2 --checkpointing off on --eight_bit off on --batch_sizes 8
    python benchmarks/memory.py --preset 1b-7b-zero3-fsdp2-scaling --only gpus2                    # the 2-GPU slice
    python benchmarks/memory.py --preset cpu-smoke --device cpu --name smoke           # CPU, seconds

Each configuration runs ``launch/pretrain.py`` (under ``torchrun`` for ZeRO / FSDP2) on synthetic tokens
with GaLore's 32000-token vocabulary, and is summarised in ``benchmarks/results/<name>.json``: peak
allocated and reserved memory (on CPU: the process's peak RSS), tokens/s as the median of the steps
after warm-up and as the run mean (total tokens / total time, which counts BlockLLM's scoring steps),
the final loss, and the memory model's prediction. An OOM, a timeout, a backend that does not exist
yet or more GPUs than the machine has ("unavailable") or a configuration the launcher refuses in one line ("refused": a CUDA-only optimizer
on CPU, a missing optional package) are results, not crashes. The file is append-only: configurations
already in it are skipped (except "unavailable" ones and any status named by ``--retry``; a replaced
result is kept under "superseded"), so a grid runs in slices (``--only``, ``--time_budget``) and a killed slice loses at most
the configuration it was running. ``<name>.md`` and ``<name>.png`` are rewritten from the JSON after every configuration.

The GPU count is part of a configuration (``RunSpec.gpus``, ``--gpu_counts``): ZeRO / FSDP2 runs go under
``torchrun --nproc_per_node=<gpus>`` with the batch size per process. With ``--device cpu`` the GPU count is a
number of CPU processes (CUDA hidden, DeepSpeed's CPU accelerator), so a scaling grid can be dry-run anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from blockllm_scale.benchmarks import environment, report  # noqa: E402
from blockllm_scale.benchmarks.grid import (REPO, RunSpec, ds_config, grid, launcher_command, launcher_flags, select,  # noqa: E402
                             unavailable_reason)
from blockllm_scale.benchmarks.memory_model import Setup, predict  # noqa: E402
from blockllm_scale.benchmarks.presets import PRESETS  # noqa: E402

RESULTS_DIR = REPO / "benchmarks" / "results"
# Seconds a configuration is expected to take before any of that size has run (start-up, model
# build, steps); afterwards the slowest finished one of the same size is the estimate.
EXPECTED_S = {"tiny": 20, "60m": 40, "130m": 45, "350m": 60, "1b": 90, "7b": 150}
OOM_MARKERS = ("out of memory", "OutOfMemoryError")


def summarize(records: list[dict], warmup: int) -> dict:
    """Memory, speed and loss of one run from its metrics.jsonl records."""
    if not records:
        return {"steps_done": 0}
    timed = [r["tokens_per_s"] for r in records if r["step"] > warmup] or [records[-1]["tokens_per_s"]]
    out = {"steps_done": records[-1]["step"], "first_loss": records[0]["loss"], "final_loss": records[-1]["loss"],
           "tokens_per_step": records[0]["tokens"] // records[0]["step"],
           "tokens_per_s_median": statistics.median(timed),
           # Every step has the same tokens, so the run mean is the harmonic mean of the rates.
           "tokens_per_s_mean": len(timed) / sum(1 / max(rate, 1e-9) for rate in timed)}
    # How deep the timed steps' backward went (-1: to the embeddings), which sets most of their time.
    # (None, only the head trained, is left out.)
    depths = [r.get("lowest_trained_layer") for r in records if r["step"] > warmup]
    if any(d is not None for d in depths):
        out["lowest_trained_layer_mean"] = statistics.mean(d for d in depths if d is not None)
    for field in ("peak_allocated_gib", "peak_reserved_gib", "peak_rss_gib"):
        values = [r[field] for r in records if field in r]
        if values:
            out[field] = max(values)
    if "selected_fraction" in records[0]:
        out["selected_fraction"] = statistics.mean(r["selected_fraction"] for r in records)
        out["reselections"] = sum(bool(r.get("reselected")) for r in records)
        out["scoring_steps"] = sum(bool(r.get("scoring_step")) for r in records)
        # Split the timed steps' seconds by whether each was a scoring step.
        seconds = {True: [], False: []}
        for record in records:
            if record["step"] > warmup:
                seconds[bool(record.get("scoring_step"))].append(out["tokens_per_step"] / max(record["tokens_per_s"], 1e-9))
        if seconds[True]:
            out["scoring_time_share"] = sum(seconds[True]) / (sum(seconds[True]) + sum(seconds[False]))
            out["scoring_step_s_median"] = statistics.median(seconds[True])
            if seconds[False]:
                out["sparse_step_s_median"] = statistics.median(seconds[False])
    return out


def classify(returncode: int | None, stderr: str) -> tuple[str, str]:
    """(status, reason) of a finished or killed launcher process."""
    if returncode is None:
        return "timeout", "killed at the per-configuration timeout"
    if returncode == 0:
        return "ok", ""
    lines = stderr.splitlines()
    oom = [line for line in lines if any(marker in line for marker in OOM_MARKERS)]
    if oom:
        return "oom", oom[0].strip()[:300]
    refused = [line for line in lines if line.startswith("pretrain.py: error:")]
    if refused:  # the launcher refused the configuration (device, package, flag); torchrun then exits 1
        return "refused", refused[-1].removeprefix("pretrain.py: error:").strip()
    return "error", "\n".join(stderr.strip().splitlines()[-6:])[-1500:]


def launcher_env(device: str) -> dict[str, str]:
    """The launcher's environment; on --device cpu every backend's processes stay on the CPU (the plain
    backend gets --device cpu; FSDP2 and DeepSpeed choose by what they see)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    return env


def gpus_present(device: str) -> int | None:
    """GPUs a configuration may use (torch.cuda.device_count: NVML, no CUDA context in this process);
    None where runs go to the CPU (--device cpu, or no GPU), where the GPU count is a number of processes."""
    if device == "cpu":
        return None
    import torch

    return torch.cuda.device_count() or None


def run_config(spec: RunSpec, known: dict, device: str, timeout_s: float) -> dict:
    """Run one configuration in its own process group; never raises for what the run does."""
    with tempfile.TemporaryDirectory(prefix="blockllm-bench-") as out_dir:
        argv, notes = launcher_command(spec, out_dir, known, device)
        started = time.monotonic()
        with open(Path(out_dir) / "stdout", "w") as out, open(Path(out_dir) / "stderr", "w") as err:
            proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=err, start_new_session=True,
                                    env=launcher_env(device))
            try:
                returncode = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):  # it may have ended just now
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: torchrun's workers too
                proc.wait()
                returncode = None
        stderr = (Path(out_dir) / "stderr").read_text(errors="replace")
        metrics = Path(out_dir) / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    status, reason = classify(returncode, stderr)
    summary = summarize(records, spec.warmup)
    expected_tokens = spec.batch_size * spec.seq_len * spec.gpus  # metrics count the tokens of every rank
    if summary.get("tokens_per_step", expected_tokens) != expected_tokens:  # e.g. a DeepSpeed JSON's own batch size
        notes.append(f"ran {summary['tokens_per_step']} tokens/step, not the {expected_tokens} asked for")
    result = {"status": status, "reason": reason, "notes": notes, "wall_s": round(time.monotonic() - started, 1),
              "command": shlex.join(argv).replace(out_dir, "<out_dir>"), **summary}
    kept = ("step", "loss", "tokens_per_s", "peak_allocated_gib", "peak_reserved_gib", "peak_rss_gib",
            "selected_fraction", "scoring_step", "reselected", "lowest_trained_layer")
    result["steps"] = [{k: r[k] for k in kept if k in r} for r in records]
    return result


def refresh_predictions(entries: list[dict], known: dict, specs: list[RunSpec]) -> None:
    """Recompute each result's prediction with today's memory model (the measurement stays as it was),
    from the grid's spec of that key (presets spell out flags whose default changed since), else the stored one."""
    by_key = {spec.key: spec for spec in specs}
    for entry in entries:
        stored = entry.get("spec")
        spec = by_key.get(entry["key"])
        if spec is None and stored:
            spec = RunSpec(**{**stored, "flags": tuple(stored.get("flags", {}).items()),
                              "optional": tuple(stored.get("optional", {}).items())})
        if spec is not None:
            entry.update(prediction(spec, known))


def prediction(spec: RunSpec, known: dict) -> dict:
    settings = {k: v for k, v in spec.settings().items() if k not in dict(spec.optional) or k in known}
    if spec.backend.startswith("zero") and ds_config(spec.backend).is_file():
        zero = json.loads(ds_config(spec.backend).read_text()).get("zero_optimization", {})
        settings.setdefault("reduce_bucket_size", int(float(zero.get("reduce_bucket_size", 5e8))))
    try:
        pred = predict(Setup.from_flags(**settings, world_size=spec.gpus))
    except (ValueError, KeyError) as error:
        return {"predicted_error": str(error)}
    return {"predicted_gib": round(pred.peak_gib, 3), "predicted_phase": pred.phase,
            "predicted_parts_gib": pred.parts_gib()}


class Results:
    """``<name>.json``: invocations (command, device, versions, commit) and one entry per configuration."""

    def __init__(self, directory: Path, name: str, mirror: Path | None = None):
        self.path, self.mirror = directory / f"{name}.json", mirror
        fresh = {"name": name, "invocations": [], "results": []}
        self.data = json.loads(self.path.read_text()) if self.path.exists() else fresh

    def done(self, retry: set[str] = frozenset()) -> set[str]:
        """Keys not to run again: every configuration with a result, except those whose status is in ``retry``."""
        return {r["key"] for r in self.data["results"] if r["status"] not in retry}

    def add(self, entry: dict) -> None:
        """Add a result, in the place of one for the same configuration (which moves to "superseded":
        nothing is deleted), so a re-run keeps the table in the grid's order."""
        results, superseded = self.data["results"], self.data.setdefault("superseded", [])
        for index, old in enumerate(results):  # keys are unique: add() is the only writer
            if old["key"] == entry["key"]:
                superseded.append(old)
                results[index] = entry
                break
        else:
            results.append(entry)
        self.save()

    def order_as(self, specs: list[RunSpec]) -> None:
        """Results in the grid's order (those of configurations no longer in it last)."""
        rank = {spec.key: i for i, spec in enumerate(specs)}
        self.data["results"].sort(key=lambda r: rank.get(r["key"], len(rank)))

    def start_invocation(self, info: dict) -> int:
        self.data["invocations"].append(info)
        self.save()
        return len(self.data["invocations"]) - 1

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(tmp, self.path)  # a kill mid-write never leaves half a file
        paths = [self.path] + report.write(self.data, self.path.with_suffix(""))
        if self.mirror is not None:
            self.mirror.mkdir(parents=True, exist_ok=True)
            for path in paths:
                shutil.copy2(path, self.mirror / path.name)


def expected_seconds(spec: RunSpec, results: list[dict]) -> float:
    """Start-up plus steps, from finished runs of the same size and batch (the slowest of them), else
    from EXPECTED_S; used to decide whether a configuration fits in what is left of --time_budget."""
    runs = [r for r in results if r["status"] == "ok" and r.get("tokens_per_s_mean") and r["spec"]["model"] == spec.model
            and r["spec"]["batch_size"] == spec.batch_size]
    if not runs:
        return EXPECTED_S.get(spec.model, 120) + 0.5 * spec.steps
    step_s = [r["tokens_per_step"] / r["tokens_per_s_mean"] for r in runs]
    startup = [r["wall_s"] - r["steps_done"] * t for r, t in zip(runs, step_s)]
    return max(startup) + spec.steps * max(step_s)


def run_grid(specs: list[RunSpec], results: Results, args) -> int:
    """Run what is not done yet, within the time budget; returns how many were left for later."""
    known = launcher_flags()
    todo = [s for s in specs if s.key not in results.done(set(args.retry.split(",")))]
    if not todo:
        return 0
    command = ["benchmarks/memory.py", *args.argv]
    invocation = results.start_invocation(environment.describe(command, args.device))
    present = gpus_present(args.device)
    begin = time.monotonic()
    for index, spec in enumerate(todo):
        expected = expected_seconds(spec, results.data["results"])
        if args.time_budget and time.monotonic() - begin + expected > args.time_budget:
            if index == 0:  # "run again" would refuse it again
                print(f"[memory] {spec.key} is expected to take ~{expected:.0f} s, more than --time_budget "
                      f"{args.time_budget:g}: raise --time_budget (the estimate comes from finished runs of this size "
                      "and batch, else from EXPECTED_S)", flush=True)
            else:
                print(f"[memory] time budget reached: {len(todo) - index} configuration(s) left; run again", flush=True)
            return len(todo) - index
        print(f"[memory] {index + 1}/{len(todo)} {spec.key} (expect ~{expected:.0f} s)", flush=True)
        reason = unavailable_reason(spec, known, present)
        outcome = ({"status": "unavailable", "reason": reason, "notes": [], "wall_s": 0.0} if reason else
                   run_config(spec, known, args.device, args.timeout or max(3 * expected, 300)))
        entry = {"key": spec.key, "invocation": invocation, "spec": spec.as_dict(), **outcome, **prediction(spec, known)}
        results.add(entry)
        print(f"[memory]   -> {report.one_line(entry)}", flush=True)
    return 0


def build_specs(args) -> list[RunSpec]:
    if args.preset:
        specs = PRESETS[args.preset]()
    else:
        on_off = {"on": True, "off": False}
        specs = grid(args.optimizers, args.models, args.backends, [on_off[v] for v in args.checkpointing],
                     [on_off[v] for v in args.eight_bit], args.batch_sizes, args.seq_len, args.dtype, args.steps, args.warmup,
                     args.gpu_counts)
    return select(specs, args.only)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named grid (benchmarks/presets.py)")
    parser.add_argument("--name", help="results file stem (default: the preset's name)")
    parser.add_argument("--only", action="append", default=[],
                        help="keep configurations whose key contains one of these comma-separated substrings; repeat "
                        "to AND (one-GPU configurations also match 'gpus1')")
    parser.add_argument("--retry", default="unavailable",
                        help="comma-separated statuses to run again (default: unavailable; e.g. unavailable,refused,error)")
    parser.add_argument("--list", action="store_true", help="print each configuration: done or not, predicted peak, result")
    parser.add_argument("--report_only", action="store_true",
                        help="rewrite <name>.md / .png from the JSON, predictions recomputed with today's memory model")
    parser.add_argument("--time_budget", type=float, default=0,
                        help="seconds: start no configuration expected to end later; 0: no limit")
    parser.add_argument("--timeout", type=float, default=0, help="seconds per configuration (default: 3x expected, >= 300)")
    parser.add_argument("--device", default="", help="'cpu' to run on the CPU (peak = process RSS); default: the launcher's")
    parser.add_argument("--results_dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--mirror", type=Path, help="also copy <name>.json/.md/.png here after every configuration (e.g. $OUT)")
    grid_args = parser.add_argument_group("a grid from the command line (instead of --preset)")
    grid_args.add_argument("--optimizers", nargs="+", default=["adamw", "blockllm:sparsity=0.9"],
                           help="name[:flag=value,...], e.g. blockllm:sparsity=0.9,states=bnb_8bit")
    grid_args.add_argument("--models", nargs="+", default=["60m"])
    grid_args.add_argument("--backends", nargs="+", default=["plain"])
    grid_args.add_argument("--checkpointing", nargs="+", default=["off"], choices=["on", "off"])
    grid_args.add_argument("--eight_bit", nargs="+", default=["off"], choices=["on", "off"])
    grid_args.add_argument("--batch_sizes", nargs="+", type=int, default=[8], help="per GPU (process)")
    grid_args.add_argument("--gpu_counts", nargs="+", type=int, default=[1],
                           help="GPUs (processes) per ZeRO / FSDP2 run, torchrun --nproc_per_node; plain runs use 1")
    grid_args.add_argument("--seq_len", type=int, default=256)
    grid_args.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    grid_args.add_argument("--steps", type=int, default=10)
    grid_args.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded as the exact command
    args.name = args.name or args.preset or "grid"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = Results(args.results_dir, args.name, args.mirror)
    if args.report_only:
        specs = build_specs(args)
        refresh_predictions(results.data["results"], launcher_flags(), specs)
        results.order_as(specs)
        results.save()
        return 0
    specs = build_specs(args)
    if args.list:
        known = launcher_flags()
        predicted = [prediction(spec, known).get("predicted_gib") for spec in specs]
        print(report.listing(specs, results.data["results"], predicted))
        return 0
    left = run_grid(specs, results, args)
    print(f"[memory] wrote {results.path} (+ .md, .png); {left} configuration(s) left", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
