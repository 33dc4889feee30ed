"""A row store's serving representation: its tier pools as trained, a canonical slot map, nothing of training.

The saved state of a row store (stock ``weight``, a uniform pool, or a tiered table's pools, ``row_slot`` and
``shards`` under any sharding) becomes the ``row_tiers`` representation of :mod:`torchrec_shark.serving`:

* every row keeps its tier and its stored bytes (integer rows only move their 4 scale/bias bytes to the
  front, FBGEMM's inference layout: nothing is re-quantised);
* a tiered table's rows are laid out in a canonical order, each tier's rows by ascending row id, and its
  slot map is rewritten to match. The export is therefore a function of the trained model alone: a table
  trained on 2 ranks row-wise and the same table loaded into 1 rank export the same bytes, although their
  pools were filled in different orders;
* priorities, optimizer state, the update and step counters and the ``shards`` record stay behind.

Two passes over the saved state, each a chunk at a time: the slot map (each row's tier, from its saved
slot and its shard's tier sizes, and its place in that tier), then the pools, each saved pool window read
once and its rows written where the new slot map puts them.

Example::

    sink = MemorySink()
    description = export_row_store(config, DictStateReader(kind.local_state(table)), sink)
    description["tiers"]      # [{"precision": "fp32", "rows": 10, "tensor": "fp32_rows"}, ...]
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from torchrec_shark.modules.quantization import CODECS, inference_rows
from torchrec_shark.modules.row_store import pool_name, saved_pools, saved_shards, source_row_batches
from torchrec_shark.modules.table_kind import StateReader, ServingSink
from torchrec_shark.serving.format import ROW_TIERS

SLOT_MAP = "slot_map"


def export_row_store(config, reader: StateReader, sink: ServingSink) -> Dict[str, Any]:
    """Write the ``row_tiers`` representation of a row store's saved state into ``sink``; returns its
    description."""
    pools = saved_pools(reader)
    if not pools:
        raise ValueError(f"table {config.name!r}: no row-store rows among the saved keys {sorted(reader.keys())}")
    rows, dim = int(config.num_embeddings), int(config.embedding_dim)
    if "row_slot" not in set(reader.keys()):
        if len(pools) != 1:
            raise ValueError(f"table {config.name!r}: {len(pools)} tier pools saved without a slot map")
        precision, key = pools[0]
        if reader.size(key)[0] != rows:
            raise ValueError(f"table {config.name!r}: {reader.size(key)[0]} saved rows, the config has {rows}")
        out = _pool(sink, precision, rows, dim)
        for a, enc in reader.chunks(key, 0, rows):
            out[a : a + enc.shape[0]] = inference_rows(precision, enc)
        return _description([(precision, rows)], slotted=False)

    shards = sorted(saved_shards(reader, pools))
    if sum(s[1] for s in shards) != rows:
        raise ValueError(f"table {config.name!r}: the saved shards hold {sum(s[1] for s in shards)} rows, "
                         f"the config has {rows}")
    totals = [sum(s[2 + k] for s in shards) for k in range(len(pools))]
    starts = [sum(totals[:k]) for k in range(len(pools))]
    slot_map = sink.tensor(SLOT_MAP, (rows,), torch.int32 if rows < 2**31 else torch.int64)
    _write_slot_map(reader, shards, starts, totals, slot_map, config.name)
    out = [_pool(sink, precision, n, dim) for (precision, _), n in zip(pools, totals)]
    tier_of = {precision: k for k, (precision, _) in enumerate(pools)}
    for batch_rows, precision, enc in source_row_batches(reader, 0, rows):
        k = tier_of[precision]
        places = slot_map.index_select(0, batch_rows).long() - starts[k]
        out[k].index_copy_(0, places, inference_rows(precision, enc))
    return _description([(precision, n) for (precision, _), n in zip(pools, totals)], slotted=True)


def _write_slot_map(reader: StateReader, shards: List[List[int]], starts: List[int], totals: List[int],
                    slot_map: torch.Tensor, name: str) -> None:
    """Each row's global slot in the canonical layout (tier by tier, each tier's rows by ascending id), from the
    saved slots (a shard's slots number its own pools, its tier ``k`` after its tiers ``< k``)."""
    filled = [0] * len(totals)
    for s0, sn, *sizes in shards:
        bounds = torch.tensor(sizes, dtype=torch.int64).cumsum(0)[:-1]
        for a, saved in reader.chunks("row_slot", s0, sn):
            saved = saved.long()
            if saved.numel() and (int(saved.min()) < 0 or int(saved.max()) >= sum(sizes)):
                raise ValueError(f"table {name!r}: saved slots outside the {sum(sizes)} slots of their shard")
            tier = torch.searchsorted(bounds, saved, right=True)
            slots = torch.empty_like(saved)
            for k in range(len(totals)):
                mine = tier == k
                count = int(mine.sum())
                if count:
                    slots[mine] = torch.arange(count) + (starts[k] + filled[k])
                    filled[k] += count
            slot_map[a : a + saved.numel()] = slots.to(slot_map.dtype)
    if filled != totals:
        raise ValueError(f"table {name!r}: the saved slot map puts {filled} rows in tiers of {totals} slots")


def _pool(sink: ServingSink, precision: str, rows: int, dim: int) -> torch.Tensor:
    codec = CODECS[precision]
    return sink.tensor(pool_name(precision), (rows, codec.width(dim)), codec.dtype)


def _description(tiers, slotted: bool) -> Dict[str, Any]:
    return {"format": ROW_TIERS,
            "tiers": [{"precision": p, "rows": int(n), "tensor": pool_name(p)} for p, n in tiers],
            "slot_map": SLOT_MAP if slotted else None}
