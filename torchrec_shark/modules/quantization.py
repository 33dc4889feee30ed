"""Row codecs for embedding storage: fp32, fp16, and int8 / int4 / int2 with row-wise scale and bias.

A codec turns fp32 rows ``[n, D]`` into their stored form and back. Encoding rounds either
to the nearest representable value or stochastically, so that the *expected* stored value
equals the input exactly (an update smaller than the storage's step still moves the row on
average instead of being lost).

Integer rows use FBGEMM's fused n-bit rowwise layout (``FloatToFusedNBitRowwiseQuantizedSBHalf``):
the codes, packed ``8 / bits`` to a byte, followed by an fp16 scale and an fp16 bias, value
``code * scale + bias``. At ``D = 64`` a row takes 68 bytes in int8, 36 in int4, 20 in int2.
Decoding uses FBGEMM's ``FusedNBitRowwiseQuantizedSBHalfToFloat`` where it is available for
the device. The same rows serve in FBGEMM's inference TBE (``IntNBitTableBatchedEmbeddingBagsCodegen``)
once the 4 scale/bias bytes are moved to the front of the row.

Scale and bias are recomputed from the row every time it is encoded: the bias is the row
minimum rounded *down* to fp16 and the scale is ``(max - bias) / (2**bits - 1)`` rounded *up*,
so ``[bias, bias + (2**bits - 1) * scale]`` always covers the row. Nothing is ever clipped,
which is what keeps stochastic rounding unbiased, and all ``2**bits`` codes span the row's
current range (the smallest step the format allows). Keeping an old scale/bias instead would
clip values that grew out of the range (a biased error that never averages out).

Example::

    q = Int8Codec.encode(x, "stochastic")      # [n, D + 4] uint8
    x_hat = Int8Codec.decode(q)                 # [n, D] fp32, E[x_hat] == x
    q4 = CODECS["int4"].encode(x, "stochastic")  # [n, D / 2 + 4] uint8
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from torchrec_shark.modules.kernels.host import numpy_path
from torchrec_shark.modules.table_kind import mix64

try:  # FBGEMM's CPU ops (fbgemm-gpu-cpu) or CUDA ops (fbgemm-gpu)
    import fbgemm_gpu  # noqa: F401

    _HAS_FBGEMM = hasattr(torch.ops.fbgemm, "FusedNBitRowwiseQuantizedSBHalfToFloat")
except Exception:  # pragma: no cover - FBGEMM is a hard dependency of torchrec
    _HAS_FBGEMM = False

ROUNDING_MODES = ("stochastic", "nearest")
_FP16_MAX = 65504.0
_FP16_MIN_NORMAL = 2.0**-14
_FP16_SUBNORMAL_STEP = 2.0**-24
_DROPPED_BITS = 13  # fp32 has 23 mantissa bits, fp16 has 10
_DROPPED_MASK = (1 << _DROPPED_BITS) - 1


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding={rounding!r} must be one of {ROUNDING_MODES}")


class RoundingNoise:
    """Uniform random bits for stochastic rounding.

    numpy's PCG64 raw output, 16 bits per element: several times cheaper than torch's CPU
    RNG, which matters because every updated low-precision element needs fresh bits. Seeded
    from torch's generator by default, so ``torch.manual_seed`` makes runs repeatable.
    """

    def __init__(self, seed: Optional[int] = None) -> None:
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        self._bits = np.random.PCG64(seed)

    def int16(self, shape, device=None) -> torch.Tensor:
        """Uniform int16 bit patterns of ``shape`` (all 16 bits random)."""
        n = int(np.prod(shape))
        raw = self._bits.random_raw((n + 3) // 4)
        out = torch.from_numpy(raw.view(np.int16)[:n]).view(shape)
        return out if device is None or torch.device(device).type == "cpu" else out.to(device)

    def int32(self, n: int, device=None) -> torch.Tensor:
        """``n`` uniform int32 bit patterns."""
        out = torch.from_numpy(self._bits.random_raw((n + 1) // 2).view(np.int32)[:n])
        return out if device is None or torch.device(device).type == "cpu" else out.to(device)

    def uniform(self, shape, device=None) -> torch.Tensor:
        """fp32 uniform on (0, 1) with 15-bit resolution (midpoints of 2**15 cells)."""
        r = self.int16(shape, device).bitwise_and_(0x7FFF).float()
        return r.mul_(2.0**-15).add_(2.0**-16)


class CounterNoise:
    """Rounding bits as a function of ``(seed, step, row id, column)``: counter-based, not a stream.

    A stream's state cannot follow a row to another rank when a checkpoint is loaded under
    another sharding; bits that depend only on the row's global id and the table's update count
    are the same on 1 rank, table-wise or row-wise, and after any resume, so training resumes
    exactly. One 64-bit hash per row (SplitMix64 of the row id and the step's key), then one
    multiply-xorshift round per group of columns; each 64-bit value gives four 16-bit or two
    32-bit draws. ``int16``/``int32``/``uniform`` follow :class:`RoundingNoise`'s interface for
    the ``[len(rows), D]`` values being encoded (row-major).

    Rows of several tables at once (a fused store's update): :meth:`per_row` with each row's key
    (:meth:`keys` of its table's seed and step) gives every row the bits its own table would.
    CPU rows hash in numpy; rows on another device hash there with torch's int64 ops (the same bits).

    Example::

        noise = CounterNoise(seed=7, step=12, rows=torch.tensor([3, 900]))
        q = Int8Codec.encode(values, "stochastic", noise)   # values: [2, D]
    """

    _GOLDEN = 0x9E3779B97F4A7C15
    _M1, _M2, _M3 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0xD6E8FEB86659FD93

    def __init__(self, seed: int, step: int, rows: torch.Tensor, key=None) -> None:
        if key is None:
            key = mix64((int(seed) * self._GOLDEN + int(step) * self._M3 + 1) & ((1 << 64) - 1))
        self._key = key  # an int, or one key per row (uint64 numpy on CPU, int64 torch elsewhere)
        self._rows = rows.reshape(-1)

    @classmethod
    def per_row(cls, keys, rows: torch.Tensor) -> "CounterNoise":
        """Noise for ``rows`` whose keys differ (``keys[i]`` from :meth:`keys`, one per row)."""
        return cls(0, 0, rows, key=keys)

    @classmethod
    def keys(cls, seeds: np.ndarray, steps: np.ndarray) -> np.ndarray:
        """The key of each ``(seed, step)`` pair (uint64): what ``CounterNoise(seed, step, ...)`` hashes rows with."""
        with np.errstate(over="ignore"):
            x = (seeds.astype(np.uint64) * np.uint64(cls._GOLDEN) + steps.astype(np.uint64) * np.uint64(cls._M3)
                 + np.uint64(1))
            return _splitmix_np(x)

    def _words(self, cols: int):
        """``[len(rows), cols]`` 64-bit hashes (numpy uint64 for CPU rows, torch int64 on other devices)."""
        if not numpy_path(self._rows):
            return self._words_torch(cols)
        key = self._key
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy().astype(np.uint64)
        elif not isinstance(key, np.ndarray):
            key = np.uint64(key)
        with np.errstate(over="ignore"):
            r = self._rows.numpy().astype(np.uint64)
            h = _splitmix_np(r * np.uint64(self._GOLDEN) + key)
            x = h[:, None] ^ (np.arange(1, cols + 1, dtype=np.uint64) * np.uint64(self._M3))[None, :]
            x *= np.uint64(self._M1)
            x ^= x >> np.uint64(31)
            x *= np.uint64(self._M2)
            x ^= x >> np.uint64(29)
        return x

    def _words_torch(self, cols: int) -> torch.Tensor:
        # int64 arithmetic wraps as uint64 does; right shifts are masked to make them logical.
        device = self._rows.device
        key = self._key
        if isinstance(key, np.ndarray):
            key = torch.from_numpy(key.view(np.int64)).to(device)
        elif not isinstance(key, torch.Tensor):
            key = _signed(int(key))
        r = self._rows.to(torch.int64)
        h = _splitmix_torch(r * _signed(self._GOLDEN) + key)
        cols_t = torch.arange(1, cols + 1, dtype=torch.int64, device=device) * _signed(self._M3)
        x = h.unsqueeze(1) ^ cols_t.unsqueeze(0)
        x = x * _signed(self._M1)
        x = x ^ _shift_right(x, 31)
        x = x * _signed(self._M2)
        return x ^ _shift_right(x, 29)

    def int16(self, shape, device=None) -> torch.Tensor:
        n, d = shape
        words = self._words((d + 3) // 4)
        if isinstance(words, torch.Tensor):
            out = words.view(torch.int16)[:, :d].contiguous()
        else:
            out = torch.from_numpy(np.ascontiguousarray(words.view(np.int16)[:, :d]))
        return out if device is None or torch.device(device) == out.device else out.to(device)

    def int32(self, n: int, device=None) -> torch.Tensor:
        rows = self._rows.numel()
        d = n // max(rows, 1)
        words = self._words((d + 1) // 2)
        if isinstance(words, torch.Tensor):
            out = words.view(torch.int32)[:, :d].reshape(-1)
        else:
            out = torch.from_numpy(np.ascontiguousarray(words.view(np.int32)[:, :d])).reshape(-1)
        return out if device is None or torch.device(device) == out.device else out.to(device)

    def uniform(self, shape, device=None) -> torch.Tensor:
        r = self.int16(shape, device).bitwise_and_(0x7FFF).float()
        return r.mul_(2.0**-15).add_(2.0**-16)


def _signed(x: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _shift_right(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _splitmix_torch(x: torch.Tensor) -> torch.Tensor:
    x = x ^ _shift_right(x, 30)
    x = x * _signed(0xBF58476D1CE4E5B9)
    x = x ^ _shift_right(x, 27)
    x = x * _signed(0x94D049BB133111EB)
    return x ^ _shift_right(x, 31)


def _splitmix_np(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def round_to_fp16(x: torch.Tensor, rounding: str = "nearest", noise: Optional[RoundingNoise] = None) -> torch.Tensor:
    """fp32 -> fp16, nearest or stochastic (``E[result] == x`` for ``|x| <= 65504``).

    Stochastic rounding adds a uniform random integer below ``2**13`` to the fp32 bit pattern
    and clears the 13 mantissa bits fp16 does not keep: the carry rounds the magnitude up
    with probability equal to the dropped fraction. Values in fp16's subnormal range, whose
    step is the fixed ``2**-24``, are rounded on that grid instead.
    """
    _check_rounding(rounding)
    y = x.float().clamp(-_FP16_MAX, _FP16_MAX)  # a new tensor: modified in place below
    if rounding == "nearest" or y.numel() == 0:
        return y.half()
    noise = noise or RoundingNoise()
    flat = y.view(-1)
    if y.dim() == 2:  # rows: 16-bit draws carry the 13 dropped bits, for half the hashing of 32-bit ones
        r = noise.int16(y.shape, y.device).bitwise_and_(_DROPPED_MASK).view(-1).to(torch.int32)
    else:
        r = noise.int32(flat.numel(), y.device).bitwise_and_(_DROPPED_MASK)
    if numpy_path(y):
        tiny = torch.from_numpy(np.flatnonzero(np.abs(flat.numpy()) < _FP16_MIN_NORMAL))
    else:
        tiny = (flat.abs() < _FP16_MIN_NORMAL).nonzero().squeeze(1)
    if tiny.numel():  # values in fp16's subnormal range: round on its fixed 2**-24 grid
        u = (r.index_select(0, tiny).float() + 0.5) * (1.0 / (1 << _DROPPED_BITS))
        sub = torch.floor(flat.index_select(0, tiny) * (1.0 / _FP16_SUBNORMAL_STEP) + u) * _FP16_SUBNORMAL_STEP
    flat.view(torch.int32).add_(r).bitwise_and_(~_DROPPED_MASK)
    if tiny.numel():
        flat.index_copy_(0, tiny, sub)
    return y.half()


def _fp16_toward(values: np.ndarray, up: bool) -> np.ndarray:
    """``np.nextafter(values, +inf if up else -inf)`` for finite fp16 ``values``, on their bit patterns.

    Why: numpy's float16 ``nextafter`` is emulated per element, a fifth of the whole encode of a few thousand
    rows; one step of the bit pattern is the next value (away from zero where the sign points the way)."""
    bits = values.view(np.uint16)
    away = ((bits & 0x8000) != 0) != up  # magnitude grows: positive going up, negative going down
    out = np.where(away, bits + np.uint16(1), bits - np.uint16(1)).astype(np.uint16)
    out[(bits & 0x7FFF) == 0] = 0x0001 if up else 0x8001  # from either zero: the smallest subnormal
    return out.view(np.float16)


def _scale_bias(x: torch.Tensor, levels: int = 255) -> tuple:
    """Per-row fp16 ``(scale, bias)`` with ``[bias, bias + levels * scale]`` covering the row:
    the bias is the row minimum rounded down, the scale ``(max - bias) / levels`` rounded up."""
    lo = x.amin(dim=1).clamp_(-_FP16_MAX, _FP16_MAX)
    hi = x.amax(dim=1).clamp_(-_FP16_MAX, _FP16_MAX)
    if numpy_path(x):  # [n]-sized work: numpy's per-call cost is a fraction of torch's
        lo_np, hi_np = lo.numpy(), hi.numpy()
        bias = lo_np.astype(np.float16)
        bias = np.where(bias.astype(np.float32) > lo_np, _fp16_toward(bias, up=False), bias)
        step = (hi_np - bias.astype(np.float32)) / np.float32(levels)
        scale = step.astype(np.float16)
        scale = np.where(scale.astype(np.float32) < step, _fp16_toward(scale, up=True), scale)
        scale[scale <= 0] = np.float16(_FP16_SUBNORMAL_STEP)  # constant row: any positive scale
        return torch.from_numpy(scale), torch.from_numpy(bias)
    bias = lo.half()
    bias = torch.where(bias.float() > lo, torch.nextafter(bias, torch.full_like(bias, -float("inf"))), bias)
    step = (hi - bias.float()) / float(levels)
    scale = step.half()
    scale = torch.where(scale.float() < step, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    scale = torch.where(scale > 0, scale, torch.full_like(scale, _FP16_SUBNORMAL_STEP))
    return scale, bias


class Fp32Codec:
    """Rows stored as they are."""

    name = "fp32"
    dtype = torch.float32

    @staticmethod
    def width(dim: int) -> int:
        return dim

    @staticmethod
    def encode(x: torch.Tensor, rounding: str = "nearest", noise: Optional[RoundingNoise] = None) -> torch.Tensor:
        return x.float()

    @staticmethod
    def decode(q: torch.Tensor) -> torch.Tensor:
        return q


class Fp16Codec:
    """Rows stored as fp16."""

    name = "fp16"
    dtype = torch.float16

    @staticmethod
    def width(dim: int) -> int:
        return dim

    @staticmethod
    def encode(x: torch.Tensor, rounding: str = "nearest", noise: Optional[RoundingNoise] = None) -> torch.Tensor:
        return round_to_fp16(x, rounding, noise)

    @staticmethod
    def decode(q: torch.Tensor) -> torch.Tensor:
        return q.float()


class NBitCodec:
    """Rows stored as ``bits``-bit codes + fp16 scale + fp16 bias: FBGEMM's fused n-bit rowwise layout.

    A row of ``D`` values takes ``D * bits / 8`` code bytes, the codes of columns ``j * k ..
    j * k + k - 1`` (``k = 8 / bits``) packed into byte ``j`` from the low bits up, then the fp16
    scale and the fp16 bias: ``FloatToFusedNBitRowwiseQuantizedSBHalf``'s output, which
    ``FusedNBitRowwiseQuantizedSBHalfToFloat`` decodes (``bits=8``: one code per byte, no packing).
    ``D`` must fill whole bytes, as FBGEMM's n-bit kernels require (its library rejects other
    widths; TBE, whose rows put the scale and bias first, sizes an int4 row as ``D // 2 + 4``).

    Encoding computes the scale and bias itself rather than calling FBGEMM's quantiser, which
    rounds the bias and scale to the *nearest* fp16 (a row minimum below the fp16 bias, or a
    maximum above ``bias + levels * scale``, is then clipped: a biased error that stochastic
    rounding would never average out) and has no stochastic rounding.

    Example::

        q = Int4Codec.encode(x, "stochastic")   # x: [n, 64] -> [n, 36] uint8
        x_hat = Int4Codec.decode(q)              # [n, 64] fp32, E[x_hat] == x
    """

    dtype = torch.uint8
    SCALE_BIAS_BYTES = 4

    def __init__(self, bits: int) -> None:
        if bits not in (2, 4, 8):
            raise ValueError(f"bits={bits} must be 2, 4 or 8")
        self.bits = bits
        self.name = f"int{bits}"
        self.levels = (1 << bits) - 1  # largest code
        self.per_byte = 8 // bits

    def __repr__(self) -> str:
        return f"NBitCodec(bits={self.bits})"

    def code_bytes(self, dim: int) -> int:
        """Bytes of packed codes in a row of ``dim`` values."""
        if dim % self.per_byte:
            raise ValueError(
                f"{self.name} rows need a dim that is a multiple of {self.per_byte} (whole bytes of codes), got {dim}"
            )
        return dim // self.per_byte

    def width(self, dim: int) -> int:
        return self.code_bytes(dim) + self.SCALE_BIAS_BYTES

    def dim_of(self, q: torch.Tensor) -> int:
        """Values per row of encoded rows ``q``."""
        return (q.shape[1] - self.SCALE_BIAS_BYTES) * self.per_byte

    def encode(self, x: torch.Tensor, rounding: str = "nearest", noise: Optional[RoundingNoise] = None) -> torch.Tensor:
        _check_rounding(rounding)
        x = x.float()
        n, dim = x.shape
        nbytes = self.code_bytes(dim)
        out = torch.empty(n, nbytes + self.SCALE_BIAS_BYTES, dtype=torch.uint8, device=x.device)
        if n == 0:
            return out
        scale, bias = _scale_bias(x, self.levels)
        inv = 1.0 / scale.float()
        shift = -bias.float() * inv
        if rounding == "stochastic":  # floor((x - bias) / scale + u), u ~ U(0, 1) at 15-bit resolution
            y = torch.addcmul(shift.add_(2.0**-16).unsqueeze(1), x, inv.unsqueeze(1))
            r = (noise or RoundingNoise()).int16(y.shape, y.device).bitwise_and_(0x7FFF)
            y.add_(r, alpha=2.0**-15)
            if self.per_byte > 1:  # packing adds codes, so they must be whole; 8-bit codes are floored below
                y.floor_()
        else:
            y = torch.addcmul(shift.unsqueeze(1), x, inv.unsqueeze(1)).round_()
        # clamped to [0, levels], the conversion to uint8 truncates, which for values >= 0 is the floor
        y.clamp_(0, self.levels)
        if self.per_byte > 1:  # pack in fp32 (exact: every byte is below 256), one conversion to uint8
            packed = y[:, 0 :: self.per_byte].clone()
            for j in range(1, self.per_byte):
                packed.add_(y[:, j :: self.per_byte], alpha=float(1 << (j * self.bits)))
            y = packed
        out[:, :nbytes] = y
        out[:, nbytes:] = torch.stack([scale, bias], dim=1).view(torch.uint8)
        return out

    def codes(self, q: torch.Tensor) -> torch.Tensor:
        """The unpacked codes of encoded rows, uint8 ``[n, D]``."""
        nbytes = q.shape[1] - self.SCALE_BIAS_BYTES
        if self.per_byte == 1:
            return q[:, :nbytes]
        shifts = torch.arange(0, 8, self.bits, dtype=torch.uint8, device=q.device)
        c = q[:, :nbytes].unsqueeze(2).bitwise_right_shift(shifts).bitwise_and_(self.levels)
        return c.reshape(q.shape[0], nbytes * self.per_byte)

    def scale_bias(self, q: torch.Tensor) -> torch.Tensor:
        """fp32 ``[n, 2]``: each row's scale and bias."""
        nbytes = q.shape[1] - self.SCALE_BIAS_BYTES
        return q[:, nbytes:].contiguous().view(torch.float16).float()

    def decode(self, q: torch.Tensor) -> torch.Tensor:
        dim = self.dim_of(q)
        if q.shape[0] == 0:
            return torch.empty(0, dim, device=q.device)
        if _HAS_FBGEMM and numpy_path(q):  # FBGEMM's CPU decoder
            return torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(q, self.bits)
        sb = self.scale_bias(q)
        return torch.addcmul(sb[:, 1:2], self.codes(q).float(), sb[:, 0:1])

    def step(self, q: torch.Tensor) -> torch.Tensor:
        """Quantisation step (the scale) per row, fp32 ``[n]``."""
        return self.scale_bias(q)[:, 0]


Int8Codec = NBitCodec(8)
Int4Codec = NBitCodec(4)
Int2Codec = NBitCodec(2)

CODECS = {"fp32": Fp32Codec, "fp16": Fp16Codec, "int8": Int8Codec, "int4": Int4Codec, "int2": Int2Codec}


def inference_rows(precision: str, q: torch.Tensor) -> torch.Tensor:
    """Encoded rows of ``precision`` in the row layout of FBGEMM's inference TBE
    (``IntNBitTableBatchedEmbeddingBagsCodegen``): float rows as they are; integer rows with their fp16 scale
    and bias moved *before* the codes (a byte permutation of the same row, nothing re-quantised).

    Example::

        fbgemm_rows = inference_rows("int4", Int4Codec.encode(x))   # [n, 4 + D / 2] uint8
    """
    sb = getattr(CODECS[precision], "SCALE_BIAS_BYTES", 0)
    if not sb:
        return q
    return torch.cat([q[:, -sb:], q[:, :-sb]], dim=1)


def training_rows(precision: str, q: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`inference_rows`: rows in the inference layout back in this package's layout."""
    sb = getattr(CODECS[precision], "SCALE_BIAS_BYTES", 0)
    if not sb:
        return q
    return torch.cat([q[:, sb:], q[:, :sb]], dim=1)
