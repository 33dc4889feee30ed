"""Unsharded modules: compressed tables and the collection that holds them.

Example::

    from torchrec_shark.modules import (
        CompressedEmbeddingBagCollection, CompressedEmbeddingBagConfig, MixedPrecision, SparseOptimizerSpec,
    )
    ebc = CompressedEmbeddingBagCollection(
        tables=[CompressedEmbeddingBagConfig(name="t", num_embeddings=1000, embedding_dim=64,
                                             feature_names=["f"], compression=MixedPrecision())],
        optimizer=SparseOptimizerSpec("rowwise_adagrad", lr=0.05),
    )
"""

from torchrec_shark.modules.base import (
    CompressedTable,
    SparseOptimizerSpec,
    TableInputError,
    build_table,
)
from torchrec_shark.modules.embedding_bag_collection import (
    CompressedEmbeddingBagCollection,
    CompressedTablesOptimizer,
)
from torchrec_shark.modules.mixed_precision import Fp32Table, MixedPrecisionTable, RowStoreTable, UniformTable
from torchrec_shark.modules.quantization import CounterNoise, Fp16Codec, Fp32Codec, Int8Codec, RoundingNoise
from torchrec_shark.modules.table_kind import PieceSpec, StateReader, TableKind, kind_of, register_table_kind
from torchrec_shark.modules.specs import (
    CompressedEmbeddingBagConfig,
    CompressionSpec,
    MixedPrecision,
    TensorTrain,
    Uniform,
)

__all__ = [
    "CompressedEmbeddingBagCollection",
    "CompressedEmbeddingBagConfig",
    "CompressedTable",
    "CompressedTablesOptimizer",
    "CompressionSpec",
    "CounterNoise",
    "Fp16Codec",
    "Fp32Codec",
    "Fp32Table",
    "Int8Codec",
    "MixedPrecision",
    "MixedPrecisionTable",
    "PieceSpec",
    "RoundingNoise",
    "RowStoreTable",
    "SparseOptimizerSpec",
    "StateReader",
    "TableKind",
    "TableInputError",
    "TensorTrain",
    "TensorTrainTable",
    "Uniform",
    "UniformTable",
    "build_table",
    "kind_of",
    "register_table_kind",
]


def __getattr__(name: str):
    # The tensor-train table is imported on first use so this package imports even while
    # that module's optional pieces are unavailable (the collection registers it itself).
    if name == "TensorTrainTable":
        from torchrec_shark.modules.tensor_train import TensorTrainTable

        return TensorTrainTable
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
