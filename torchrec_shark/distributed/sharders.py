"""Sharders that offer row-wise sharding on CPU as well as CUDA.

TorchRec lists ``row_wise`` only for CUDA (``BaseEmbeddingSharder.sharding_types``), but its
row-wise sharding runs with gloo on CPU (forward and backward), which is how multi-rank
jobs are tested without GPUs.

Example::

    sharders = [CpuRowWiseEmbeddingBagCollectionSharder()]
    plan = planner.collective_plan(model, sharders, pg)
"""

from __future__ import annotations

from typing import List

from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import ShardingType

SUPPORTED_SHARDING_TYPES: List[str] = [
    ShardingType.DATA_PARALLEL.value,
    ShardingType.TABLE_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.ROW_WISE.value,
]


class CpuRowWiseEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """``EmbeddingBagCollectionSharder`` offering the CUDA sharding types on every device."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return list(SUPPORTED_SHARDING_TYPES)
