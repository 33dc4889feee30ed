"""Compression specs carried by :class:`CompressedEmbeddingBagConfig`.

Specs are frozen (hashable) dataclasses: TorchRec groups tables into kernels by
``tuple(sorted(fused_params.items()))``, so a spec must be usable as a dict value there.

Example::

    from torchrec_shark.modules import CompressedEmbeddingBagConfig, MixedPrecision
    cfg = CompressedEmbeddingBagConfig(
        name="t_user", num_embeddings=1_000_000, embedding_dim=64,
        feature_names=["user"], compression=MixedPrecision(fp32_fraction=0.1, fp16_fraction=0.3),
    )
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

from torchrec.modules.embedding_configs import EmbeddingBagConfig


@dataclass(frozen=True)
class Uniform:
    """Every row stored in one precision: ``fp16`` or ``int8`` (row-wise scale and bias).

    ``rounding`` applies to optimizer updates, as in :class:`MixedPrecision`.
    """

    dtype: str = "fp16"
    rounding: str = "stochastic"  # stochastic | nearest

    def __post_init__(self) -> None:
        if self.dtype not in ("fp16", "int8"):
            raise ValueError(f"Uniform.dtype={self.dtype!r} must be 'fp16' or 'int8'")
        if self.rounding not in ("stochastic", "nearest"):
            raise ValueError(f"Uniform.rounding={self.rounding!r} must be 'stochastic' or 'nearest'")


@dataclass(frozen=True)
class MixedPrecision:
    """SHARK F-Quantization: each row lives in fp32, fp16 or int8 by its priority.

    ``P_t = decay * P_{t-1} + pos_weight * n_pos + neg_weight * n_neg``; every
    ``retier_every`` steps the top ``fp32_fraction`` rows by priority go to fp32, the
    next ``fp16_fraction`` to fp16 and the rest to int8.
    """

    fp32_fraction: float = 0.10
    fp16_fraction: float = 0.30
    decay: float = 0.99
    pos_weight: float = 1.0
    neg_weight: float = 0.25
    retier_every: int = 100
    rounding: str = "stochastic"  # stochastic | nearest

    def __post_init__(self) -> None:
        if not (0 <= self.fp32_fraction and 0 <= self.fp16_fraction and self.fp32_fraction + self.fp16_fraction <= 1 + 1e-9):
            raise ValueError(
                f"MixedPrecision fractions fp32={self.fp32_fraction}, fp16={self.fp16_fraction} "
                "must be >= 0 and sum to at most 1 (int8 takes the rest)"
            )
        if self.rounding not in ("stochastic", "nearest"):
            raise ValueError(f"MixedPrecision.rounding={self.rounding!r} must be 'stochastic' or 'nearest'")
        if self.retier_every < 1:
            raise ValueError(f"MixedPrecision.retier_every={self.retier_every} must be >= 1")

    @property
    def int8_fraction(self) -> float:
        return max(0.0, 1.0 - self.fp32_fraction - self.fp16_fraction)


@dataclass(frozen=True)
class TensorTrain:
    """TT-Rec: the table is a chain of 3-D cores ``(R_{k-1}, p_k, q_k, R_k)``.

    ``ranks`` holds one value (used between every pair of cores) or ``num_cores - 1``
    values. ``row_factors``/``col_factors`` default to balanced factorisations of
    ``num_embeddings`` (rounded up) and ``embedding_dim``.
    """

    num_cores: int = 3
    ranks: Tuple[int, ...] = (32,)
    row_factors: Optional[Tuple[int, ...]] = None
    col_factors: Optional[Tuple[int, ...]] = None
    init: str = "sampled_gaussian"  # sampled_gaussian | naive
    cache_fraction: float = 0.0
    cache_refresh_every: int = 500


CompressionSpec = Union[Uniform, MixedPrecision, TensorTrain]


@dataclass
class CompressedEmbeddingBagConfig(EmbeddingBagConfig):
    """An :class:`EmbeddingBagConfig` plus how the table is stored (``None``: stock fp32)."""

    compression: Optional[CompressionSpec] = None
