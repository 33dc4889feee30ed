"""Which tensors get their index bookkeeping in numpy: CPU tensors (numpy's per-call cost and sorts are
several times cheaper than torch's at these sizes), never tensors on another device (torch ops there, so a
CUDA step never copies ids to the host).

:func:`torch_ops_only` sends CPU tensors down the torch path too: the path CUDA tensors take, checked on a
machine without a GPU.

Example::

    if numpy_path(ids):
        uniq = np.unique(ids.numpy())
    else:
        uniq = torch.unique(ids)
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

_numpy = True


def numpy_path(t: torch.Tensor) -> bool:
    """Whether ``t``'s bookkeeping runs in numpy (a CPU tensor, outside :func:`torch_ops_only`)."""
    return _numpy and t.device.type == "cpu"


@contextlib.contextmanager
def torch_ops_only() -> Iterator[None]:
    """Within the block every tensor takes the torch-ops path (the one CUDA tensors take)."""
    global _numpy
    before, _numpy = _numpy, False
    try:
        yield
    finally:
        _numpy = before
