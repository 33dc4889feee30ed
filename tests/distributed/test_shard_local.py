"""Two gloo ranks: shards are built from the config for the rows a rank owns (nothing else is allocated),
start from the same values under any sharding, checkpoint at their compressed size, and a checkpoint
saved table-wise or by one rank loads row-wise on two ranks and trains on like the uninterrupted run."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from tests.dist_utils import run_ranks
from tests.distributed import compressed_common as C
from torchrec_shark.distributed.compressed_kernels import allocated_bytes
from torchrec_shark.modules import (
    CompressedEmbeddingBagCollection,
    CompressedEmbeddingBagConfig,
    MixedPrecision,
    SparseOptimizerSpec,
    TensorTrain,
    Uniform,
)
from torchrec_shark.modules.kinds import kind_of

KINDS = ["fp32", "mp", "tt"]
OPT = SparseOptimizerSpec("rowwise_adagrad", lr=0.05)


def _big_configs():
    """Tables large enough that chunk headers do not matter next to the rows (several save chunks each)."""
    return [
        CompressedEmbeddingBagConfig(name="t_mp", num_embeddings=150_000, embedding_dim=16, feature_names=["f_mp"],
                                     compression=MixedPrecision()),
        CompressedEmbeddingBagConfig(name="t_i8", num_embeddings=100_000, embedding_dim=16, feature_names=["f_i8"],
                                     compression=Uniform("int8")),
        CompressedEmbeddingBagConfig(name="t_tt", num_embeddings=4096, embedding_dim=16, feature_names=["f_tt"],
                                     compression=TensorTrain(ranks=(8,), row_factors=(16, 16, 16))),
        CompressedEmbeddingBagConfig(name="t_fp", num_embeddings=70_000, embedding_dim=16, feature_names=["f_fp"]),
    ]


def _big_dmp(sharding_type, ws):
    from torchrec_shark.models.dlrm import DLRM, DLRMTrain

    torch.manual_seed(3)
    ebc = CompressedEmbeddingBagCollection(_big_configs(), device=torch.device("meta"), optimizer=OPT)
    model = DLRMTrain(DLRM(ebc, 3, [16], [8, 1], dense_device=torch.device("cpu")))
    return C.shard(model, ws, sharding_type)


def _shard_local(rank, ws, path):
    out = {}
    for st in ("table_wise", "row_wise"):
        dmp, plan = _big_dmp(st, ws)
        coll = C.sharded_collection(dmp)
        shards = coll.table_shards
        # rows this rank allocated per table (a table's own row count), against the rows the plan gives it
        owned = {t: sum(int(s.shard_sizes[0]) for s in ps.sharding_spec.shards if s.placement.rank() == rank)
                 for t, ps in plan.plan["model.embedding_bag_collection"].items()}
        out[st] = {
            "rows": {t: s.table.num_embeddings for t, s in shards.items()},
            "owned": owned,
            "allocated": {t: allocated_bytes(s.table) for t, s in shards.items()},
            "expected": {t: kind_of(s.config).storage_bytes(s.config, OPT, s.row_start, s.rows)["total"]
                         for t, s in shards.items()},
            # initial values of the rows this rank holds (global row ids -> values)
            "init": {t: (s.row_start, s.table.full_weight()) for t, s in shards.items()},
            "tiers": {t: s.table.tier_of_rows() for t, s in shards.items() if hasattr(s.table, "tier_of_rows")},
        }
        sd = dmp.state_dict()
        prefix = "model.embedding_bag_collection.embedding_bags."
        out[st]["keys"] = {t: sorted(k[len(prefix) + len(t) + 1:] for k in sd if k.startswith(f"{prefix}{t}."))
                           for t in ("t_mp", "t_i8", "t_tt", "t_fp")}
        if "t_fp" in shards:  # the state dict's tensors are the table's: a write into them is a write into it
            for piece in sd[prefix + "t_fp.weight"].local_shards():
                piece.tensor.fill_(0.25)
            out[st]["aliased"] = bool((shards["t_fp"].table.full_weight() == 0.25).all())
        # a checkpoint: its table payload against the tables' bytes
        embedding = coll.memory_bytes()["per_table"]
        local_bytes = sum(p["table"] for p in embedding.values())
        total = torch.tensor([local_bytes])
        dist.all_reduce(total)
        ckpt = os.path.join(path, st)
        dcp.save({"model": dmp.state_dict()}, checkpoint_id=ckpt)
        dist.barrier()
        md = FileSystemReader(ckpt).read_metadata().state_dict_metadata
        saved = 0
        for key, item in md.items():
            if ".embedding_bags." in key and hasattr(item, "chunks"):
                saved += sum(int(torch.Size(c.sizes).numel()) for c in item.chunks) * item.properties.dtype.itemsize
        on_disk = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt))
        out[st]["checkpoint"] = (int(total), saved, on_disk)
        dist.barrier()
    return out


@pytest.fixture(scope="module")
def shard_local():
    with tempfile.TemporaryDirectory() as d:
        return run_ranks(_shard_local, 2, d)


def test_each_rank_allocates_only_the_rows_it_owns(shard_local):
    for st in ("table_wise", "row_wise"):
        for rank, r in enumerate(shard_local):
            res = r[st]
            assert res["rows"] == {t: n for t, n in res["owned"].items() if n}, (st, rank)
            for t, nbytes in res["allocated"].items():
                # what the shard holds is what its kind says a shard of its rows costs (tables + optimizer)
                assert abs(nbytes - res["expected"][t]) <= 0.02 * res["expected"][t] + 64, (st, t, nbytes)
        if st == "row_wise":  # both ranks hold part of every table
            assert all(set(r[st]["rows"]) == {"t_mp", "t_i8", "t_tt", "t_fp"} for r in shard_local)


def test_sharded_state_dict_aliases_the_tables_and_has_the_unsharded_keys(shard_local):
    unsharded = CompressedEmbeddingBagCollection(_big_configs(), optimizer=OPT).state_dict()
    for st in ("table_wise", "row_wise"):
        assert any(r[st].get("aliased") for r in shard_local)
        assert all(r[st]["aliased"] for r in shard_local if "aliased" in r[st])
        for t in ("t_mp", "t_i8", "t_tt", "t_fp"):
            holder = next(r for r in shard_local if t in r[st]["rows"])  # replicated keys: on its ranks only
            want = sorted(k.split(".", 2)[2] for k in unsharded if k.startswith(f"embedding_bags.{t}."))
            assert holder[st]["keys"][t] == want, (st, t)


def test_initial_values_do_not_depend_on_the_sharding(shard_local):
    full = {}
    for r in shard_local:
        for t, (r0, w) in r["table_wise"]["init"].items():
            full[t] = w
    assert set(full) == {"t_mp", "t_i8", "t_tt", "t_fp"}
    for r in shard_local:
        for t, (r0, w) in r["row_wise"]["init"].items():
            ref = full[t][r0:r0 + w.shape[0]]
            if t in ("t_fp", "t_tt"):  # stored exactly
                assert torch.equal(w, ref), t
            elif t == "t_i8":  # one rounding of the same fp32 values: identical codes
                assert torch.equal(w, ref), t
            else:  # mixed precision: the same values, each rounded into its shard's tier (at most one int8 step)
                step = 1.01 * (ref.amax(1, keepdim=True) - ref.amin(1, keepdim=True)) / 255 + ref.abs() * 2.0**-10
                assert bool(((w - ref).abs() <= step).all()), t
                assert (w == ref).float().mean() > 0.5, t  # most rows keep their tier: bit-identical


def test_checkpoint_holds_tables_at_their_compressed_size(shard_local):
    for st in ("table_wise", "row_wise"):
        embedding_bytes, saved, on_disk = shard_local[0][st]["checkpoint"]
        assert saved <= 1.15 * embedding_bytes, (st, saved, embedding_bytes)
        # the files: the tables' payload, the dense layers and per-chunk headers only
        assert on_disk <= 1.15 * embedding_bytes + 200_000, (st, on_disk, embedding_bytes)


# ---------------------------------------------------------------------------- more reshards
def _reshard(rank, ws, path, ref4):
    out = {}
    # saved table-wise on two ranks -> row-wise on two ranks
    dmp, _ = C.shard(C.build_model(KINDS), ws, "table_wise")
    opt = C.train_sharded(dmp, KINDS, 2, rank, ws)
    tw = os.path.join(path, "tw")
    dcp.save({"model": dmp.state_dict(), "optim": opt.state_dict()}, checkpoint_id=tw)
    dist.barrier()
    # saved by one rank (a group of rank 0 alone)
    one = os.path.join(path, "one")
    pg1 = dist.new_group([0])
    if rank == 0:
        dmp1, _ = C.shard(C.build_model(KINDS), 1, "table_wise", batch_size=C.GLOBAL_BATCH, pg=pg1)
        opt1 = C.train_sharded(dmp1, KINDS, 2, 0, 1)
        dcp.save({"model": dmp1.state_dict(), "optim": opt1.state_dict()}, checkpoint_id=one, process_group=pg1)
    dist.barrier()
    from tests.distributed.test_compressed_sharding import _compare

    for name, ckpt in (("tw_to_rw", tw), ("one_to_rw", one)):
        dmp2, plan2, _ = C.load_sharded(ckpt, KINDS, ws, "row_wise")
        opt2 = C.train_sharded(dmp2, KINDS, 2, rank, ws, start=2)
        types = {t: ps.sharding_type for t, ps in plan2.plan["model.embedding_bag_collection"].items()}
        out[name] = (types, _compare(dmp2, opt2, ref4, rank, ws, KINDS))
    return out


@pytest.fixture(scope="module")
def reshards():
    with tempfile.TemporaryDirectory() as d:
        return run_ranks(_reshard_all, 2, d)


def _reshard_all(rank, ws, path):
    from tests.distributed.test_compressed_sharding import _set_allreduce

    _set_allreduce(True)
    return _reshard(rank, ws, path, C.reference_run(KINDS, 4))


@pytest.mark.parametrize("case", ["tw_to_rw", "one_to_rw"])
def test_checkpoint_loads_row_wise_and_training_continues(reshards, case):
    for types, errs in (r[case] for r in reshards):
        assert set(types.values()) == {"row_wise"}, types
        bad = {k: v for k, v in errs.items() if v > 1.0}
        assert not bad, f"{case}: beyond tolerance (error / tolerance): {bad}"
        assert "t_mp.weight" in errs and "t_tt.core_0" in errs
