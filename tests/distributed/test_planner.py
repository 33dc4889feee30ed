import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_shark.distributed.model_parallel import PlanningError, plan_model
from torchrec_shark.distributed.planner import build_constraints, describe_plan
from torchrec_shark.distributed.sharders import CpuRowWiseEmbeddingBagCollectionSharder


def test_global_types_apply_to_every_table_and_per_table_overrides():
    c = build_constraints(["a", "b"], ["row_wise"], {"b": ["table_wise"]})
    assert c["a"].sharding_types == ["row_wise"] and c["b"].sharding_types == ["table_wise"]
    assert build_constraints(["a"], []) == {}


def test_per_table_override_for_unknown_table_fails():
    with pytest.raises(ValueError, match="unknown tables \\['zz'\\]"):
        build_constraints(["a"], [], {"zz": ["row_wise"]})


def test_sharder_offers_row_wise_on_cpu():
    assert "row_wise" in CpuRowWiseEmbeddingBagCollectionSharder().sharding_types("cpu")


def _model(rows):
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=n, feature_names=[f"f{i}"])
              for i, n in enumerate(rows)]
    return torch.nn.Sequential(EmbeddingBagCollection(tables=tables, device=torch.device("meta")))


def test_single_rank_plan_respects_constraints():
    plan = plan_model(_model([100, 10]), 1, "cpu", 64, ["t0", "t1"], ["row_wise"], {"t1": ["table_wise"]})
    desc = describe_plan(plan)
    assert desc["t0"]["sharding_type"] == "row_wise" and desc["t1"]["sharding_type"] == "table_wise"
    assert desc["t0"]["ranks"] == [0]


def test_tables_that_do_not_fit_fail_with_planning_error():
    # 1e6 x 16 fp32 = 64 MB; a 1 MB budget cannot hold it.
    with pytest.raises(PlanningError, match="sharding planner failed"):
        plan_model(_model([1_000_000]), 1, "cpu", 64, ["t0"], ddr_cap_gb=0.001, hbm_cap_gb=0.001)


def test_one_rank_puts_every_compressed_table_in_one_sharding_type():
    """On one rank row_wise and table_wise place the same rows; left free, the planner's estimates split
    a collection between them (two lookups and an output concatenation every step). Constraints given
    by the user still apply."""
    import torch

    from torchrec_shark.distributed.compressed_sharder import compressed_constraints
    from torchrec_shark.distributed.model_parallel import compressed_sharders, plan_model
    from torchrec_shark.models.dlrm import DLRM, DLRMTrain
    from torchrec_shark.modules import CompressedEmbeddingBagCollection, CompressedEmbeddingBagConfig, MixedPrecision

    # the default data's tables as tables=shark stores them, which a free planner splits between the two
    rows = [1_000_000, 300_000, 100_000, 100_000, 30_000, 10_000, 10_000, 3_000, 3_000, 1_000, 1_000, 300, 300,
            100, 100, 30, 30, 10, 300_000, 100_000, 10_000, 1_000, 100, 10]
    spec = MixedPrecision(tiers=(("fp32", 0.02), ("int8", 0.08), ("int4", 0.90)), hot_rows=2048)
    configs = [CompressedEmbeddingBagConfig(name=f"t_{i}", num_embeddings=n, embedding_dim=32,
                                            feature_names=[f"f_{i}"], compression=spec)
               for i, n in enumerate(rows)]
    ebc = CompressedEmbeddingBagCollection(configs, device=torch.device("meta"))
    model = DLRMTrain(DLRM(ebc, 13, [32], [16, 1], dense_device=torch.device("cpu")))
    names = [c.name for c in configs]

    def types(**kw):
        plan = plan_model(model, 1, "cpu", 2048, names, sharders=compressed_sharders(), compressed_configs=configs, **kw)
        return {ps.sharding_type for ps in plan.plan["model.embedding_bag_collection"].values()}

    assert types() == {"table_wise"}
    assert types(sharding_types=["row_wise"]) == {"row_wise"}
    per_table = types(per_table={"t_0": ["row_wise"]})
    assert per_table == {"table_wise", "row_wise"}
    # two ranks: left to the planner as before
    assert "t_0" not in compressed_constraints(configs, 2)
