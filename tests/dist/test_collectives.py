"""The launcher's collectives on 2 CPU processes: every rank gets every rank's values in rank order (the
launcher's one gather a step: loss, time budget, peak memory), and the mean BlockLLM's patience rule uses."""

import json

from launch_utils import REPO, failure_report, torchrun


def test_gather_returns_every_ranks_values_in_rank_order_on_every_rank(tmp_path):
    result = torchrun(REPO / "tests" / "dist" / "collectives_driver.py", str(tmp_path), nproc=2, timeout=120)
    assert result.returncode == 0, failure_report(result)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert [r["gathered"] for r in ranks] == [[[1.5, 7.0], [2.5, 6.0]]] * 2
    assert [r["mean"] for r in ranks] == [0.5, 0.5]
