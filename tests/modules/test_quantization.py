"""Row codecs: layout, nearest-rounding error bounds and unbiased stochastic rounding."""

import math

import pytest
import torch

from torchrec_shark.modules.quantization import Fp16Codec, Int8Codec, RoundingNoise, round_to_fp16

Z_MAX = 5.0  # z-test threshold: a false alarm is a < 1e-6 event per statistic


def _fp16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of fp16 values around |x| (2**-24 in the subnormal range)."""
    a = x.abs().clamp(min=2.0**-14)
    return torch.exp2(torch.floor(torch.log2(a)) - 10)


def _values(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mags = torch.exp2(torch.empty(n).uniform_(-30, 8, generator=g))  # subnormal .. 256
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return mags * signs


def test_fp16_nearest_within_half_ulp():
    x = _values(4096, 0)
    err = (round_to_fp16(x, "nearest").float() - x).abs()
    assert bool((err <= 0.5 * _fp16_ulp(x) * (1 + 1e-6)).all())


def test_fp16_stochastic_rounds_to_a_neighbour():
    x = _values(4096, 1)
    q = round_to_fp16(x, "stochastic", RoundingNoise(1)).float()
    ulp = _fp16_ulp(x)
    assert bool(((q - x).abs() < ulp).all())


def test_fp16_stochastic_is_unbiased():
    """Per element: mean of M roundings vs x, z-test with the Bernoulli variance p(1-p) ulp^2."""
    x = _values(512, 2)
    x = torch.cat([x, torch.tensor([1e-7, -3e-6, 5e-5, 1.0 + 2.0**-12, -0.3])])  # subnormal and tie-ish cases
    noise = RoundingNoise(2)
    m = 4000
    total = torch.zeros_like(x, dtype=torch.float64)
    for _ in range(m):
        total += round_to_fp16(x, "stochastic", noise).double()
    mean = total / m
    lo = round_to_fp16(x, "nearest").double()
    ulp = _fp16_ulp(x).double()
    lo = torch.where(lo > x.double(), lo - ulp, lo)  # the neighbour below
    p = ((x.double() - lo) / ulp).clamp(0, 1)
    sd = torch.sqrt(p * (1 - p) * ulp**2 / m)
    bias = mean - x.double()
    exact = sd == 0
    assert bool((bias[exact].abs() <= 1e-12 * x.double().abs()[exact] + 1e-30).all())
    z = bias[~exact] / sd[~exact]
    # 15-bit-or-better noise resolution adds a bias of at most 2**-14 ulp: negligible at this m
    assert float(z.abs().max()) < Z_MAX, f"max |z| = {float(z.abs().max()):.2f}"
    # and the aggregate: sum of biases over all elements
    z_all = float(bias[~exact].sum() / torch.sqrt((sd[~exact] ** 2).sum()))
    assert abs(z_all) < Z_MAX


def test_int8_layout_matches_fbgemm():
    import fbgemm_gpu  # noqa: F401

    x = torch.randn(37, 16)
    q = Int8Codec.encode(x, "nearest")
    assert q.shape == (37, 16 + 4) and q.dtype == torch.uint8
    sb = q[:, 16:].contiguous().view(torch.float16).float()
    manual = q[:, :16].float() * sb[:, :1] + sb[:, 1:]
    torch.testing.assert_close(torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(q, 8), manual)
    torch.testing.assert_close(Int8Codec.decode(q), manual)


def test_int8_nearest_within_half_step_and_covers_range():
    """Error <= half a step, and (scale, bias) are the tightest fp16 pair that covers the row:
    the bias is the largest fp16 <= min, the scale the smallest fp16 >= (max - bias) / 255.
    Rows with a normal fp16 scale then use codes 0..254+; tiny rows, whose scale is an fp16
    subnormal (step 2**-24), use fewer codes but no coarser step than the format allows."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(200, 64, generator=g) * torch.exp2(torch.randint(-12, 6, (200, 1), generator=g).float())
    x = torch.cat([x, torch.full((3, 64), 0.3)])
    q = Int8Codec.encode(x, "nearest")
    step = Int8Codec.step(q).unsqueeze(1)
    err = (Int8Codec.decode(q) - x).abs()
    assert bool((err <= 0.5 * step * (1 + 1e-5) + 1e-12).all())
    sb = q[:200, 64:].contiguous().view(torch.float16)
    scale, bias = sb[:, 0], sb[:, 1]
    lo, hi = x[:200].amin(1), x[:200].amax(1)
    inf = torch.full_like(bias, float("inf"))
    assert bool((bias.float() <= lo).all()) and bool((torch.nextafter(bias, inf).float() > lo).all())
    need = (hi - bias.float()) / 255
    assert bool((scale.float() >= need).all()) and bool((torch.nextafter(scale, -inf).float() < need).all())
    codes = q[:200, :64].long()
    assert bool((codes.min(1).values == 0).all())  # the bias is the row minimum (to fp16 precision)
    normal = scale.float() >= 2.0**-14
    assert int(normal.sum()) > 100 and int((~normal).sum()) > 0  # both cases are exercised
    assert bool((codes[normal].max(1).values >= 254).all())  # the range is fully used
    const = Int8Codec.decode(q[200:])  # constant rows stay constant
    assert torch.equal(const, const[:, :1].expand_as(const))


def test_int8_stochastic_is_unbiased():
    torch.manual_seed(3)
    x = torch.randn(8, 64)
    noise = RoundingNoise(3)
    m = 3000
    q0 = Int8Codec.encode(x, "nearest")
    step = Int8Codec.step(q0).double().unsqueeze(1)  # scale/bias depend on the row only: same every time
    total = torch.zeros_like(x, dtype=torch.float64)
    for _ in range(m):
        q = Int8Codec.encode(x, "stochastic", noise)
        assert torch.equal(q[:, 64:], q0[:, 64:])
        total += Int8Codec.decode(q).double()
    mean = total / m
    sb = q0[:, 64:].contiguous().view(torch.float16).double()
    y = (x.double() - sb[:, 1:]) / sb[:, :1]
    p = y - torch.floor(y)
    sd = torch.sqrt(p * (1 - p) * step**2 / m)
    bias = mean - x.double()
    nz = sd > 0
    z = bias[nz] / sd[nz]
    assert float(z.abs().max()) < Z_MAX, f"max |z| = {float(z.abs().max()):.2f}"
    assert abs(float(bias[nz].sum() / torch.sqrt((sd[nz] ** 2).sum()))) < Z_MAX


def test_fp16_codec_roundtrip_and_clamp():
    x = torch.tensor([[1.0, -2.5, 70000.0, -1e6]])
    y = Fp16Codec.decode(Fp16Codec.encode(x, "stochastic", RoundingNoise(0)))
    assert torch.equal(y, torch.tensor([[1.0, -2.5, 65504.0, -65504.0]]))


def test_rounding_mode_is_checked():
    with pytest.raises(ValueError, match="rounding"):
        round_to_fp16(torch.zeros(2), "up")
