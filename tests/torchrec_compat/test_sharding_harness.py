"""TorchRec's sharding harness (``sharding_single_rank_test`` from the installed
``torchrec.distributed.test_utils``) over compressed collections and our sharder, 2 gloo ranks.

The harness builds the same model twice (unsharded and, through TorchRec's default planner and
``DistributedModelParallel``, sharded), copies the unsharded state into the sharded one, trains one
SGD step on each and checks that the sharded predictions equal the unsharded ones. Each compressed
kind is compared with itself unsharded (the reference computes over the same dequantised values).
The default suite runs one model mixing three kinds and both sharding types; ``-m torchrec_full``
runs every kind x sharding type (``make test-torchrec``).
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.distributed.planner import ParameterConstraints
from torchrec.modules.embedding_configs import PoolingType

from tests.torchrec_compat.harness_models import CompressedSparseNN  # first: makes the harness importable
from torchrec.distributed.test_utils import test_sharding  # noqa: E402
from torchrec.distributed.test_utils.test_sharding import sharding_single_rank_test  # noqa: E402

_harness_copy_state_dict = test_sharding.copy_state_dict
from torchrec_shark import CompressedEmbeddingBagCollectionSharder, CompressedEmbeddingBagConfig
from torchrec_shark import MixedPrecision, TensorTrain, Uniform, three_tier

WORLD_SIZE = 2
TIMEOUT_S = 240
ROWS = 64  # two row-wise shards of 32 rows: whole tier blocks and whole TT first-core slices (4 x 4 x 4)

KINDS = {
    "fp32": None,
    "fp16": Uniform("fp16", rounding="nearest"),
    "int8": Uniform("int8", rounding="nearest"),
    "mixed_precision": three_tier(0.25, 0.25, rounding="nearest", retier_every=1000),
    "tensor_train": TensorTrain(num_cores=3, ranks=(4,), row_factors=(4, 4, 4)),
}
SHARDING_TYPES = ["table_wise", "row_wise"]
# The default suite's run: one model whose tables are of three kinds and both sharding types
# (table_0, table_1, weighted_table_0).
MIXED = (("fp32", "row_wise"), ("mixed_precision", "row_wise"), ("tensor_train", "table_wise"))


def _tables(specs):
    tables = [
        CompressedEmbeddingBagConfig(name="table_0", num_embeddings=ROWS, embedding_dim=8, feature_names=["feature_0"],
                                     compression=specs[0]),
        # two features share a table; MEAN pooling
        CompressedEmbeddingBagConfig(name="table_1", num_embeddings=ROWS, embedding_dim=16,
                                     feature_names=["feature_1", "feature_2"], pooling=PoolingType.MEAN,
                                     compression=specs[1]),
    ]
    weighted = [
        CompressedEmbeddingBagConfig(name="weighted_table_0", num_embeddings=ROWS, embedding_dim=8,
                                     feature_names=["weighted_feature_0"], compression=specs[2]),
    ]
    return tables, weighted


def _copy_dense_state(loc, glob, exclude_predfix=None):
    """The harness's ``copy_state_dict`` without the compressed collections' keys. Their sharded
    layout is not the unsharded one (a ``tier`` per shard, 4-D TT cores the copy cannot slice), and
    the copy is not what makes the tables equal here: both models build their tables from the same
    seed and the shards are built from the unsharded tables (a mismatch fails the comparison). It
    brings the dense weights over, as in TorchRec's own runs."""
    sparse = ("sparse.ebc.", "sparse.weighted_ebc.")
    return _harness_copy_state_dict({k: v for k, v in loc.items() if not k.startswith(sparse)}, glob, exclude_predfix)


def _rank_main(rank: int, world_size: int, layout) -> None:
    """``layout``: ``(kind, sharding type)`` of table_0, table_1 and weighted_table_0."""
    torch.set_num_threads(1)
    test_sharding.copy_state_dict = _copy_dense_state
    tables, weighted = _tables([KINDS[kind] for kind, _ in layout])
    sharding_single_rank_test(
        rank=rank,
        world_size=world_size,
        model_class=CompressedSparseNN,
        embedding_groups={"group_0": ["feature_0", "feature_1", "feature_2"]},
        tables=tables,
        weighted_tables=weighted,
        sharders=[CompressedEmbeddingBagCollectionSharder(
            fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1})],
        backend="gloo",
        optim=EmbOptimType.EXACT_SGD,
        constraints={t.name: ParameterConstraints(sharding_types=[st]) for t, (_, st) in zip(tables + weighted, layout)},
        # tighter than the harness's float32 default: one SGD step moves these predictions by ~1e-5
        # per 0.2 of learning rate, which the default tolerance would not see
        atol=1e-6,
        rtol=1e-6,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_harness(layout, world_size: int = WORLD_SIZE) -> None:
    """Run the harness on ``world_size`` spawned gloo ranks; fail (never hang) after ``TIMEOUT_S``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    ctx = mp.start_processes(_rank_main, args=(world_size, tuple(layout)), nprocs=world_size,
                             start_method="spawn", join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"TorchRec harness {layout} did not finish in {TIMEOUT_S}s")


def test_torchrec_harness_three_kinds_both_sharding_types():
    run_harness(MIXED)


@pytest.mark.torchrec_full
@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_torchrec_harness_full(kind, sharding_type):
    run_harness([(kind, sharding_type)] * 3)
