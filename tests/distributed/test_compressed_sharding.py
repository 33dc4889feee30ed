"""Two gloo ranks: compressed tables (mixed precision, tensor train, and a stock fp32 table beside them)
sharded table-wise / row-wise by TorchRec's planner + DMP train like the unsharded collection on the
global batch; row-wise mixed precision re-tiers per shard on priorities counted from every rank;
checkpoints reshard RW -> TW and 2 ranks -> 1; the TT replica all-reduce is what keeps RW exact; a
model with stock FBGEMM tables beside a compressed collection trains in ``TrainPipelineSparseDist``.

Every scenario runs in one pair of spawned ranks (``scenarios``, module scope): starting ranks and
importing TorchRec costs more than the scenarios themselves.
"""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchrec.optim.keyed import CombinedOptimizer

from tests.dist_utils import run_ranks
from tests.distributed import compressed_common as C
from torchrec_shark.modules import MixedPrecisionTable, TensorTrainTable
from torchrec_shark.modules.tensor_train import DeferredRowOptimizer

KINDS = ["fp32", "mp", "tt"]
STEPS = 3
PREFIX = "model.embedding_bag_collection.embedding_bags."


def _compare(dmp, opt, ref, rank, ws, kinds):
    """Max violations (error / tolerance, must be <= 1) of predictions, table state, optimizer state."""
    out = {}
    ref_ebc = ref.model.embedding_bag_collection
    dmp.eval()
    ref.eval()
    with torch.no_grad():
        _, (_, logits, _) = dmp(C.local_batch(kinds, 50, rank, ws))
        _, (_, ref_logits, _) = ref(C.local_batch(kinds, 50, 0, 1))
    b = C.GLOBAL_BATCH // ws
    out["logits"] = float(((logits - ref_logits[rank * b:(rank + 1) * b]).abs() / 1e-4).max())
    sd = dmp.state_dict()
    osd = opt.state_dict()["state"]
    for name, rt in ref_ebc.embedding_bags.items():
        if isinstance(rt, TensorTrainTable):
            v = C.local_view(sd[PREFIX + f"{name}.core_0"], dim=1)
            if v is not None:
                s0, local = v
                out[f"{name}.core_0"] = float(((local - rt.core_0[:, s0:s0 + local.shape[1]]).abs() / 1e-5).max())
            for k in range(1, rt.layout.num_cores):
                key = PREFIX + f"{name}.core_{k}"
                if key in sd:
                    out[f"{name}.core_{k}"] = float(((sd[key] - getattr(rt, f"core_{k}")).abs() / 1e-5).max())
            st = osd.get(PREFIX + f"{name}.weight", {})
            for k, opt_k in enumerate(rt.core_optimizers):
                for bn, ref_b in opt_k.named_buffers():
                    val = st.get(f"{name}.core_{k}.{bn}")
                    if val is None:
                        continue
                    if hasattr(val, "local_shards"):
                        s0, local = C.local_view(val)
                        ref_b = ref_b[s0:s0 + local.shape[0]]
                        val = local
                    out[f"opt.{name}.core_{k}.{bn}"] = float(((val - ref_b).abs() / 1e-5).max())
            continue
        shard = C.sharded_collection(dmp).table_shards.get(name)
        if shard is None:
            continue
        r0, t = shard.row_start, shard.table
        rows = torch.arange(r0, r0 + t.num_embeddings)
        tol = C.row_tolerance(rt, rows)
        out[f"{name}.weight"] = float(((t.full_weight() - rt.full_weight()[rows]).abs() / tol).max())
        if isinstance(rt, MixedPrecisionTable):
            out[f"{name}.tier_mismatch"] = float((t.tier_of_rows().long() != rt.tier_of_rows(rows).long()).sum())
            ref_pr = rt.priorities()[rows]
            assert float(ref_pr.sum()) > 0, "the reference counted no labels"
            # bfloat16 priorities rounded stochastically: the same counts summed in another order can round one
            # step (2**-7 relative at most) apart, and the two runs then round independently: a few steps
            out[f"{name}.priority"] = float(((t.priorities() - ref_pr).abs() / (ref_pr.abs() * 2.0**-5 + 1e-5)).max())
        st = osd[PREFIX + f"{name}.weight"]
        for bn, ref_b in rt.optimizer_state().items():
            val = st[f"{name}.{bn}"]
            if hasattr(val, "local_shards"):
                _, val = C.local_view(val)
                ref_b = ref_b[rows]
            out[f"opt.{name}.{bn}"] = float(((val - ref_b).abs() / 1e-5).max())
    return out


def _set_allreduce(on: bool) -> None:
    from torchrec_shark.modules.tensor_train import ShardTensorTrainTable

    ShardTensorTrainTable.allreduce = on


def _equivalence(rank, ws, ref, sharding_type):
    dmp, plan = C.shard(C.build_model(KINDS), ws, sharding_type)
    types = {t: ps.sharding_type for t, ps in plan.plan["model.embedding_bag_collection"].items()}
    opt = C.train_sharded(dmp, KINDS, STEPS, rank, ws)
    return dmp, types, _compare(dmp, opt, ref, rank, ws, KINDS)


def _per_shard_retier(dmp):
    """Re-tier the local row-wise mixed-precision shard now: its own budgets, its own priorities."""
    shard = C.sharded_collection(dmp).table_shards["t_mp"]
    t = shard.table
    t.retier()
    tier, pr = t.tier_of_rows().long(), t.priorities()
    counts = torch.bincount(tier, minlength=3).tolist()
    # every fp32 row ranks at least as high as every fp16 row, and fp16 over int8
    order_ok = all(
        float(pr[tier == a].min()) >= float(pr[tier == b].max()) - 1e-6
        for a, b in ((0, 1), (1, 2)) if bool((tier == a).any()) and bool((tier == b).any())
    )
    return {"rows": shard.rows, "counts": counts, "budget": list(t.tier_counts().values()), "order_ok": order_ok,
            "moved_any": bool(pr.sum() > 0)}


def _checkpoint(rank, ws, ref4, path):
    dmp, _ = C.shard(C.build_model(KINDS), ws, "row_wise")
    opt = C.train_sharded(dmp, KINDS, 2, rank, ws)
    dcp.save({"model": dmp.state_dict(), "optim": opt.state_dict()}, checkpoint_id=path)
    dist.barrier()
    out = {}
    # a different initialisation, sharded table-wise: everything must come from the checkpoint
    dmp2, plan2, _ = C.load_sharded(path, KINDS, ws, "table_wise")
    opt2 = C.train_sharded(dmp2, KINDS, 2, rank, ws, start=2)
    types = {t: ps.sharding_type for t, ps in plan2.plan["model.embedding_bag_collection"].items()}
    out["rw_to_tw"] = (types, _compare(dmp2, opt2, ref4, rank, ws, KINDS))
    # the same checkpoint on one rank (a group of rank 0 alone)
    pg1 = dist.new_group([0])
    if rank == 0:
        dmp1, plan1, _ = C.load_sharded(path, KINDS, 1, "table_wise", pg=pg1, batch_size=C.GLOBAL_BATCH, seed=9)
        opt1 = C.train_sharded(dmp1, KINDS, 2, 0, 1, start=2)
        types = {t: ps.sharding_type for t, ps in plan1.plan["model.embedding_bag_collection"].items()}
        out["two_to_one"] = (types, _compare(dmp1, opt1, ref4, 0, 1, KINDS))
        # row-wise on one rank: the TT replicas have no other rank to sum with and update in the backward
        dmp1, plan1, _ = C.load_sharded(path, KINDS, 1, "row_wise", pg=pg1, batch_size=C.GLOBAL_BATCH, seed=9)
        tt = C.sharded_collection(dmp1).table_shards["t_tt"]
        deferred = tt.replicated_group is not None or any(
            isinstance(o, DeferredRowOptimizer) for o in tt.table.core_optimizers)
        opt1 = C.train_sharded(dmp1, KINDS, 2, 0, 1, start=2)
        types = {t: ps.sharding_type for t, ps in plan1.plan["model.embedding_bag_collection"].items()}
        out["two_to_one_rw"] = (types, _compare(dmp1, opt1, ref4, 0, 1, KINDS), deferred)
    dist.barrier()
    return out


def _mixed(rank, ws):
    """Stock FBGEMM tables and a compressed collection in one model, one planner, one DMP, one
    combined optimizer, trained by ``TrainPipelineSparseDist`` and by a plain loop (must agree)."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    steps = 4
    losses = {}
    states = {}
    for mode in ("pipeline", "loop"):
        dmp, plan = C.shard_mixed(C.build_mixed(), ws)
        opt = CombinedOptimizer([dmp.fused_optimizer, C.dense_opt(dmp)])
        before = {k: v.clone() for k, v in _local_state(dmp).items()}
        dmp.train()
        got = []
        if mode == "pipeline":
            pipe = TrainPipelineSparseDist(dmp, opt, torch.device("cpu"))
            it = iter([C.mixed_batch(s, rank, ws) for s in range(steps + 1)])  # the pipeline reads one ahead
            for _ in range(steps):
                loss, _, _ = pipe.progress(it)
                got.append(float(loss))
            pipe.detach()
        else:
            for s in range(steps):
                loss, _ = dmp(C.mixed_batch(s, rank, ws))
                opt.zero_grad()
                loss.backward()
                opt.step()
                got.append(float(loss))
        after = _local_state(dmp)
        losses[mode] = got
        states[mode] = {k: (v, before[k]) for k, v in after.items()}
        kernels = {t: (ps.compute_kernel, ps.sharding_type) for m in plan.plan.values() for t, ps in m.items()}
    return losses, states, kernels


def _local_state(dmp):
    out = {}
    for k, v in dmp.state_dict().items():
        if "embedding_bags" not in k:
            continue
        if hasattr(v, "local_shards"):
            shards = v.local_shards()
            if not shards:
                continue
            v = shards[0].tensor
        out[k] = v.detach().float().clone()
    return out


def _all_scenarios(rank, ws, path):
    out = {}
    ref3 = C.reference_run(KINDS, STEPS)
    _set_allreduce(True)
    for st in ("table_wise", "row_wise"):
        dmp, types, errs = _equivalence(rank, ws, ref3, st)
        out[st] = (types, errs)
        if st == "row_wise":
            out["rw_retier"] = _per_shard_retier(dmp)
    _set_allreduce(False)  # negative control
    out["rw_no_allreduce"] = _equivalence(rank, ws, ref3, "row_wise")[1:]
    _set_allreduce(True)
    out.update(_checkpoint(rank, ws, C.reference_run(KINDS, 4), path))
    out["mixed"] = _mixed(rank, ws)
    return out


@pytest.fixture(scope="module")
def scenarios():
    with tempfile.TemporaryDirectory() as d:
        return run_ranks(_all_scenarios, 2, os.path.join(d, "ckpt"))


def _assert_close(results, sharding_type, what):
    seen = set()
    for types, errs in results:
        assert set(types.values()) == {sharding_type}, types
        bad = {k: v for k, v in errs.items() if v > 1.0}
        assert not bad, f"{what}: beyond tolerance (error / tolerance): {bad}"
        seen |= set(errs)
    return seen


@pytest.mark.parametrize("sharding_type", ["table_wise", "row_wise"])
def test_sharded_training_equals_unsharded(scenarios, sharding_type):
    seen = _assert_close([r[sharding_type] for r in scenarios], sharding_type, sharding_type)
    # every table's state and optimizer state was checked on some rank
    for key in ["logits", "t_mp.weight", "t_mp.priority", "t_mp.tier_mismatch", "t_fp.weight", "t_tt.core_0",
                "t_tt.core_1", "opt.t_mp.momentum1", "opt.t_tt.core_0.momentum1", "opt.t_tt.core_2.momentum1"]:
        assert key in seen, key


def test_row_wise_mixed_precision_retiers_per_shard(scenarios):
    """Each rank's shard keeps its own tier budget and ranks its rows by priorities that (as the
    equivalence test checks) count the samples of both ranks."""
    for r in scenarios:
        info = r["rw_retier"]
        assert info["moved_any"]
        assert info["counts"] == info["budget"], info
        assert sum(info["counts"]) == info["rows"] < 64  # a shard's rows only, not the table's
        assert info["order_ok"], info


def test_tt_row_wise_without_replica_allreduce_diverges(scenarios):
    """Negative control: without summing the replicated cores' gradients over ranks, RW TT is wrong."""
    worst = max(r["rw_no_allreduce"][1].get("t_tt.core_1", 0.0) for r in scenarios)
    assert worst > 10.0, worst


def test_checkpoint_row_wise_to_table_wise_then_continue(scenarios):
    seen = _assert_close([r["rw_to_tw"] for r in scenarios], "table_wise", "after RW -> TW reload")
    assert {"t_mp.weight", "t_tt.core_0", "opt.t_mp.momentum1", "t_mp.priority", "opt.t_tt.core_1.momentum1"} <= seen


def test_checkpoint_two_ranks_to_one_then_continue(scenarios):
    seen = _assert_close([scenarios[0]["two_to_one"]], "table_wise", "after 2 -> 1 rank reload")
    assert {"t_mp.weight", "t_tt.core_0", "t_tt.core_2", "opt.t_mp.momentum1", "t_mp.priority"} <= seen


def test_one_rank_row_wise_tt_updates_its_cores_in_the_backward(scenarios):
    """A row-wise TT shard alone in its group keeps no deferred gradients and trains as the unsharded table."""
    types, errs, deferred = scenarios[0]["two_to_one_rw"]
    seen = _assert_close([(types, errs)], "row_wise", "one rank, row-wise")
    assert {"t_tt.core_0", "t_tt.core_1", "t_tt.core_2", "opt.t_tt.core_1.momentum1"} <= seen
    assert not deferred


def test_stock_and_compressed_tables_train_together(scenarios):
    for losses, states, kernels in (r["mixed"] for r in scenarios):
        assert {k for k, _ in kernels.values()} == {"fused", "customized_kernel"}, kernels
        for loss in losses["pipeline"]:
            assert loss == loss and abs(loss) < 10
        # the pipeline (labels recorded one batch ahead of the lookups) trains exactly as a plain loop
        assert losses["pipeline"] == pytest.approx(losses["loop"], rel=1e-5, abs=1e-6)
        for key, (after, before) in states["pipeline"].items():
            if key.endswith((".weight", ".priority", ".core_0")):
                assert not torch.equal(after, before), f"{key} did not train"
            assert torch.allclose(after, states["loop"][key][0], rtol=1e-5, atol=1e-6), key
        assert any("priority" in k for k in states["pipeline"])


# ---------------------------------------------------------------------------- planner (one process)
def _planner_tables():
    from torchrec_shark.modules import CompressedEmbeddingBagConfig, MixedPrecision, three_tier, TensorTrain

    return [
        CompressedEmbeddingBagConfig(name="t_big_mp", num_embeddings=40_000, embedding_dim=32, feature_names=["a"],
                                     compression=three_tier(0.1, 0.3)),
        CompressedEmbeddingBagConfig(name="t_big_tt", num_embeddings=32_768, embedding_dim=32, feature_names=["b"],
                                     compression=TensorTrain(ranks=(16,), row_factors=(32, 32, 32))),
    ]


@pytest.mark.parametrize("sharding_type", ["table_wise", "row_wise"])
def test_planner_fits_compressed_where_fp32_fails_and_estimates_real_bytes(sharding_type):
    from torchrec.distributed.planner import ParameterConstraints
    from torchrec.distributed.planner.types import PlannerError
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from torchrec_shark.distributed.compressed_kernels import allocated_bytes, build_table_shard
    from torchrec_shark.distributed.compressed_sharder import (
        CompressedEmbeddingBagCollectionSharder,
        build_compressed_planner,
    )
    from torchrec_shark.distributed.planner import build_planner
    from torchrec_shark.distributed.sharders import CpuRowWiseEmbeddingBagCollectionSharder
    from torchrec_shark.modules import CompressedEmbeddingBagCollection, SparseOptimizerSpec
    from torchrec_shark.training.table_factory import stock_configs

    world, batch, cap_gb = 2, 8, 3.0e6 / 1024**3  # 3 MB per rank; fp32 needs ~4.7 MB per rank
    configs = _planner_tables()
    names = [c.name for c in configs]
    stock = EmbeddingBagCollection(tables=stock_configs(configs), device=torch.device("meta"))
    fp32_planner = build_planner(world, "cpu", batch, names, [sharding_type], ddr_cap_gb=cap_gb)
    with pytest.raises(PlannerError):
        fp32_planner.plan(stock, [CpuRowWiseEmbeddingBagCollectionSharder()])

    torch.manual_seed(0)
    ebc = CompressedEmbeddingBagCollection(tables=configs, optimizer=SparseOptimizerSpec("rowwise_adagrad"))
    cons = {n: ParameterConstraints(sharding_types=[sharding_type]) for n in names}
    planner = build_compressed_planner(world, "cpu", batch, cons, ddr_cap_gb=cap_gb)
    plan = planner.plan(ebc, [CompressedEmbeddingBagCollectionSharder()])
    assert {ps.sharding_type for ps in plan.plan[""].values()} == {sharding_type}
    chosen = {so.name: so for so in planner._best_plan}
    for c in configs:
        so = chosen[c.name]
        estimate = sum(s.storage.ddr for s in so.shards)
        real = sum(
            allocated_bytes(build_table_shard(c.name, c, SparseOptimizerSpec("rowwise_adagrad"), 0, sharding_type,
                                              s.offset[0], s.size[0], torch.device("cpu"), None).table)
            for s in so.shards
        )
        assert abs(estimate - real) <= 0.10 * real, (c.name, estimate, real)
        assert real < 0.6 * c.num_embeddings * c.embedding_dim * 4  # compressed, not dense
        # the planner's per-kind perf estimate is a real cost (TT's chain costs more than a row fetch)
        assert all(s.perf is not None and s.perf.total > 0 for s in so.shards)
    tt_perf = sum(s.perf.fwd_compute for s in chosen["t_big_tt"].shards) / 32_768
    mp_perf = sum(s.perf.fwd_compute for s in chosen["t_big_mp"].shards) / 40_000
    assert tt_perf != mp_perf


def test_unaligned_tensor_train_is_constrained_to_table_wise_with_reason(caplog):
    import logging

    from torchrec.distributed.planner import ParameterConstraints

    from torchrec_shark.distributed.compressed_sharder import compressed_constraints
    from torchrec_shark.modules import CompressedEmbeddingBagConfig, TensorTrain

    spec = TensorTrain(ranks=(4,), row_factors=(4, 4, 4))  # first-core block: 16 rows
    aligned = CompressedEmbeddingBagConfig(name="t_ok", num_embeddings=64, embedding_dim=8, compression=spec)
    unaligned = CompressedEmbeddingBagConfig(name="t_bad", num_embeddings=60, embedding_dim=8, compression=spec)
    asked = {n: ParameterConstraints(sharding_types=["row_wise"]) for n in ("t_ok", "t_bad")}
    with caplog.at_level(logging.WARNING, logger="torchrec_shark.distributed.compressed_sharder"):
        out = compressed_constraints([aligned, unaligned], 2, asked)
    assert out["t_ok"].sharding_types == ["row_wise"]  # 32-row shards: two first-core slices each
    assert out["t_bad"].sharding_types == ["table_wise"]  # 30-row shards would split a slice
    assert asked["t_bad"].sharding_types == ["row_wise"]  # the caller's constraints are not modified
    assert "t_bad" in caplog.text and "row alignment 16" in caplog.text and "t_ok" not in caplog.text
