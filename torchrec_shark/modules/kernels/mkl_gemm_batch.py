"""Batches of small GEMMs on CPU in one call to MKL's ``cblas_?gemm_batch``, which the torch CPU library links
and exports.

Why not ``torch._grouped_mm``: on CPU it runs one ``mm`` per group through the dispatcher, about 3 us of
fixed cost per group. A tensor-train lookup runs three grouped products per middle core per step, one group
per core slice (216 slices for a 1e7-row table), so that cost alone was about 2 ms a step, a third of the
products' time. MKL's batch GEMM takes every group's sizes and pointers at once and returns the same values
(the same MKL kernels compute each group). Because it takes one pointer per matrix, it also multiplies each
row's slice of a core where it lies, and writes each product where it belongs, with no gather or scatter
copy around it (:func:`gemm_batch`). Nothing is compiled: the symbol is looked up in the library torch
already loaded.

Used only where it is known to work (:func:`usable`): CPU tensors of float32/float64 whose matrices each have
one unit stride, and a library that exports the symbol and passes a check against ``torch.mm`` on first use.
Elsewhere :func:`grouped_mm_mkl` returns ``None`` and callers use torch.

Example::

    out = grouped_mm_mkl(a, b, offs)   # or None: use torch._grouped_mm
    if usable(x, w):
        gemm_batch(x.dtype, NO_TRANS, NO_TRANS, m, n, k, a_ptrs, lda, b_ptrs, ldb, c_ptrs, ldc)
"""

from __future__ import annotations

import ctypes
import os
from typing import Dict, Optional, Tuple

import numpy as np
import torch

_ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
_SYMBOLS = {torch.float32: ("cblas_sgemm_batch", np.float32), torch.float64: ("cblas_dgemm_batch", np.float64)}
_FUNCTIONS: Dict[torch.dtype, Optional[object]] = {}
_CHECKED: Dict[torch.dtype, bool] = {}
ENABLED = True  # tests switch it off to compare with torch's path


def _function(dtype: torch.dtype):
    if dtype not in _FUNCTIONS:
        fn = None
        name = _SYMBOLS[dtype][0]
        try:
            lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
            fn = getattr(lib, name)
            fn.restype = None
            p = ctypes.c_void_p
            # MKL's LP64 interface (the one torch links): int32 sizes, arrays of pointers
            fn.argtypes = [ctypes.c_int] + [p] * 13 + [ctypes.c_int, p]
        except (OSError, AttributeError):
            fn = None
        _FUNCTIONS[dtype] = fn
    return _FUNCTIONS[dtype]


def _layout(m: torch.Tensor) -> Optional[Tuple[int, int]]:
    """``(transpose flag, leading dimension)`` of a 2-D matrix view, as BLAS sees it, or ``None``."""
    s0, s1 = m.stride(-2), m.stride(-1)
    if s1 == 1 and s0 >= max(1, m.shape[-1]):
        return NO_TRANS, s0
    if s0 == 1 and s1 >= max(1, m.shape[-2]):
        return TRANS, s1
    return None


def gemm_batch(dtype, trans_a, trans_b, m, n, k, a_ptr, lda, b_ptr, ldb, c_ptr, ldc) -> None:
    """A batch of matrix products ``C_i = op(A_i) @ op(B_i)`` (row-major) in one MKL call. Pointers are arrays
    (one entry per product); sizes and leading dimensions are numbers (shared by every product: one MKL
    group) or arrays (one entry per product: one MKL group each)."""
    count = len(a_ptr)
    if count == 0:
        return
    uniform = all(np.ndim(v) == 0 for v in (m, n, k, lda, ldb, ldc))
    g = 1 if uniform else count
    np_dtype = _SYMBOLS[dtype][1]
    # every integer argument a row of one array (one allocation, not one per argument: this runs a few
    # dozen times a step); the last row is the group sizes
    ints = np.empty((9, g), np.int32)
    for row, v in enumerate((trans_a, trans_b, m, n, k, lda, ldb, ldc, count if uniform else 1)):
        ints[row] = v
    scalars = np.empty((2, g), np_dtype)
    scalars[0], scalars[1] = 1, 0  # alpha, beta
    ptrs = np.empty((3, count), np.uint64)
    ptrs[0], ptrs[1], ptrs[2] = a_ptr, b_ptr, c_ptr
    i, f, p = ints.ctypes.data, scalars.ctypes.data, ptrs.ctypes.data  # the arrays live through the call
    row_i, row_f, row_p = 4 * g, scalars.itemsize * g, 8 * count
    _function(dtype)(_ROW_MAJOR, i, i + row_i, i + 2 * row_i, i + 3 * row_i, i + 4 * row_i, f, p,
                     i + 5 * row_i, p + row_p, i + 6 * row_i, f + row_f, p + 2 * row_p, i + 7 * row_i, g,
                     i + 8 * row_i)


def usable(*tensors: torch.Tensor) -> bool:
    """Whether :func:`gemm_batch` may run on these tensors: CPU, one dtype MKL takes, 32-bit sizes, and
    :func:`available`."""
    t = tensors[0]
    return (ENABLED and t.device.type == "cpu" and t.dtype in _SYMBOLS
            and all(x.device == t.device and x.dtype == t.dtype for x in tensors)
            and max(x.numel() for x in tensors) < 2**31 and available(t.dtype))


def available(dtype: torch.dtype) -> bool:
    """Whether the MKL path runs for ``dtype``: the symbol exists and, on first use, a small grouped product
    matches ``torch.mm`` group by group.

    The sizes are passed as 32-bit integers, MKL's LP64 interface, which torch's x86 wheels link (their
    64-bit interface is exported under ``_64`` names). A torch built against MKL's 64-bit interface would
    misread them, possibly fatally, before this check could compare anything; for such a build set
    ``ENABLED = False``."""
    if dtype not in _SYMBOLS or not ENABLED or _function(dtype) is None:
        return False
    if dtype not in _CHECKED:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(7, 3, generator=gen, dtype=dtype)
        b = torch.randn(3, 3, 5, generator=gen, dtype=dtype)
        offs = torch.tensor([2, 2, 7], dtype=torch.int32)
        try:
            got = _grouped_rows(a, b, offs)
            want = torch.cat([a[:2] @ b[0], a[2:] @ b[2]])
            _CHECKED[dtype] = got is not None and torch.allclose(got, want, rtol=1e-5, atol=1e-6)
        except Exception:  # noqa: BLE001 - any failure means: use torch
            _CHECKED[dtype] = False
    return _CHECKED[dtype]


def _starts_ends(offs: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
    ends = offs.cpu().numpy().astype(np.int64)
    starts = np.concatenate([np.zeros(1, np.int64), ends[:-1]])
    return starts, ends


def _grouped_rows(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> Optional[torch.Tensor]:
    """Rows ``[offs[g-1], offs[g])`` of ``a (M, K)`` times ``b[g] (K, N)`` -> ``(M, N)``."""
    la, lb = _layout(a), _layout(b[0] if b.shape[0] else b.new_empty(b.shape[1:]))
    if la is None or lb is None:
        return None
    M, N, K = a.shape[0], b.shape[2], a.shape[1]
    starts, ends = _starts_ends(offs)
    rows = ends - starts
    used = np.nonzero(rows)[0]
    covered = len(ends) > 0 and ends[-1] == M and K > 0
    out = a.new_empty(M, N) if covered else a.new_zeros(M, N)  # rows past the last group: zero
    if used.size == 0 or K == 0:
        return out
    it = a.element_size()
    gemm_batch(a.dtype, la[0], lb[0], rows[used], N, K,
               a.data_ptr() + starts[used] * a.stride(0) * it, la[1],
               b.data_ptr() + used * b.stride(0) * it, lb[1],
               out.data_ptr() + starts[used] * N * it, N)
    return out


def _grouped_columns(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> Optional[torch.Tensor]:
    """Columns ``[offs[g-1], offs[g])`` of ``a (M, K)`` times those rows of ``b (K, N)`` -> ``(G, M, N)``."""
    la, lb = _layout(a), _layout(b)
    if la is None or lb is None:
        return None
    M, N = a.shape[0], b.shape[1]
    starts, ends = _starts_ends(offs)
    depth = ends - starts
    used = np.nonzero(depth)[0]
    out = a.new_empty(len(ends), M, N)
    if used.size < len(ends):  # an empty group's product is zero
        out[torch.from_numpy(np.nonzero(depth == 0)[0])] = 0
    if used.size == 0 or M == 0 or N == 0:
        return out
    it = a.element_size()
    gemm_batch(a.dtype, la[0], lb[0], M, N, depth[used],
               a.data_ptr() + starts[used] * a.stride(1) * it, la[1],
               b.data_ptr() + starts[used] * b.stride(0) * it, lb[1],
               out.data_ptr() + used * (M * N) * it, N)
    return out


def grouped_mm_mkl(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> Optional[torch.Tensor]:
    """``torch._grouped_mm(a, b, offs=offs)`` for 2-D ``a`` and 2-D or 3-D ``b`` through MKL, or ``None``
    where this path does not apply."""
    if a.dim() != 2 or b.dim() not in (2, 3) or not usable(a, b):
        return None
    return _grouped_rows(a, b, offs) if b.dim() == 3 else _grouped_columns(a, b, offs)
