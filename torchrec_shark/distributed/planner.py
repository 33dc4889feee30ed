"""Planner set-up: topology for the job's world size and device, constraints from config.

Example::

    planner = build_planner(world_size=2, device_type="cpu", batch_size=1024,
                            table_names=["t_a", "t_b"], sharding_types=["row_wise"])
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence

from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.types import ShardingPlan

GIB = 1024**3


def build_constraints(
    table_names: Sequence[str],
    sharding_types: Sequence[str] = (),
    per_table: Optional[Dict[str, List[str]]] = None,
) -> Dict[str, ParameterConstraints]:
    """``sharding_types`` restricts every table; ``per_table[name]`` overrides it for one table."""
    per_table = dict(per_table or {})
    unknown = sorted(set(per_table) - set(table_names))
    if unknown:
        raise ValueError(f"planner.per_table names unknown tables {unknown}; tables are {list(table_names)}")
    constraints = {}
    for name in table_names:
        types = per_table.get(name) or list(sharding_types)
        if types:
            constraints[name] = ParameterConstraints(sharding_types=list(types))
    return constraints


def build_planner(
    world_size: int,
    device_type: str,
    batch_size: int,
    table_names: Sequence[str],
    sharding_types: Sequence[str] = (),
    per_table: Optional[Dict[str, List[str]]] = None,
    hbm_cap_gb: Optional[float] = None,
    ddr_cap_gb: Optional[float] = None,
) -> EmbeddingShardingPlanner:
    """An ``EmbeddingShardingPlanner`` for ``world_size`` ranks of ``device_type`` (``cpu``/``cuda``).

    ``batch_size`` is the per-rank batch the planner's perf model assumes.
    """
    # The direct constructor is what takes explicit capacities; silence its advisory warning.
    types_logger = logging.getLogger("torchrec.distributed.planner.types")
    level = types_logger.level
    types_logger.setLevel(logging.ERROR)
    try:
        topology = Topology(
            world_size=world_size,
            compute_device=device_type,
            hbm_cap=int(hbm_cap_gb * GIB) if hbm_cap_gb is not None else None,
            ddr_cap=int(ddr_cap_gb * GIB) if ddr_cap_gb is not None else None,
        )
    finally:
        types_logger.setLevel(level)
    return EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        storage_reservation=FixedPercentageStorageReservation(percentage=0.15),
        constraints=build_constraints(table_names, sharding_types, per_table),
        debug=False,
    )


def describe_plan(plan: ShardingPlan) -> Dict[str, Dict]:
    """Per table: sharding type, compute kernel and the ranks holding it (JSON-able)."""
    out: Dict[str, Dict] = {}
    for module_path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            ranks = sorted(set(ps.ranks or []))
            out[table] = {
                "module": module_path,
                "sharding_type": ps.sharding_type,
                "compute_kernel": ps.compute_kernel,
                "ranks": ranks,
            }
    return out
