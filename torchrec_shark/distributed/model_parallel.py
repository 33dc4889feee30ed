"""Plan and shard a model with TorchRec: planner on rank 0, plan shared, then DMP.

Example::

    dmp, plan = shard_model(model, env, batch_size=1024, sharding_types=["row_wise"])
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingEnv, ShardingPlan

from torchrec_shark.distributed.planner import build_constraints, build_planner
from torchrec_shark.distributed.sharders import CpuRowWiseEmbeddingBagCollectionSharder


class PlanningError(RuntimeError):
    """The planner found no plan (raised on every rank, not only rank 0)."""


def default_sharders() -> List:
    return [CpuRowWiseEmbeddingBagCollectionSharder()]


def compressed_sharders() -> List:
    """Stock EBC sharder plus the compressed collection's (one planner, one DMP for both)."""
    from torchrec_shark.distributed.compressed_sharder import CompressedEmbeddingBagCollectionSharder

    return [CpuRowWiseEmbeddingBagCollectionSharder(), CompressedEmbeddingBagCollectionSharder()]


def plan_model(
    model: nn.Module,
    world_size: int,
    device_type: str,
    batch_size: int,
    table_names: Sequence[str],
    sharding_types: Sequence[str] = (),
    per_table: Optional[Dict[str, List[str]]] = None,
    hbm_cap_gb: Optional[float] = None,
    ddr_cap_gb: Optional[float] = None,
    sharders: Optional[List] = None,
    compressed_configs: Optional[Sequence] = None,
) -> ShardingPlan:
    """Plan on rank 0 and broadcast. A planner error there would otherwise leave the other
    ranks waiting in the plan broadcast forever, so the error is shared and raised everywhere.

    ``compressed_configs``: the table configs of a compressed collection in the model; the planner
    then estimates those tables from their real compressed bytes, and TT tables that cannot be
    sharded row-wise exactly are constrained to table-wise (see ``compressed_sharder``)."""
    sharders = sharders or default_sharders()
    result: List = [None, None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            if compressed_configs is None:
                planner = build_planner(
                    world_size, device_type, batch_size, table_names, sharding_types, per_table, hbm_cap_gb,
                    ddr_cap_gb,
                )
            else:
                from torchrec_shark.distributed.compressed_sharder import (
                    build_compressed_planner,
                    compressed_constraints,
                )

                constraints = compressed_constraints(
                    compressed_configs, world_size, build_constraints(table_names, sharding_types, per_table)
                )
                planner = build_compressed_planner(
                    world_size, device_type, batch_size, constraints, hbm_cap_gb, ddr_cap_gb
                )
            result = [planner.plan(model, sharders), None]
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            result = [None, f"{type(e).__name__}: {e}"]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(result, src=0)
    plan, error = result
    if error is not None:
        raise PlanningError(f"sharding planner failed: {error}")
    return plan


def shard_model(model: nn.Module, plan: ShardingPlan, device, sharders: Optional[List] = None) -> DistributedModelParallel:
    """Wrap ``model`` in ``DistributedModelParallel`` with ``plan`` over the default group."""
    return DistributedModelParallel(
        module=model,
        env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
        device=device,
        plan=plan,
        sharders=sharders or default_sharders(),
    )
