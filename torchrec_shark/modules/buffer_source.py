"""Where a row store's buffers come from: its own zeroed tensors, or views of a fused store's buffers.

A row-store table asks :func:`allocate` for each of its buffers, naming the buffer's *role*:

* ``("pool", precision)``: a tier pool (rows of one precision);
* ``("rows",)``: a per-row tensor (slot map, priority, optimizer state), indexed by the table's rows;
* ``("scalar",)``: a 0-dim counter;
* ``("hits",)``: per-tier lookup counters.

Outside any source it gets a fresh zeroed tensor. While a fused store builds its members
(:mod:`~torchrec_shark.modules.fused_store`) a source is active: when planning (tables built on ``meta``)
it records each request, and when building it hands out zeroed views of the store's batched buffers
(one per precision, per row tensor and per counter), so the tables of a fused store keep their own
per-table tensors (state-dict keys, bytes, checkpoints) without any copy.

Example::

    pool = allocate("int8_rows", (rows, 36), torch.uint8, device, ("pool", "int8"))
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Protocol, Tuple

import torch

from torchrec_shark.modules.kernels.huge_pages import zeros_on_huge_pages


class BufferSource(Protocol):
    def take(self, name: str, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device,
             role: Tuple[str, ...]) -> torch.Tensor: ...


_source: Optional[BufferSource] = None


def allocate(name: str, shape, dtype: torch.dtype, device, role: Tuple[str, ...]) -> torch.Tensor:
    """A zeroed tensor for buffer ``name`` of ``role`` (see the module doc): the active source's, or a new one."""
    shape = tuple(int(s) for s in shape)
    if _source is not None:
        return _source.take(name, shape, dtype, torch.device(device), role)
    return zeros_on_huge_pages(shape, dtype, device)


@contextlib.contextmanager
def buffers_from(source: BufferSource) -> Iterator[None]:
    """Row stores built inside this block take their buffers from ``source``."""
    global _source
    before, _source = _source, source
    try:
        yield
    finally:
        _source = before
