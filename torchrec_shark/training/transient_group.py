"""A gloo process group that lives for one block of collectives and takes its threads with it.

Why: a gloo collective copies its buffers on the group's worker threads, and a copy large enough
for ``at::parallel_for`` starts an OpenMP thread team owned by that worker thread. The team lives
as long as the thread. libgomp then manages more threads than the machine has CPUs and cuts the
spin-wait of the training thread's own team to a few hundred iterations: every parallel region
of a step pays a futex wake-up, and the second intra-op thread idles about half the time. A DCP
save (its plan gather) or a metrics gather on the default group does this once and the whole
rest of the run trains ~35% slower on 1 rank with 2 threads. A group destroyed after use joins
its worker threads, and libgomp releases the teams they started.

Example::

    with transient_group() as group:
        dcp.save(state, checkpoint_id=path, process_group=group)
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator, Optional

import torch.distributed as dist


@contextlib.contextmanager
def transient_group() -> Iterator[Optional[dist.ProcessGroup]]:
    """A fresh gloo group over every rank, destroyed on exit; ``None`` (the default group) without a
    default group or when it is not gloo (NCCL copies on the GPU, no OpenMP team).

    Every rank must enter it at the same point (``new_group`` is a collective). Do not keep the
    group (or an object holding it) beyond the block: its threads stop when the last reference goes.
    """
    if not dist.is_initialized() or dist.get_backend() != "gloo":
        yield None
        return
    group = dist.new_group(backend="gloo")
    try:
        yield group
    finally:
        dist.destroy_process_group(group)
        del group
        gc.collect()  # drop the last Python reference so the group's worker threads are joined now
