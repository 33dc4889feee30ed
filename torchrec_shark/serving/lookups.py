"""Pooled lookups of exported tables, scriptable, on torch, TorchRec and FBGEMM only.

Every lookup takes the jagged ids of its features (feature-major, as a ``KeyedJaggedTensor`` holds them) and
returns one pooled ``[B, D]`` tensor per feature (sums; the model divides MEAN tables by the bag lengths):

* :class:`DirectRows`: tables whose rows are in one precision each (row ``r`` at row ``r``): one pooled
  ``IntNBitTableBatchedEmbeddingBagsCodegen`` over all of them, the ids passed as they come.
* :class:`TieredRows`: tables whose rows are in several precision tiers (per-row mixed precision): one
  FBGEMM inference TBE holding every tier pool of every table as one of its tables. Ids become global slots
  through the tables' slot maps (one gather over a concatenated int32 map), FBGEMM's
  ``block_bucketize_sparse_features`` splits them by tier keeping their bags (the tier boundaries of each
  table are its bucket boundaries), the TBE reads each id's row from its tier pool, dequantised to fp32
  (``PoolingMode.NONE``: a tier split of a bag would otherwise cost a pooled output per tier), and
  ``embedding_bag`` pools the rows back into the original bags. FBGEMM's own ``index_remapping`` is not
  used: it keeps a full-size array per tier (12 bytes a row for three tiers) where the slot map keeps 4.
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
    """Tiered tables of one width: one FBGEMM inference TBE over every tier pool, ids mapped to slots through
    one concatenated slot map (see the module doc)."""

    def __init__(self, tables: List[TieredTable]) -> None:
        super().__init__()
        dims = {t.dim for t in tables}
        if len(dims) != 1:
            raise ValueError(f"tiered tables of one lookup share a width, got {sorted(dims)}")
        self.dim: int = tables[0].dim
        self.num_tiers: int = max(len(t.tiers) for t in tables)
        self.num_features: int = sum(t.features for t in tables)
        # TBE tables tier-major: (tier 0 of every table), (tier 1 of every table that has one), ...
        self._pools: List[RowTable] = []
        first: List[List[int]] = [[] for _ in tables]
        for k in range(self.num_tiers):
            for i, t in enumerate(tables):
                if k < len(t.tiers):
                    precision, rows = t.tiers[k]
                    first[i].append(len(self._pools))
                    self._pools.append(RowTable(f"{t.name}.{precision}", int(rows), t.dim, precision))
        self._table_pools = first
        # TBE features in block_bucketize's output order, bucket (tier) major: (tier k, feature f). A table
        # with fewer tiers gets none of its ids in the higher buckets; their features read its last tier.
        feature_table: List[int] = [i for i, t in enumerate(tables) for _ in range(t.features)]
        feature_table_map = [first[i][min(k, len(tables[i].tiers) - 1)] for k in range(self.num_tiers)
                             for i in feature_table]
        self.tbe = _tbe(self._pools, feature_table_map, PoolingMode.NONE, BoundsCheckMode.NONE)
        bases, total = [], 0
        for t in tables:
            bases.append(total)
            total += t.rows
        self.register_buffer("slot_map", torch.zeros(total, dtype=torch.int32 if total < 2**31 else torch.int64))
        self.register_buffer("feature_base", torch.tensor([bases[i] for i in feature_table], dtype=torch.int64))
        self.register_buffer("feature_rows", torch.tensor([tables[i].rows for i in feature_table], dtype=torch.int64))
        self._bases = bases
        # each feature's tier boundaries in its table's slots: [0, end of tier 0, ..., rows, rows, ...]
        self.bucket_bounds: List[torch.Tensor] = []
        for i in feature_table:
            ends = [0]
            for _, rows in tables[i].tiers:
                ends.append(ends[-1] + int(rows))
            ends += [ends[-1]] * (self.num_tiers + 1 - len(ends))
            self.bucket_bounds.append(torch.tensor(ends, dtype=torch.int64))
        self._tables = list(tables)

    def table_bytes(self, t: int, k: int) -> torch.Tensor:
        """Tier ``k`` of table ``t`` in the TBE's weights (uint8, a view)."""
        return _table_region(self.tbe, self._pools, self._table_pools[t][k])

    def table_slots(self, t: int) -> torch.Tensor:
        """Table ``t``'s slot map (a view of the concatenated one)."""
        return self.slot_map[self._bases[t] : self._bases[t] + self._tables[t].rows]

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
        new_lengths, tier_ids, _, _, unbucketize = torch.ops.fbgemm.block_bucketize_sparse_features(
            lengths, slots, False, True, self.feature_rows, self.num_tiers, None, None, -1, self.bucket_bounds)
        per_tier_feature = new_lengths.view(self.num_tiers * self.num_features, batch).sum(1)
        tier_offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(per_tier_feature)
        rows = self.tbe(tier_ids, tier_offsets)
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
