"""The row store: a table's rows in precision tiers, the engine of every row-store kind.

Rows live in one or more *tiers*, each a pool of rows in one precision (a codec of
:mod:`~torchrec_shark.modules.quantization`: fp32, fp16, int8, ...), most precise first. A store with
one tier keeps row ``r`` in slot ``r``; a store with several keeps a slot map ``row_slot`` (int32): a
row's *global slot*, tier 0's slots first, then tier 1's, ..., so one integer encodes both tier and
position. Tier sizes are fixed when the store is built (a shard's memory is fixed), and rows move between
tiers only by swapping slots (:meth:`RowStoreTable.move_rows`).

A lookup dedupes the batch's ids, decodes only those rows (vectorised per tier) and pools them;
backward sums each row's gradient, runs the fused sparse optimizer on those rows
(:class:`~torchrec_shark.modules.kernels.sparse_optimizer.RowOptimizer`) and re-encodes them in their
tier (stochastic rounding by default, so the expected stored value is the exact update). There is no
fp32 master copy and no ``nn.Parameter``: storage and optimizer state are buffers, so DDP and dense
optimizers never see them.

The tables built on it (:mod:`~torchrec_shark.modules.stock`, :mod:`~torchrec_shark.modules.uniform`,
:mod:`~torchrec_shark.modules.mixed_precision`) choose the tiers and, for several, which row goes where;
:class:`RowStoreKind` is their shared layout, byte count and checkpoint loader.

Example::

    table = RowStoreTable(config, SparseOptimizerSpec(), None, tiers=[("fp32", 10), ("int4", 90)])
    table.move_rows(target_tier)          # int8 [rows]: tier index per row, same tier sizes
    pooled = table(ids, offsets)          # lookup; backward updates the rows in their tiers
"""

from __future__ import annotations

import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torchrec.modules.embedding_configs import PoolingType

from torchrec_shark.modules.base import CompressedTable, SparseOptimizerSpec, TableInputError, all_finite
from torchrec_shark.modules.buffer_source import allocate
from torchrec_shark.modules.kernels.lookup import RowIndex, mean_divisor, pooled_lookup, row_index
from torchrec_shark.modules.kernels.row_copy import put_rows_, take_rows
from torchrec_shark.modules.kernels.sparse_optimizer import RowOptimizer
from torchrec_shark.modules.quantization import CODECS, ROUNDING_MODES, CounterNoise, Fp32Codec
from torchrec_shark.modules.table_kind import (
    CHUNK_ROWS,
    DictStateReader,
    PieceSpec,
    StateReader,
    TableKind,
    draws_initial_values,
    init_blocks,
    table_seed,
)


def _row_bytes(precision: str, dim: int) -> int:
    codec = CODECS[precision]
    return codec.width(dim) * codec.dtype.itemsize


#: every precision a tier can have, most bytes per row first (the order tiers are listed and saved in)
PRECISIONS: Tuple[str, ...] = tuple(sorted(CODECS, key=lambda p: -_row_bytes(p, 64)))


def precision_rank(precision: str) -> int:
    """Position of ``precision`` in :data:`PRECISIONS` (0: fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {list(PRECISIONS)}")
    return PRECISIONS.index(precision)


def pool_name(precision: str) -> str:
    """The state key of a tier pool: its precision names its codec (int8, int4 and int2 codes are all uint8)."""
    return f"{precision}_rows"


def scale_bias_bytes(precision: str) -> int:
    """Bytes per row of an integer codec's scale and bias (0 for float codecs)."""
    return getattr(CODECS[precision], "SCALE_BIAS_BYTES", 0)


class MemberCounter:
    """A per-table counter kept in the table's own attribute ``own``, or, once the table is a member of a fused
    store, in the store's per-member array ``fused`` (the store steps them all at once)."""

    def __init__(self, own: str, fused: str) -> None:
        self.own, self.fused = own, fused

    def __get__(self, table, owner=None):
        if table is None:
            return self
        if table._fused is None:
            return getattr(table, self.own)
        return int(getattr(table._fused, self.fused)[table._member])

    def __set__(self, table, value: int) -> None:
        if table._fused is None:
            setattr(table, self.own, int(value))
        else:
            getattr(table._fused, self.fused)[table._member] = value


class RowStoreTable(CompressedTable):
    """Rows in precision tiers with a fused sparse optimizer (see the module doc).

    Args:
        tiers: ``(precision, rows)`` per tier, most precise first; their rows add up to the table's.
        stock_pool: a one-tier fp32 store named ``weight`` (a stock table's state-dict key).
        rounding: how updates are rounded into non-fp32 tiers (``stochastic`` or ``nearest``).
        row_start, seed, pooling: the shard's first row, the table's seed, SUM/MEAN (default the config's).
    """

    def __init__(
        self,
        config,
        optimizer: SparseOptimizerSpec,
        device: Optional[torch.device],
        tiers: Sequence[Tuple[str, int]],
        rounding: str = "stochastic",
        row_start: int = 0,
        seed: int = 0,
        pooling: Optional[PoolingType] = None,
        stock_pool: bool = False,
    ) -> None:
        super().__init__()
        pooling = config.pooling if pooling is None else pooling
        if pooling not in (PoolingType.SUM, PoolingType.MEAN):
            raise ValueError(f"table {config.name!r}: pooling {pooling} is not supported (SUM or MEAN)")
        if rounding not in ROUNDING_MODES:
            raise ValueError(f"table {config.name!r}: rounding={rounding!r} must be one of {ROUNDING_MODES}")
        ranks = [precision_rank(p) for p, _ in tiers]
        if ranks != sorted(set(ranks)):
            raise ValueError(f"table {config.name!r}: tiers {[p for p, _ in tiers]} must be distinct precisions, "
                             f"most precise first (order {list(PRECISIONS)})")
        device = _default_device(device)
        self.name: str = config.name
        # This table holds rows [row_start, row_start + num_embeddings) of a table of table_rows rows
        # (all of them unless it is a row-wise shard); ids given to it are local to that range.
        self.num_embeddings = int(sum(n for _, n in tiers))
        self.table_rows = int(config.num_embeddings)
        self.row_start = int(row_start)
        self.embedding_dim = int(config.embedding_dim)
        self.pooling = pooling
        self.rounding = rounding
        self.seed = int(seed)
        # A member of a fused store (modules.fused_store) keeps its per-step counters there: the store
        # steps every member at once, and the table's own methods read and write the same counters.
        self._fused = None
        self._member = 0
        self._version = 0  # bumped on every write; a lookup's cached rows are reused only if unchanged
        self._updates = 0  # optimizer updates applied: the step of the stochastic-rounding noise
        # Puts lookups in the autograd graph; its gradient is never computed (not a parameter).
        self._anchor = torch.empty(0, requires_grad=True)
        self._shard_record: Optional[torch.Tensor] = None  # made when the layout is first saved or sharded
        self._tiers: List[Tuple[str, int, int]] = []  # (precision, first global slot, rows)
        self._pool_names: List[str] = ["weight"] if stock_pool else [pool_name(p) for p, _ in tiers]
        start = 0
        for (precision, count), pool in zip(tiers, self._pool_names):
            codec = CODECS[precision]
            self.register_buffer(pool, allocate(pool, (count, codec.width(self.embedding_dim)), codec.dtype, device,
                                                ("pool", precision)))
            self._tiers.append((precision, start, count))
            start += count
        self._bounds = [s for _, s, _ in self._tiers[1:]]
        if self.slotted:
            slot_dtype = torch.int32 if self.num_embeddings < 2**31 else torch.int64
            row_slot = allocate("row_slot", (self.num_embeddings,), slot_dtype, device, ("rows",))
            self.register_buffer("row_slot", row_slot.copy_(torch.arange(self.num_embeddings, dtype=slot_dtype,
                                                                         device=device)))
        if not stock_pool:
            self.register_buffer("update_count", allocate("update_count", (), torch.int64, device, ("scalar",)))
        if self.slotted:  # lookups served per tier since the last tier_activity(reset=True): a statistic, not state
            self.register_buffer("tier_hits", allocate("tier_hits", (len(self._tiers),), torch.int64, device,
                                                       ("hits",)), persistent=False)
        self.optim = RowOptimizer(optimizer, self.num_embeddings, self.embedding_dim, device)
        self._moves = 0

    @property
    def version(self) -> int:
        """Bumped on every write of the table (a fused store's members share the store's)."""
        return self._version if self._fused is None else self._fused.version

    @version.setter
    def version(self, value: int) -> None:
        if self._fused is None:
            self._version = value
        else:
            self._fused.version = value

    #: Optimizer updates applied: the step of the stochastic-rounding noise.
    updates = MemberCounter("_updates", "updates")

    @classmethod
    def fused_store_type(cls):
        """The fused store that batches tables of this class (:mod:`~torchrec_shark.modules.fused_store`)."""
        from torchrec_shark.modules.fused_store import FusedRowStore

        return FusedRowStore

    @property
    def slotted(self) -> bool:
        """More than one tier: rows reach their storage through the slot map."""
        return len(self._tiers) > 1

    @property
    def is_meta(self) -> bool:
        return self._pool(0).device.type == "meta"

    # ------------------------------------------------------------------ storage
    def _pool(self, k: int) -> torch.Tensor:
        return getattr(self, self._pool_names[k])

    def slots_of(self, rows: torch.Tensor) -> torch.Tensor:
        """Global storage slot of each row (tier ``k`` owns slots ``[start_k, start_k + n_k)``)."""
        if not self.slotted:
            return rows
        return self.row_slot.index_select(0, rows.reshape(-1).long())

    def tier_of_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """Tier index (int8, 0: the most precise tier) of each global slot."""
        out = torch.zeros(slots.shape, dtype=torch.int8, device=slots.device)
        for b in self._bounds:
            out += (slots >= b).to(torch.int8)
        return out

    def tier_of_rows(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tier index (int8) of ``rows`` (default: all)."""
        if not self.slotted:
            n = self.num_embeddings if rows is None else rows.numel()
            return torch.zeros(n, dtype=torch.int8, device=self._pool(0).device)
        return self.tier_of_slots(self.row_slot if rows is None else self.row_slot.index_select(0, rows))

    def tier_bounds(self, sorted_slots: torch.Tensor) -> List[int]:
        """``[0, end of tier 0, ..., len]``: the run of each tier in ascending ``sorted_slots``."""
        if not self._bounds:
            return [0, sorted_slots.numel()]
        bounds = torch.tensor(self._bounds, dtype=sorted_slots.dtype, device=sorted_slots.device)
        cuts = torch.searchsorted(sorted_slots, bounds).tolist()
        return [0, *cuts, sorted_slots.numel()]

    def _runs(self, index: RowIndex):
        """``(tier id, codec, pool, first, last, slots in pool)`` per non-empty tier run of ``index``."""
        b = index.bounds
        for k, (precision, start, _) in enumerate(self._tiers):
            if b[k + 1] > b[k]:
                seg = index.slots[b[k] : b[k + 1]]
                yield k, CODECS[precision], self._pool(k), b[k], b[k + 1], seg - start if start else seg

    def gather(self, index: RowIndex) -> torch.Tensor:
        """fp32 values of ``index.slots``, ``[U, D]`` (only these rows are decoded)."""
        runs = list(self._runs(index))
        if len(runs) == 1 and runs[0][1] is not Fp32Codec:  # one precision holds every row: its decoded rows
            _, codec, pool, _, _, seg = runs[0]  # are the result
            return codec.decode(take_rows(pool, seg))
        out = torch.empty(index.slots.numel(), self.embedding_dim, device=self._pool(0).device)
        for _, codec, pool, a, b, seg in runs:
            if codec is Fp32Codec:
                torch.index_select(pool, 0, seg, out=out[a:b])
            else:
                out[a:b] = codec.decode(take_rows(pool, seg))
        return out

    def _scatter(self, index: RowIndex, values: torch.Tensor, rounding: str) -> None:
        for _, codec, pool, a, b, seg in self._runs(index):
            noise = None
            if rounding == "stochastic" and codec is not Fp32Codec:
                rows = index.rows[a:b]
                noise = CounterNoise(self.seed, self.updates, rows + self.row_start if self.row_start else rows)
            put_rows_(pool, seg, codec.encode(values[a:b], rounding, noise))
        self.version += 1

    def index_rows(self, rows: torch.Tensor) -> RowIndex:
        """A :class:`RowIndex` for distinct ``rows`` (no pooling structure needed)."""
        return row_index(self, rows)

    def write_rows(self, rows: torch.Tensor, values: torch.Tensor, rounding: Optional[str] = None) -> None:
        """Store fp32 ``values`` for distinct ``rows`` in whatever tier each row is in."""
        index = self.index_rows(rows)
        self._scatter(index, values.float().index_select(0, index.perm), rounding or self.rounding)

    def read_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """fp32 values of ``rows`` (any order, repeats allowed)."""
        index = self.index_rows(rows)
        return self.gather(index).index_select(0, index.inverse)

    @torch.no_grad()
    def apply_gradients(self, index: RowIndex, grad: torch.Tensor, values: Optional[torch.Tensor] = None) -> None:
        """The fused optimizer step on the rows of ``index`` with their summed gradients ``grad``.

        ``values`` are the rows' current values if the table has not been written since they
        were gathered. Non-finite gradients are rejected before anything is written.
        """
        if not all_finite(grad):
            bad = index.rows[~torch.isfinite(grad).all(dim=1)]
            raise TableInputError(
                f"table {self.name!r}: non-finite gradient for {bad.numel()} row(s) (first: {bad[:5].tolist()}); "
                "the table was not updated"
            )
        if self.slotted:  # lookups (ids, repeats included) served by each tier
            hits = index.offsets.index_select(0, torch.tensor(index.bounds, device=index.offsets.device))
            self.tier_hits += (hits[1:] - hits[:-1]).to(self.tier_hits)
        if values is None:  # written since the lookup (e.g. re-tiered): locate the rows afresh
            fresh = self.index_rows(index.rows)
            grad = grad.index_select(0, fresh.perm)
            index, values = fresh, self.gather(fresh)
        new = self.optim.update(index.rows, values, grad)
        self.updates += 1
        self._scatter(index, new, self.rounding)

    @torch.no_grad()
    def init_rows(self, config) -> None:
        """Initial values of this table's rows from ``config.init_fn``, drawn per fixed row block
        (:func:`~torchrec_shark.modules.table_kind.init_blocks`: the same values under any
        sharding) and written a block at a time (no full fp32 copy). Nothing on ``meta``, nor inside
        :func:`~torchrec_shark.modules.table_kind.without_initial_values` (a resume loads over them)."""
        if self.is_meta or not draws_initial_values():
            return
        device = self._pool(0).device
        for a, chunk in init_blocks(config.init_fn, self.seed, self.row_start, self.num_embeddings,
                                    self.embedding_dim, self.table_rows, device):
            local = a - self.row_start
            self.write_rows(torch.arange(local, local + chunk.shape[0], device=device), chunk, rounding="nearest")

    # ------------------------------------------------------------------ lookup
    def forward(
        self,
        ids: torch.Tensor,
        offsets: torch.Tensor,
        per_sample_weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if self.is_meta or ids.device.type == "meta":  # shape propagation, as stock tables on meta
            return torch.empty(offsets.numel() - 1, self.embedding_dim, device="meta")
        self.check_lookup(ids, offsets, per_sample_weights)
        divisor = mean_divisor(offsets) if self.pooling == PoolingType.MEAN else None
        return pooled_lookup(self, row_index(self, ids), offsets, per_sample_weights, divisor, self._anchor)

    # ------------------------------------------------------------------ contract
    def full_weight(self) -> torch.Tensor:
        return self.read_rows(torch.arange(self.num_embeddings, device=self._pool(0).device))

    def optimizer_state(self) -> Dict[str, torch.Tensor]:
        return self.optim.state()

    def set_learning_rate(self, lr: float) -> None:
        self.optim.lr = float(lr)

    def tier_counts(self) -> Dict[str, int]:
        return {precision: count for precision, _, count in self._tiers}

    def memory_bytes(self) -> Dict[str, int]:
        """Bytes of every buffer except optimizer state, by part; ``total`` is their sum."""
        parts: Dict[str, int] = {}
        for name, buf in self.named_buffers():
            if name.startswith("optim."):
                continue
            nbytes = buf.numel() * buf.element_size()
            if name in self._pool_names:
                precision = self._tiers[self._pool_names.index(name)][0]
                sb = buf.shape[0] * scale_bias_bytes(precision)
                if sb:
                    parts[f"{precision}_codes"] = parts.get(f"{precision}_codes", 0) + nbytes - sb
                    parts[f"{precision}_scale_bias"] = parts.get(f"{precision}_scale_bias", 0) + sb
                else:
                    parts[f"{precision}_rows"] = parts.get(f"{precision}_rows", 0) + nbytes
            else:
                parts[name] = parts.get(name, 0) + nbytes
        if self._shard_record is not None:  # held for the table's life once made: counted as allocated
            parts["shards"] = self._shard_record.numel() * self._shard_record.element_size()
        parts["total"] = sum(parts.values())
        return parts

    def tier_activity(self, reset: bool = True) -> Dict[str, object]:
        """Rows per tier, training lookups (distinct rows per step) served by each tier, and rows moved
        since the last reset: whether the hot rows really sit in the precise tiers.

        Example::

            table.tier_activity()  # {"rows": {"fp32": 10, "int4": 90}, "hits": {"fp32": 812, ...}, "moves": 37}
        """
        hits = self.tier_hits.tolist() if self.slotted else [0]
        out = {"rows": self.tier_counts(), "hits": {p: int(v) for (p, _, _), v in zip(self._tiers, hits)},
               "moves": self._moves}
        if reset:
            if self.slotted:
                self.tier_hits.zero_()
            self._moves = 0
        return out

    # ------------------------------------------------------------------ state dict
    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        self.sync_state()
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.slotted:
            destination[prefix + "shards"] = self.shard_record()  # the same keys as a sharded table's

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        record = state_dict.pop(prefix + "shards", None) if self.slotted else None
        if record is not None and not _same_record(record, self.shard_record()):
            # saved under another sharding or tier list: re-slice it for this table's rows
            present = {k[len(prefix):]: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix)}
            present["shards"] = record
            self.loader().load_state(self, DictStateReader(present), self.row_start)
            return
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.loaded()

    def loader(self) -> "RowStoreKind":
        """The kind that loads state of another layout into this table (tables with per-row extras override)."""
        return RowStoreKind()

    def shard_record(self) -> torch.Tensor:
        """``[[row_start, rows, n_0, ..., n_{T-1}]]``: where this table's rows and tier pools sit in the whole
        table (one tensor for the table's life, so an in-place load into its export is recognised as such)."""
        if self._shard_record is None:
            sizes = [n for _, _, n in self._tiers]
            self._shard_record = torch.tensor([[self.row_start, self.num_embeddings, *sizes]], dtype=torch.int64)
        return self._shard_record

    def sync_state(self) -> None:
        """Bring the exported buffers up to date with the table's plain attributes (before any export)."""
        if not self.is_meta and "update_count" in self._buffers:
            self.update_count.fill_(self.updates)

    def loaded(self) -> None:
        """Re-read the plain attributes from the buffers after they were written (a load)."""
        self.version += 1
        if not self.is_meta and "update_count" in self._buffers:
            self.updates = int(self.update_count)

    # ------------------------------------------------------------------ tiers
    @torch.no_grad()
    def assign_tiers(self, order: torch.Tensor) -> None:
        """Lay the rows out by rank: ``order`` lists every row, best first; the first ``n_0`` go to tier 0,
        the next ``n_1`` to tier 1, ... (this table's exact tier sizes), rows ascending within a tier. Only
        the layout changes (``row_slot``): write the values after."""
        if not self.slotted:
            return
        target = self.target_tiers(order)
        by_tier = torch.sort(target.long() * self.num_embeddings + torch.arange(self.num_embeddings, device=order.device))
        slots = torch.empty_like(order)
        slots[by_tier.indices] = torch.arange(self.num_embeddings, device=order.device)
        self.row_slot.copy_(slots)
        self.version += 1

    def target_tiers(self, order: torch.Tensor) -> torch.Tensor:
        """Tier index (int8) per row when rows are ranked by ``order`` (best first) into this table's tier sizes."""
        target = torch.empty(self.num_embeddings, dtype=torch.int8, device=order.device)
        for k, (_, start, count) in enumerate(self._tiers):
            target[order[start : start + count]] = k
        return target

    @torch.no_grad()
    def move_rows(self, target: torch.Tensor) -> int:
        """Move every row whose tier differs from ``target`` (tier index per row, with this table's tier sizes)
        into its target tier; returns how many rows moved.

        Only movers are touched: each is decoded and re-encoded (nearest rounding: a one-off move should add
        the least error) into a slot another mover vacated. Movers are decoded :data:`CHUNK_ROWS` at a time and
        held encoded in their new tier until every mover has been read, so no more than a chunk of fp32 values
        exists at once however many rows move. Optimizer state is indexed by row id: it stays with the row."""
        current = self.tier_of_slots(self.row_slot)
        movers = (target != current).nonzero().squeeze(1)
        if movers.numel() == 0:
            return 0
        src, dst = current.index_select(0, movers), target.index_select(0, movers)
        del current
        tiers = range(len(self._tiers))
        encoded = []  # per chunk: its movers' values in their destination tiers' encodings
        for a in range(0, movers.numel(), CHUNK_ROWS):
            rows, to = movers[a : a + CHUNK_ROWS], dst[a : a + CHUNK_ROWS]
            values = self.read_rows(rows)
            encoded.append({k: CODECS[self._tiers[k][0]].encode(values[to == k], "nearest") for k in tiers})
        old_slots = self.row_slot.index_select(0, movers).long()
        new_slots = torch.empty_like(old_slots)
        for k in tiers:
            leaving, arriving = (src == k).nonzero().squeeze(1), (dst == k).nonzero().squeeze(1)
            if leaving.numel() != arriving.numel():
                raise ValueError(f"table {self.name!r}: a move must keep tier sizes ({self._tiers[k][0]}: "
                                 f"{leaving.numel()} rows leave, {arriving.numel()} arrive)")
            new_slots[arriving] = old_slots.index_select(0, leaving)
        self.row_slot[movers] = new_slots.to(self.row_slot.dtype)
        for i, a in enumerate(range(0, movers.numel(), CHUNK_ROWS)):
            slots, to = new_slots[a : a + CHUNK_ROWS], dst[a : a + CHUNK_ROWS]
            for k, (_, start, _) in enumerate(self._tiers):
                if encoded[i][k].shape[0]:
                    put_rows_(self._pool(k), slots[to == k] - start, encoded[i][k])
        self.version += 1
        self._moves += int(movers.numel())
        return int(movers.numel())


def seed_or_default(config, seed: Optional[int]) -> int:
    """``seed``, or the table's seed under ``torch.initial_seed()``."""
    return table_seed(torch.initial_seed(), config.name) if seed is None else int(seed)


def _same_record(saved, own: torch.Tensor) -> bool:
    saved = torch.as_tensor(saved)
    return saved.numel() == own.numel() and torch.equal(saved.reshape(own.shape).to(own.dtype), own)


def _default_device(device: Optional[torch.device]) -> torch.device:
    """``device``, or torch's default device (``meta`` inside ``with torch.device("meta")``, as TorchRec's
    modules follow it)."""
    if device is not None:
        return torch.device(device)
    return torch.empty(0).device


def tier_sizes(fractions: Sequence[float], rows: int) -> List[int]:
    """Rows per tier for ``fractions`` (summing to 1) of ``rows`` rows: cumulative rounding, so the sizes add
    up to ``rows`` exactly and any shard's sizes are within one row of its fractions."""
    out, done, acc = [], 0, 0.0
    for f in fractions[:-1]:
        acc += f
        end = max(done, min(rows, int(round(acc * rows))))
        out.append(end - done)
        done = end
    return out + [rows - done]


# ---------------------------------------------------------------------------- saved rows of any row store
def saved_pools(reader: StateReader) -> List[Tuple[str, str]]:
    """``(precision, key)`` of the tier pools in ``reader``'s state, most precise first. A stock ``weight`` is
    one fp32 (or fp16) pool; its codec comes from the key, never from a uint8 dtype."""
    keys = set(reader.keys())
    if "weight" in keys:
        dtype = reader.read("weight", 0, 0).dtype
        if dtype not in (torch.float32, torch.float16):
            raise ValueError(f"a stock 'weight' of dtype {dtype} is not fp32 or fp16 rows")
        return [("fp32" if dtype == torch.float32 else "fp16", "weight")]
    return [(p, pool_name(p)) for p in PRECISIONS if pool_name(p) in keys]


def saved_shards(reader: StateReader, pools: Sequence[Tuple[str, str]]) -> List[List[int]]:
    """``[row_start, rows, n_0, ..., n_{T-1}]`` of every saved shard (one for an unsharded table's state)."""
    if "shards" in set(reader.keys()):
        return reader.read("shards").long().reshape(-1, 2 + len(pools)).tolist()
    rows = reader.size("row_slot")[0] if "row_slot" in set(reader.keys()) else reader.size(pools[0][1])[0]
    return [[0, rows, *(reader.size(key)[0] for _, key in pools)]]


def source_row_batches(reader: StateReader, row_start: int, rows: int) -> Iterator[Tuple[torch.Tensor, str, torch.Tensor]]:
    """The saved rows ``[row_start, row_start + rows)`` of any row store, as ``(local rows, precision, encoded
    rows)`` batches of at most :data:`CHUNK_ROWS` rows.

    A one-pool source (stock ``weight``, a uniform table's pool) comes in row order. A tiered source
    (``row_slot``, its pools and ``shards``) comes tier by tier in the order of its saved pools, so each saved
    pool window is read once whatever the sharding that saved it.
    """
    pools = saved_pools(reader)
    if not pools:
        raise ValueError(f"no row-store rows in a state with keys {sorted(reader.keys())}")
    if "row_slot" not in set(reader.keys()):
        if len(pools) != 1:
            raise ValueError(f"{len(pools)} tier pools but no row_slot in a state with keys {sorted(reader.keys())}")
        precision, key = pools[0]
        for a, enc in reader.chunks(key, row_start, rows):
            yield torch.arange(a - row_start, a - row_start + enc.shape[0]), precision, enc
        return
    offsets = [0] * len(pools)
    for s0, sn, *sizes in saved_shards(reader, pools):
        lo, hi = max(row_start, s0), min(row_start + rows, s0 + sn)
        if lo < hi:
            slots = torch.cat([c.long() for _, c in reader.chunks("row_slot", lo, hi - lo)])
            start = 0
            for k, (precision, key) in enumerate(pools):
                sel = ((slots >= start) & (slots < start + sizes[k])).nonzero().squeeze(1)
                pos, order = torch.sort(slots.index_select(0, sel) - start)
                sel = sel.index_select(0, order)
                i, m = 0, pos.numel()
                while i < m:  # windows of the saved pool, each read once
                    w0 = int(pos[i])
                    j = int(torch.searchsorted(pos, w0 + CHUNK_ROWS))
                    window = reader.read(key, offsets[k] + w0, int(pos[j - 1]) - w0 + 1)
                    yield sel[i:j] + (lo - row_start), precision, window.index_select(0, pos[i:j] - w0)
                    i = j
                start += sizes[k]
        offsets = [o + n for o, n in zip(offsets, sizes)]


def source_precision_ranks(reader: StateReader, row_start: int, rows: int) -> Optional[torch.Tensor]:
    """:func:`precision_rank` (int8) of each saved row of ``[row_start, row_start + rows)``, or ``None`` when
    the source has one pool (every row in one precision)."""
    if "row_slot" not in set(reader.keys()):
        return None
    pools = saved_pools(reader)
    ranks = torch.tensor([precision_rank(p) for p, _ in pools], dtype=torch.int8)
    out = torch.empty(rows, dtype=torch.int8)
    for s0, sn, *sizes in saved_shards(reader, pools):
        lo, hi = max(row_start, s0), min(row_start + rows, s0 + sn)
        bounds = torch.tensor(sizes, dtype=torch.int64).cumsum(0)[:-1]
        for a, slots in (reader.chunks("row_slot", lo, hi - lo) if lo < hi else ()):
            tier = torch.searchsorted(bounds, slots.long(), right=True)
            out[a - row_start : a - row_start + slots.numel()] = ranks.index_select(0, tier)
    return out


# ---------------------------------------------------------------------------- the kind
# Machine balance assumed by the planner's perf model: flops a core completes in the time it streams one
# byte from memory, and the flops to decode (and re-encode after the update) one quantised element.
FLOPS_PER_BYTE = 4.0
DECODE_FLOPS_PER_ELEMENT = 2.0


class RowStoreKind(TableKind):
    """Row stores: tier pools plus row-indexed tensors; what every row-store kind shares.

    A shard's pool of tier ``k`` is the slice of the global pool at the sum of the lower shards' tier-``k``
    sizes (``shards`` records them, so a loader can re-slice by rows); every other tensor is indexed by row.
    Loading accepts any row store's state (stock ``weight``, uniform, tiered) and re-encodes rows only when
    their precision changes.

    Subclasses give :meth:`tier_list` (``(precision, rows)`` of a shard) and may add per-row tensors
    (:attr:`row_buffers`) and scalars (:attr:`scalar_buffers`).
    """

    state_family = "row_store"
    stock_pool = False
    row_buffers: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}  # per-row extras: (trailing shape, dtype)
    scalar_buffers: Tuple[str, ...] = ("update_count",)

    def tier_list(self, config, rows: int, row_start: int = 0) -> List[Tuple[str, int]]:
        """``(precision, rows)`` per tier of the shard of ``rows`` rows from ``row_start`` (the shards of a
        table add up to the whole table's tiers)."""
        raise NotImplementedError

    def tiers(self, config) -> Tuple[str, ...]:
        return tuple(p for p, _ in self.tier_list(config, max(1, int(config.num_embeddings))))

    def pool_names(self, config) -> List[str]:
        return ["weight"] if self.stock_pool else [pool_name(p) for p in self.tiers(config)]

    def slotted(self, config) -> bool:
        return len(self.tiers(config)) > 1

    def build(self, config, optimizer, row_start, rows, device, seed, row_wise=False):
        return self.table_class(config, optimizer, device, row_start=row_start, rows=rows, seed=seed,
                                pooling=PoolingType.SUM if row_wise else None)

    def storage_bytes(self, config, optimizer, row_start, rows) -> Dict[str, int]:
        dim = int(config.embedding_dim)
        parts: Dict[str, int] = {}
        for precision, n in self.tier_list(config, rows, row_start):
            sb = scale_bias_bytes(precision)
            if sb:
                parts[f"{precision}_codes"] = n * (_row_bytes(precision, dim) - sb)
                parts[f"{precision}_scale_bias"] = n * sb
            else:
                parts[f"{precision}_rows"] = n * _row_bytes(precision, dim)
        if self.slotted(config):
            parts["row_slot"] = rows * (4 if rows < 2**31 else 8)
            parts["tier_hits"] = 8 * len(self.tiers(config))
        for name, (trail, dtype) in self.row_buffers.items():
            parts[name] = rows * math.prod(trail) * dtype.itemsize
        for name in self.scalar_buffers:
            parts[name] = 8
        parts["optimizer"] = RowOptimizer.state_bytes(optimizer, rows, dim)
        parts["total"] = sum(parts.values())
        return parts

    def state_layout(self, config, optimizer, ranges):
        n_rows, dim = int(config.num_embeddings), int(config.embedding_dim)
        names = self.pool_names(config)
        slotted = self.slotted(config)
        per_range = [self.tier_list(config, n, r0) for r0, n in ranges]
        totals = [sum(t[k][1] for t in per_range) for k in range(len(names))]
        offsets = [0] * len(names)
        out = []
        for j, ((r0, n), tiers) in enumerate(zip(ranges, per_range)):
            spec: Dict[str, PieceSpec] = {}
            for k, ((precision, cnt), pool) in enumerate(zip(tiers, names)):
                codec = CODECS[precision]
                spec[pool] = PieceSpec((totals[k], codec.width(dim)), codec.dtype, offsets[k], cnt)
                offsets[k] += cnt
            if slotted:
                spec["row_slot"] = PieceSpec((n_rows,), torch.int32 if n < 2**31 else torch.int64, r0, n)
                # where each shard's pools sit: lets a loader re-slice them by rows
                spec["shards"] = PieceSpec((len(ranges), 2 + len(names)), torch.int64, j, 1)
            for name, (trail, dtype) in self.row_buffers.items():
                spec[name] = PieceSpec((n_rows, *trail), dtype, r0, n)
            for name in self.scalar_buffers:
                spec[name] = PieceSpec((), torch.int64, replicated=True)
            for name, (shape, dtype) in RowOptimizer.state_shapes(optimizer, n, dim).items():
                spec[f"optim.{name}"] = (PieceSpec((n_rows, *shape[1:]), dtype, r0, n) if shape
                                         else PieceSpec((), dtype, replicated=True))
            out.append(spec)
        return out

    def local_state(self, table, sync: bool = True) -> Dict[str, torch.Tensor]:
        if sync:
            table.sync_state()
        out = {name: getattr(table, name) for name in table._pool_names}
        if table.slotted:
            out["row_slot"] = table.row_slot
            out["shards"] = table.shard_record()
        out.update({name: getattr(table, name) for name in (*self.row_buffers, *self.scalar_buffers)})
        out.update({f"optim.{k}": v for k, v in table.optim.state().items()})
        return out

    def unloadable(self, config, reader: StateReader, columns=None) -> Optional[str]:
        try:
            pools = saved_pools(reader)
        except ValueError as e:
            return str(e)
        keys = set(reader.keys())
        if not pools:
            return f"no row-store rows among the saved keys {sorted(keys)}"
        rows = reader.size("row_slot" if "row_slot" in keys else pools[0][1])[0]
        if rows != config.num_embeddings:
            return f"{rows} saved rows, {config.num_embeddings} wanted"
        precision, key = pools[0]
        width = reader.size(key)[1] * CODECS[precision].dtype.itemsize - scale_bias_bytes(precision)
        width = width * 8 // bits_per_value(precision)
        if columns is None and width != config.embedding_dim:
            return f"saved width {width}, {config.embedding_dim} wanted"
        if columns is not None and (len(columns) != config.embedding_dim or max(columns) >= width):
            return f"{len(columns)} columns (max {max(columns)}) cannot fill width {config.embedding_dim} from {width}"
        return None

    @torch.no_grad()
    def load_state(self, table, reader: StateReader, row_start: int, columns=None) -> None:
        keys = set(reader.keys())
        n = table.num_embeddings
        self.load_layout(table, reader, row_start)
        cols = None if columns is None else torch.as_tensor(list(columns), dtype=torch.long)
        precision_of_tier = [p for p, _, _ in table._tiers]
        device = table._pool(0).device
        for rows, precision, enc in source_row_batches(reader, row_start, n):
            rows, enc = rows.to(device), enc.to(device)  # saved rows come to the table's device a chunk at a time
            index = table.index_rows(rows)
            enc = enc.index_select(0, index.perm)
            same = [precision_of_tier[k] == precision for k, *_ in table._runs(index)]
            if cols is None and all(same):  # the stored bytes themselves: exact, no re-encoding
                for _, codec, pool, a, b, seg in table._runs(index):
                    pool.index_copy_(0, seg, enc[a:b].to(pool.dtype))
            else:
                values = CODECS[precision].decode(enc)
                table._scatter(index, values if cols is None else values.index_select(1, cols), "nearest")
        for name in self.scalar_buffers:
            if name in keys and name in table._buffers:
                getattr(table, name).copy_(reader.read(name))
        for name, buf in table.optim.state().items():
            key = f"optim.{name}"
            if key not in keys or tuple(reader.size(key)[1:]) != tuple(buf.shape[1:]):
                continue  # another optimizer (or none) saved: this one starts fresh
            if buf.dim() == 0:
                buf.copy_(reader.read(key))
            else:
                for a, v in reader.chunks(key, row_start, n):
                    buf[a - row_start : a - row_start + v.shape[0]].copy_(v)
        table.loaded()

    def export_serving(self, config, reader: StateReader, sink, options=None) -> Dict:
        """Its pools as trained, in a canonical order, with their slot map (see
        :mod:`~torchrec_shark.modules.row_store_export`)."""
        from torchrec_shark.modules.row_store_export import export_row_store

        return export_row_store(config, reader, sink)

    def load_layout(self, table, reader: StateReader, row_start: int) -> None:
        """Per-row layout before the rows: a tiered table keeps each row's saved precision rank where its tier
        sizes allow (more precise first, then row id)."""
        if not table.slotted:
            return
        ranks = source_precision_ranks(reader, row_start, table.num_embeddings)
        if ranks is not None:
            table.assign_tiers(torch.sort(ranks.to(table.row_slot.device, torch.int64), stable=True).indices)

    def cost_factor(self, config) -> float:
        dim = int(config.embedding_dim)
        rows = 1000
        tiers = self.tier_list(config, rows)
        read = sum(n * _row_bytes(p, dim) for p, n in tiers) / rows
        decoded = sum(n for p, n in tiers if p != "fp32") / rows
        extra = 4 if self.slotted(config) else 0
        return (read + extra + decoded * DECODE_FLOPS_PER_ELEMENT * dim / FLOPS_PER_BYTE) / (4.0 * dim)


def bits_per_value(precision: str) -> int:
    """Bits per value of ``precision``'s codes."""
    codec = CODECS[precision]
    return getattr(codec, "bits", codec.dtype.itemsize * 8)
