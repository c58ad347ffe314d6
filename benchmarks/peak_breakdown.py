"""What is live at a run's memory peak, from a snapshot the launcher wrote (``--memory_snapshot``).

    python benchmarks/peak_breakdown.py runs/x/snapshot.pickle [--top 25]

Replays the allocation trace of ``torch.cuda.memory._dump_snapshot`` (recording started before the model
existed, so the replay starts from zero), finds the moment the allocated bytes peak, and groups the
tensors live then by where they were allocated: the innermost frame in this repository or in
transformers / bitsandbytes / torchao / deepspeed (torch's own frames are skipped), else the innermost.
This is how the memory model's terms are checked against a real run rather than guessed.
"""

from __future__ import annotations

import argparse
import pickle
from collections import defaultdict
from dataclasses import dataclass

GIB = 2**30
# Where an allocation is charged: the first (innermost) frame whose file path contains one of these.
OWNERS = ("blockllm_scale/", "launch/", "baselines/", "benchmarks/", "transformers/", "bitsandbytes/", "torchao/",
          "deepspeed/")


@dataclass
class Peak:
    bytes: int
    event: int  # index of the allocation that reached the peak
    live: dict[int, dict]  # address -> the alloc event of each tensor live then


def find_peak(trace: list[dict]) -> Peak:
    """Replay alloc / free_requested events (the caching allocator's 'allocated' counter moves on these)."""
    live: dict[int, dict] = {}
    current, best, best_event, best_live = 0, -1, -1, {}
    for index, event in enumerate(trace):
        action = event["action"]
        if action == "alloc":
            live[event["addr"]] = event
            current += event["size"]
            if current > best:
                best, best_event, best_live = current, index, dict(live)
        elif action == "free_requested" and event["addr"] in live:
            current -= live.pop(event["addr"])["size"]
    return Peak(max(best, 0), best_event, best_live)


def owner(frames: list[dict]) -> str:
    for frame in frames:
        if any(p in frame["filename"] for p in OWNERS):
            return f"{_short(frame['filename'])}:{frame['line']} {frame['name']}"
    return f"{_short(frames[0]['filename'])}:{frames[0]['line']} {frames[0]['name']}" if frames else "(no stack)"


def _short(path: str) -> str:
    for marker in ("site-packages/", "blockllm_scale/", "launch/", "baselines/", "benchmarks/"):
        if marker in path:
            return (marker if not marker.startswith("site") else "") + path.split(marker, 1)[1]
    return path


def breakdown(snapshot: dict, device: int = 0) -> tuple[Peak, list[tuple[str, int, int]]]:
    """(the peak, [(owner, bytes, tensors)] largest first)."""
    peak = find_peak(snapshot["device_traces"][device])
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for event in peak.live.values():
        group = groups[owner(event.get("frames", []))]
        group[0] += event["size"]
        group[1] += 1
    rows = sorted(((k, v[0], v[1]) for k, v in groups.items()), key=lambda r: -r[1])
    return peak, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("snapshot")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--device", type=int, default=0)
    args = parser.parse_args(argv)
    with open(args.snapshot, "rb") as f:
        snapshot = pickle.load(f)
    peak, rows = breakdown(snapshot, args.device)
    trace = snapshot["device_traces"][args.device]
    at = trace[peak.event] if peak.event >= 0 else {}
    print(f"peak {peak.bytes / GIB:.3f} GiB at event {peak.event} of {len(trace)}, reached by "
          f"{at.get('size', 0) / GIB:.3f} GiB from {owner(at.get('frames', []))}")
    print(f"{'GiB':>8} {'tensors':>8}  allocated at")
    for name, size, count in rows[:args.top]:
        print(f"{size / GIB:8.3f} {count:8d}  {name}")
    rest = rows[args.top:]
    if rest:
        print(f"{sum(r[1] for r in rest) / GIB:8.3f} {sum(r[2] for r in rest):8d}  ({len(rest)} other places)")


if __name__ == "__main__":
    main()
