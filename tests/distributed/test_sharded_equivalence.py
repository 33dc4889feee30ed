"""Two gloo ranks: a sharded DLRM computes what the unsharded one computes with the same parameters."""

import pytest
import torch
import torch.distributed as dist
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.dist_utils import run_ranks
from torchrec_shark.distributed.model_parallel import plan_model, shard_model
from torchrec_shark.models.dlrm import DLRM, DLRMTrain
from torchrec_shark.training.optimizers import apply_embedding_optimizer

ROWS = [40, 7, 100]
GLOBAL_BATCH = 8


def _model(device):
    tables = [EmbeddingBagConfig(name=f"t_{i}", embedding_dim=8, num_embeddings=n, feature_names=[f"f{i}"])
              for i, n in enumerate(ROWS)]
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=tables, device=device)
    return DLRMTrain(DLRM(ebc, 3, [8], [8, 1], dense_device=torch.device("cpu")))


def _global_batch():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 4, (len(ROWS), GLOBAL_BATCH), generator=g)  # empty bags included
    values = [torch.randint(0, n, (int(lengths[i].sum()),), generator=g) for i, n in enumerate(ROWS)]
    return torch.randn(GLOBAL_BATCH, 3, generator=g), lengths, values, torch.randint(0, 2, (GLOBAL_BATCH,), generator=g).float()


def _local_batch(rank, world_size):
    dense, lengths, values, labels = _global_batch()
    b = GLOBAL_BATCH // world_size
    sl = slice(rank * b, (rank + 1) * b)
    vals, lens = [], []
    for i in range(len(ROWS)):
        off = torch.cat([torch.zeros(1, dtype=torch.long), lengths[i].cumsum(0)])
        vals.append(values[i][off[sl.start]:off[sl.stop]])
        lens.append(lengths[i][sl])
    kjt = KeyedJaggedTensor.from_lengths_sync([f"f{i}" for i in range(len(ROWS))], torch.cat(vals), torch.cat(lens))
    return Batch(dense[sl], kjt, labels[sl])


def _copy_into_sharded(sharded_sd, full_sd):
    for key, dst in sharded_sd.items():
        src = full_sd[key]
        if hasattr(dst, "local_shards"):
            for shard in dst.local_shards():
                (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.detach().copy_(src[r0:r0 + nr, c0:c0 + nc])
        else:
            dst.detach().copy_(src)


def _run(rank, world_size, sharding_type):
    reference = _model(torch.device("cpu"))
    model = _model(torch.device("meta"))
    apply_embedding_optimizer(model.model.embedding_bag_collection, "sgd", lr=0.1)
    plan = plan_model(model, world_size, "cpu", GLOBAL_BATCH // world_size, [f"t_{i}" for i in range(len(ROWS))],
                      [sharding_type])
    dmp = shard_model(model, plan, torch.device("cpu"))
    _copy_into_sharded(dmp.state_dict(), reference.state_dict())
    dmp.eval()
    reference.eval()
    with torch.no_grad():
        _, (_, logits, _) = dmp(_local_batch(rank, world_size))
        dense, *_ = _global_batch()
        _, (_, ref_logits, _) = reference(_local_batch(0, 1))
    b = GLOBAL_BATCH // world_size
    types = {t: ps.sharding_type for t, ps in plan.plan["model.embedding_bag_collection"].items()}
    return logits, ref_logits[rank * b:(rank + 1) * b], types


@pytest.mark.parametrize("sharding_type", ["table_wise", "row_wise"])
def test_sharded_forward_equals_unsharded(sharding_type):
    for logits, ref, types in run_ranks(_run, 2, sharding_type):
        assert set(types.values()) == {sharding_type}
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-6)
