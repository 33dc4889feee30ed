"""TorchRec's test model (``TestSparseNN``) over compressed collections, for TorchRec's sharding harness.

The harness builds its model class from the table configs it is given; here those are
:class:`CompressedEmbeddingBagConfig` s, and the model's two embedding collections (unweighted and
weighted) are swapped for :class:`CompressedEmbeddingBagCollection` s over the same configs. The rest
of the model (dense arch, over arch, inputs, planner, DMP, comparison) is TorchRec's.
"""

from __future__ import annotations

import sys
import types
from typing import List, Optional

import torch
from torchrec.distributed.test_utils.test_model import TestSparseNN


def _stub_missing_sequence_test_module() -> None:
    """The wheel ships ``test_utils/test_sharding.py`` but not the ``torchrec.distributed.tests``
    module it imports one sharder from (used only by its 2-D parallel path, which these tests do
    not take): stand in for it so the harness imports."""
    name = "torchrec.distributed.tests.test_sequence_model"
    try:
        __import__(name)
        return
    except ImportError:
        pass

    class TestEmbeddingCollectionSharder:  # noqa: D401 - placeholder, never built here
        def __init__(self, *args, **kwargs) -> None:
            raise RuntimeError("2-D parallel harness path is not available in the installed torchrec wheel")

    package = sys.modules.setdefault("torchrec.distributed.tests", types.ModuleType("torchrec.distributed.tests"))
    package.__path__ = []  # type: ignore[attr-defined]
    module = types.ModuleType(name)
    module.TestEmbeddingCollectionSharder = TestEmbeddingCollectionSharder  # type: ignore[attr-defined]
    sys.modules[name] = module


_stub_missing_sequence_test_module()

from torchrec_shark import CompressedEmbeddingBagCollection, SparseOptimizerSpec
from torchrec_shark.modules import MixedPrecisionTable

# What the harness trains the unsharded reference with (torch.optim.SGD, lr 0.1) and what it
# configures sharded tables with (EXACT_SGD).
HARNESS_OPTIMIZER = SparseOptimizerSpec("sgd", lr=0.1)


def balance_tiers(ebc: CompressedEmbeddingBagCollection, block: int = 32) -> None:
    """Give mixed-precision tables the same share of tiers in every ``block`` rows (a quarter fp32,
    a quarter fp16, half int8): a row-wise shard then holds its rows in the tiers the whole table
    holds them in, so sharded and unsharded tables store the same values. (A row-wise shard keeps
    its own tier budget over its own rows.)"""
    for table in ebc.embedding_bags.values():
        if not isinstance(table, MixedPrecisionTable):
            continue
        values = table.full_weight()
        pattern = [0] * (block // 4) + [1] * (block // 4) + [2] * (block // 2)
        tier = torch.tensor(pattern * (table.num_embeddings // block))
        table.assign_tiers(torch.sort(tier, stable=True).indices)
        table.write_rows(torch.arange(table.num_embeddings), values, rounding="nearest")


def _collection(tables: List, weighted: bool) -> CompressedEmbeddingBagCollection:
    ebc = CompressedEmbeddingBagCollection(tables=list(tables), is_weighted=weighted, optimizer=HARNESS_OPTIMIZER)
    balance_tiers(ebc)
    return ebc


class CompressedSparseNN(TestSparseNN):
    """``TestSparseNN`` whose embedding collections are compressed ones (any device given is ignored:
    tables are built on CPU, where the harness runs)."""

    def __init__(self, tables: List, weighted_tables: Optional[List] = None, **kwargs) -> None:
        kwargs["sparse_device"] = torch.device("meta")  # the stock collections built here are replaced
        super().__init__(tables=tables, weighted_tables=weighted_tables, **kwargs)
        self.sparse.ebc = _collection(tables, weighted=False)
        if weighted_tables:
            self.sparse.weighted_ebc = _collection(weighted_tables, weighted=True)
