"""Sharder and planner set-up for :class:`CompressedEmbeddingBagCollection`.

Every table of a compressed collection (stock fp32 tables included: they run as ``Fp32Table``
shards on the same path) is offered ``table_wise`` and ``row_wise`` on every device, with the
``customized_kernel`` compute kernel. Row-wise tensor-train tables need shard boundaries on
first-core slices: :func:`compressed_constraints` restricts the ones that would not align to
``table_wise`` (and logs why).

TorchRec's own planner works as it is (``EmbeddingShardingPlanner()``, or ``DistributedModelParallel``
without a plan): importing this module registers a ``customized_kernel`` bandwidth with TorchRec's
default perf config, and the planning tensors' dtypes carry the compressed size to its default storage
estimator (to the nearest 1, 2 or 4 bytes per element). :func:`build_compressed_planner` counts the
exact bytes and each kind's compute cost.

Example::

    sharders = [CompressedEmbeddingBagCollectionSharder(), CpuRowWiseEmbeddingBagCollectionSharder()]
    constraints = compressed_constraints(ebc.embedding_bag_configs(), world_size, base_constraints)
    planner = build_compressed_planner(world_size, "cpu", batch_size, constraints)
    plan = planner.plan(model, sharders)       # or model_parallel.plan_model(..., sharders=sharders)
    dmp = DistributedModelParallel(model, plan=plan, sharders=sharders, ...)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torchrec.distributed.embedding_types import BaseEmbeddingSharder, EmbeddingComputeKernel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.types import ParameterSharding, ShardingEnv, ShardingType

from torchrec_shark.distributed.compressed_kernels import rw_alignment_problem
from torchrec_shark.distributed.estimators import (
    CompressedPerfEstimator,
    CompressedStorageEstimator,
    planning_dtype,
    register_customized_kernel_bandwidth,
)

logger = logging.getLogger(__name__)

GIB = 1024**3
# TorchRec's default planner (EmbeddingShardingPlanner(), DMP without a plan) can then price these tables.
register_customized_kernel_bandwidth()
COMPRESSED_SHARDING_TYPES = [ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value]


def _collection_type():
    from torchrec_shark.modules.embedding_bag_collection import CompressedEmbeddingBagCollection

    return CompressedEmbeddingBagCollection


class CompressedEmbeddingBagCollectionSharder(BaseEmbeddingSharder):
    """Shards ``CompressedEmbeddingBagCollection`` table-wise or row-wise on ``customized_kernel``."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return list(COMPRESSED_SHARDING_TYPES)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        return [EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value]

    def shardable_parameters(self, module) -> Dict[str, nn.Parameter]:
        # Planning tensors only: rows x dim on meta (never allocated). The row count must be exactly
        # num_embeddings: the RW input dist bucketises ids with ceil(N / world) as the planner does.
        # The dtype is the one nearest the table's real bytes per element, so that TorchRec's default
        # storage estimator sees (about) the compressed size.
        tables = module.embedding_bags
        return {
            c.name: nn.Parameter(
                torch.empty(c.num_embeddings, c.embedding_dim, device="meta", dtype=planning_dtype(tables[c.name])),
                requires_grad=False,
            )
            for c in module.embedding_bag_configs()
        }

    def shard(self, module, params: Dict[str, ParameterSharding], env: ShardingEnv,
              device: Optional[torch.device] = None, module_fqn: Optional[str] = None):
        from torchrec_shark.distributed.sharded_collection import ShardedCompressedEmbeddingBagCollection

        return ShardedCompressedEmbeddingBagCollection(
            module=module, table_name_to_parameter_sharding=params, env=env, fused_params=self.fused_params,
            device=device, qcomm_codecs_registry=self.qcomm_codecs_registry, module_fqn=module_fqn,
        )

    @property
    def module_type(self):
        return _collection_type()

    @property
    def sharded_module_type(self):
        from torchrec_shark.distributed.sharded_collection import ShardedCompressedEmbeddingBagCollection

        return ShardedCompressedEmbeddingBagCollection


def compressed_constraints(
    configs: Sequence,
    world_size: int,
    constraints: Optional[Dict[str, ParameterConstraints]] = None,
) -> Dict[str, ParameterConstraints]:
    """``constraints`` with TT tables whose row-wise shards would split first-core slices limited to
    table_wise, with the reason logged (also when the table had been restricted to row_wise only:
    a row-wise shard of such a table could not be exact). On one rank every table not constrained
    otherwise is table_wise: there row_wise and table_wise place the same rows, and the planner's
    estimates would otherwise split the tables over both, which costs a second lookup, input dist and
    output concatenation every step."""
    out = dict(constraints or {})
    if world_size == 1:
        for c in configs:
            current = out.get(c.name) or ParameterConstraints()
            if not current.sharding_types:
                out[c.name] = dataclasses.replace(current, sharding_types=[ShardingType.TABLE_WISE.value])
    for c in configs:
        rows_per_shard = math.ceil(c.num_embeddings / world_size)
        problem = rw_alignment_problem(c, rows_per_shard) if world_size > 1 else None
        if problem is None:
            continue
        current = out.get(c.name)
        types = list(current.sharding_types) if current and current.sharding_types else list(COMPRESSED_SHARDING_TYPES)
        if types != [ShardingType.TABLE_WISE.value]:
            logger.warning("%s (world size %d; requested sharding types %s)", problem, world_size, types)
        if current is None:
            out[c.name] = ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value])
        else:
            out[c.name] = dataclasses.replace(current, sharding_types=[ShardingType.TABLE_WISE.value])
    return out


def build_compressed_planner(
    world_size: int,
    device_type: str,
    batch_size: int,
    constraints: Optional[Dict[str, ParameterConstraints]] = None,
    hbm_cap_gb: Optional[float] = None,
    ddr_cap_gb: Optional[float] = None,
    storage_reservation_percentage: float = 0.15,
) -> EmbeddingShardingPlanner:
    """An ``EmbeddingShardingPlanner`` whose estimators understand compressed tables (stock ones as before)."""
    types_logger = logging.getLogger("torchrec.distributed.planner.types")
    level = types_logger.level
    types_logger.setLevel(logging.ERROR)
    try:
        topology = Topology(
            world_size=world_size, compute_device=device_type,
            hbm_cap=int(hbm_cap_gb * GIB) if hbm_cap_gb is not None else None,
            ddr_cap=int(ddr_cap_gb * GIB) if ddr_cap_gb is not None else None,
        )
    finally:
        types_logger.setLevel(level)
    enumerator = EmbeddingEnumerator(
        topology=topology, batch_size=batch_size, constraints=constraints,
        estimator=[CompressedPerfEstimator(topology, constraints), CompressedStorageEstimator(topology, constraints)],
    )
    return EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size, enumerator=enumerator,
        storage_reservation=FixedPercentageStorageReservation(percentage=storage_reservation_percentage),
        constraints=constraints, debug=False,
    )
