"""MKL batch GEMM through torch's library: the same values as torch, and torch's path wherever it does not apply."""

import pytest
import torch

from torchrec_shark.modules.kernels import mkl_gemm_batch as mkl

needs_mkl = pytest.mark.skipif(not mkl.available(torch.float32), reason="this torch exports no MKL batch GEMM")


def _reference_rows(a, b, offs):
    ends = offs.tolist()
    return torch.cat([a[lo:hi] @ b[g] for g, (lo, hi) in enumerate(zip([0] + ends[:-1], ends))])


@needs_mkl
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_rows_with_strided_and_transposed_operands(dtype):
    gen = torch.Generator().manual_seed(0)
    offs = torch.tensor([3, 3, 8, 9, 9, 16], dtype=torch.int32)  # empty groups included
    a = torch.randn(16, 8, generator=gen, dtype=dtype)
    core = torch.randn(8, 6, 5, generator=gen, dtype=dtype)  # (R, p, N): slice g is core[:, g] (row stride p*N)
    b = core.transpose(0, 1)
    torch.testing.assert_close(mkl.grouped_mm_mkl(a, b, offs), _reference_rows(a, b, offs), rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)
    g = torch.randn(16, 5, generator=gen, dtype=dtype)
    bt = b.transpose(1, 2)  # each matrix column-major: BLAS transposes it
    torch.testing.assert_close(mkl.grouped_mm_mkl(g, bt, offs), _reference_rows(g, bt, offs))
    at = torch.randn(8, 16, generator=gen, dtype=dtype).t()  # a transposed view as the left operand
    torch.testing.assert_close(mkl.grouped_mm_mkl(at, b, offs), _reference_rows(at, b, offs))


@needs_mkl
def test_grouped_columns_give_zero_for_empty_groups():
    gen = torch.Generator().manual_seed(1)
    offs = torch.tensor([4, 4, 10], dtype=torch.int32)
    a = torch.randn(10, 6, generator=gen)
    g = torch.randn(10, 7, generator=gen)
    got = mkl.grouped_mm_mkl(a.t(), g, offs)
    assert got.shape == (3, 6, 7)
    torch.testing.assert_close(got[0], a[:4].t() @ g[:4])
    assert torch.equal(got[1], torch.zeros(6, 7))
    torch.testing.assert_close(got[2], a[4:].t() @ g[4:])


@needs_mkl
def test_gemm_batch_reads_and_writes_through_pointers():
    """Products whose operands are rows scattered in other tensors, written to chosen rows of the output."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, 4, generator=gen)
    w = torch.randn(4, 7, 2, generator=gen)  # slice d: w[:, d] (4 x 2), row stride 14
    digits = torch.tensor([6, 0, 3, 3, 1])
    dest = torch.tensor([2, 4, 0, 1, 3])
    out = torch.full((5, 6), float("nan"))
    it = x.element_size()
    mkl.gemm_batch(torch.float32, mkl.NO_TRANS, mkl.NO_TRANS, 3, 2, 4,
                   x.data_ptr() + torch.arange(5).numpy() * 12 * it, 4,
                   w.data_ptr() + digits.numpy() * 2 * it, 14,
                   out.data_ptr() + dest.numpy() * 6 * it, 2)
    for j in range(5):
        torch.testing.assert_close(out[dest[j]].view(3, 2), x[j] @ w[:, digits[j]])


def test_not_applicable_returns_none(monkeypatch):
    a, b = torch.randn(4, 3), torch.randn(2, 3, 5)
    offs = torch.tensor([1, 4], dtype=torch.int32)
    assert mkl.grouped_mm_mkl(a.half(), b.half(), offs) is None  # a dtype MKL's batch GEMM does not take
    assert mkl.grouped_mm_mkl(a[:, ::2], b[:, ::2], offs) is None  # no unit stride in a matrix
    monkeypatch.setattr(mkl, "ENABLED", False)
    assert mkl.grouped_mm_mkl(a, b, offs) is None
    assert not mkl.usable(a, b)
