"""TorchRec's own planner and DistributedModelParallel (no plan given, TorchRec's default sharders
plus ours) over a model holding a compressed collection and a stock one."""

import pytest
import torch
from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.shard_estimators import EmbeddingPerfEstimator, EmbeddingStorageEstimator
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.dist_utils import run_ranks
from torchrec_shark import (
    CompressedEmbeddingBagCollection,
    CompressedEmbeddingBagCollectionSharder,
    CompressedEmbeddingBagConfig,
    MixedPrecision,
    three_tier,
    TensorTrain,
    Uniform,
)
from torchrec_shark.distributed.sharders import CpuRowWiseEmbeddingBagCollectionSharder

ROWS, DIM = 20_000, 64
KINDS = {
    "fp32": None,
    "fp16": Uniform("fp16"),
    "int8": Uniform("int8"),
    "mp": three_tier(0.1, 0.3),
    "tt": TensorTrain(ranks=(8,)),
}


def _compressed(rows=ROWS, dim=DIM, kinds=KINDS):
    torch.manual_seed(0)
    return CompressedEmbeddingBagCollection([
        CompressedEmbeddingBagConfig(name=f"t_{k}", num_embeddings=rows, embedding_dim=dim, feature_names=[f"f_{k}"],
                                     compression=spec)
        for k, spec in kinds.items()
    ])


class _Model(nn.Module):
    def __init__(self, compressed, stock_rows=ROWS, dim=DIM):
        super().__init__()
        self.compressed = compressed
        self.stock = EmbeddingBagCollection(
            [EmbeddingBagConfig(name="t_stock", num_embeddings=stock_rows, embedding_dim=dim, feature_names=["f_s"])],
            device=torch.device("meta"),
        )

    def forward(self, kjt):
        return self.compressed(kjt), self.stock(kjt)


def test_default_enumerator_and_estimators_price_compressed_tables_by_their_size():
    model = _Model(_compressed())
    topology = Topology(world_size=2, compute_device="cpu")
    options = EmbeddingEnumerator(topology=topology, batch_size=64).enumerate(
        model, [CompressedEmbeddingBagCollectionSharder(), CpuRowWiseEmbeddingBagCollectionSharder()]
    )
    tw = {so.name: so for so in options if so.sharding_type == "table_wise"}
    ddr = {name: sum(s.storage.ddr for s in so.shards) for name, so in tw.items()}
    fp32 = ROWS * DIM * 4
    assert all(so.shards[0].perf is not None for so in tw.values())
    assert ddr["t_stock"] == pytest.approx(ddr["t_fp32"], rel=0.02)
    assert fp32 <= ddr["t_fp32"] < 1.1 * fp32
    assert 0.45 * fp32 < ddr["t_fp16"] < 0.55 * fp32
    assert 0.2 * fp32 < ddr["t_int8"] < 0.3 * fp32
    assert 0.45 * fp32 < ddr["t_mp"] < 0.55 * fp32  # ~1.9 real bytes per element, seen as 2
    # TT holds a few kB: the default estimator sees it at the smallest element size (1 byte)
    assert ddr["t_tt"] < 0.3 * fp32


def test_default_planner_fits_compressed_tables_where_fp32_would_not():
    # one rank, 6 MB: the five fp32-sized tables (5 x 5 MB) would not fit, the compressed ones do
    model = _Model(_compressed(kinds={k: v for k, v in KINDS.items() if k != "fp32"}), stock_rows=100)
    topology = Topology(world_size=1, compute_device="cpu", ddr_cap=12 * 1024**2)
    planner = EmbeddingShardingPlanner(topology=topology)
    plan = planner.plan(model, [CompressedEmbeddingBagCollectionSharder(), CpuRowWiseEmbeddingBagCollectionSharder()])
    assert {ps.compute_kernel for ps in plan.plan["compressed"].values()} == {"customized_kernel"}
    assert plan.plan["stock"]["t_stock"].compute_kernel == "fused"


def test_users_topology_constraints_and_estimators_keep_working_with_our_sharder():
    model = _Model(_compressed(rows=1000, kinds={"int8": KINDS["int8"], "fp32": None}), stock_rows=1000)
    topology = Topology(world_size=2, compute_device="cpu", ddr_cap=64 * 1024**2)
    constraints = {
        "t_stock": ParameterConstraints(sharding_types=["row_wise"]),
        "t_int8": ParameterConstraints(sharding_types=["row_wise"]),
        "t_fp32": ParameterConstraints(sharding_types=["table_wise"]),
    }
    estimators = [EmbeddingPerfEstimator(topology, constraints), EmbeddingStorageEstimator(topology, constraints)]
    enumerator = EmbeddingEnumerator(topology=topology, batch_size=32, constraints=constraints, estimator=estimators)
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=32, enumerator=enumerator, constraints=constraints)
    plan = planner.plan(model, [CpuRowWiseEmbeddingBagCollectionSharder(), CompressedEmbeddingBagCollectionSharder()])
    assert plan.plan["stock"]["t_stock"].sharding_type == "row_wise"
    assert plan.plan["compressed"]["t_int8"].sharding_type == "row_wise"
    assert plan.plan["compressed"]["t_fp32"].sharding_type == "table_wise"


def test_a_users_own_customized_kernel_bandwidth_is_kept():
    from torchrec.distributed.planner.estimator.annotations import device_bw
    from torchrec.distributed.planner.estimator.config import EmbeddingPerfEstimatorConfig

    from torchrec_shark.distributed.estimators import register_customized_kernel_bandwidth

    @device_bw(bandwidth=123.0, device="cpu", compute_kernel="customized_kernel")
    class UserConfig(EmbeddingPerfEstimatorConfig):
        pass

    register_customized_kernel_bandwidth(UserConfig)
    assert UserConfig.kernel_device_bandwidths[("cpu", "customized_kernel")] == 123.0
    assert ("cuda", "customized_kernel") in UserConfig.kernel_device_bandwidths
    assert ("cpu", "customized_kernel") in EmbeddingPerfEstimatorConfig.kernel_device_bandwidths


# ---------------------------------------------------------------------------- DMP without a plan (spawned ranks)
SMALL = {"int8": Uniform("int8"), "mp": three_tier(0.25, 0.25, rounding="nearest"),
         "fp32": None}


def _batch(rank: int, batch: int = 4) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(10 + rank)
    keys = [f"f_{k}" for k in SMALL] + ["f_s"]
    lengths = torch.randint(0, 3, (len(keys) * batch,), generator=g)
    return KeyedJaggedTensor.from_lengths_sync(keys, torch.randint(0, 64, (int(lengths.sum()),), generator=g), lengths)


def _dmp_without_plan(rank: int, world_size: int):
    from torchrec.distributed.model_parallel import DistributedModelParallel, get_default_sharders

    model = _Model(_compressed(rows=64, dim=8, kinds=SMALL), stock_rows=64, dim=8)
    visited = []
    model.apply(lambda m: visited.append(type(m).__name__))  # what DMP's parameter initialisation does
    dmp = DistributedModelParallel(model, device=torch.device("cpu"),
                                   sharders=[*get_default_sharders(), CompressedEmbeddingBagCollectionSharder()])
    kinds = {n: ps.compute_kernel for n, ps in dmp.plan.plan["compressed"].items()}
    ours, stock = dmp(_batch(rank))
    reference = _compressed(rows=64, dim=8, kinds=SMALL)(_batch(rank))
    diff = {k: float((ours[k] - reference[k]).detach().abs().max()) for k in reference.keys()}
    (ours.values().sum() + stock.values().sum()).backward()
    return {"kernels": kinds, "diff": diff, "stock_shape": tuple(stock.values().shape),
            "applied": "CompressedEmbeddingBagCollection" in visited}


@pytest.mark.parametrize("world_size", [1, 2])
def test_dmp_without_plan_with_torchrec_default_sharders_plus_ours(world_size):
    for result in run_ranks(_dmp_without_plan, world_size):
        assert result["applied"]
        assert set(result["kernels"].values()) == {"customized_kernel"}
        diff = result["diff"]
        assert diff["f_fp32"] < 1e-6 and diff["f_int8"] < 1e-6
        # a row-wise mixed-precision shard re-tiers its own rows within its own budget, so a row may sit
        # in another precision than in the unsharded table
        assert diff["f_mp"] < (1e-6 if world_size == 1 else 2e-2)
        assert result["stock_shape"] == (4, 8)
