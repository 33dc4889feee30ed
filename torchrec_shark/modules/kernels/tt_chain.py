"""Tensor-train row reconstruction: the chain of core-slice products, its backward, and dense materialisation.

Cores are in the canonical layout ``(R_{k-1}, p_k, q_k, R_k)``. For ``U`` distinct rows with
mixed-radix digits ``i_1 .. i_d`` the chain computes, left to right,

    X_1 = G_1[i_1]                                  (U, q_1, R_1)
    X_k = X_{k-1}.view(U m, R_{k-1}) @ G_k[i_k]      (U, m q_k, R_k),  m = q_1 ... q_{k-1}

and the last ``X_d`` is the rows ``(U, D)``. How each product runs (BLAS only, no custom kernel):

* **middle cores** (slices ``R_{k-1} x q_k R_k``: 16 KB and 16 K multiply-adds per row at rank 32 and
  ``q_k = 4``, the bulk of the work): the rows are sorted by their digit ``i_k`` and one *grouped GEMM*
  computes ``(c m, R_{k-1}) @ (R_{k-1}, q_k R_k)`` for every distinct slice, reading the core in place.
  On CPU that is one call to MKL's batch GEMM (:mod:`~torchrec_shark.modules.kernels.mkl_gemm_batch`:
  ``torch._grouped_mm`` pays a dispatch per group, about 3 us, which at ``p_k`` of 100-200 slices and
  three products per step was a third of their time); elsewhere ``torch._grouped_mm``, or a loop of
  ``mm`` where that op does not take the dtype. A per-row batched product would copy a slice per row
  (most of the time on CPU) or run ``U`` GEMMs of 16 K multiply-adds each.
* **first and last cores** (slices ``q_1 x R_1`` and ``R_{d-1} x q_d``, at most 1 KB): the first is
  gathered per row as the input of the first grouped GEMM; the last product is ``U`` tiny GEMMs, one MKL
  batch call that reads each slice in the core and writes each row in the ids' order (a gather, ``bmm``
  and scatter elsewhere), and ``bmm`` in the backward (faster there, see :func:`_last_backward`).
* between two middle stages (4 cores) the prefix products are permuted once to the next digit order.

The backward runs the same products in reverse with the saved stage inputs and returns, per core, the
gradient of each *touched* slice already summed over its rows (the grouped GEMMs produce the middle
cores' sums directly; the first and last cores' are summed with ``index_add``), so a sparse optimizer
updates ``(slice ids, slice grads)`` as they come, with no dense gradient of the cores.

Example::

    rows, saved = chain_forward(cores, split_ids(ids, layout.row_factors), save=True)
    slice_grads = chain_backward(cores, saved, grad_rows)  # [(slice ids, grads (G, R, q, R')), ...] per core
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from torchrec_shark.modules.kernels import mkl_gemm_batch as mkl

# (device type, dtype) -> whether torch._grouped_mm runs there; learnt on first use.
_GROUPED_MM_OK: Dict[Tuple[str, torch.dtype], bool] = {}
USE_GROUPED_MM = hasattr(torch, "_grouped_mm")  # False: always the mm loop (tests compare both)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm`` semantics, with a loop of ``mm`` as fallback.

    ``a (M, K)``, ``b (G, K, N)``: rows ``[offs[g-1], offs[g])`` of ``a`` times ``b[g]`` -> ``(M, N)``.
    ``a (M, K)``, ``b (K, N)``: columns ``[offs[g-1], offs[g])`` of ``a`` times those rows of ``b``
    -> ``(G, M, N)``. ``offs`` (int32, ascending) holds the group ends; empty groups are allowed.
    """
    out = mkl.grouped_mm_mkl(a, b, offs)
    if out is not None:
        return out
    key = (a.device.type, a.dtype)
    if USE_GROUPED_MM and _GROUPED_MM_OK.get(key, True):
        try:
            return torch._grouped_mm(a, b, offs=offs)
        except (RuntimeError, NotImplementedError):
            _GROUPED_MM_OK[key] = False
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    if b.dim() == 3:
        out = a.new_empty(a.shape[0], b.shape[2])
        for g, (lo, hi) in enumerate(zip(starts, ends)):
            if hi > lo:
                torch.mm(a[lo:hi], b[g], out=out[lo:hi])
        return out
    out = a.new_zeros(len(ends), a.shape[0], b.shape[1])
    for g, (lo, hi) in enumerate(zip(starts, ends)):
        if hi > lo:
            torch.mm(a[:, lo:hi], b[lo:hi], out=out[g])
    return out


@dataclass
class _Stage:
    """The grouped product with one middle core."""

    a: torch.Tensor  # input, rows sorted by this core's digit: (U * m, R_{k-1})
    order: torch.Tensor  # row j of this stage is id order[j]
    inv: Optional[torch.Tensor]  # id i is row inv[i] of this stage (kept with 2+ middle cores only)
    counts: torch.Tensor  # ids per digit (all p_k digits)
    offs: torch.Tensor  # int32 group ends in rows of ``a``


@dataclass
class ChainSaved:
    first_digits: torch.Tensor  # first-core digit per row, in the row order of the first product
    stages: List[_Stage]  # middle cores
    last_digits: torch.Tensor  # last-core digit per row, in the row order of the last product
    last_in: torch.Tensor  # input of the last product (U, m, R_{d-1})


def _slice_view(core: torch.Tensor) -> torch.Tensor:
    """Middle core ``(R, p, q, R')`` as ``(p, R, q R')`` matrices (a view, no copy)."""
    r_in, p, q, r_out = core.shape
    return core.reshape(r_in, p, q * r_out).transpose(0, 1)


def _last_slices(last: torch.Tensor, digits: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """Last-core slices ``(U, R_{d-1}, q_d)`` of ``digits``, or ``(U, q_d, R_{d-1})`` with ``transposed``
    (the core is small: one contiguous copy, then a row gather)."""
    slices = last[..., 0].permute(1, 2, 0) if transposed else last[..., 0].transpose(0, 1)
    return slices.contiguous().index_select(0, digits)


def _sum_by(digits: torch.Tensor, per_row: torch.Tensor, num_slices: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Distinct ``digits`` (ascending) and the sums of ``per_row`` (U, ...) over each.

    Digits are below ``num_slices`` (a core's ``p_k``, at most a few hundred), so a dense accumulator over
    all slices plus a ``bincount`` finds the present ones without the sort ``torch.unique`` would run;
    ``index_add_`` adds in row order either way, so the sums are the same."""
    present = torch.bincount(digits, minlength=num_slices).nonzero().squeeze(1)
    dense = per_row.new_zeros(num_slices, *per_row.shape[1:]).index_add_(0, digits, per_row)
    return present, (dense if present.numel() == num_slices else dense.index_select(0, present))


def _order_by(digit: torch.Tensor, num_slices: int) -> torch.Tensor:
    """A permutation that sorts ``digit`` (values below ``num_slices``).

    On CPU through NumPy's stable sort of 16-bit integers, a radix sort: about a fifth of the time of
    ``torch.argsort`` for a few thousand ids."""
    if digit.device.type == "cpu" and num_slices <= 2**15:
        return torch.from_numpy(np.argsort(digit.numpy().astype(np.int16), kind="stable"))
    return torch.argsort(digit)


def _row_pointers(t: torch.Tensor, rows: Optional[torch.Tensor], count: int) -> np.ndarray:
    """Address of row ``rows[j]`` (``j`` if ``rows`` is None) of ``t``, for j < count."""
    index = np.arange(count, dtype=np.int64) if rows is None else rows.numpy()
    return t.data_ptr() + index * (t.stride(0) * t.element_size())


def _last_forward(x: torch.Tensor, last: torch.Tensor, digits: torch.Tensor, dest: Optional[torch.Tensor]) -> torch.Tensor:
    """Rows ``(U, m q_d)``: ``x[j] (m, R_{d-1})`` times the last-core slice ``digits[j]``, written to row
    ``dest[j]`` (``j`` if ``dest`` is None).

    With MKL's batch GEMM each product reads its slice inside the core and writes its row in place (1.26 ms
    against 1.41 ms for the torch path at 3000 rows, D = 128, rank 32); the torch path gathers the slices,
    runs one ``bmm`` and scatters the rows."""
    U, m, r = x.shape
    q = last.shape[2]
    if mkl.usable(x, last) and x.is_contiguous() and last.is_contiguous():
        out = x.new_empty(U, m * q)
        mkl.gemm_batch(x.dtype, mkl.NO_TRANS, mkl.NO_TRANS, m, q, r, _row_pointers(x, None, U), r,
                       _row_pointers(last.transpose(0, 1), digits, U), last.stride(0), _row_pointers(out, dest, U), q)
        return out
    rows = torch.bmm(x, _last_slices(last, digits)).view(U, m * q)
    return rows if dest is None else torch.empty_like(rows).index_copy_(0, dest, rows)


def _last_backward(
    grad_rows: torch.Tensor, source: Optional[torch.Tensor], x: torch.Tensor, last: torch.Tensor,
    digits: torch.Tensor, scratch: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The gradients of :func:`_last_forward` (``dest = source``) given the rows' ``grad_rows``: per product,
    its slice's gradient transposed ``(U, q_d, R_{d-1})`` and ``x``'s gradient ``(U, m, R_{d-1})``.

    Both are U tiny GEMMs, which ``torch.bmm`` runs faster than MKL's batch GEMM (0.6-0.7 ms each against
    0.9-1.4 ms for 3000 rows at rank 32), enough to pay for the permutation of the gradient and the gather of
    the slices that MKL would not need. BLAS runs them about twice as fast when the narrow (q_d) side is the
    contiguous left operand, so the slices' gradient is formed transposed, g^T @ x, and the input's gradient
    from the slices gathered transposed."""
    U, m, r = x.shape
    g = (grad_rows if source is None else grad_rows.index_select(0, source)).view(U, m, -1)
    slice_grads = torch.bmm(g.transpose(1, 2), x)
    g_out = None if scratch is None else scratch.resize_(U, m, r)
    return slice_grads, torch.bmm(g, _last_slices(last, digits, transposed=True), out=g_out)


def chain_forward(
    cores: Sequence[torch.Tensor], digits: Sequence[torch.Tensor], save: bool = False
) -> Tuple[torch.Tensor, Optional[ChainSaved]]:
    """Rows ``(U, D)`` for the ids whose digits are given; with ``save`` also what the backward needs."""
    U, d = digits[0].numel(), len(cores)
    first, last = cores[0][0], cores[-1]  # (p_1, q_1, R_1), (R_{d-1}, p_d, q_d, 1)
    if d == 2:  # one product per row, in the ids' order
        x = first.index_select(0, digits[0])
        rows = _last_forward(x, last, digits[1], None)
        return rows, (ChainSaved(digits[0], [], digits[1], x) if save else None)

    m = first.shape[1]
    stages: List[_Stage] = []
    first_digits = digits[0]
    x: Optional[torch.Tensor] = None
    inv = order = None
    for k in range(1, d - 1):
        r_in, p, q, r_out = cores[k].shape
        digit = digits[k]
        order = _order_by(digit, p)
        if x is None:  # gather the first-core slices straight into this stage's order
            first_digits = digits[0].index_select(0, order)
            a = first.index_select(0, first_digits).view(U * m, r_in)
        else:  # previous output, from its row order into this one's
            a = x.view(U, m * r_in).index_select(0, inv.index_select(0, order)).view(U * m, r_in)
        if d > 3:  # another middle stage follows (or precedes, in the backward): it needs the way back
            inv = torch.empty_like(order)
            inv[order] = torch.arange(U, device=order.device)
        counts = torch.bincount(digit, minlength=p)
        offs = (counts * m).cumsum(0).to(torch.int32)
        x = grouped_mm(a, _slice_view(cores[k]), offs)  # (U m, q R')
        if save:
            stages.append(_Stage(a, order, inv, counts, offs))
        m *= q
    last_in = x.view(U, m, last.shape[0])
    last_digits = digits[-1].index_select(0, order)
    rows = _last_forward(last_in, last, last_digits, order)
    return rows, (ChainSaved(first_digits, stages, last_digits, last_in) if save else None)


def chain_backward(
    cores: Sequence[torch.Tensor], saved: ChainSaved, grad_rows: torch.Tensor, scratch: Optional[torch.Tensor] = None
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Per core: ``(distinct slice ids, their summed gradients (G_k, R_{k-1}, q_k, R_k))``.

    ``scratch`` (optional; the cores' dtype and device, any size, resized here) is storage the caller keeps
    from call to call for the largest temporary, the gradient of the last product's input (``U m R_{d-1}``
    values: 6 MB for 3000 ids at ``D = 64``, rank 32). Why: a fresh buffer that size often comes from
    newly mapped pages (the allocator hands such blocks back to the system between steps), and faulting
    them in can cost as much as the product that fills them. It holds nothing the caller reads afterwards."""
    U, d = grad_rows.shape[0], len(cores)
    if U == 0:  # nothing looked up through the cores (empty batch, or every row a cache hit)
        ids = saved.first_digits.new_empty(0)
        return [(ids, grad_rows.new_empty(0, c.shape[0], c.shape[2], c.shape[3])) for c in cores]
    first, last = cores[0], cores[-1]
    q1, r1 = first.shape[2], first.shape[3]
    r_last, q_last = last.shape[0], last.shape[2]
    source = None if d == 2 else saved.stages[-1].order
    slice_grads, g = _last_backward(grad_rows, source, saved.last_in, last, saved.last_digits, scratch)
    last_ids, last_sum = _sum_by(saved.last_digits, slice_grads, last.shape[1])
    out: List[Tuple[torch.Tensor, torch.Tensor]] = [(last_ids, last_sum.transpose(1, 2).contiguous().view(-1, r_last, q_last, 1))]
    for k in range(d - 2, 0, -1):
        st = saved.stages[k - 1]
        r_in, _, q, r_out = cores[k].shape
        if k < d - 2:  # from the next stage's row order into this one's
            g = g.view(U, -1).index_select(0, saved.stages[k].inv.index_select(0, st.order))
        g = g.reshape(-1, q * r_out)
        present = st.counts.nonzero().squeeze(1)
        dw = grouped_mm(st.a.t(), g, st.offs)  # (p_k, R_{k-1}, q_k R_k), zero for absent slices
        if present.numel() < dw.shape[0]:  # a large batch touches every slice: no copy then
            dw = dw.index_select(0, present)
        out.append((present, dw.view(-1, r_in, q, r_out)))
        g = grouped_mm(g, _slice_view(cores[k]).transpose(1, 2), st.offs)  # (U m, R_{k-1})
    first_ids, first_sum = _sum_by(saved.first_digits, g.reshape(U, q1 * r1), first.shape[1])
    out.append((first_ids, first_sum.view(-1, 1, q1, r1)))
    return out[::-1]


def materialize(cores: Sequence[torch.Tensor], first_slices: Optional[slice] = None) -> torch.Tensor:
    """The dense rows of the cores, ``(p_1' * p_2 * ... * p_d, D)`` for the first-core slices ``first_slices``
    (all by default): contraction over whole cores, independent of the chain above."""
    x = cores[0][0] if first_slices is None else cores[0][0, first_slices]  # (P, M, R) with P=p1', M=q1
    for core in cores[1:]:
        r_in, p, q, r_out = core.shape
        P, M, _ = x.shape
        x = torch.matmul(x.reshape(P * M, r_in), core.reshape(r_in, p * q * r_out))
        x = x.view(P, M, p, q, r_out).permute(0, 2, 1, 3, 4).reshape(P * p, M * q, r_out)
    return x.squeeze(2)
