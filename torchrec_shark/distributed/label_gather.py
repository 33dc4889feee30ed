"""A training batch's labels from every rank, in rank order (the global batch's bag order), in one collective.

Row-wise shards count labels for the global batch (see ``ShardedCompressedEmbeddingBagCollection``), so every
rank needs every rank's labels each step. Local batches may differ in size, so a plain ``all_gather`` needs
the sizes first: two collectives a step, each a point where the ranks wait for each other. Here each rank
sends its size and its labels in one tensor padded to a capacity every rank agrees on (the largest local
batch any rank has had, which they all learnt from the same gathers); only a batch larger than that costs a
second round, once.

Example::

    gather = LabelGather()
    all_labels = gather(local_labels, group)   # [sum of the ranks' batch sizes]
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

# the size travels as a float next to the labels: exact below 2**24
_MAX_LOCAL_BATCH = 1 << 24


class LabelGather:
    """All-gathers per-rank label vectors of any sizes; see the module doc."""

    def __init__(self) -> None:
        self.capacity = 0  # the same on every rank of a group: set from gathered sizes only

    def __call__(self, labels: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
        labels = labels.reshape(-1).float()
        n = labels.numel()
        if n >= _MAX_LOCAL_BATCH:
            raise ValueError(f"a local batch of {n} labels: at most {_MAX_LOCAL_BATCH - 1} are gathered")
        world = dist.get_world_size(group)
        if world == 1:
            return labels
        if self.capacity:
            parts = self._gather(labels, n, self.capacity, world, group)
            sizes = [int(p[0]) for p in parts]
            if max(sizes) <= self.capacity:
                return torch.cat([p[1 : 1 + s] for p, s in zip(parts, sizes)])
        else:  # the first batch: sizes first, so that every rank learns the same capacity
            size = torch.tensor([float(n)], device=labels.device)
            parts = [torch.zeros_like(size) for _ in range(world)]
            dist.all_gather(parts, size, group=group)
            sizes = [int(p[0]) for p in parts]
        self.capacity = max(sizes)
        parts = self._gather(labels, n, self.capacity, world, group)
        return torch.cat([p[1 : 1 + s] for p, s in zip(parts, sizes)])

    @staticmethod
    def _gather(labels: torch.Tensor, n: int, capacity: int, world: int, group) -> List[torch.Tensor]:
        """Every rank's ``[size, labels..., padding]`` (``capacity + 1`` values; labels past it cut)."""
        send = torch.zeros(capacity + 1, device=labels.device)
        send[0] = n
        send[1 : 1 + min(n, capacity)] = labels[:capacity]
        parts = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(parts, send, group=group)
        return parts
