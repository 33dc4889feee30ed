"""Pooled lookups of exported tables, scriptable, on torch, TorchRec and FBGEMM only.

Every lookup takes the jagged ids of its features (feature-major, as a ``KeyedJaggedTensor`` holds them) and
returns one pooled ``[B, D]`` tensor per feature (sums; the model divides MEAN tables by the bag lengths):

* :class:`DirectRows`: tables whose rows are in one precision each (row ``r`` at row ``r``): one pooled
  ``IntNBitTableBatchedEmbeddingBagsCodegen`` over all of them, the ids passed as they come.
* :class:`TieredRows`: tables whose rows are in several precision tiers (per-row mixed precision): one
  FBGEMM inference TBE with one table per precision, holding that precision's tier of every table one after
  the other. Ids become global slots through the tables' slot maps (one gather over a concatenated int32
  map), FBGEMM's ``block_bucketize_sparse_features`` splits them by precision keeping their order (every bag
  of every feature as one feature: the pools' slot ranges are the bucket boundaries), the TBE reads each
  id's row from its pool, dequantised to fp32 (``PoolingMode.NONE``: a precision split of a bag would
  otherwise cost a pooled output per precision), and ``embedding_bag`` pools the rows back into the
  original bags. The TBE's work per feature is paid once per precision, not once per table and tier.
  FBGEMM's own ``index_remapping`` is not used: it keeps a full-size array per tier (12 bytes a row for three
  tiers) where the slot map keeps 4.
* :class:`TensorTrainRows`: one tensor-train table: the distinct ids of a batch are reconstructed from the
  cores (each core's slices applied a slice at a time to the rows that use it), LFU-cached rows taken as
  stored, then pooled.

Example::

    lookup = DirectRows([RowTable("t", rows=100, dim=8, precision="int8", features=1)])
    lookup.table_bytes(0).copy_(rows_in_fbgemm_layout.view(-1))
    pooled = lookup(values, lengths, offsets, None, batch)      # [tensor [B, 8]]
"""


from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode, EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen
from torch import nn

SPARSE_TYPES = {
    "fp32": SparseType.FP32,
    "fp16": SparseType.FP16,
    "int8": SparseType.INT8,
    "int4": SparseType.INT4,
    "int2": SparseType.INT2,
}


@dataclass(frozen=True)
class RowTable:
    """One pool of rows of one precision (a one-tier table, or one tier of a tiered table)."""

    name: str
    rows: int
    dim: int
    precision: str
    features: int = 1


def _tbe(pools: List[RowTable], feature_table_map: List[int], pooling: PoolingMode,
         bounds: BoundsCheckMode) -> IntNBitTableBatchedEmbeddingBagsCodegen:
    unknown = [p.precision for p in pools if p.precision not in SPARSE_TYPES]
    if unknown:
        raise ValueError(f"row precisions {unknown} are not served (known: {list(SPARSE_TYPES)})")
    tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
        [(p.name, p.rows, p.dim, SPARSE_TYPES[p.precision], EmbeddingLocation.HOST) for p in pools],
        feature_table_map=feature_table_map,
        pooling_mode=pooling,
        device=torch.device("cpu"),
        output_dtype=SparseType.FP32,
        bounds_check_mode=bounds,
        row_alignment=1,  # rows exactly as exported: no padding
    )
    tbe.initialize_weights()
    return tbe


def _table_region(tbe: IntNBitTableBatchedEmbeddingBagsCodegen, pools: List[RowTable], t: int) -> torch.Tensor:
    """The bytes of TBE table ``t`` in its weights (a view): where its exported pool is copied."""
    pool = pools[t]
    row_bytes = _row_bytes(pool.precision, pool.dim)
    start = int(tbe.weights_physical_offsets[t])
    return tbe.weights_host[start : start + pool.rows * row_bytes]


def _row_bytes(precision: str, dim: int) -> int:
    return {"fp32": dim * 4, "fp16": dim * 2, "int8": dim + 4, "int4": dim // 2 + 4, "int2": dim // 4 + 4}[precision]


class DirectRows(nn.Module):
    """One-tier tables (any precisions and widths): one pooled FBGEMM inference TBE, ids as they come."""

    def __init__(self, tables: List[RowTable]) -> None:
        super().__init__()
        self._pools = list(tables)
        feature_table_map = [t for t, table in enumerate(tables) for _ in range(table.features)]
        self.tbe = _tbe(self._pools, feature_table_map, PoolingMode.SUM, BoundsCheckMode.FATAL)
        self.dims: List[int] = [table.dim for table in tables for _ in range(table.features)]

    def table_bytes(self, t: int) -> torch.Tensor:
        """Table ``t``'s rows in the TBE's weights (uint8, a view), in FBGEMM's inference row layout."""
        return _table_region(self.tbe, self._pools, t)

    def forward(self, values: torch.Tensor, lengths: torch.Tensor, offsets: torch.Tensor,
                weights: Optional[torch.Tensor], batch: int) -> List[torch.Tensor]:
        out = self.tbe(values, offsets, weights)
        return list(out.split(self.dims, dim=1))


@dataclass(frozen=True)
class TieredTable:
    """A table of several precision tiers (``tiers``: ``(precision, rows)``, most precise first)."""

    name: str
    rows: int
    dim: int
    tiers: List[tuple]
    features: int = 1


class TieredRows(nn.Module):
    """Tiered tables of one width: one FBGEMM inference TBE with one table per precision, holding that tier of
    every table one after the other, ids mapped to those rows through one concatenated slot map (see the
    module doc)."""

    def __init__(self, tables: List[TieredTable]) -> None:
        super().__init__()
        dims = {t.dim for t in tables}
        if len(dims) != 1:
            raise ValueError(f"tiered tables of one lookup share a width, got {sorted(dims)}")
        for t in tables:
            precisions = [precision for precision, _ in t.tiers]
            if len(set(precisions)) != len(precisions):
                raise ValueError(f"table {t.name!r}: tiers {precisions} repeat a precision")
        self.dim: int = tables[0].dim
        self.num_features: int = sum(t.features for t in tables)
        # One TBE table (and one TBE feature) per precision, so that the TBE's per-feature work does not grow
        # with tables x tiers; a table's tier of that precision is a run of its rows.
        used = {precision for t in tables for precision, _ in t.tiers}
        order = [p for p in SPARSE_TYPES if p in used] + sorted(used - set(SPARSE_TYPES))  # unknown: _tbe says so
        pool_rows = {p: 0 for p in order}
        # (table, tier) -> its first row in its precision's pool
        self._tier_rows: List[List[int]] = []
        for t in tables:
            firsts = []
            for precision, rows in t.tiers:
                firsts.append(pool_rows[precision])
                pool_rows[precision] += int(rows)
            self._tier_rows.append(firsts)
        self._precisions: List[str] = order
        self._pools: List[RowTable] = [RowTable(p, pool_rows[p], self.dim, p) for p in order]
        self.num_pools: int = len(order)
        self.tbe = _tbe(self._pools, list(range(self.num_pools)), PoolingMode.NONE, BoundsCheckMode.NONE)
        # served slots are global: pool p's rows follow those of the pools before it
        pool_starts, total_slots = [], 0
        for p in order:
            pool_starts.append(total_slots)
            total_slots += pool_rows[p]
        self._pool_starts = pool_starts
        self.register_buffer("pool_bounds", torch.tensor(pool_starts + [total_slots], dtype=torch.int64))
        self.register_buffer("total_slots", torch.tensor([max(total_slots, 1)], dtype=torch.int64))
        bases, total = [], 0
        for t in tables:
            bases.append(total)
            total += t.rows
        index_dtype = torch.int32 if max(total, total_slots) < 2**31 else torch.int64
        self.register_buffer("slot_map", torch.zeros(total, dtype=index_dtype))
        feature_table: List[int] = [i for i, t in enumerate(tables) for _ in range(t.features)]
        self.register_buffer("feature_base", torch.tensor([bases[i] for i in feature_table], dtype=torch.int64))
        self.register_buffer("feature_rows", torch.tensor([tables[i].rows for i in feature_table], dtype=torch.int64))
        self._bases = bases
        self._tables = list(tables)

    def table_bytes(self, t: int, k: int) -> torch.Tensor:
        """Tier ``k`` of table ``t`` in the TBE's weights (uint8, a view)."""
        precision, rows = self._tables[t].tiers[k]
        pool = self._precisions.index(precision)
        region = _table_region(self.tbe, self._pools, pool)
        row_bytes = _row_bytes(precision, self.dim)
        first = self._tier_rows[t][k]
        return region[first * row_bytes : (first + int(rows)) * row_bytes]

    @torch.no_grad()
    def set_slots(self, t: int, slots: torch.Tensor) -> None:
        """Set table ``t``'s slot map from its exported one (``slots[i]``: the row of id ``i`` among the
        table's tiers laid end to end, most precise first), as slots of this lookup's pools."""
        table = self._tables[t]
        if slots.numel() != table.rows:
            raise ValueError(f"table {table.name!r}: a slot map of {slots.numel()} rows for {table.rows} rows")
        ends, shift = [], []
        first = 0
        for k, (precision, rows) in enumerate(table.tiers):
            ends.append(first + int(rows))
            shift.append(self._pool_starts[self._precisions.index(precision)] + self._tier_rows[t][k] - first)
            first += int(rows)
        ends_t, shift_t = torch.tensor(ends, dtype=torch.int64), torch.tensor(shift, dtype=torch.int64)
        target = self.slot_map[self._bases[t] : self._bases[t] + table.rows]
        chunk = 1 << 22  # an int64 copy of a few million slots at a time, not of the whole map
        for start in range(0, table.rows, chunk):
            part = slots[start : start + chunk].long()
            if part.numel() and (int(part.min()) < 0 or int(part.max()) >= first):
                raise ValueError(f"table {table.name!r}: slots outside its {first} tier rows")
            tier = torch.bucketize(part, ends_t, right=True)
            target[start : start + part.numel()] = (part + shift_t[tier]).to(target.dtype)

    def forward(self, values: torch.Tensor, lengths: torch.Tensor, offsets: torch.Tensor,
                weights: Optional[torch.Tensor], batch: int) -> List[torch.Tensor]:
        ids = values.long()
        lengths = lengths.long()
        per_feature = lengths.view(self.num_features, batch).sum(1)
        feature = torch.repeat_interleave(torch.arange(self.num_features), per_feature, output_size=ids.numel())
        if ids.numel() > 0:
            limit = self.feature_rows.index_select(0, feature)
            if bool(((ids < 0) | (ids >= limit)).any()):
                bad = ((ids < 0) | (ids >= limit)).nonzero()[0]
                raise ValueError("id " + str(int(ids[bad])) + " is outside its table's "
                                 + str(int(limit[bad])) + " rows")
        slots = self.slot_map.index_select(0, ids + self.feature_base.index_select(0, feature)).long()
        # every bag of every feature as one feature of num_features * batch bags, split by pool
        pool_lengths, pool_ids, _, _, unbucketize = torch.ops.fbgemm.block_bucketize_sparse_features(
            lengths, slots, False, True, self.total_slots, self.num_pools, None, None, -1, [self.pool_bounds])
        pool_offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(pool_lengths.view(self.num_pools, -1).sum(1))
        rows = self.tbe(pool_ids, pool_offsets)
        assert unbucketize is not None
        pooled = F.embedding_bag(unbucketize, rows, offsets.long(), mode="sum", per_sample_weights=weights,
                                 include_last_offset=True)
        return list(pooled.view(self.num_features, batch, self.dim).unbind(0))


class TensorTrainRows(nn.Module):
    """One tensor-train table (cores in the canonical layout ``(R_{k-1}, p_k, q_k, R_k)``), optionally with
    cached rows that replace the cores' rows of their ids."""

    def __init__(self, name: str, rows: int, cores: List[torch.Tensor], features: int = 1,
                 cache_ids: Optional[torch.Tensor] = None, cache_rows: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.name = name
        self.rows: int = int(rows)
        self.num_features: int = features
        self.row_factors: List[int] = [int(c.shape[1]) for c in cores]
        self.rank_out: List[int] = [int(c.shape[3]) for c in cores]
        self.dim: int = 1
        for c in cores:
            self.dim *= int(c.shape[2])
        # every core as its slices [p_k, R_{k-1}, q_k * R_k] (a row's slice is one contiguous matrix), all in
        # one buffer: core k is the view at core_offsets[k] of shape core_shapes[k]
        slabs = [c.permute(1, 0, 2, 3).reshape(c.shape[1], c.shape[0], c.shape[2] * c.shape[3]).float()
                 for c in cores]
        self.core_shapes: List[List[int]] = [list(s.shape) for s in slabs]
        self.core_offsets: List[int] = []
        total = 0
        for slab in slabs:
            self.core_offsets.append(total)
            total += slab.numel()
        self.register_buffer("core_data", torch.cat([slab.reshape(-1) for slab in slabs]))
        self.register_buffer("cache_ids", cache_ids.long() if cache_ids is not None
                             else torch.zeros(0, dtype=torch.int64))
        self.register_buffer("cache_rows", cache_rows.float() if cache_rows is not None else torch.zeros(0, self.dim))

    def _core(self, k: int) -> torch.Tensor:
        shape = self.core_shapes[k]
        n = shape[0] * shape[1] * shape[2]
        return self.core_data[self.core_offsets[k] : self.core_offsets[k] + n].view(shape)

    def _chain(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of distinct ``ids`` from the cores: ``X_1 = G_1[i_1]``, ``X_k = X_{k-1} @ G_k[i_k]``."""
        digits: List[torch.Tensor] = []
        rest = ids
        for k in range(len(self.row_factors) - 1, 0, -1):
            digits.insert(0, torch.remainder(rest, self.row_factors[k]))
            rest = torch.div(rest, self.row_factors[k], rounding_mode="floor")
        digits.insert(0, rest)
        n = ids.numel()
        x = self._core(0).index_select(0, digits[0]).view(n, -1, self.rank_out[0])  # [U, q1, R1]
        for k in range(1, len(self.row_factors)):
            core = self._core(k)  # [p, R_{k-1}, q_k * R_k]
            digit = digits[k]
            order = torch.argsort(digit)
            counts: List[int] = torch.bincount(digit, minlength=core.shape[0]).tolist()
            xs = x.index_select(0, order)
            out = xs.new_empty(n, xs.shape[1], core.shape[2])
            start = 0
            for s, c in enumerate(counts):  # the rows using slice s, one product
                if c > 0:
                    out[start : start + c] = torch.matmul(xs[start : start + c], core[s])
                    start += c
            back = torch.empty_like(out)
            back.index_copy_(0, order, out)
            x = back.view(n, -1, self.rank_out[k])  # [U, q1 ... q_k, R_k]
        return x.reshape(n, self.dim)

    def forward(self, values: torch.Tensor, lengths: torch.Tensor, offsets: torch.Tensor,
                weights: Optional[torch.Tensor], batch: int) -> List[torch.Tensor]:
        ids = values.long()
        if ids.numel() > 0 and (int(ids.min()) < 0 or int(ids.max()) >= self.rows):
            raise ValueError("ids of tensor-train table " + self.name + " must be in [0, " + str(self.rows)
                             + "), got " + str(int(ids.min())) + " to " + str(int(ids.max())))
        uniq, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        if self.cache_ids.numel() > 0 and uniq.numel() > 0:
            rows = torch.empty(uniq.numel(), self.dim)
            place = torch.searchsorted(self.cache_ids, uniq).clamp(max=self.cache_ids.numel() - 1)
            hit = self.cache_ids.index_select(0, place) == uniq
            found = hit.nonzero().squeeze(1)
            miss = (~hit).nonzero().squeeze(1)
            rows.index_copy_(0, found, self.cache_rows.index_select(0, place.index_select(0, found)))
            if miss.numel() > 0:
                rows.index_copy_(0, miss, self._chain(uniq.index_select(0, miss)))
        else:
            rows = self._chain(uniq)
        pooled = F.embedding_bag(inverse, rows, offsets.long(), mode="sum", per_sample_weights=weights,
                                 include_last_offset=True)
        return list(pooled.view(self.num_features, batch, self.dim).unbind(0))
