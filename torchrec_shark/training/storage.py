"""Bytes that embedding tables really occupy, summed over ranks (optimizer state excluded).

Example::

    embedding_storage(collection, table_configs, sharded=True, model=dmp)
    # {"total": ..., "fp32_total": ..., "allocated_total": ..., "per_table": {"t_f00": ...}}
    plan_table = compressed_plan_table(describe_plan(plan), table_configs, sharded_collection)
    print(format_plan_table(plan_table))   # kind, sharding type, ranks, compressed bytes per table
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.distributed as dist
from torch import nn

from torchrec_shark.distributed.compressed_kernels import allocated_bytes
from torchrec_shark.distributed.device_check import collective_device
from torchrec_shark.modules.kinds import kind_of

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
    """``total``: the tables' bytes as their kinds count them (rows, scales, slot maps, priorities; no optimizer
    state), summed over ranks; ``allocated_total``: what their tensors occupy (each storage once, optimizer
    state excluded); ``fp32_total``: the same tables as fp32 rows. A collective when sharded."""
    names = [c.name for c in configs]
    fp32 = {c.name: c.num_embeddings * c.embedding_dim * 4 for c in configs}
    allocated = None
    if sharded and hasattr(collection, "table_shards"):  # compressed shards: what they allocate
        per_table = _sum_over_ranks(names, _compressed_local_bytes(collection))
        allocated = _sum_over_ranks(names, {n: p["allocated"] - p["optimizer"]
                                            for n, p in collection.memory_bytes()["per_table"].items()})
    elif sharded:
        per_rank = dict.fromkeys(names, 0)
        for key, value in model.state_dict().items():
            if _TABLE_KEY in key and key.endswith(".weight"):
                table = key.split(_TABLE_KEY, 1)[1].rsplit(".", 1)[0]
                if table in per_rank:
                    per_rank[table] += _local_bytes(value)
        per_table = _sum_over_ranks(names, per_rank)
    else:
        per_table = {n: _table_total(collection.table_memory_bytes(n)) for n in names}
        allocated = {n: allocated_bytes(t) - sum(v.numel() * v.element_size() for v in t.optimizer_state().values())
                     for n, t in collection.embedding_bags.items()}
    allocated = per_table if allocated is None else allocated  # stock tables: their weights are what they hold
    return {"total": sum(per_table.values()), "fp32_total": sum(fp32.values()),
            "allocated_total": sum(allocated.values()), "per_table": per_table}


def _sum_over_ranks(names: Sequence[str], per_rank: Dict[str, int]) -> Dict[str, int]:
    counts = torch.tensor([per_rank.get(n, 0) for n in names], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        counts = counts.to(collective_device())  # NCCL reduces CUDA tensors
        dist.all_reduce(counts)
    return {n: int(v) for n, v in zip(names, counts.tolist())}


def _compressed_local_bytes(collection: nn.Module) -> Dict[str, int]:
    """Table bytes (no optimizer state) of this rank's compressed shards."""
    return {name: int(p["table"]) for name, p in collection.memory_bytes()["per_table"].items()}


def compressed_plan_table(plan_table: Dict[str, Dict], configs: Sequence, collection: nn.Module) -> Dict[str, Dict]:
    """``plan_table`` (from ``describe_plan``) with each table's kind and the bytes its shards really
    allocate, summed over ranks (``bytes``: table storage; ``optimizer_bytes``: fused optimizer
    state). A collective: every rank must call it."""
    names = [c.name for c in configs]
    per = collection.memory_bytes()["per_table"]
    table = _sum_over_ranks(names, {n: p["table"] for n, p in per.items()})
    optim = _sum_over_ranks(names, {n: p["optimizer"] for n, p in per.items()})
    out = {}
    for c in configs:
        info = dict(plan_table.get(c.name, {}))
        info.update(kind=kind_of(c).name,
                    bytes=table[c.name], optimizer_bytes=optim[c.name],
                    fp32_bytes=c.num_embeddings * c.embedding_dim * 4)
        out[c.name] = info
    return out


def format_plan_table(plan_table: Dict[str, Dict]) -> str:
    """One line per table: kind, sharding type, ranks, compressed bytes (and fp32 for comparison)."""
    head = f"{'table':<12} {'kind':<15} {'sharding':<11} {'ranks':<8} {'bytes':>13} {'optim bytes':>12} {'fp32 bytes':>13}"
    lines = [head]
    for name, t in plan_table.items():
        ranks = ",".join(str(r) for r in t.get("ranks", []))
        lines.append(f"{name:<12} {t.get('kind', ''):<15} {t.get('sharding_type', ''):<11} {ranks:<8} "
                     f"{t.get('bytes', 0):>13,} {t.get('optimizer_bytes', 0):>12,} {t.get('fp32_bytes', 0):>13,}")
    total = sum(t.get("bytes", 0) for t in plan_table.values())
    fp32 = sum(t.get("fp32_bytes", 0) for t in plan_table.values())
    lines.append(f"total compressed bytes {total:,} (fp32 {fp32:,}, {total / max(fp32, 1):.3f}x)")
    return "\n".join(lines)
