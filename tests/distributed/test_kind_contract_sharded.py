"""The table-kind contract on two gloo ranks, for every registered kind: an unsharded table's state loads
into its table-wise and row-wise shards (1 -> 2 ranks), the shards compute what the unsharded table
computes, train one step as it does, and their checkpoint loads back into one process (2 -> 1 ranks).

Tolerances: exact where the kind keeps each row's bytes across layouts; one rounding step of the kind's
coarsest precision where tier budgets are per shard (a row can change tier when the layout changes).
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import ParameterConstraints
from torchrec.distributed.types import ShardingEnv
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.dist_utils import run_ranks
from tests.modules.test_kind_contract import kind_config
from torchrec_shark.distributed.compressed_sharder import (
    CompressedEmbeddingBagCollectionSharder,
    build_compressed_planner,
    compressed_constraints,
)
from torchrec_shark.distributed.state_readers import CheckpointStateReader
from torchrec_shark.modules import KINDS, CompressedEmbeddingBagCollection, SparseOptimizerSpec, build_table
from torchrec_shark.modules.row_store import RowStoreTable, bits_per_value

BATCH = 16  # global
OPT = SparseOptimizerSpec("rowwise_adagrad", lr=0.1)


class _Holder(torch.nn.Module):
    def __init__(self, ebc) -> None:
        super().__init__()
        self.ebc = ebc

    def forward(self, kjt):
        return self.ebc(kjt).values()


def _global_batch(rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (BATCH,), generator=g)
    return torch.randint(0, rows, (int(lengths.sum()),), generator=g), lengths


def _local_kjt(ids, lengths, rank: int, world: int) -> KeyedJaggedTensor:
    b = BATCH // world
    off = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return KeyedJaggedTensor.from_lengths_sync(["f"], ids[off[rank * b]:off[(rank + 1) * b]], lengths[rank * b:(rank + 1) * b])


def _offsets(lengths):
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])


def _tolerance(kind, table, ids, lengths) -> torch.Tensor:
    """Per bag: the sum over its ids of one rounding step of the coarsest precision the kind stores (0 when
    it stores rows in one precision, so nothing is re-encoded between layouts)."""
    if not isinstance(table, RowStoreTable) or len(table._tiers) == 1:
        return torch.full((BATCH, 1), 1e-5)
    coarsest = table._tiers[-1][0]
    w = table.full_weight()
    step = (w.amax(1) - w.amin(1)) / (2 ** bits_per_value(coarsest) - 1)
    per_id = step.index_select(0, ids)
    return torch.zeros(BATCH).index_add_(0, torch.repeat_interleave(torch.arange(BATCH), lengths), per_id).unsqueeze(1) + 1e-5


def _contract(rank: int, world: int, sharding_type: str, names, path: str):
    report = {}
    for name in names:
        kind = next(k for k in KINDS if k.name == name)
        cfg = kind_config(kind)
        torch.manual_seed(0)
        ref = build_table(cfg, OPT)  # unsharded, real storage; the shards' seed (rounding noise alike)
        ids, lengths = _global_batch(cfg.num_embeddings, seed=1)
        want = ref(ids, _offsets(lengths)).detach()
        tol = _tolerance(kind, ref, ids, lengths)

        torch.manual_seed(0)
        with torch.device("meta"):
            model = _Holder(CompressedEmbeddingBagCollection([cfg], optimizer=OPT))
        cons = compressed_constraints([cfg], world, {cfg.name: ParameterConstraints(sharding_types=[sharding_type])})
        planner = build_compressed_planner(world, "cpu", BATCH // world, cons)
        sharders = [CompressedEmbeddingBagCollectionSharder()]
        plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
        dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                       device=torch.device("cpu"), plan=plan, sharders=sharders)
        # TorchRec's contract: state-dict keys are the named parameters and buffers
        named = set(dict(dmp.named_parameters())) | set(dict(dmp.named_buffers()))
        assert set(dmp.state_dict()) == named, f"{name}: {sorted(set(dmp.state_dict()) ^ named)}"
        # 1 -> 2 ranks: the unsharded table's state dict into the shards
        dmp.load_state_dict({f"ebc.embedding_bags.t.{k}": v for k, v in ref.state_dict().items()})
        b = BATCH // world
        mine = slice(rank * b, (rank + 1) * b)
        got = dmp(_local_kjt(ids, lengths, rank, world))
        assert bool(((got - want[mine]).abs() <= tol[mine]).all()), f"{name}: sharded forward differs"

        # one training step on both: TorchRec divides the shards' gradients by the world size
        g = torch.randn(BATCH, cfg.embedding_dim, generator=torch.Generator().manual_seed(4))
        got.backward(g[mine])
        dmp.fused_optimizer.step()
        ref(ids, _offsets(lengths)).backward(g / world)
        ref.step_end()
        ids2, lengths2 = _global_batch(cfg.num_embeddings, seed=2)
        want2 = ref(ids2, _offsets(lengths2)).detach()
        tol2 = 2 * _tolerance(kind, ref, ids2, lengths2)
        got2 = dmp(_local_kjt(ids2, lengths2, rank, world))
        assert bool(((got2 - want2[mine]).abs() <= tol2[mine]).all()), f"{name}: sharded step differs"

        # 2 -> 1 ranks: the shards' checkpoint into one unsharded table
        where = os.path.join(path, f"{sharding_type}_{name}")
        dcp.save({"model": dmp.state_dict()}, checkpoint_id=where)
        dist.barrier()
        back = build_table(cfg, OPT, seed=99)
        kind.load_state(back, CheckpointStateReader(where, "model.ebc.embedding_bags.t."), 0)
        shard = dmp.module.ebc.table_shards.get("t")
        if shard is not None:  # the rows this rank trained, as the reloaded table holds them
            rows = torch.arange(shard.row_start, shard.row_start + shard.rows)
            local = shard.table.full_weight()
            assert bool(((back.full_weight()[rows] - local).abs() <= 1e-5 + _row_step(kind, local)).all()), \
                f"{name}: checkpoint reloaded on one process differs"
        report[name] = True
    return report


def _row_step(kind, w):
    """Per row: one step of the kind's coarsest integer precision (0 for one-precision and non-row kinds)."""
    spec = kind.example_spec()
    tiers = [t.precision for t in getattr(spec, "tiers", ())]
    if len(tiers) < 2:
        return torch.zeros(w.shape[0], 1)
    return ((w.amax(1) - w.amin(1)) / (2 ** bits_per_value(tiers[-1]) - 1)).unsqueeze(1)


@pytest.mark.parametrize("sharding_type", ["table_wise", "row_wise"])
def test_every_kind_shards_trains_and_reshards(sharding_type):
    names = [k.name for k in KINDS]
    with tempfile.TemporaryDirectory() as path:
        results = run_ranks(_contract, 2, sharding_type, names, path, timeout=600)
    assert all(set(r) == set(names) for r in results)
