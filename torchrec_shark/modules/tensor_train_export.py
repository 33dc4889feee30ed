"""A tensor-train table's serving representation: its cores (and LFU-cached rows), or, small, its rows.

From the saved state under any sharding (``core_0`` is saved whole along its slices, the other cores are
replicas; the cache is laid out per shard) the export writes the ``tensor_train`` representation of
:mod:`torchrec_shark.serving`: the cores as trained and, when the table kept an LFU cache, its cached rows
by global row id (they are the trained values of those rows: a lookup takes them instead of the cores').
A table of at most :attr:`~torchrec_shark.modules.table_kind.ServingOptions.materialize_max_rows` rows is
written as one tier of fp32 rows instead, materialised from the cores a block of rows at a time, with the
cached rows overlaid. Optimizer state, frequencies and the repopulation clock stay behind.

Example::

    description = export_tensor_train(config, reader, sink, ServingOptions(materialize_max_rows=100_000))
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from torchrec_shark.modules.kernels.tt_chain import materialize
from torchrec_shark.modules.row_store import pool_name
from torchrec_shark.modules.table_kind import CHUNK_ROWS, ServingOptions, ServingSink, StateReader
from torchrec_shark.modules.tt_factorization import TTLayout
from torchrec_shark.serving.format import ROW_TIERS, TENSOR_TRAIN

PER_SHARD = "per_shard."


def export_tensor_train(config, layout: TTLayout, reader: StateReader, sink: ServingSink,
                        options: ServingOptions) -> Dict[str, Any]:
    """Write the serving representation of a tensor-train table's saved state into ``sink``."""
    rows, dim = int(config.num_embeddings), int(config.embedding_dim)
    cores = []
    for k in range(layout.num_cores):
        key = f"core_{k}"
        if key not in set(reader.keys()) or tuple(reader.size(key)) != tuple(layout.core_shape(k)):
            raise ValueError(f"table {config.name!r}: no saved {key} of shape {layout.core_shape(k)}")
        cores.append(reader.read(key).float())  # the cores are the table's stored form (kilobytes to megabytes)
    cache = saved_cache(reader, rows)
    if rows <= options.materialize_max_rows:
        out = sink.tensor(pool_name("fp32"), (rows, dim), torch.float32)
        block = layout.first_core_block
        step = max(1, CHUNK_ROWS // block)
        for s in range(0, layout.row_factors[0], step):
            lo = s * block
            if lo >= rows:
                break
            part = materialize(cores, slice(s, s + step))
            out[lo : lo + part.shape[0]] = part[: rows - lo]
        if cache is not None:
            out.index_copy_(0, cache[0], cache[1])
        return {"format": ROW_TIERS, "tiers": [{"precision": "fp32", "rows": rows, "tensor": pool_name("fp32")}],
                "slot_map": None}
    names: List[str] = []
    for k, core in enumerate(cores):
        sink.tensor(f"core_{k}", core.shape, torch.float32).copy_(core)
        names.append(f"core_{k}")
    description: Dict[str, Any] = {"format": TENSOR_TRAIN, "cores": names, "cache": None}
    if cache is not None and cache[0].numel():
        sink.tensor("cache_ids", cache[0].shape, torch.int64).copy_(cache[0])
        sink.tensor("cache_rows", cache[1].shape, torch.float32).copy_(cache[1])
        description["cache"] = {"ids": "cache_ids", "rows": "cache_rows"}
    return description


def saved_cache(reader: StateReader, rows: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(global row ids ascending, fp32 values)`` of the rows the saved LFU cache holds (any sharding), or
    ``None`` when the table kept no cache."""
    keys = set(reader.keys())
    ids: List[torch.Tensor] = []
    values: List[torch.Tensor] = []
    if f"{PER_SHARD}layout" in keys:
        offset = 0
        for r0, n, slots in reader.read(f"{PER_SHARD}layout").long().tolist():
            local = reader.read(f"{PER_SHARD}cache_ids", offset, slots).long()
            take = (local < n).nonzero().squeeze(1)  # empty slots hold the shard's row count
            ids.append(local.index_select(0, take) + r0)
            values.append(reader.read(f"{PER_SHARD}cache_weight", offset, slots).float().index_select(0, take))
            offset += slots
    elif "cache_ids" in keys and "cache_weight" in keys:  # an unsharded table's own buffers
        saved = reader.read("cache_ids").long()
        take = (saved < rows).nonzero().squeeze(1)
        ids.append(saved.index_select(0, take))
        values.append(reader.read("cache_weight").float().index_select(0, take))
    else:
        return None
    all_ids, all_values = torch.cat(ids), torch.cat(values)
    order = torch.argsort(all_ids)
    return all_ids.index_select(0, order), all_values.index_select(0, order)
