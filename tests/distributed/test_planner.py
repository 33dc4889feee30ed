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
