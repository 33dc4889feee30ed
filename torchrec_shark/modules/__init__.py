"""Unsharded modules: compressed tables, their kinds, and the collection that holds them.

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

from torchrec_shark.modules.base import CompressedTable, SparseOptimizerSpec, TableInputError
from torchrec_shark.modules.embedding_bag_collection import (
    CompressedEmbeddingBagCollection,
    CompressedTablesOptimizer,
)
from torchrec_shark.modules.kinds import KINDS, build_table, kind_named, kind_of, register_kind
from torchrec_shark.modules.mixed_precision import MixedPrecision, MixedPrecisionTable, Tier, three_tier
from torchrec_shark.modules.quantization import CounterNoise, Fp16Codec, Fp32Codec, Int8Codec, RoundingNoise
from torchrec_shark.modules.row_store import RowStoreKind, RowStoreTable
from torchrec_shark.modules.specs import CompressedEmbeddingBagConfig
from torchrec_shark.modules.stock import Fp32Table
from torchrec_shark.modules.table_kind import PieceSpec, StateReader, TableKind
from torchrec_shark.modules.tensor_train import TensorTrain, TensorTrainTable
from torchrec_shark.modules.uniform import Uniform, UniformTable

__all__ = [
    "KINDS",
    "CompressedEmbeddingBagCollection",
    "CompressedEmbeddingBagConfig",
    "CompressedTable",
    "CompressedTablesOptimizer",
    "CounterNoise",
    "Fp16Codec",
    "Fp32Codec",
    "Fp32Table",
    "Int8Codec",
    "MixedPrecision",
    "MixedPrecisionTable",
    "PieceSpec",
    "RoundingNoise",
    "RowStoreKind",
    "RowStoreTable",
    "SparseOptimizerSpec",
    "StateReader",
    "TableInputError",
    "TableKind",
    "TensorTrain",
    "TensorTrainTable",
    "Tier",
    "Uniform",
    "UniformTable",
    "build_table",
    "kind_named",
    "kind_of",
    "register_kind",
    "three_tier",
]
