"""The multi-rank test harness fails, rather than hangs, when one rank raises while the other waits."""

import time

import pytest
import torch.distributed as dist

from tests.dist_utils import run_ranks


def _one_rank_fails(rank, world_size):
    if rank == 1:
        raise RuntimeError("rank 1 broke")
    dist.barrier()  # rank 0 waits in a collective rank 1 never reaches


def test_a_failing_rank_ends_the_run_with_its_error():
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="rank 1 broke"):
        run_ranks(_one_rank_fails, 2)
    assert time.monotonic() - t0 < 120
