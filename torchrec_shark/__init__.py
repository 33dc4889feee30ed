"""torchrec-shark: compressed embedding tables for TorchRec.

The public classes are importable from the top level, as ``torchrec.EmbeddingBagCollection`` is::

    from torchrec_shark import (
        CompressedEmbeddingBagCollection, CompressedEmbeddingBagConfig, CompressedEmbeddingBagCollectionSharder,
        MixedPrecision, Tier, TensorTrain, Uniform,
    )

They are loaded on first access, so ``import torchrec_shark`` alone stays cheap (TorchRec and
FBGEMM load only when a class is used).
"""

from importlib import import_module
from typing import Any, Dict

_EXPORTS: Dict[str, str] = {
    "CompressedEmbeddingBagCollection": "torchrec_shark.modules.embedding_bag_collection",
    "CompressedEmbeddingBagConfig": "torchrec_shark.modules.specs",
    "MixedPrecision": "torchrec_shark.modules.mixed_precision",
    "Tier": "torchrec_shark.modules.mixed_precision",
    "three_tier": "torchrec_shark.modules.mixed_precision",
    "TensorTrain": "torchrec_shark.modules.tensor_train",
    "Uniform": "torchrec_shark.modules.uniform",
    "SparseOptimizerSpec": "torchrec_shark.modules.base",
    "CompressedEmbeddingBagCollectionSharder": "torchrec_shark.distributed.compressed_sharder",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
