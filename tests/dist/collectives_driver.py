"""Run under torchrun with 2 CPU processes: every rank writes what the launcher's collectives returned."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from blockllm_scale.parallel import barrier, gather_over_ranks, mean_over_ranks

dist.init_process_group("gloo")
rank = dist.get_rank()
# Each rank's values must come back in rank order, on every rank.
result = {"world_size": dist.get_world_size(), "gathered": gather_over_ranks([1.5 + rank, 7.0 - rank]),
          "mean": mean_over_ranks(float(rank))}
barrier()
Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(result))
dist.destroy_process_group()
