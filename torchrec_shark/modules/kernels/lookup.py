"""Pooled lookup over a row store: dedupe ids, fetch each distinct row once, pool, and in
backward hand the per-row summed gradient to the store's fused optimizer.

The store (see :class:`~torchrec_shark.modules.mixed_precision.RowStoreTable`) provides

* ``slots_of(ids)``: the storage slot of each id (ids themselves for a one-tier store);
  slots of one precision tier are contiguous, so sorting by slot groups rows by tier;
* ``tier_bounds(slots)``: where each tier's run starts and ends in sorted unique slots;
* ``gather(index) -> [U, D] fp32`` and ``apply_gradients(index, grad, values)``;
* ``num_embeddings`` and ``version`` (bumped on every write).

Pooling and its transpose are both ``F.embedding_bag`` calls (the forward one pools the
``U`` fetched rows by bag; the backward one pools the bags' gradients by row, using the
id -> row grouping computed once in forward), so no dense ``[num_embeddings, D]`` gradient
ever exists and nothing is left in ``.grad``. Index bookkeeping on CPU runs in numpy, whose
per-call overhead and sorts are several times cheaper than torch's at these sizes.

Example::

    out = pooled_lookup(store, row_index(store, ids), offsets, per_sample_weights=None, divisor=None,
                        anchor=anchor)  # [B, D]
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from torchrec_shark.modules.kernels.host import numpy_path


class RowIndex(NamedTuple):
    """How the ids of one lookup map onto their distinct rows.

    ``slots`` are the distinct storage slots (ascending) and ``rows`` their row ids;
    ``inverse[i]`` is the position of ``ids[i]`` in ``slots``; ``perm`` lists id positions
    grouped by slot, slot ``u``'s occurrences being ``perm[offsets[u]:offsets[u + 1]]``;
    ``bounds[k]:bounds[k + 1]`` is the run of tier ``k`` in ``slots``.
    """

    slots: torch.Tensor
    rows: torch.Tensor
    inverse: torch.Tensor
    perm: torch.Tensor
    offsets: torch.Tensor
    bounds: List[int]


def unique_index(keys: torch.Tensor, ids: torch.Tensor, num_keys: int) -> tuple:
    """``(unique keys ascending, ids at their first occurrence, inverse, perm, offsets)``.

    On CPU one numpy value sort of packed ``(key << b) | position`` int64 keys does it all
    (several times faster here than ``torch.unique``/``argsort``).
    """
    n = keys.numel()
    pos_bits = max(1, (max(n, 1) - 1).bit_length())
    if numpy_path(keys) and max(num_keys, 1).bit_length() + pos_bits <= 62:
        k = keys.numpy().astype(np.int64, copy=False)
        packed = (k << pos_bits) | np.arange(n, dtype=np.int64)
        packed.sort()
        sk = packed >> pos_bits
        perm = packed & ((1 << pos_bits) - 1)
        first = np.empty(n, dtype=bool)
        first[:1] = True
        np.not_equal(sk[1:], sk[:-1], out=first[1:])
        starts = np.flatnonzero(first)
        inverse = np.empty(n, dtype=np.int64)
        inverse[perm] = np.cumsum(first) - 1
        uniq = sk[starts]
        rows = uniq if ids is keys else ids.numpy()[perm[starts]].astype(np.int64, copy=False)
        return (
            torch.from_numpy(uniq),
            torch.from_numpy(rows),
            torch.from_numpy(inverse),
            torch.from_numpy(perm),
            torch.from_numpy(np.append(starts, n)),
        )
    keys, ids = keys.long(), ids.long()
    sk, perm = torch.sort(keys, stable=True)
    uniq, counts = torch.unique_consecutive(sk, return_counts=True)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    inverse = torch.empty_like(keys)
    inverse[perm] = torch.repeat_interleave(torch.arange(uniq.numel(), device=keys.device), counts)
    rows = ids.index_select(0, perm.index_select(0, offsets[:-1]))
    return uniq, rows, inverse, perm, offsets


def row_index(store, ids: torch.Tensor) -> RowIndex:
    """Distinct rows of ``ids`` sorted by storage slot (so grouped by tier)."""
    ids = ids.reshape(-1)
    keys = store.slots_of(ids)
    slots, rows, inverse, perm, offsets = unique_index(keys, ids, store.num_embeddings)
    return RowIndex(slots, rows, inverse, perm, offsets, store.tier_bounds(slots))


def bag_of_ids(offsets: torch.Tensor, n: int) -> torch.Tensor:
    """Bag index of each id, ``[n]`` int64, from ``B + 1`` offsets."""
    if numpy_path(offsets):
        o = offsets.numpy()
        return torch.from_numpy(np.repeat(np.arange(o.size - 1, dtype=np.int64), np.diff(o)))
    lengths = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=n)


class _PooledLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, per_sample_weights, store, index, offsets, divisor):  # type: ignore[override]
        values = store.gather(index)
        psw = per_sample_weights
        out = F.embedding_bag(index.inverse, values, offsets, mode="sum", per_sample_weights=psw,
                              include_last_offset=True)
        if divisor is not None:
            out = out / divisor.unsqueeze(1).to(out.dtype)
        ctx.store, ctx.index, ctx.version = store, index, store.version
        ctx.save_for_backward(values, offsets, psw, divisor)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        values, offsets, psw, divisor = ctx.saved_tensors
        store, index = ctx.store, ctx.index
        grad_out = grad_out.contiguous()
        bag = bag_of_ids(offsets, index.inverse.numel())
        scale = psw
        if divisor is not None:
            per_id = (1.0 / divisor.to(grad_out.dtype)).index_select(0, bag)
            scale = per_id if scale is None else scale * per_id
        grad_rows = F.embedding_bag(
            bag.index_select(0, index.perm),
            grad_out,
            index.offsets,
            mode="sum",
            per_sample_weights=None if scale is None else scale.index_select(0, index.perm),
            include_last_offset=True,
        )
        grad_psw = None
        if ctx.needs_input_grad[1]:
            grad_psw = (grad_out.index_select(0, bag) * values.index_select(0, index.inverse)).sum(1)
            if divisor is not None:
                grad_psw = grad_psw * per_id
        store.apply_gradients(index, grad_rows, values if store.version == ctx.version else None)
        return None, grad_psw, None, None, None, None


def mean_divisor(offsets: torch.Tensor) -> torch.Tensor:
    """Each bag's length (at least 1): what MEAN pooling divides its sum by."""
    offsets = offsets.long()
    return (offsets[1:] - offsets[:-1]).clamp(min=1).float()


def pooled_lookup(
    store,
    index,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    divisor: Optional[torch.Tensor],
    anchor: torch.Tensor,
) -> torch.Tensor:
    """Pool bags ``offsets[b]:offsets[b+1]`` of the ids ``index`` resolved (their rows in ``store``):
    ``[B, D]`` fp32, each bag's (weighted) sum divided by ``divisor[b]`` when given (MEAN: its length).

    ``anchor`` is a zero-size tensor with ``requires_grad=True`` that puts the lookup in the
    autograd graph; its gradient is never computed (the store updates itself instead).
    """
    offsets = offsets.long()
    if per_sample_weights is not None:
        per_sample_weights = per_sample_weights.float()
    if not torch.is_grad_enabled():
        anchor = anchor.detach()
    return _PooledLookup.apply(anchor, per_sample_weights, store, index, offsets, divisor)
