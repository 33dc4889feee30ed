"""Row gathers and scatters on pools of 1- and 2-byte elements, moved as wider machine words.

torch's ``index_select`` / ``index_copy_`` move a row element by element: an int8 row of 64 codes plus its
scale and bias is 68 one-byte moves, the same row seen as int32 is 17. Viewing the pool and the rows as the
widest integer type that divides the row's bytes (and the pool's offset in its storage) moves the same bytes
in a fraction of the element moves. Measured on one CPU thread, 33,750 rows written into a pool of 4.1M:
68-byte int8 rows 2.1 ms as uint8 against 1.1 ms as int32; 64-wide fp16 rows 2.7 ms against 1.4 ms as int64.
fp32 rows gain nothing (already 4-byte moves) and go as they are. The bytes are the same either way.

Example::

    rows = take_rows(pool, slots)              # pool: uint8 [N, 68] -> uint8 [len(slots), 68]
    put_rows_(pool, slots, encoded)            # encoded: uint8 [len(slots), 68]
"""

from __future__ import annotations

import torch

_WORDS = (torch.int64, torch.int32)


def _word_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` ([n, w], rows contiguous) seen as the widest integer words that tile its rows, or ``t`` itself."""
    size = t.element_size()
    if size >= 4 or t.dim() != 2 or t.stride(1) != 1 or t.shape[0] == 0:
        return t
    row_bytes, offset_bytes, stride_bytes = t.shape[1] * size, t.storage_offset() * size, t.stride(0) * size
    for word in _WORDS:
        w = word.itemsize
        if row_bytes % w == 0 and offset_bytes % w == 0 and stride_bytes % w == 0:
            return t.view(word)
    return t


def take_rows(pool: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``pool.index_select(0, index)``, moved as words where the rows allow."""
    words = _word_view(pool)
    if words is pool:
        return pool.index_select(0, index)
    return words.index_select(0, index).view(pool.dtype)


def put_rows_(pool: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``pool.index_copy_(0, index, rows)``, moved as words where the rows allow; returns ``pool``."""
    words = _word_view(pool)
    if words is not pool and rows.dtype == pool.dtype:
        rows = rows.contiguous()
        src = _word_view(rows)
        if src.dtype == words.dtype:
            words.index_copy_(0, index, src)
            return pool
    return pool.index_copy_(0, index, rows)
