"""The contract every compressed table kind implements, and the registry of kinds.

A table kind is an ``nn.Module`` that pools bags of ids into ``[B, D]`` and applies its
sparse optimizer inside the backward pass (like FBGEMM's TBE), so it holds no dense
gradient and no fp32 master copy. :class:`CompressedEmbeddingBagCollection` builds one
per table through :func:`~torchrec_shark.modules.kinds.build_table`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn
from torchrec.modules.embedding_configs import PoolingType


@dataclass(frozen=True)
class SparseOptimizerSpec:
    """Fused sparse optimizer applied in backward: ``sgd``, ``adagrad``, ``rowwise_adagrad``, ``adam``."""

    name: str = "rowwise_adagrad"
    lr: float = 0.05
    eps: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0


class TableInputError(ValueError):
    """Bad input to a table (ids out of range, non-finite per-id weights, labels or gradients).

    The message names the table; the table is left unchanged.
    """


def all_finite(x: torch.Tensor) -> bool:
    """No NaN/inf in ``x`` (a sum first: one fast pass when, as usual, it is finite)."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


class CompressedTable(nn.Module, abc.ABC):
    """One compressed embedding table.

    ``forward(ids, offsets, per_sample_weights)`` returns pooled rows ``[B, D]`` where
    bag ``b`` holds ``ids[offsets[b]:offsets[b+1]]``. Gradients flowing back are applied to
    the table's own storage by its fused optimizer; nothing is left in ``.grad``.
    """

    num_embeddings: int
    embedding_dim: int
    pooling: PoolingType

    @abc.abstractmethod
    def forward(
        self,
        ids: torch.Tensor,
        offsets: torch.Tensor,
        per_sample_weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor: ...

    @abc.abstractmethod
    def memory_bytes(self) -> Dict[str, int]:
        """Bytes really allocated for the table (no optimizer state), by part; key ``total``."""

    def fp32_bytes(self) -> int:
        """Bytes of the same table as plain fp32 rows."""
        return self.num_embeddings * self.embedding_dim * 4

    @abc.abstractmethod
    def full_weight(self) -> torch.Tensor:
        """The table as an fp32 ``[num_embeddings, embedding_dim]`` tensor (debugging, tests, warm start)."""

    @abc.abstractmethod
    def optimizer_state(self) -> Dict[str, torch.Tensor]:
        """Fused optimizer state tensors by name (exposed through the collection's KeyedOptimizer)."""

    def record_labels(self, ids: torch.Tensor, offsets: torch.Tensor, labels: torch.Tensor) -> None:
        """Count positive/negative samples per row (called only for label-aware kinds, which override it)."""

    def step_end(self) -> None:
        """Called once per training step after the update (re-tiering, cache refresh)."""

    def loaded(self) -> None:
        """Called after the table's tensors were written in place (a load): re-read what it mirrors."""

    def set_learning_rate(self, lr: float) -> None:
        """Learning rate of the fused optimizer from now on (the collection's ``KeyedOptimizer``
        pushes its param group's ``lr`` here on ``step()``, so LR schedulers work); tables whose
        optimizer has a learning rate override this."""

    def check_ids(self, ids: torch.Tensor) -> None:
        """Raise :class:`TableInputError` for non-integer ids or ids outside ``[0, num_embeddings)``."""
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TableInputError(f"table {self.name!r}: ids must be integers, got {ids.dtype}")
        if ids.numel():
            lo, hi = (int(v) for v in torch.aminmax(ids))
            if lo < 0 or hi >= self.num_embeddings:
                raise TableInputError(
                    f"table {self.name!r}: ids must be in [0, {self.num_embeddings}), got min {lo}, max {hi}"
                )

    def check_lookup(self, ids: torch.Tensor, offsets: torch.Tensor,
                     per_sample_weights: Optional[torch.Tensor]) -> None:
        """The checks of :meth:`forward`'s inputs every kind shares (ids, offsets, per-id weights)."""
        self.check_ids(ids)
        if offsets.numel() < 1 or int(offsets[-1]) != ids.numel():
            raise TableInputError(
                f"table {self.name!r}: offsets must have B + 1 entries ending at len(ids)={ids.numel()}"
            )
        if per_sample_weights is not None:
            if per_sample_weights.numel() != ids.numel():
                raise TableInputError(
                    f"table {self.name!r}: {per_sample_weights.numel()} per-id weights for {ids.numel()} ids"
                )
            if not all_finite(per_sample_weights):
                raise TableInputError(f"table {self.name!r}: per-id weights contain NaN or inf")
