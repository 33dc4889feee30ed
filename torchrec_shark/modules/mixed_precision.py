"""SHARK's F-Quantization, taken below int8: each row in the precision its label-weighted traffic earns.

A :class:`MixedPrecision` spec lists tiers, most precise first, each a precision (fp32, fp16, int8, int4,
int2) and a fraction of the rows. A row's priority counts the labelled samples that touched it,
``P_t = decay * P_{t-1} + pos_weight * n_pos + neg_weight * n_neg``; every ``retier_every`` steps the rows
are ranked by priority and the top fraction goes to the first tier, the next to the second, and so on.
The tiers live in one row store (:mod:`~torchrec_shark.modules.row_store`): pools of fixed sizes and a
row -> slot map.

Example::

    spec = MixedPrecision(tiers=(("fp32", 0.02), ("int4", 0.98)))
    cfg = CompressedEmbeddingBagConfig(name="t", num_embeddings=1000, embedding_dim=64,
                                       feature_names=["f"], compression=spec)
    table = build_table(cfg, SparseOptimizerSpec("rowwise_adagrad", lr=0.05))
    table.record_labels(ids, offsets, labels)   # each training step, before forward
    table(ids, offsets).sum().backward()          # lookup; backward updates the rows
    table.step_end()                              # priorities, and every retier_every steps re-tiering
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torchrec.modules.embedding_configs import PoolingType

from torchrec_shark.modules.base import SparseOptimizerSpec, TableInputError, all_finite
from torchrec_shark.modules.buffer_source import allocate
from torchrec_shark.modules.kernels.host import numpy_path
from torchrec_shark.modules.kernels.lookup import bag_of_ids
from torchrec_shark.modules.quantization import ROUNDING_MODES, CounterNoise
from torchrec_shark.modules.row_store import (
    PRECISIONS,
    MemberCounter,
    RowStoreKind,
    RowStoreTable,
    precision_rank,
    seed_or_default,
    source_precision_ranks,
    tier_sizes,
)
from torchrec_shark.modules.table_kind import StateReader


@dataclass(frozen=True)
class Tier:
    """One precision tier of a mixed-precision table: its precision and the fraction of rows it holds."""

    precision: str
    fraction: float


@dataclass(frozen=True)
class MixedPrecision:
    """Per-row precision by label-weighted priority (SHARK's F-Quantization, with deeper tiers).

    ``tiers``: most precise first, fractions summing to 1 (``(precision, fraction)`` pairs are accepted).
    The default is the SHARK paper's fp32 / fp16 / int8 split.
    """

    tiers: Tuple[Tier, ...] = (Tier("fp32", 0.10), Tier("fp16", 0.30), Tier("int8", 0.60))
    decay: float = 0.99
    pos_weight: float = 1.0
    neg_weight: float = 0.25
    retier_every: int = 100
    rounding: str = "stochastic"  # stochastic | nearest
    # The first tier holds at least this many rows of every table, all of a smaller one: a small table's rows
    # are all hot, and a fraction of it would leave hot rows in the coarse tiers. A shard holds its share.
    hot_rows: int = 0

    def __post_init__(self) -> None:
        tiers = tuple(t if isinstance(t, Tier) else Tier(*t) for t in self.tiers)
        object.__setattr__(self, "tiers", tuple(Tier(t.precision, float(t.fraction)) for t in tiers))
        names = [t.precision for t in self.tiers]
        if not names or any(p not in PRECISIONS for p in names):
            raise ValueError(f"MixedPrecision.tiers precisions {names} must be among {list(PRECISIONS)}")
        ranks = [precision_rank(p) for p in names]
        if ranks != sorted(set(ranks)):
            raise ValueError(f"MixedPrecision.tiers {names} must be distinct precisions, most precise first "
                             f"(order {list(PRECISIONS)})")
        fractions = [t.fraction for t in self.tiers]
        if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"MixedPrecision.tiers fractions {fractions} must be >= 0 and sum to 1")
        if self.rounding not in ROUNDING_MODES:
            raise ValueError(f"MixedPrecision.rounding={self.rounding!r} must be one of {list(ROUNDING_MODES)}")
        if self.retier_every < 1:
            raise ValueError(f"MixedPrecision.retier_every={self.retier_every} must be >= 1")
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"MixedPrecision.decay={self.decay} must be in [0, 1]")
        if self.hot_rows < 0:
            raise ValueError(f"MixedPrecision.hot_rows={self.hot_rows} must be >= 0")

    @property
    def precisions(self) -> Tuple[str, ...]:
        return tuple(t.precision for t in self.tiers)

    def sizes(self, rows: int, table_rows: Optional[int] = None, row_start: int = 0) -> List[int]:
        """Rows per tier of a table (or of the shard of ``rows`` rows from ``row_start`` of a table of
        ``table_rows`` rows): the fractions, with at least ``hot_rows`` in the first tier (all of a smaller
        table); the other tiers share the rest in proportion to their fractions. A shard holds its part of the
        table's sizes (:func:`shard_tier_sizes`): the shards of a table add up to the table's sizes exactly,
        however it is split, so a checkpoint resharded to any world size keeps every row's tier."""
        table_rows = rows if table_rows is None else table_rows
        whole = self._table_sizes(table_rows)
        if row_start == 0 and rows == table_rows:
            return whole
        return shard_tier_sizes(whole, row_start, rows)

    def _table_sizes(self, rows: int) -> List[int]:
        fractions = [t.fraction for t in self.tiers]
        sizes = tier_sizes(fractions, rows)
        first = min(rows, self.hot_rows)
        if sizes[0] >= first:
            return sizes
        rest = fractions[1:]
        total = sum(rest)
        rest = [f / total for f in rest] if total > 0 else [1.0 / len(rest)] * len(rest)
        return [first, *tier_sizes(rest, rows - first)]


def _leading_tier_sizes(sizes: Sequence[int], rows: int) -> List[int]:
    """Tier sizes of the first ``rows`` rows of a table of tier ``sizes``: tier 0 takes its share of them,
    tier 1 its share of the tiers after tier 0 of what is left, and so on (integer floors). Every count is
    non-decreasing in ``rows`` (a floor of a fraction <= 1 of a non-decreasing count) and the whole table
    gives ``sizes`` back."""
    out, left_rows, left = [], sum(sizes), rows
    for size in sizes[:-1]:
        count = left * size // left_rows if left_rows else 0
        out.append(count)
        left -= count
        left_rows -= size
    return out + [left]


def shard_tier_sizes(sizes: Sequence[int], row_start: int, rows: int) -> List[int]:
    """Tier sizes of rows ``[row_start, row_start + rows)`` of a table of tier ``sizes``: the difference of
    the leading counts at its two ends, so the shards of any split add up to ``sizes`` exactly and each
    shard's sizes add up to its rows.

    Example::

        shard_tier_sizes([3, 9, 18], 0, 15), shard_tier_sizes([3, 9, 18], 15, 15)   # [1, 4, 10], [2, 5, 8]
    """
    a, b = _leading_tier_sizes(sizes, row_start), _leading_tier_sizes(sizes, row_start + rows)
    return [y - x for x, y in zip(a, b)]


# Priorities are kept in bfloat16 (2 bytes a row: only their order matters) and every update is rounded
# stochastically, so a small count added to a large priority still moves it by the right amount on average.
PRIORITY_DTYPE = torch.bfloat16
_PRIORITY_NOISE_SALT = 0x5851F42D4C957F2D


def added_by_row(priority: torch.Tensor, rows: torch.Tensor, contrib: torch.Tensor, rows_sorted: bool = False):
    """``(uniq, total)``: the distinct ``rows`` and ``priority[uniq]`` plus the sum of each one's ``contrib``, in fp32.
    ``rows_sorted``: ``rows`` are ascending already (repeats next to each other), so the distinct rows are
    found without a sort. Each row's contributions are added in their order in ``rows`` either way."""
    if rows_sorted:
        new = torch.ones(rows.numel(), dtype=torch.bool, device=rows.device)
        torch.ne(rows[1:], rows[:-1], out=new[1:])
        uniq, inverse = rows[new], torch.cumsum(new, 0) - 1
    elif numpy_path(rows):
        uniq, inverse = np.unique(rows.numpy(), return_inverse=True)
        uniq, inverse = torch.from_numpy(uniq), torch.from_numpy(inverse.reshape(-1))
    else:
        uniq, inverse = torch.unique(rows, return_inverse=True)
    total = torch.zeros(uniq.numel(), device=rows.device).index_add_(0, inverse, contrib.float())
    return uniq, total + priority.index_select(0, uniq).float()


def _descending_bf16_keys(values: torch.Tensor) -> np.ndarray:
    """uint16 keys of bfloat16 ``values`` (CPU) in the values' descending order (-0 as +0)."""
    bits = values.reshape(-1).view(torch.int16).numpy().view(np.uint16)
    # keys in the values' ascending order: negatives' bits flipped, positives' sign bit set, -0 as +0
    key = np.where(bits & 0x8000, ~bits, bits | 0x8000).astype(np.uint16)
    key[bits == 0x8000] = 0x8000
    return np.invert(key, out=key)


def descending_bf16_order(values: torch.Tensor) -> torch.Tensor:
    """Indices of bfloat16 ``values`` (CPU), largest first, ties in index order: what a stable descending
    ``torch.sort`` gives. A bf16 value has 16 bits, so the sort is numpy's stable sort of 16-bit keys, a radix
    sort: several times faster than a comparison sort of 10^6 values."""
    return torch.from_numpy(np.argsort(_descending_bf16_keys(values), kind="stable"))


def descending_bf16_ranks_past(values: torch.Tensor, ends: Sequence[int]) -> torch.Tensor:
    """Per bfloat16 value (CPU): how many of ``ends`` (ascending) its rank is at or past, ranking the values
    largest first with ties in index order (as :func:`descending_bf16_order` orders them). Re-tiering needs
    only which tier each row falls in, not an order: a histogram of the 16-bit keys finds the key at each
    tier end, and only the rows holding that very key are ranked among themselves (by index)."""
    key = _descending_bf16_keys(values)
    before = np.concatenate([[0], np.cumsum(np.bincount(key, minlength=1 << 16))])  # rows with a smaller key
    out = np.zeros(key.size, dtype=np.int8)
    for end in ends:
        if end >= key.size:
            continue
        v = int(np.searchsorted(before, end, side="right")) - 1  # the key of the row ranked ``end``
        out += key > v
        tied = np.flatnonzero(key == v)
        out[tied[end - int(before[v]):]] += 1
    return torch.from_numpy(out)


def _round_to_bf16(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16, stochastically: 16 uniform bits added to the fp32 pattern, the low 16 bits dropped."""
    bits = x.float().contiguous().view(torch.int32) + noise.to(torch.int32).bitwise_and_(0xFFFF)
    return bits.bitwise_and_(~0xFFFF).view(torch.float32).to(PRIORITY_DTYPE)


class MixedPrecisionTable(RowStoreTable):
    """Rows in the spec's tiers by label-weighted priority.

    Storage: one pool per tier, ``<precision>_rows`` (sizes fixed by the spec's fractions), ``row_slot``
    (int32, tier and slot of each row) and ``priority`` (bfloat16 per row).

    Priority: ``P_t = decay * P_{t-1} + pos_weight * n_pos + neg_weight * n_neg`` for every row at every
    :meth:`step_end`, with ``n_pos``/``n_neg`` the positive/negative samples of that step whose bag holds
    the row (:meth:`record_labels`). Kept lazily: the buffer ``priority`` holds ``Q = P / decay**age``
    so a step only touches the rows it saw (``Q[r] += c_r / decay**(age + 1)``), and ``Q`` is rescaled
    to ``P`` (``age = 0``) at every re-tiering and before ``decay**-age`` could lose range.
    :meth:`priorities` returns ``P``.

    Re-tiering (every ``retier_every`` steps): rows sorted by priority, descending, ties by row id, cut
    at the tier sizes; only rows whose tier changes move (:meth:`RowStoreTable.move_rows`). Optimizer
    state is indexed by row id, so it stays with the row.
    """

    _RESCALE_LIMIT = 2.0**20  # rescale Q before decay**-(age + 1) exceeds this

    def __init__(self, config, optimizer: SparseOptimizerSpec = SparseOptimizerSpec(), device=None, *,
                 row_start: int = 0, rows: Optional[int] = None, seed: Optional[int] = None,
                 pooling: Optional[PoolingType] = None) -> None:
        spec: MixedPrecision = config.compression
        n = int(config.num_embeddings) if rows is None else int(rows)
        tiers = list(zip(spec.precisions, spec.sizes(n, config.num_embeddings, row_start)))
        super().__init__(config, optimizer, device, tiers, spec.rounding, row_start, seed_or_default(config, seed),
                         pooling)
        device = self._pool(0).device
        self.spec = spec
        self.register_buffer("priority", allocate("priority", (n,), PRIORITY_DTYPE, device, ("rows",)))
        self.register_buffer("priority_age", allocate("priority_age", (), torch.int64, device, ("scalar",)))
        self.register_buffer("step", allocate("step", (), torch.int64, device, ("scalar",)))
        self._own_age = self._own_step = 0  # mirrors of the two buffers (no tensor reads per step)
        self._lazy = 1.0 / self._RESCALE_LIMIT <= spec.decay <= 1.0
        self._pending: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self.init_rows(config)

    _age = MemberCounter("_own_age", "age")
    _step = MemberCounter("_own_step", "steps")

    @classmethod
    def fused_store_type(cls):
        from torchrec_shark.modules.fused_priorities import FusedMixedPrecisionStore

        return FusedMixedPrecisionStore

    def loader(self) -> "MixedPrecisionKind":
        return MixedPrecisionKind()

    # ------------------------------------------------------------------ priorities
    def record_labels(self, ids: torch.Tensor, offsets: torch.Tensor, labels: torch.Tensor) -> None:
        """Count this step's positive/negative samples per row; applied at :meth:`step_end`.

        Bag ``b`` is ``ids[offsets[b]:offsets[b+1]]`` and ``labels[b]`` its sample's label
        (0/1; a soft label in [0, 1] counts fractionally). A row counts once per bag, however
        often the bag holds it, so pass one bag per *sample* (the collection merges the bags of
        features that share a table).

        Row-wise sharding: the counts are a sum over (row, sample) pairs, so each rank can
        count exactly the pairs whose row it owns, provided it sees every sample that touched
        those rows. TorchRec's RW input dist already sends every id to its owner with the bag
        structure of the *global* batch; a sharded collection gives each bag its label by
        all-gathering the ``B`` labels (in rank order, matching the global bag order), then calls
        this with local ids. Nothing here needs rows from other ranks.
        """
        self.check_ids(ids)
        labels = labels.reshape(-1).float()
        if labels.numel() != offsets.numel() - 1:
            raise TableInputError(
                f"table {self.name!r}: {labels.numel()} labels for {offsets.numel() - 1} bags"
            )
        if not all_finite(labels):
            raise TableInputError(f"table {self.name!r}: labels contain NaN or inf")
        n = ids.numel()
        if n == 0:
            return
        offsets = offsets.long()
        ids = ids.reshape(-1).long()
        bag = bag_of_ids(offsets, n)
        if n > labels.numel() or int((offsets[1:] - offsets[:-1]).max()) > 1:  # a row counts once per bag
            key = torch.unique(bag * self.num_embeddings + ids)
            ids, bag = key % self.num_embeddings, key // self.num_embeddings
        per_bag = labels * (self.spec.pos_weight - self.spec.neg_weight) + self.spec.neg_weight
        self._pending.append((ids, per_bag.index_select(0, bag)))

    def priorities(self) -> torch.Tensor:
        """Current ``P`` per row, fp32 ``[N]``."""
        return self.priority.float() * (self.spec.decay**self._age)

    def _set_age(self, age: int) -> None:
        self._age = age
        self.priority_age.fill_(age)

    def _rescale(self) -> None:
        if self._age:
            self.priority.copy_(self.priorities())
            self._set_age(0)

    def _add_priority(self, rows: torch.Tensor, contrib: torch.Tensor) -> None:
        """``priority[rows] += contrib`` (rows may repeat), each touched row rounded once, stochastically,
        with bits that depend on the row's global id and the step (the same under any sharding)."""
        uniq, total = added_by_row(self.priority, rows, contrib)
        noise = CounterNoise(self.seed ^ _PRIORITY_NOISE_SALT, self._step, uniq + self.row_start)
        self.priority.index_copy_(0, uniq, _round_to_bf16(total, noise.int16((uniq.numel(), 1)).reshape(-1)))

    @torch.no_grad()
    def step_end(self) -> None:
        """Close a training step: fold in its label counts, decay, and re-tier when due."""
        decay = self.spec.decay
        rows = contrib = None
        if self._pending:
            rows = torch.cat([r for r, _ in self._pending])
            contrib = torch.cat([c for _, c in self._pending])
            self._pending = []
        if self._lazy:
            if rows is not None:
                self._add_priority(rows, contrib * decay ** -(self._age + 1))
            self._set_age(self._age + 1)
            if decay ** -(self._age + 1) > self._RESCALE_LIMIT:
                self._rescale()
        else:
            self.priority.mul_(decay)
            if rows is not None:
                self._add_priority(rows, contrib)
        self._step += 1
        self.step.fill_(self._step)
        if self._step % self.spec.retier_every == 0:
            self.retier()

    def sync_state(self) -> None:
        super().sync_state()
        if not self.is_meta:
            self._rescale()  # exported priorities are P itself (age 0), whatever the layout that loads them

    def loaded(self) -> None:
        super().loaded()
        if not self.is_meta:
            self._age, self._step = int(self.priority_age), int(self.step)
        self._pending = []

    # ------------------------------------------------------------------ re-tiering
    def priority_order(self) -> torch.Tensor:
        """Every row, highest priority first (ties by row id)."""
        if numpy_path(self.priority) and self.priority.dtype == torch.bfloat16:
            return descending_bf16_order(self.priority)
        return torch.sort(self.priority.float(), descending=True, stable=True).indices

    @torch.no_grad()
    def retier(self) -> int:
        """Re-assign tiers by priority now; returns how many rows moved."""
        if not self.slotted:
            return 0
        self._rescale()
        if numpy_path(self.priority) and self.priority.dtype == torch.bfloat16:
            ends = [start + count for _, start, count in self._tiers[:-1]]
            return self.move_rows(descending_bf16_ranks_past(self.priority, ends))
        return self.move_rows(self.target_tiers(self.priority_order()))


class MixedPrecisionKind(RowStoreKind):
    """Mixed-precision tables: ``tables.compression.kind=mixed_precision``, settings (tiers, priority,
    re-tiering) in ``tables.compression.mixed_precision``. Label-aware: the collections gather and record
    labels only for these."""

    names = ("mixed_precision",)
    spec_type = MixedPrecision
    config_section = "mixed_precision"
    table_class = MixedPrecisionTable
    label_aware = True
    row_buffers = {"priority": ((), PRIORITY_DTYPE)}
    scalar_buffers = ("priority_age", "step", "update_count")

    def tier_list(self, config, rows: int, row_start: int = 0) -> List[Tuple[str, int]]:
        spec: MixedPrecision = config.compression
        return list(zip(spec.precisions, spec.sizes(rows, config.num_embeddings, row_start)))

    def example_spec(self):
        every = tuple(Tier(p, 1.0 / len(PRECISIONS)) for p in PRECISIONS[:-1])
        return MixedPrecision(tiers=(*every, Tier(PRECISIONS[-1], 1.0 - sum(t.fraction for t in every))),
                              retier_every=2)

    def load_layout(self, table, reader: StateReader, row_start: int) -> None:
        """Saved priorities first, then the layout: each row keeps its saved precision where the tier sizes
        allow (more precise first), then by priority, then by row id."""
        keys = set(reader.keys())
        n = table.num_embeddings
        if "priority" in keys:
            for a, v in reader.chunks("priority", row_start, n):
                table.priority[a - row_start : a - row_start + v.shape[0]].copy_(v.to(PRIORITY_DTYPE))
        ranks = source_precision_ranks(reader, row_start, n)
        if ranks is None and "priority" not in keys:
            return
        table._set_age(0)
        table._pending = []
        order = table.priority_order()
        if ranks is not None:
            ranks = ranks.to(order.device, torch.int64)
            order = order.index_select(0, torch.sort(ranks.index_select(0, order), stable=True).indices)
        table.assign_tiers(order)


def three_tier(fp32: float, fp16: float, **kwargs) -> MixedPrecision:
    """SHARK's three tiers: ``fp32`` and ``fp16`` fractions, int8 the rest."""
    return MixedPrecision(tiers=(Tier("fp32", fp32), Tier("fp16", fp16), Tier("int8", 1.0 - fp32 - fp16)), **kwargs)

