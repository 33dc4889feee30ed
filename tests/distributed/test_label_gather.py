"""Labels of every rank in rank order, in one collective a step once the ranks know the largest local batch."""

import torch
import torch.distributed as dist

from tests.dist_utils import run_ranks
from torchrec_shark.distributed.label_gather import LabelGather

# local batch sizes per step on ranks 0 and 1: equal, a larger one (a second round), smaller ones, an empty one
SIZES = [(4, 4), (4, 6), (3, 2), (6, 6), (0, 5), (7, 1)]


def _labels(step: int, rank: int, n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32) + 100 * step + 10 * rank + 0.5


def _gather(rank, world):
    calls = []
    real = dist.all_gather

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    dist.all_gather = counted
    gather, out = LabelGather(), []
    try:
        for step, sizes in enumerate(SIZES):
            before = len(calls)
            got = gather(_labels(step, rank, sizes[rank]), None)
            out.append((got, len(calls) - before, gather.capacity))
    finally:
        dist.all_gather = real
    return out


def test_labels_of_every_rank_in_rank_order_in_one_collective_a_step():
    results = run_ranks(_gather, 2)
    for rank_result in results:
        for step, (got, collectives, capacity) in enumerate(rank_result):
            want = torch.cat([_labels(step, r, SIZES[step][r]) for r in range(2)])
            assert torch.equal(got, want), step
            # the first step learns the sizes; a batch above every earlier one costs a second round
            grows = step == 0 or max(SIZES[step]) > max(max(s) for s in SIZES[:step])
            assert collectives == (2 if grows else 1), step
            assert capacity == max(max(s) for s in SIZES[: step + 1])


def test_one_rank_keeps_its_labels_without_a_collective():
    (result,) = run_ranks(_gather, 1)
    for step, (got, collectives, _) in enumerate(result):
        assert torch.equal(got, _labels(step, 0, SIZES[step][0])) and collectives == 0
