"""Tier activity of a whole collection (sharded or not), summed over ranks: rows, lookups and moves per
precision of every table with several tiers.

Example::

    activity = collect_tier_activity(collection)  # a collective: every rank calls it
    # {"rows": {"fp32": ..., "int4": ...}, "hits": {...}, "moves": 1234} or None
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from torchrec_shark.modules.row_store import PRECISIONS, RowStoreTable


def _tables(collection: torch.nn.Module) -> List[torch.nn.Module]:
    shards = getattr(collection, "table_shards", None)  # a sharded compressed collection
    if shards is not None:
        return [s.table for s in shards.values()]
    bags = getattr(collection, "embedding_bags", None)
    return list(bags.values()) if isinstance(bags, torch.nn.ModuleDict) else []


def collect_tier_activity(
    collection: torch.nn.Module, device: Optional[torch.device] = None, reset: bool = True
) -> Optional[Dict]:
    """Rows per precision, training lookups per precision and rows moved since the last call, over every
    tiered table (shard) of every rank; ``None`` when there is no such table. ``device``: where the
    reduction runs (the process group's device: cuda under NCCL)."""
    n = len(PRECISIONS)
    total = torch.zeros(2 * n + 2, dtype=torch.int64)  # rows, hits, moves, number of tables
    for table in _tables(collection):
        if not isinstance(table, RowStoreTable) or not table.slotted:
            continue
        a = table.tier_activity(reset=reset)
        total[:n] += torch.tensor([a["rows"].get(p, 0) for p in PRECISIONS])
        total[n:2 * n] += torch.tensor([a["hits"].get(p, 0) for p in PRECISIONS])
        total[2 * n] += a["moves"]
        total[2 * n + 1] += 1
    if dist.is_initialized() and dist.get_world_size() > 1:
        reduced = total.to(device or torch.device("cpu"))
        dist.all_reduce(reduced)
        total = reduced.cpu()
    if int(total[-1]) == 0:
        return None
    values = total.tolist()
    used = [i for i in range(n) if values[i]]
    return {"rows": {PRECISIONS[i]: values[i] for i in used}, "hits": {PRECISIONS[i]: values[n + i] for i in used},
            "moves": values[2 * n]}
