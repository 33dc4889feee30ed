"""The table config of a compressed collection: TorchRec's ``EmbeddingBagConfig`` plus a compression spec.

Specs are frozen (hashable) dataclasses defined next to their kinds (``Uniform`` in
:mod:`~torchrec_shark.modules.uniform`, ``MixedPrecision`` in :mod:`~torchrec_shark.modules.mixed_precision`,
``TensorTrain`` in :mod:`~torchrec_shark.modules.tensor_train`): TorchRec groups tables into kernels by
``tuple(sorted(fused_params.items()))``, so a spec must be usable as a dict value there.

Example::

    from torchrec_shark.modules import CompressedEmbeddingBagConfig, MixedPrecision
    cfg = CompressedEmbeddingBagConfig(
        name="t_user", num_embeddings=1_000_000, embedding_dim=64, feature_names=["user"],
        compression=MixedPrecision(tiers=(("fp32", 0.02), ("int4", 0.98))),
    )
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torchrec.modules.embedding_configs import EmbeddingBagConfig


@dataclass
class CompressedEmbeddingBagConfig(EmbeddingBagConfig):
    """An :class:`EmbeddingBagConfig` plus how the table is stored (``None``: stock fp32)."""

    compression: Optional[Any] = None
