"""Row codecs: layout, nearest-rounding error bounds and unbiased stochastic rounding."""

import pytest
import torch

from torchrec_shark.modules import quantization
from torchrec_shark.modules.quantization import (
    CODECS,
    CounterNoise,
    Fp16Codec,
    Int2Codec,
    Int4Codec,
    Int8Codec,
    NBitCodec,
    RoundingNoise,
    round_to_fp16,
)

NBIT = [Int8Codec, Int4Codec, Int2Codec]

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


# fp16 rounding draws its bits as 32-bit words for a flat tensor and as 16-bit draws for rows ([n, D], what the
# tables encode, with their counter-based noise): both must be unbiased
NOISE_LAYOUTS = ["stream-flat", "counter-rows"]


def _fp16_noise(layout: str, x: torch.Tensor, seed: int):
    """``(x as rounded, noise for draw i)``: flat with a stream, or as 11 rows with a step's counter noise."""
    if layout == "stream-flat":
        stream = RoundingNoise(seed)
        return x, lambda i: stream
    rows = x.view(11, -1)
    return rows, lambda i: CounterNoise(seed, i, torch.arange(11) * 1000 + 7)


@pytest.mark.parametrize("layout", NOISE_LAYOUTS)
def test_fp16_stochastic_rounds_to_a_neighbour(layout):
    x, noise = _fp16_noise(layout, _values(4092, 1), 1)
    q = round_to_fp16(x, "stochastic", noise(0)).float()
    ulp = _fp16_ulp(x)
    assert bool(((q - x).abs() < ulp).all())


@pytest.mark.parametrize("layout", NOISE_LAYOUTS)
def test_fp16_stochastic_is_unbiased(layout):
    """Per element: mean of M roundings vs x, z-test with the Bernoulli variance p(1-p) ulp^2."""
    x = _values(512, 2)
    x = torch.cat([x, torch.tensor([1e-7, -3e-6, 5e-5, 1.0 + 2.0**-12, -0.3])])  # subnormal and tie-ish cases
    x, noise = _fp16_noise(layout, x, 2)
    m = 4000
    total = torch.zeros_like(x, dtype=torch.float64)
    for i in range(m):
        total += round_to_fp16(x, "stochastic", noise(i)).double()
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


def _representable(codec: NBitCodec, n: int, dim: int, seed: int) -> torch.Tensor:
    """Rows ``bias + code * scale`` with codes 0 and ``levels`` present and scale a power of two:
    every value, and ``max - min``, is exact in fp32, so the covering scale/bias are these ones."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, codec.levels + 1, (n, dim), generator=g)
    codes[:, 0], codes[:, -1] = 0, codec.levels
    scale = torch.exp2(torch.randint(-12, 2, (n, 1), generator=g).float())
    bias = torch.randint(-64, 64, (n, 1), generator=g).float() / 16
    return bias + codes * scale


@pytest.mark.parametrize("codec", NBIT, ids=lambda c: c.name)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_representable_values_round_trip_exactly(codec, rounding):
    x = _representable(codec, 64, 32, seed=codec.bits)
    q = codec.encode(x, rounding, RoundingNoise(5))
    torch.testing.assert_close(codec.decode(q), x, rtol=0, atol=0)
    assert torch.equal(codec.encode(codec.decode(q), rounding, RoundingNoise(6)), q)


@pytest.mark.parametrize("codec", NBIT, ids=lambda c: c.name)
def test_nearest_encoding_is_fbgemms_on_representable_rows(codec):
    """Where FBGEMM's nearest fp16 scale/bias equal the covering ones, the bytes are FBGEMM's own:
    same code packing (low bits first), same scale/bias placement."""
    import fbgemm_gpu  # noqa: F401

    x = _representable(codec, 40, 64, seed=10 + codec.bits)
    ours = codec.encode(x, "nearest")
    assert torch.equal(ours, torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(x, codec.bits))


@pytest.mark.parametrize("codec", NBIT, ids=lambda c: c.name)
@pytest.mark.parametrize("dim", [8, 12, 16, 32, 64])
def test_decode_equals_fbgemm(codec, dim, monkeypatch):
    """Rows FBGEMM encoded, and rows this codec encoded, decode as FBGEMM's op decodes them, on
    the FBGEMM path and on the plain torch path (used off CPU)."""
    import fbgemm_gpu  # noqa: F401

    g = torch.Generator().manual_seed(dim)
    x = torch.randn(37, dim, generator=g) * torch.exp2(torch.randint(-8, 4, (37, 1), generator=g).float())
    rows = [codec.encode(x, "stochastic", RoundingNoise(dim)), codec.encode(x, "nearest")]
    if dim % (2 * codec.per_byte) == 0:  # FBGEMM's quantiser takes only an even number of code bytes
        rows.append(torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(x, codec.bits))
    for q in rows:
        assert q.shape == (37, codec.width(dim)) and q.dtype == torch.uint8
        want = torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(q, codec.bits)
        sb = q[:, -4:].contiguous().view(torch.float16).float()
        assert torch.equal(codec.codes(q).float() * sb[:, :1] + sb[:, 1:], want)
        assert torch.equal(codec.decode(q), want)
        monkeypatch.setattr(quantization, "_HAS_FBGEMM", False)
        assert torch.equal(codec.decode(q), want)
        monkeypatch.undo()


@pytest.mark.parametrize("codec", NBIT, ids=lambda c: c.name)
def test_rows_serve_in_fbgemm_inference_tbe(codec):
    """FBGEMM's inference TBE (``IntNBitTableBatchedEmbeddingBagsCodegen``, CPU) reads the same
    codes with the fp16 scale and bias moved to the *front* of the row, rows unpadded on CPU."""
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen

    rows, dim = 20, 24
    tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[("t", rows, dim, SparseType(codec.name), EmbeddingLocation.HOST)],
        device="cpu",
        pooling_mode=PoolingMode.SUM,
        output_dtype=SparseType.FP32,
    )
    tbe.fill_random_weights()
    q = codec.encode(torch.randn(rows, dim, generator=torch.Generator().manual_seed(1)), "stochastic", RoundingNoise(1))
    weight = tbe.split_embedding_weights_with_scale_bias(split_scale_bias_mode=0)[0][0]
    assert weight.shape == q.shape
    weight.copy_(torch.cat([q[:, -4:], q[:, :-4]], dim=1))
    ids, offsets = torch.tensor([0, 3, 3, 19, 5, 1, 2]), torch.tensor([0, 2, 4, 7])
    want = torch.nn.functional.embedding_bag(ids, codec.decode(q), offsets[:-1], mode="sum")
    torch.testing.assert_close(tbe(ids, offsets), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("codec", NBIT, ids=lambda c: c.name)
def test_nearest_within_half_step_and_covers_range(codec):
    """Error <= half a step, and (scale, bias) are the tightest fp16 pair that covers the row:
    the bias is the largest fp16 <= min, the scale the smallest fp16 >= (max - bias) / levels.
    Rows with a normal fp16 scale then use codes 0..levels-1 and up; tiny rows, whose scale is an
    fp16 subnormal (step 2**-24), use fewer codes but no coarser step than the format allows."""
    levels = codec.levels
    g = torch.Generator().manual_seed(4)
    x = torch.randn(200, 64, generator=g) * torch.exp2(torch.randint(-12, 6, (200, 1), generator=g).float())
    if levels < 255:  # a few rows whose range is below levels * 2**-14: subnormal scales at these bits too
        x[:5] = torch.randn(5, 64, generator=g) * 2.0**-18
    x = torch.cat([x, torch.full((3, 64), 0.3)])
    q = codec.encode(x, "nearest")
    step = codec.step(q).unsqueeze(1)
    err = (codec.decode(q) - x).abs()
    assert bool((err <= 0.5 * step * (1 + 1e-5) + 1e-12).all())
    sb = q[:200, -4:].contiguous().view(torch.float16)
    scale, bias = sb[:, 0], sb[:, 1]
    lo, hi = x[:200].amin(1), x[:200].amax(1)
    inf = torch.full_like(bias, float("inf"))
    assert bool((bias.float() <= lo).all()) and bool((torch.nextafter(bias, inf).float() > lo).all())
    need = (hi - bias.float()) / levels
    assert bool((scale.float() >= need).all()) and bool((torch.nextafter(scale, -inf).float() < need).all())
    codes = codec.codes(q[:200]).long()
    assert bool((codes.min(1).values == 0).all())  # the bias is the row minimum (to fp16 precision)
    normal = scale.float() >= 2.0**-14
    assert int(normal.sum()) > 100 and int((~normal).sum()) > 0  # both cases are exercised
    assert bool((codes[normal].max(1).values >= levels - 1).all())  # the range is fully used
    const = codec.decode(q[200:])  # constant rows stay constant
    assert torch.equal(const, const[:, :1].expand_as(const))


@pytest.mark.parametrize("codec", NBIT, ids=lambda c: c.name)
def test_stochastic_is_unbiased(codec):
    """Per element: mean of M encodings vs x, z-test with the Bernoulli variance p(1-p) step^2
    (scale and bias depend on the row only, so the two neighbours are fixed)."""
    torch.manual_seed(3)
    x = torch.randn(8, 64)
    m = 3000
    q0 = codec.encode(x, "nearest")
    step = codec.step(q0).double().unsqueeze(1)
    total = torch.zeros_like(x, dtype=torch.float64)
    rows = torch.arange(8)
    for i in range(m):  # the counter-based noise the tables use, a fresh step each time
        q = codec.encode(x, "stochastic", CounterNoise(3, i, rows))
        assert torch.equal(q[:, -4:], q0[:, -4:])
        total += codec.decode(q).double()
    mean = total / m
    sb = q0[:, -4:].contiguous().view(torch.float16).double()
    y = (x.double() - sb[:, 1:]) / sb[:, :1]
    p = y - torch.floor(y)
    sd = torch.sqrt(p * (1 - p) * step**2 / m)
    bias = mean - x.double()
    nz = sd > 0
    z = bias[nz] / sd[nz]
    assert float(z.abs().max()) < Z_MAX, f"max |z| = {float(z.abs().max()):.2f}"
    assert abs(float(bias[nz].sum() / torch.sqrt((sd[nz] ** 2).sum()))) < Z_MAX


@pytest.mark.parametrize(
    "codec, dim, nbytes",
    [(Int8Codec, 32, 36), (Int8Codec, 64, 68), (Int4Codec, 32, 20), (Int4Codec, 64, 36), (Int2Codec, 32, 12),
     (Int2Codec, 64, 20), (Int4Codec, 6, 7), (Int2Codec, 12, 7)],
)
def test_bytes_per_row(codec, dim, nbytes):
    assert codec.width(dim) * codec.dtype.itemsize == nbytes
    assert codec.encode(torch.randn(3, dim), "stochastic").shape == (3, nbytes)
    assert codec.dim_of(codec.encode(torch.randn(3, dim))) == dim


@pytest.mark.parametrize("codec, dim", [(Int4Codec, 5), (Int2Codec, 6), (Int2Codec, 30)])
def test_dims_that_leave_a_byte_part_full_are_refused(codec, dim):
    with pytest.raises(ValueError, match="multiple of"):
        codec.width(dim)
    with pytest.raises(ValueError, match="multiple of"):
        codec.encode(torch.zeros(2, dim))


def test_codecs_by_name():
    assert {name: c.name for name, c in CODECS.items()} == {n: n for n in ("fp32", "fp16", "int8", "int4", "int2")}
    assert [CODECS[f"int{b}"].bits for b in (8, 4, 2)] == [8, 4, 2]
    with pytest.raises(ValueError, match="bits"):
        NBitCodec(3)


def test_empty_rows():
    for codec in NBIT:
        assert codec.encode(torch.zeros(0, 16)).shape == (0, codec.width(16))
        assert codec.decode(torch.zeros(0, codec.width(16), dtype=torch.uint8)).shape == (0, 16)


def test_fp16_codec_roundtrip_and_clamp():
    x = torch.tensor([[1.0, -2.5, 70000.0, -1e6]])
    y = Fp16Codec.decode(Fp16Codec.encode(x, "stochastic", RoundingNoise(0)))
    assert torch.equal(y, torch.tensor([[1.0, -2.5, 65504.0, -65504.0]]))


def test_rounding_mode_is_checked():
    with pytest.raises(ValueError, match="rounding"):
        round_to_fp16(torch.zeros(2), "up")


@pytest.mark.parametrize("up", [True, False])
def test_fp16_step_is_numpys_nextafter_for_every_finite_value(up):
    import numpy as np

    from torchrec_shark.modules.quantization import _fp16_toward

    values = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    values = values[np.isfinite(values)]
    with np.errstate(over="ignore"):  # the largest values step to infinity
        want = np.nextafter(values, np.float16(np.inf if up else -np.inf))
    assert np.array_equal(_fp16_toward(values, up).view(np.uint16), want.view(np.uint16))
