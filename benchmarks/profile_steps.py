"""Where a training step's time goes: run the launcher under torch.profiler for a few steps and print how busy
the GPU was, how often the host waited for it, and the top operators.

    python benchmarks/profile_steps.py --wait 6 --active 4 -- --model 7b --batch_size 4 --dtype bf16 \
        --activation_checkpointing --dataset synthetic --vocab_size 32000 --eval_every 0 --steps 12 \
        --keep_checkpoints 0 --out_dir runs/profile-7b

Everything after ``--`` goes to launch/pretrain.py unchanged (``--keep_checkpoints 0``: no end-of-run
checkpoint to write). The profiler skips ``--wait`` steps (model set-up, first selection, allocator
warm-up), warms up one, then records ``--active`` steps.
GPU busy = the union of kernel intervals / wall time of the recorded steps: well below 100% means the host
(Python, launches, synchronisations) sets the pace, not the GPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from blockllm_scale.launcher import train as pretrain  # noqa: E402

# Host calls that wait for the GPU: explicit synchronisations and the copies that .item() / .cpu() make.
WAITS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize")


def merged_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def summarize(prof, step_seconds: list[float]) -> dict:
    events = prof.events()
    # Kernels and copies on the GPU; ranges such as ProfilerStep# are mirrored there as "user annotations".
    kernels = [(e.time_range.start, e.time_range.end) for e in events
               if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]
    wall_us = sum(step_seconds) * 1e6
    waits = {name: sum(1 for e in events if e.name == name) for name in WAITS}
    return {
        "steps": len(step_seconds),
        "step_ms": [round(s * 1e3, 1) for s in step_seconds],
        "gpu_busy": merged_length(kernels) / wall_us if wall_us else None,
        "kernels_per_step": len(kernels) / max(1, len(step_seconds)),
        "waits_per_step": {k: v / max(1, len(step_seconds)) for k, v in waits.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wait", type=int, default=6, help="steps run before recording")
    parser.add_argument("--active", type=int, default=4, help="steps recorded")
    parser.add_argument("--json", default="", help="also write the summary here")
    parser.add_argument("--rows", type=int, default=12, help="operators listed")
    args, launcher_argv = parser.parse_known_args()
    launcher_argv = [a for a in launcher_argv if a != "--"]

    ends: list[float] = []
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                   schedule=schedule(wait=args.wait, warmup=1, active=args.active, repeat=1))
    write = pretrain.MetricsLog.write

    def write_and_tick(self, record):  # the launcher writes each step's record after synchronising the GPU
        write(self, record)
        ends.append(time.perf_counter())
        prof.step()

    pretrain.MetricsLog.write = write_and_tick
    with prof:
        pretrain.main(launcher_argv)
    first = args.wait + 1  # index into ends of the first recorded step's end
    step_seconds = [b - a for a, b in zip(ends[first - 1:first + args.active - 1], ends[first:first + args.active])]
    summary = summarize(prof, step_seconds)
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cuda_time_total", row_limit=args.rows))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print("[profile] " + json.dumps(summary))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"argv": launcher_argv, **summary}, indent=1))


if __name__ == "__main__":
    main()
