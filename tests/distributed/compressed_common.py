"""Shared fixtures for the compressed-sharding tests: a small DLRM over compressed tables, global batches,
a single-process reference run and helpers to read sharded state back as global tensors."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingEnv
from torchrec.modules.embedding_configs import PoolingType
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_shark.distributed.compressed_sharder import (
    CompressedEmbeddingBagCollectionSharder,
    build_compressed_planner,
    compressed_constraints,
)
from torchrec_shark.models.dlrm import DLRM, DLRMTrain
from torchrec_shark.modules.base import SparseOptimizerSpec
from torchrec_shark.modules.embedding_bag_collection import CompressedEmbeddingBagCollection
from torchrec_shark.modules import CompressedEmbeddingBagConfig, MixedPrecisionTable, RowStoreTable, TensorTrain, three_tier
from torchrec_shark.modules.row_store import bits_per_value

GLOBAL_BATCH = 16
DIM = 8
MP = three_tier(0.25, 0.25, rounding="nearest", retier_every=1000)
TT = TensorTrain(num_cores=3, ranks=(4,), row_factors=(4, 4, 4))  # 64 rows, first-core block 16


def table_configs(kinds: Sequence[str]) -> List[CompressedEmbeddingBagConfig]:
    out = []
    for kind in kinds:
        if kind == "mp":  # two features share the table
            out.append(CompressedEmbeddingBagConfig(name="t_mp", num_embeddings=64, embedding_dim=DIM,
                                                    feature_names=["f_mp", "f_mp2"], compression=MP))
        elif kind == "tt":
            out.append(CompressedEmbeddingBagConfig(name="t_tt", num_embeddings=64, embedding_dim=DIM,
                                                    feature_names=["f_tt"], compression=TT))
        elif kind == "fp32":  # a stock table in the same collection, MEAN pooled
            out.append(CompressedEmbeddingBagConfig(name="t_fp", num_embeddings=20, embedding_dim=DIM,
                                                    feature_names=["f_fp"], pooling=PoolingType.MEAN))
        else:
            raise ValueError(kind)
    return out


def features(kinds: Sequence[str]) -> List[str]:
    return [f for c in table_configs(kinds) for f in c.feature_names]


def rows_of(kinds) -> Dict[str, int]:
    return {f: c.num_embeddings for c in table_configs(kinds) for f in c.feature_names}


def build_model(kinds: Sequence[str], seed: int = 0, lr: float = 0.05, optimizer: str = "rowwise_adagrad") -> DLRMTrain:
    torch.manual_seed(seed)
    ebc = CompressedEmbeddingBagCollection(tables=table_configs(kinds), optimizer=SparseOptimizerSpec(optimizer, lr=lr))
    for name, t in ebc.embedding_bags.items():
        if isinstance(t, MixedPrecisionTable):  # shard-balanced tiers: every 32-row block: 8 fp32, 8 fp16, 16 int8 rows
            values = t.full_weight()
            tier = torch.tensor(([0] * 8 + [1] * 8 + [2] * 16) * (t.num_embeddings // 32))
            t.assign_tiers(torch.sort(tier, stable=True).indices)
            t.write_rows(torch.arange(t.num_embeddings), values, rounding="nearest")
    return DLRMTrain(DLRM(ebc, 3, [DIM], [8, 1], dense_device=torch.device("cpu")))


def global_batch(kinds: Sequence[str], step: int):
    g = torch.Generator().manual_seed(100 + step)
    rows = rows_of(kinds)
    feats = list(rows)
    lengths = torch.randint(0, 4, (len(feats), GLOBAL_BATCH), generator=g)
    values = [torch.randint(0, rows[f], (int(lengths[i].sum()),), generator=g) for i, f in enumerate(feats)]
    dense = torch.randn(GLOBAL_BATCH, 3, generator=g)
    labels = torch.randint(0, 2, (GLOBAL_BATCH,), generator=g).float()
    return dense, lengths, values, labels


def local_batch(kinds, step: int, rank: int, world_size: int) -> Batch:
    dense, lengths, values, labels = global_batch(kinds, step)
    feats = features(kinds)
    b = GLOBAL_BATCH // world_size
    sl = slice(rank * b, (rank + 1) * b)
    vals, lens = [], []
    for i in range(len(feats)):
        off = torch.cat([torch.zeros(1, dtype=torch.long), lengths[i].cumsum(0)])
        vals.append(values[i][off[sl.start]:off[sl.stop]])
        lens.append(lengths[i][sl])
    kjt = KeyedJaggedTensor.from_lengths_sync(feats, torch.cat(vals), torch.cat(lens))
    return Batch(dense[sl], kjt, labels[sl])


def dense_opt(model, lr=0.1):
    params = dict(in_backward_optimizer_filter(model.named_parameters()))
    return KeyedOptimizerWrapper(params, lambda p: torch.optim.SGD(p, lr=lr))


def reference_run(kinds, steps: int, **kw) -> DLRMTrain:
    """Single process, unsharded, on the global batch (= mean of per-rank mean losses)."""
    model = build_model(kinds, **kw)
    ebc = model.model.embedding_bag_collection
    opt = CombinedOptimizer([ebc.fused_optimizer, dense_opt(model)])
    model.train()
    for s in range(steps):
        loss, _ = model(local_batch(kinds, s, 0, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        ebc.step_end()
    return model


def shard(model, world_size: int, sharding_type: str, batch_size: int = GLOBAL_BATCH // 2, pg=None):
    """Plan (every table restricted to ``sharding_type``) and wrap in DMP over ``pg`` (default: world)."""
    from torchrec.distributed.planner import ParameterConstraints

    pg = pg if pg is not None else dist.GroupMember.WORLD
    ebc = model.model.embedding_bag_collection
    cons = {c.name: ParameterConstraints(sharding_types=[sharding_type]) for c in ebc.embedding_bag_configs()}
    cons = compressed_constraints(ebc.embedding_bag_configs(), world_size, cons)
    planner = build_compressed_planner(world_size, "cpu", batch_size, cons)
    sharders = [CompressedEmbeddingBagCollectionSharder()]
    plan = planner.collective_plan(model, sharders, pg)
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(pg),
                                   device=torch.device("cpu"), plan=plan, sharders=sharders)
    return dmp, plan


def load_sharded(path: str, kinds, world_size: int, sharding_type: str, pg=None, batch_size: int = GLOBAL_BATCH // 2,
                 seed: int = 7):
    """A model of another initialisation, sharded ``sharding_type``, with everything loaded from the checkpoint
    at ``path`` (which any sharding may have saved): ``(dmp, plan, optimizer)``."""
    from torchrec_shark.distributed import resharding

    dmp, plan = shard(build_model(kinds, seed=seed), world_size, sharding_type, batch_size=batch_size, pg=pg)
    opt = CombinedOptimizer([dmp.fused_optimizer, dense_opt(dmp)])
    state = {"model": dmp.state_dict(), "optim": opt.state_dict()}
    resharding.load(state, path, dmp, process_group=pg)
    dmp.load_state_dict(state["model"])
    opt.load_state_dict(state["optim"])
    return dmp, plan, opt


def train_sharded(dmp, kinds, steps: int, rank: int, world_size: int, start: int = 0):
    opt = CombinedOptimizer([dmp.fused_optimizer, dense_opt(dmp)])
    dmp.train()
    for s in range(start, start + steps):
        loss, _ = dmp(local_batch(kinds, s, rank, world_size))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def sharded_collection(dmp):
    return dmp.module.model.embedding_bag_collection


def local_view(value, dim: int = 0):
    """``(offset along dim, local tensor)`` of a ShardedTensor's local shard(s); None if none."""
    shards = value.local_shards()
    if not shards:
        return None
    assert len(shards) == 1
    return shards[0].metadata.shard_offsets[dim], shards[0].tensor


def row_tolerance(ref_table, rows: torch.Tensor) -> torch.Tensor:
    """One rounding step of each row's precision in the reference table (fp32 and tensor train: 1e-5)."""
    w = ref_table.full_weight()[rows]
    if not isinstance(ref_table, RowStoreTable):
        return torch.full_like(w, 1e-5)
    precision = [p for p, _, _ in ref_table._tiers]
    tier = ref_table.tier_of_rows(rows).long()
    out = torch.full_like(w, 1e-5)
    for k, p in enumerate(precision):
        here = (tier == k).unsqueeze(1).expand_as(w)
        if p == "fp16":
            step = w.abs() * 2.0**-10 + 2.0**-24
        elif p != "fp32":  # integer codes: the row's range over its levels
            levels = 2 ** bits_per_value(p) - 1
            step = ((w.amax(1) - w.amin(1)) / levels).unsqueeze(1).expand_as(w) * 1.01
        else:
            continue
        out = torch.where(here, step, out)
    return out + 1e-6


# ---------------------------------------------------------------------------- stock + compressed model
MIXED_STOCK = ["f_s1", "f_s2"]  # stock FBGEMM tables (EmbeddingBagCollection)
MIXED_KINDS = ["mp", "tt"]  # compressed collection


class MixedModel(torch.nn.Module):
    """A stock ``EmbeddingBagCollection`` and a ``CompressedEmbeddingBagCollection`` reading one KJT."""

    def __init__(self, stock, compressed) -> None:
        super().__init__()
        self.stock = stock
        self.embedding_bag_collection = compressed
        n = len(MIXED_STOCK) + len(features(MIXED_KINDS))
        self.over = torch.nn.Linear(n * DIM + 3, 1)
        self.loss_fn = torch.nn.BCEWithLogitsLoss()

    def forward(self, batch: Batch):
        if self.training:
            self.embedding_bag_collection.record_labels(batch.sparse_features, batch.labels)
        a = self.stock(batch.sparse_features).to_dict()
        b = self.embedding_bag_collection(batch.sparse_features).to_dict()
        x = torch.cat([batch.dense_features] + [a[f] for f in MIXED_STOCK] + [b[f] for f in features(MIXED_KINDS)], 1)
        logits = self.over(x).squeeze(-1)
        loss = self.loss_fn(logits, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)


def build_mixed(seed: int = 0) -> MixedModel:
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.optim import RowWiseAdagrad
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    torch.manual_seed(seed)
    stock = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name=f"t_{f}", num_embeddings=32, embedding_dim=DIM, feature_names=[f])
                for f in MIXED_STOCK],
        device=torch.device("meta"),
    )
    apply_optimizer_in_backward(RowWiseAdagrad, stock.parameters(), {"lr": 0.05, "eps": 1e-8})
    comp = CompressedEmbeddingBagCollection(tables=table_configs(MIXED_KINDS),
                                            optimizer=SparseOptimizerSpec("rowwise_adagrad", lr=0.05))
    return MixedModel(stock, comp)


def shard_mixed(model: MixedModel, world_size: int):
    """One planner (compressed estimators), both sharders, one DMP; stock tables row-wise, compressed
    tables by the planner's choice."""
    from torchrec.distributed.planner import ParameterConstraints

    from torchrec_shark.distributed.sharders import CpuRowWiseEmbeddingBagCollectionSharder

    cons = {f"t_{f}": ParameterConstraints(sharding_types=["row_wise"]) for f in MIXED_STOCK}
    cons = compressed_constraints(model.embedding_bag_collection.embedding_bag_configs(), world_size, cons)
    planner = build_compressed_planner(world_size, "cpu", GLOBAL_BATCH // world_size, cons)
    sharders = [CpuRowWiseEmbeddingBagCollectionSharder(), CompressedEmbeddingBagCollectionSharder()]
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                   device=torch.device("cpu"), plan=plan, sharders=sharders)
    return dmp, plan


def mixed_batch(step: int, rank: int, world_size: int) -> Batch:
    g = torch.Generator().manual_seed(500 + step)
    feats = MIXED_STOCK + features(MIXED_KINDS)
    rows = {**{f: 32 for f in MIXED_STOCK}, **rows_of(MIXED_KINDS)}
    b = GLOBAL_BATCH // world_size
    lengths = torch.randint(1, 4, (len(feats), GLOBAL_BATCH), generator=g)
    values = [torch.randint(0, rows[f], (int(lengths[i].sum()),), generator=g) for i, f in enumerate(feats)]
    dense = torch.randn(GLOBAL_BATCH, 3, generator=g)
    labels = torch.randint(0, 2, (GLOBAL_BATCH,), generator=g).float()
    sl = slice(rank * b, (rank + 1) * b)
    vals, lens = [], []
    for i in range(len(feats)):
        off = torch.cat([torch.zeros(1, dtype=torch.long), lengths[i].cumsum(0)])
        vals.append(values[i][off[sl.start]:off[sl.stop]])
        lens.append(lengths[i][sl])
    return Batch(dense[sl], KeyedJaggedTensor.from_lengths_sync(feats, torch.cat(vals), torch.cat(lens)), labels[sl])
