"""Mixed-precision tier activity of a whole collection (sharded or not), summed over ranks.

Example::

    activity = collect_tier_activity(collection)  # a collective: every rank calls it
    # {"rows": {"fp32": ..., "fp16": ..., "int8": ...}, "hits": {...}, "moves": 1234} or None
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from torchrec_shark.modules.mixed_precision import TIERS


def _tables(collection: torch.nn.Module) -> List[torch.nn.Module]:
    shards = getattr(collection, "table_shards", None)  # a sharded compressed collection
    if shards is not None:
        return [s.table for s in shards.values()]
    bags = getattr(collection, "embedding_bags", None)
    return list(bags.values()) if isinstance(bags, torch.nn.ModuleDict) else []


def collect_tier_activity(
    collection: torch.nn.Module, device: Optional[torch.device] = None, reset: bool = True
) -> Optional[Dict]:
    """Rows per tier, training lookups per tier and rows moved since the last call, over every
    mixed-precision table (shard) of every rank; ``None`` when there is no such table.
    ``device``: where the reduction runs (the process group's device: cuda under NCCL)."""
    n = len(TIERS)
    total = torch.zeros(2 * n + 2, dtype=torch.int64)  # rows, hits, moves, number of tables
    for table in _tables(collection):
        activity = getattr(table, "tier_activity", None)
        if activity is None:
            continue
        a = activity(reset=reset)
        total[:n] += torch.tensor([a["rows"][t] for t in TIERS])
        total[n:2 * n] += torch.tensor([a["hits"][t] for t in TIERS])
        total[2 * n] += a["moves"]
        total[2 * n + 1] += 1
    if dist.is_initialized() and dist.get_world_size() > 1:
        reduced = total.to(device or torch.device("cpu"))
        dist.all_reduce(reduced)
        total = reduced.cpu()
    if int(total[-1]) == 0:
        return None
    values = total.tolist()
    return {"rows": dict(zip(TIERS, values[:n])), "hits": dict(zip(TIERS, values[n:2 * n])),
            "moves": values[2 * n]}
