"""Bytes that embedding tables really occupy, summed over ranks (optimizer state excluded).

Example::

    embedding_storage(collection, table_configs, sharded=True, model=dmp)
    # {"total": ..., "fp32_total": ..., "per_table": {"t_f00": ...}}
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.distributed as dist
from torch import nn

_TABLE_KEY = ".embedding_bags."


def _local_bytes(value: object) -> int:
    if hasattr(value, "local_shards"):  # ShardedTensor: only what this rank holds
        return sum(s.tensor.numel() * s.tensor.element_size() for s in value.local_shards())  # type: ignore
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return 0


def _table_total(report) -> int:
    return int(report["total"]) if isinstance(report, dict) else int(report)


def embedding_storage(collection: nn.Module, configs: Sequence, sharded: bool, model: nn.Module) -> Dict:
    names = [c.name for c in configs]
    fp32 = {c.name: c.num_embeddings * c.embedding_dim * 4 for c in configs}
    if sharded:
        per_rank = dict.fromkeys(names, 0)
        for key, value in model.state_dict().items():
            if _TABLE_KEY in key and key.endswith(".weight"):
                table = key.split(_TABLE_KEY, 1)[1].rsplit(".", 1)[0]
                if table in per_rank:
                    per_rank[table] += _local_bytes(value)
        counts = torch.tensor([per_rank[n] for n in names], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        per_table = {n: int(v) for n, v in zip(names, counts.tolist())}
    else:
        per_table = {n: _table_total(collection.table_memory_bytes(n)) for n in names}
    return {"total": sum(per_table.values()), "fp32_total": sum(fp32.values()), "per_table": per_table}
