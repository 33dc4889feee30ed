"""Two gloo ranks: shards of several tables of one kind on a rank share a fused store, and train exactly as the
same shards looked up one table at a time (table-wise and row-wise; mixed precision re-tiering within the
run, labels all-gathered; stochastic rounding), with their state dicts, checkpoints and byte counts per table.
"""

import pytest
import torch
from torchrec.modules.embedding_configs import PoolingType

from tests.dist_utils import run_ranks
from tests.distributed import compressed_common as C
from torchrec_shark.distributed.compressed_kernels import allocated_bytes
from torchrec_shark.models.dlrm import DLRM, DLRMTrain
from torchrec_shark.modules import CompressedEmbeddingBagCollection, CompressedEmbeddingBagConfig, SparseOptimizerSpec
from torchrec_shark.modules.mixed_precision import MixedPrecision
from torchrec_shark.modules.uniform import Uniform

MP = MixedPrecision(tiers=(("fp32", 0.25), ("fp16", 0.25), ("int8", 0.5)), retier_every=2)
TABLES = [("t_a", 64, MP), ("t_b", 48, MP), ("t_c", 40, MP), ("t_d", 64, Uniform("int8")),
          ("t_e", 32, Uniform("int8")), ("t_f", 20, None)]
FEATURES = [f"f_{n[2:]}" for n, _, _ in TABLES]
STEPS = 4


def _configs():
    return [CompressedEmbeddingBagConfig(name=n, num_embeddings=r, embedding_dim=C.DIM, feature_names=[f"f_{n[2:]}"],
                                         pooling=PoolingType.SUM, compression=spec) for n, r, spec in TABLES]


def _model(fused: bool) -> DLRMTrain:
    torch.manual_seed(0)
    ebc = CompressedEmbeddingBagCollection(tables=_configs(), fused=fused,
                                           optimizer=SparseOptimizerSpec("rowwise_adagrad", lr=0.05))
    return DLRMTrain(DLRM(ebc, 3, [C.DIM], [8, 1], dense_device=torch.device("cpu")))


def _batch(step: int, rank: int, world_size: int):
    from torchrec.datasets.utils import Batch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(300 + step)
    rows = [r for _, r, _ in TABLES]
    lengths = torch.randint(0, 4, (len(rows), C.GLOBAL_BATCH), generator=g)
    values = [torch.randint(0, n, (int(lengths[i].sum()),), generator=g) for i, n in enumerate(rows)]
    dense = torch.randn(C.GLOBAL_BATCH, 3, generator=g)
    labels = torch.randint(0, 2, (C.GLOBAL_BATCH,), generator=g).float()
    b = C.GLOBAL_BATCH // world_size
    lo, hi = rank * b, (rank + 1) * b
    vals, lens = [], []
    for i in range(len(rows)):
        off = torch.cat([torch.zeros(1, dtype=torch.long), lengths[i].cumsum(0)])
        vals.append(values[i][off[lo]:off[hi]])
        lens.append(lengths[i][lo:hi])
    return Batch(dense[lo:hi], KeyedJaggedTensor.from_lengths_sync(FEATURES, torch.cat(vals), torch.cat(lens)),
                 labels[lo:hi])


def _train(rank, ws, sharding_type, fused: bool):
    from torchrec.optim.keyed import CombinedOptimizer

    dmp, _ = C.shard(_model(fused), ws, sharding_type)
    opt = CombinedOptimizer([dmp.fused_optimizer, C.dense_opt(dmp)])
    dmp.train()
    losses = []
    for s in range(STEPS):
        loss, _ = dmp(_batch(s, rank, ws))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    ebc = C.sharded_collection(dmp)
    state = {k: [s.tensor.clone() for s in v.local_shards()] if hasattr(v, "local_shards") else v.clone()
             for k, v in dmp.state_dict().items()}
    optim = opt.state_dict()["state"]
    optim = {k: {n: ([s.tensor.clone() for s in t.local_shards()] if hasattr(t, "local_shards") else t.clone())
                 for n, t in v.items()} for k, v in optim.items()}
    shards = ebc.table_shards
    info = {"stores": [sorted(t.name for t in s.members) for s in ebc.__dict__["_shark"].stores],
            "bytes": {n: (s.table.memory_bytes()["total"],
                          allocated_bytes(s.table) - sum(v.numel() * v.element_size()
                                                         for v in s.table.optimizer_state().values()))
                      for n, s in shards.items()}}
    return losses, state, optim, info


def _run(rank, ws, sharding_type):
    return _train(rank, ws, sharding_type, True), _train(rank, ws, sharding_type, False)


@pytest.mark.parametrize("sharding_type", ["table_wise", "row_wise"])
def test_fused_shards_train_exactly_as_per_table_shards(sharding_type):
    for fused, single in run_ranks(_run, 2, sharding_type):
        (loss_f, state_f, optim_f, info_f), (loss_s, state_s, optim_s, info_s) = fused, single
        assert loss_f == loss_s
        assert state_f.keys() == state_s.keys()
        for k in state_f:
            a, b = state_f[k], state_s[k]
            assert all(torch.equal(x, y) for x, y in zip(a, b)) if isinstance(a, list) else torch.equal(a, b), k
        for k in optim_f:
            for n in optim_f[k]:
                a, b = optim_f[k][n], optim_s[k][n]
                assert all(torch.equal(x, y) for x, y in zip(a, b)) if isinstance(a, list) else torch.equal(a, b)
        assert not info_s["stores"]
        if sharding_type == "row_wise":  # every rank holds a shard of every table: one store per kind
            assert sorted(map(tuple, info_f["stores"])) == [("t_a", "t_b", "t_c"), ("t_d", "t_e")]
        # a member reports and counts its own share of the store's tensors, as the table on its own does
        assert info_f["bytes"] == info_s["bytes"]
