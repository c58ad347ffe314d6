"""The launcher's collectives on 2 CPU processes: the reported peak memory is the largest rank's."""

import json

from launch_utils import REPO, failure_report, torchrun


def test_max_over_ranks_takes_each_value_from_the_rank_that_has_the_largest(tmp_path):
    result = torchrun(REPO / "tests" / "dist" / "collectives_driver.py", str(tmp_path), nproc=2, timeout=120)
    assert result.returncode == 0, failure_report(result)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert [r["max"] for r in ranks] == [[2.5, 7.0], [2.5, 7.0]]
    assert [r["mean"] for r in ranks] == [0.5, 0.5]
