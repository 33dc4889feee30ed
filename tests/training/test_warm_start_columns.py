"""Column warm start (dimension search): a narrowed stock table starts as ``source[:, cols]``, its field's
projection as the source's map restricted to those columns, so the narrowed model starts as the masked source."""

import pytest
import torch
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.dist_utils import run_ranks
from torchrec_shark.distributed.model_parallel import plan_model, shard_model
from torchrec_shark.models.dlrm import DLRM, DLRMTrain
from torchrec_shark.training import checkpoint as ckpt
from torchrec_shark.training.optimizers import apply_embedding_optimizer

ROWS = [40, 7, 100]
D = 8
COLS = [1, 3, 4, 6]  # t_0 keeps these source columns (width 8 -> 4)
NARROW = {"t_0": COLS}
BATCH = 8


def _model(widths, device=torch.device("cpu"), seed=0):
    torch.manual_seed(seed)
    tables = [EmbeddingBagConfig(name=f"t_{i}", embedding_dim=w, num_embeddings=n, feature_names=[f"f{i}"])
              for i, (w, n) in enumerate(zip(widths, ROWS))]
    ebc = EmbeddingBagCollection(tables=tables, device=device)
    return DLRMTrain(DLRM(ebc, 3, [D], [8, 1], dense_device=torch.device("cpu")))


def _batch(rank=0, world_size=1):
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 4, (len(ROWS), BATCH), generator=g)
    values = [torch.randint(0, n, (int(lengths[i].sum()),), generator=g) for i, n in enumerate(ROWS)]
    dense, labels = torch.randn(BATCH, 3, generator=g), torch.randint(0, 2, (BATCH,), generator=g).float()
    b = BATCH // world_size
    sl = slice(rank * b, (rank + 1) * b)
    vals, lens = [], []
    for i in range(len(ROWS)):
        off = torch.cat([torch.zeros(1, dtype=torch.long), lengths[i].cumsum(0)])
        vals.append(values[i][off[sl.start]:off[sl.stop]])
        lens.append(lengths[i][sl])
    kjt = KeyedJaggedTensor.from_lengths_sync([f"f{i}" for i in range(len(ROWS))], torch.cat(vals), torch.cat(lens))
    return Batch(dense[sl], kjt, labels[sl])


def _masked_source_logits(src, batch, cols):
    mask = torch.zeros(D)
    mask[cols] = 1.0
    with torch.no_grad():
        pooled = src.model.embed(batch.sparse_features)
        pooled["f0"] = pooled["f0"] * mask
        return src.model.predict(batch.dense_features, pooled)


def _features():
    return {f"t_{i}": [f"f{i}"] for i in range(len(ROWS))}


def test_narrowed_table_equals_source_columns_and_model_starts_masked(tmp_path):
    src = _model([D, D, D], seed=0)
    ckpt.save_checkpoint(str(tmp_path), 5, {"model": src}, meta={"step": 5})
    dst = _model([4, D, D], seed=1)
    assert set(dst.model.projection.proj) == {"f0"}
    report = ckpt.warm_start(str(tmp_path), dst, NARROW)
    keys = ckpt.warm_start_projections(str(tmp_path), dst, NARROW, _features())
    w_src = src.model.embedding_bag_collection.embedding_bags["t_0"].weight
    w_dst = dst.model.embedding_bag_collection.embedding_bags["t_0"].weight
    torch.testing.assert_close(w_dst, w_src[:, COLS], rtol=0, atol=0)
    for t in ("t_1", "t_2"):
        torch.testing.assert_close(dst.model.embedding_bag_collection.embedding_bags[t].weight,
                                   src.model.embedding_bag_collection.embedding_bags[t].weight)
    assert report["narrowed"] == ["model.embedding_bag_collection.embedding_bags.t_0.weight"]
    assert keys == ["model.projection.proj.f0.weight"]
    torch.testing.assert_close(dst.model.projection.proj["f0"].weight, torch.eye(D)[:, COLS])
    with torch.no_grad():
        _, (_, logits, _) = dst(_batch())
    torch.testing.assert_close(logits, _masked_source_logits(src, _batch(), COLS))


def test_projection_of_a_projected_source_is_restricted_to_the_columns(tmp_path):
    src = _model([16, D, D], seed=0)  # f0 already projected: 16 -> 8
    ckpt.save_checkpoint(str(tmp_path), 1, {"model": src}, meta={"step": 1})
    cols = [0, 5, 9, 10, 12, 13, 14, 15]
    dst = _model([8, D, D], seed=1)  # width 8 == interaction width: no projection any more
    ckpt.warm_start(str(tmp_path), dst, {"t_0": cols})
    assert ckpt.warm_start_projections(str(tmp_path), dst, {"t_0": cols}, _features()) == []
    dst = _model([4, D, D], seed=1)
    cols = [2, 5, 9, 14]
    ckpt.warm_start(str(tmp_path), dst, {"t_0": cols})
    ckpt.warm_start_projections(str(tmp_path), dst, {"t_0": cols}, _features())
    torch.testing.assert_close(dst.model.projection.proj["f0"].weight, src.model.projection.proj["f0"].weight[:, cols])


def test_column_count_must_match_the_new_width(tmp_path):
    ckpt.save_checkpoint(str(tmp_path), 1, {"model": _model([D, D, D])}, meta={"step": 1})
    with pytest.raises(ckpt.CheckpointError, match="t_0"):
        ckpt.warm_start(str(tmp_path), _model([4, D, D]), {"t_0": [0, 1, 2]})
    with pytest.raises(ckpt.CheckpointError, match="t_0"):
        ckpt.warm_start(str(tmp_path), _model([4, D, D]), {"t_0": [0, 1, 2, 8]})


def _copy_into_sharded(sharded_sd, full_sd):
    for key, dst in sharded_sd.items():
        src = full_sd[key]
        if hasattr(dst, "local_shards"):
            for shard in dst.local_shards():
                (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.detach().copy_(src[r0:r0 + nr, c0:c0 + nc])
        else:
            dst.detach().copy_(src)


def _sharded(widths, world_size, sharding_type):
    model = _model(widths, device=torch.device("meta"))
    apply_embedding_optimizer(model.model.embedding_bag_collection, "sgd", lr=0.1)
    plan = plan_model(model, world_size, "cpu", BATCH // world_size, [f"t_{i}" for i in range(len(ROWS))],
                      [sharding_type])
    return shard_model(model, plan, torch.device("cpu"))


def _run(rank, world_size, sharding_type, run_dir):
    reference = _model([D, D, D], seed=0)
    src = _sharded([D, D, D], world_size, sharding_type)
    _copy_into_sharded(src.state_dict(), reference.state_dict())
    ckpt.save_checkpoint(run_dir, 1, {"model": src}, meta={"step": 1})
    dst = _sharded([4, D, D], world_size, sharding_type)
    ckpt.warm_start(run_dir, dst, NARROW)
    ckpt.warm_start_projections(run_dir, dst, NARROW, _features())
    full = reference.model.embedding_bag_collection.embedding_bags["t_0"].weight.detach()[:, COLS]
    shards = []
    for shard in dst.state_dict()["model.embedding_bag_collection.embedding_bags.t_0.weight"].local_shards():
        (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
        shards.append((shard.tensor.detach().clone(), full[r0:r0 + nr, c0:c0 + nc].clone()))
    dst.eval()
    with torch.no_grad():
        _, (_, logits, _) = dst(_batch(rank, world_size))
    b = BATCH // world_size
    ref = _masked_source_logits(reference, _batch(), COLS)[rank * b:(rank + 1) * b]
    return shards, logits, ref


@pytest.mark.parametrize("sharding_type", ["row_wise"])
def test_two_ranks_sharded_narrowing(tmp_path, sharding_type):
    results = run_ranks(_run, 2, sharding_type, str(tmp_path))
    rows = 0
    for shards, logits, ref in results:
        for got, want in shards:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            rows += got.shape[0]
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-6)
    assert rows == ROWS[0]  # row-wise: the two ranks' shards cover the table


# ---------------------------------------------------------------------------- compressed tables (unsharded)
def _compressed_model(widths, kinds, seed=0):
    from torchrec_shark.modules.embedding_bag_collection import CompressedEmbeddingBagCollection
    from torchrec_shark.modules import CompressedEmbeddingBagConfig

    torch.manual_seed(seed)
    tables = [CompressedEmbeddingBagConfig(name=f"t_{i}", embedding_dim=w, num_embeddings=n, feature_names=[f"f{i}"],
                                           compression=kind)
              for i, (w, n, kind) in enumerate(zip(widths, ROWS, kinds))]
    return DLRMTrain(DLRM(CompressedEmbeddingBagCollection(tables=tables), 3, [D], [8, 1]))


def _rows(model, table):
    return model.model.embedding_bag_collection.embedding_bags[table].full_weight()


def test_mixed_precision_and_int8_tables_keep_their_columns_and_tiers(tmp_path):
    from torchrec_shark.modules import MixedPrecision, three_tier, TensorTrain, Uniform

    mp = three_tier(0.2, 0.3, rounding="nearest")
    kinds = [mp, Uniform(dtype="int8", rounding="nearest"), TensorTrain(num_cores=2, ranks=(4,))]
    src = _compressed_model([D, D, D], kinds, seed=0)
    mpt = src.model.embedding_bag_collection.embedding_bags["t_0"]
    with torch.no_grad():  # a non-trivial tier layout: priorities that are not the row order
        mpt.priority.copy_(torch.rand(ROWS[0], generator=torch.Generator().manual_seed(5)))
        mpt.retier()
    ckpt.save_checkpoint(str(tmp_path), 3, {"model": src}, meta={"step": 3})
    cols = {"t_0": COLS, "t_1": [0, 2, 5, 7]}
    dst = _compressed_model([4, 4, 4], kinds, seed=1)
    tt_before = {k: v.clone() for k, v in dst.model.embedding_bag_collection.embedding_bags["t_2"].state_dict().items()}
    report = ckpt.warm_start(str(tmp_path), dst, cols)
    keys = ckpt.warm_start_projections(str(tmp_path), dst, cols, _features())
    for table in ("t_0", "t_1"):
        want = _rows(src, table)[:, cols[table]]
        got = _rows(dst, table)
        # Re-encoding a decoded value at its own precision gives it back (fp32/fp16 exactly; int8 within a step).
        torch.testing.assert_close(got, want, rtol=0, atol=(want.abs().amax(1, keepdim=True) / 64).max().item())
    dst_mpt = dst.model.embedding_bag_collection.embedding_bags["t_0"]
    assert torch.equal(dst_mpt.tier_of_rows(), mpt.tier_of_rows())
    torch.testing.assert_close(dst_mpt.priorities(), mpt.priorities())
    fp32 = mpt.tier_of_rows() == mpt.tier_of_rows().min()  # the fp32 tier narrows exactly
    assert fp32.any() and torch.equal(_rows(dst, "t_0")[fp32], _rows(src, "t_0")[fp32][:, COLS])
    assert any(k.startswith("model.embedding_bag_collection.embedding_bags.t_0.") for k in report["narrowed"])
    assert any(k.startswith("model.embedding_bag_collection.embedding_bags.t_1.") for k in report["narrowed"])
    # A tensor-train table has no columns to keep: its narrower cores are not loaded (fresh init).
    tt_after = dst.model.embedding_bag_collection.embedding_bags["t_2"].state_dict()
    assert all(torch.equal(tt_before[k], tt_after[k]) for k in tt_before if k.startswith("core_"))
    assert report["fresh_tables"] == ["t_2"]
    # The narrowed fields' projections start as the identity's kept columns: the model starts masked.
    assert sorted(keys) == ["model.projection.proj.f0.weight", "model.projection.proj.f1.weight"]
    torch.testing.assert_close(dst.model.projection.proj["f1"].weight, torch.eye(D)[:, cols["t_1"]])
