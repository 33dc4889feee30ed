"""Row-store tables: plain fp32, uniform fp16/int8, and SHARK's per-row mixed precision.

All three kinds share one engine, :class:`RowStoreTable`: rows live in one or more
*precision tiers* (an fp32, fp16 or int8 pool, see :mod:`torchrec_shark.modules.quantization`);
a lookup dedupes the batch's ids, decodes only those rows (vectorised per tier) and pools
them; backward sums each row's gradient, runs the fused sparse optimizer on those rows
(:class:`~torchrec_shark.modules.kernels.sparse_optimizer.RowOptimizer`) and re-encodes them in
their tier (stochastic rounding by default, so the expected stored value is the exact
update). There is no fp32 master copy and no ``nn.Parameter``: storage and optimizer state
are buffers, so DDP and dense optimizers never see them.

* :class:`Fp32Table` (``compression=None``): one fp32 pool named ``weight``, initialised by
  the config's ``init_fn`` exactly as ``torchrec.EmbeddingBagCollection`` does.
* :class:`UniformTable` (:class:`~torchrec_shark.modules.specs.Uniform`): every row fp16, or int8.
* :class:`MixedPrecisionTable` (:class:`~torchrec_shark.modules.specs.MixedPrecision`): three
  pools of fixed sizes and a row -> slot map; rows move between tiers by label-weighted
  priority every ``retier_every`` steps.

Example::

    cfg = CompressedEmbeddingBagConfig(name="t", num_embeddings=1000, embedding_dim=64,
                                       feature_names=["f"], compression=MixedPrecision())
    table = build_table(cfg, SparseOptimizerSpec("rowwise_adagrad", lr=0.05))
    table.record_labels(ids, offsets, labels)   # each training step, before forward
    table(ids, offsets).sum().backward()          # lookup; backward updates the rows
    table.step_end()                              # priorities, and every retier_every steps re-tiering
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torchrec.modules.embedding_configs import PoolingType

from torchrec_shark.modules.base import (
    CompressedTable,
    SparseOptimizerSpec,
    TableInputError,
    all_finite,

)
from torchrec_shark.modules.kernels.lookup import RowIndex, bag_of_ids, pooled_lookup, row_index
from torchrec_shark.modules.kernels.sparse_optimizer import RowOptimizer
from torchrec_shark.modules.quantization import CODECS, ROUNDING_MODES, CounterNoise, Fp32Codec, Int8Codec
from torchrec_shark.modules.table_kind import (
    CHUNK_ROWS,
    DictStateReader,
    PieceSpec,
    StateReader,
    TableKind,
    draws_initial_values,
    init_blocks,
    register_table_kind,
    table_seed,
)
from torchrec_shark.modules.specs import MixedPrecision, Uniform

TIERS = ("fp32", "fp16", "int8")  # tier id = position; lower id = higher precision
_INIT_CHUNK_ROWS = 1 << 16



class RowStoreTable(CompressedTable):
    """Rows in precision tiers with a fused sparse optimizer; the engine of every row-store kind.

    Subclasses choose the tiers (``tiers``: ``(tier name, number of rows)``, their pools are
    buffers ``pool_names``) and, when there is more than one, how rows map onto storage
    slots (:meth:`slots_of`). Everything else (lookup, update, validation, byte accounting,
    logical export) is shared.
    """

    def __init__(
        self,
        config,
        optimizer: SparseOptimizerSpec,
        device: Optional[torch.device],
        tiers: Sequence[Tuple[str, int]],
        pool_names: Sequence[str],
        rounding: str = "stochastic",
        row_start: int = 0,
        seed: int = 0,
        pooling: Optional[PoolingType] = None,
    ) -> None:
        super().__init__()
        pooling = config.pooling if pooling is None else pooling
        if pooling not in (PoolingType.SUM, PoolingType.MEAN):
            raise ValueError(f"table {config.name!r}: pooling {pooling} is not supported (SUM or MEAN)")
        if rounding not in ROUNDING_MODES:
            raise ValueError(f"table {config.name!r}: rounding={rounding!r} must be one of {ROUNDING_MODES}")
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
        self.version = 0  # bumped on every write; a lookup's cached rows are reused only if unchanged
        self.updates = 0  # optimizer updates applied: the step of the stochastic-rounding noise
        # Puts lookups in the autograd graph; its gradient is never computed (not a parameter).
        self._anchor = torch.empty(0, requires_grad=True)
        self._tiers: List[Tuple[str, int, int]] = []  # (tier name, first global slot, rows)
        self._pool_names: List[str] = list(pool_names)
        start = 0
        for (tier, count), pool in zip(tiers, pool_names):
            codec = CODECS[tier]
            self.register_buffer(
                pool, torch.zeros(count, codec.width(self.embedding_dim), dtype=codec.dtype, device=device)
            )
            self._tiers.append((tier, start, count))
            start += count
        self.optim = RowOptimizer(optimizer, self.num_embeddings, self.embedding_dim, device)

    @property
    def is_meta(self) -> bool:
        return self._pool(0).device.type == "meta"

    # ------------------------------------------------------------------ storage
    def _pool(self, k: int) -> torch.Tensor:
        return getattr(self, self._pool_names[k])

    def slots_of(self, rows: torch.Tensor) -> torch.Tensor:
        """Global storage slot of each row (tier ``k`` owns slots ``[start_k, start_k + n_k)``)."""
        return rows

    def tier_bounds(self, sorted_slots: torch.Tensor) -> List[int]:
        """``[0, end of tier 0, ..., len]``: the run of each tier in ascending ``sorted_slots``."""
        starts = [start for _, start, _ in self._tiers[1:]]
        if not starts:
            return [0, sorted_slots.numel()]
        cuts = torch.searchsorted(sorted_slots, torch.tensor(starts, dtype=sorted_slots.dtype)).tolist()
        return [0, *cuts, sorted_slots.numel()]

    def _runs(self, index: RowIndex):
        """``(tier id, codec, pool, first, last, slots in pool)`` per non-empty tier run of ``index``."""
        b = index.bounds
        for k, (tier, start, _) in enumerate(self._tiers):
            if b[k + 1] > b[k]:
                seg = index.slots[b[k] : b[k + 1]]
                yield k, CODECS[tier], self._pool(k), b[k], b[k + 1], seg - start if start else seg

    def gather(self, index: RowIndex) -> torch.Tensor:
        """fp32 values of ``index.slots``, ``[U, D]`` (only these rows are decoded)."""
        out = torch.empty(index.slots.numel(), self.embedding_dim, device=self._pool(0).device)
        for _, codec, pool, a, b, seg in self._runs(index):
            if codec is Fp32Codec:
                torch.index_select(pool, 0, seg, out=out[a:b])
            else:
                out[a:b] = codec.decode(pool.index_select(0, seg))
        return out

    def _scatter(self, index: RowIndex, values: torch.Tensor, rounding: str) -> None:
        for _, codec, pool, a, b, seg in self._runs(index):
            noise = None
            if rounding == "stochastic" and codec is not Fp32Codec:
                rows = index.rows[a:b]
                noise = CounterNoise(self.seed, self.updates, rows + self.row_start if self.row_start else rows)
            pool.index_copy_(0, seg, codec.encode(values[a:b], rounding, noise))
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
        self.check_lookup(ids, offsets, per_sample_weights)
        return pooled_lookup(self, ids, offsets, per_sample_weights, self.pooling == PoolingType.MEAN, self._anchor)

    # ------------------------------------------------------------------ contract
    def full_weight(self) -> torch.Tensor:
        return self.read_rows(torch.arange(self.num_embeddings, device=self._pool(0).device))

    def optimizer_state(self) -> Dict[str, torch.Tensor]:
        return self.optim.state()

    def set_learning_rate(self, lr: float) -> None:
        self.optim.lr = float(lr)

    def tier_counts(self) -> Dict[str, int]:
        return {tier: count for tier, _, count in self._tiers}

    def tier_of_rows(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tier id (0 fp32, 1 fp16, 2 int8) of ``rows`` (default: all), int8."""
        tier = TIERS.index(self._tiers[0][0])
        n = self.num_embeddings if rows is None else rows.numel()
        return torch.full((n,), tier, dtype=torch.int8, device=self._pool(0).device)

    def memory_bytes(self) -> Dict[str, int]:
        """Bytes of every buffer except optimizer state, by part; ``total`` is their sum."""
        parts: Dict[str, int] = {}
        for name, buf in self.named_buffers():
            if name.startswith("optim."):
                continue
            nbytes = buf.numel() * buf.element_size()
            if name in self._pool_names:
                tier = self._tiers[self._pool_names.index(name)][0]
                if tier == "int8":
                    sb = buf.shape[0] * Int8Codec.SCALE_BIAS_BYTES
                    parts["int8_codes"] = parts.get("int8_codes", 0) + nbytes - sb
                    parts["int8_scale_bias"] = parts.get("int8_scale_bias", 0) + sb
                else:
                    parts[f"{tier}_rows"] = parts.get(f"{tier}_rows", 0) + nbytes
            else:
                parts[name] = parts.get(name, 0) + nbytes
        parts["total"] = sum(parts.values())
        return parts

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        self.sync_state()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def sync_state(self) -> None:
        """Bring the exported buffers up to date with the table's plain attributes (before any export)."""
        if hasattr(self, "update_count") and not self.is_meta:
            self.update_count.fill_(self.updates)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.loaded()

    def loaded(self) -> None:
        """Re-read the plain attributes from the buffers after they were written (a load)."""
        self.version += 1
        if hasattr(self, "update_count") and not self.is_meta:
            self.updates = int(self.update_count)

    # ------------------------------------------------------------------ logical (layout-free) state
    def logical_state_dict(self) -> Dict[str, torch.Tensor]:
        """Per-row state independent of the storage layout, every tensor indexed by row id.

        ``weight`` (fp32 values), ``tier`` and every row-indexed optimizer state tensor as
        ``optim.<name>``; scalar optimizer state as well. A row-wise resharding slices these
        by row range and loads each slice with :meth:`load_logical_state_dict`.
        """
        out = {"weight": self.full_weight(), "tier": self.tier_of_rows()}
        out.update({f"optim.{k}": v.clone() for k, v in self.optim.state().items()})
        return out

    @torch.no_grad()
    def load_logical_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`logical_state_dict` (values are re-encoded with nearest rounding)."""
        rows = torch.arange(self.num_embeddings, device=self._pool(0).device)
        self._load_logical_layout(state)
        self.write_rows(rows, state["weight"], rounding="nearest")
        for k, v in self.optim.state().items():
            v.copy_(state[f"optim.{k}"])

    def _load_logical_layout(self, state: Dict[str, torch.Tensor]) -> None:
        """Restore the row -> tier layout (tiered subclasses)."""


def _seed_of(config, seed: Optional[int]) -> int:
    return table_seed(torch.initial_seed(), config.name) if seed is None else int(seed)


def mixed_precision_tier_sizes(spec: MixedPrecision, rows: int) -> Tuple[int, int, int]:
    """``(n32, n16, n8)``: the fixed tier sizes of a mixed-precision table (or shard) of ``rows`` rows."""
    n32 = int(round(spec.fp32_fraction * rows))
    n16 = int(round((spec.fp32_fraction + spec.fp16_fraction) * rows)) - n32
    n16 = max(0, min(n16, rows - n32))
    return n32, n16, rows - n32 - n16


class Fp32Table(RowStoreTable):
    """A stock fp32 table (``compression=None``) on the shared engine.

    The pool is the buffer ``weight``: the same state-dict key and shape as
    ``EmbeddingBagCollection``'s parameter, and the module's only state-dict entry (the
    optimizer state is the fused optimizer's, as with TBE).
    """

    def __init__(self, config, optimizer: SparseOptimizerSpec = SparseOptimizerSpec(), device=None, *,
                 row_start: int = 0, rows: Optional[int] = None, seed: Optional[int] = None,
                 pooling: Optional[PoolingType] = None) -> None:
        rows = int(config.num_embeddings) if rows is None else int(rows)
        super().__init__(config, optimizer, device, [("fp32", rows)], ["weight"], "nearest", row_start,
                         _seed_of(config, seed), pooling)
        self.init_rows(config)


class UniformTable(RowStoreTable):
    """Every row in one precision (``Uniform.dtype``: fp16, or int8 with row-wise fp16 scale/bias)."""

    def __init__(self, config, optimizer: SparseOptimizerSpec = SparseOptimizerSpec(), device=None, *,
                 row_start: int = 0, rows: Optional[int] = None, seed: Optional[int] = None,
                 pooling: Optional[PoolingType] = None) -> None:
        spec: Uniform = config.compression
        rows = int(config.num_embeddings) if rows is None else int(rows)
        super().__init__(config, optimizer, device, [(spec.dtype, rows)], ["weight"], spec.rounding, row_start,
                         _seed_of(config, seed), pooling)
        self.register_buffer("update_count", torch.zeros((), dtype=torch.int64, device=device))
        self.init_rows(config)


class MixedPrecisionTable(RowStoreTable):
    """SHARK F-Quantization: each row in fp32, fp16 or int8 by its label-weighted priority.

    Storage: pools ``fp32_rows [n32, D]``, ``fp16_rows [n16, D]``, ``int8_rows [n8, D + 4]``
    (sizes fixed by the spec's fractions, ``n32 + n16 + n8 = N``), and ``row_slot [N]`` int32:
    a row's *global slot*, the fp32 slots first, then fp16, then int8, so one int32 encodes
    both tier and slot.

    Priority: ``P_t = decay * P_{t-1} + pos_weight * n_pos + neg_weight * n_neg`` for every row
    at every :meth:`step_end`, with ``n_pos``/``n_neg`` the positive/negative samples of that
    step whose bag holds the row (:meth:`record_labels`). Kept lazily and exactly: the buffer
    ``priority`` holds ``Q = P / decay**age`` so a step only touches the rows it saw
    (``Q[r] += c_r / decay**(age + 1)``), and ``Q`` is rescaled to ``P`` (``age = 0``) at every
    re-tiering and before ``decay**-age`` could lose range. :meth:`priorities` returns ``P``.

    Re-tiering (every ``retier_every`` steps): rows sorted by priority, descending, ties by
    row id; the first ``n32`` go to fp32, the next ``n16`` to fp16, the rest to int8. Only
    rows whose tier changes move: each is decoded and re-encoded (nearest rounding: a one-off
    move should add the least error) into a slot another mover vacated. Optimizer state is
    indexed by row id, so it stays with the row.
    """

    _RESCALE_LIMIT = 2.0**20  # rescale Q before decay**-(age + 1) exceeds this

    def __init__(self, config, optimizer: SparseOptimizerSpec = SparseOptimizerSpec(), device=None, *,
                 row_start: int = 0, rows: Optional[int] = None, seed: Optional[int] = None,
                 pooling: Optional[PoolingType] = None) -> None:
        spec: MixedPrecision = config.compression
        n = int(config.num_embeddings) if rows is None else int(rows)
        n32, n16, n8 = mixed_precision_tier_sizes(spec, n)
        super().__init__(
            config,
            optimizer,
            device,
            [("fp32", n32), ("fp16", n16), ("int8", n8)],
            ["fp32_rows", "fp16_rows", "int8_rows"],
            spec.rounding,
            row_start,
            _seed_of(config, seed),
            pooling,
        )
        self.spec = spec
        self._bounds = (n32, n32 + n16)
        slot_dtype = torch.int32 if n < 2**31 else torch.int64
        self.register_buffer("row_slot", torch.arange(n, dtype=slot_dtype, device=device))
        self.register_buffer("priority", torch.zeros(n, device=device))
        self.register_buffer("priority_age", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("update_count", torch.zeros((), dtype=torch.int64, device=device))
        self._age = self._step = 0  # mirrors of the two buffers (no tensor reads per step)
        self._lazy = 1.0 / self._RESCALE_LIMIT <= spec.decay <= 1.0
        self._pending: List[Tuple[torch.Tensor, torch.Tensor]] = []
        # Training traffic by tier and rows moved, since the last tier_activity(reset=True): shows
        # whether the hot rows really sit in the precise tiers (the tier sizes themselves are fixed).
        self._tier_hits = torch.zeros(len(TIERS), dtype=torch.int64, device=device)
        self._moves = 0
        self.init_rows(config)

    # ------------------------------------------------------------------ layout
    def _tier_of_slots(self, slots: torch.Tensor) -> torch.Tensor:
        b1, b2 = self._bounds
        return (slots >= b1).to(torch.int8) + (slots >= b2).to(torch.int8)

    def slots_of(self, rows: torch.Tensor) -> torch.Tensor:
        return self.row_slot.index_select(0, rows.reshape(-1).long())

    def tier_of_rows(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        slots = self.row_slot if rows is None else self.row_slot.index_select(0, rows)
        return self._tier_of_slots(slots)

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
        structure of the *global* batch; a sharded collection gives each bag its label either by
        all-gathering the ``B`` labels (in rank order, matching the global bag order) or by
        routing a per-id label through the same input dist as per-id weights, then calls this
        with local ids. Nothing here needs rows from other ranks.
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
        return self.priority * (self.spec.decay**self._age)

    def _set_age(self, age: int) -> None:
        self._age = age
        self.priority_age.fill_(age)

    def _rescale(self) -> None:
        if self._age:
            self.priority.mul_(self.spec.decay**self._age)
            self._set_age(0)

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
                self.priority.index_add_(0, rows, contrib * decay ** -(self._age + 1))
            self._set_age(self._age + 1)
            if decay ** -(self._age + 1) > self._RESCALE_LIMIT:
                self._rescale()
        else:
            self.priority.mul_(decay)
            if rows is not None:
                self.priority.index_add_(0, rows, contrib)
        if rows is not None:
            tiers = self._tier_of_slots(self.row_slot.index_select(0, rows)).long()
            self._tier_hits += torch.bincount(tiers, minlength=len(TIERS))
        self._step += 1
        self.step.fill_(self._step)
        if self._step % self.spec.retier_every == 0:
            self.retier()

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "shards"] = self.shard_record()  # the same keys as a sharded table's

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        record = state_dict.pop(prefix + "shards", None)
        if record is not None and not torch.equal(torch.as_tensor(record).reshape(-1, 5), self.shard_record()):
            # saved under another sharding: re-slice it for this table's rows
            present = {k[len(prefix):]: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix)}
            present["shards"] = record
            MixedPrecisionKind().load_state(self, DictStateReader(present), self.row_start)
            return
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def shard_record(self) -> torch.Tensor:
        """``[[row_start, rows, n32, n16, n8]]``: where this table's rows and pools sit in the whole table
        (one tensor for the table's life, so an in-place load into its export is recognised as such)."""
        if getattr(self, "_shard_record", None) is None:
            sizes = [n for _, _, n in self._tiers]
            self._shard_record = torch.tensor([[self.row_start, self.num_embeddings, *sizes]], dtype=torch.int64)
        return self._shard_record

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
    def _target_tiers(self, order: torch.Tensor) -> torch.Tensor:
        """Tier per row when rows are ranked by ``order`` (best first)."""
        b1, b2 = self._bounds
        target = torch.empty(self.num_embeddings, dtype=torch.int8, device=order.device)
        target[order[:b1]] = 0
        target[order[b1:b2]] = 1
        target[order[b2:]] = 2
        return target

    @torch.no_grad()
    def retier(self) -> int:
        """Re-assign tiers by priority now; returns how many rows moved.

        Movers are decoded :data:`CHUNK_ROWS` at a time and held encoded in their new tier until every
        mover has been read (a mover's new slot is one another mover vacates), so no more than a chunk
        of fp32 values exists at once however many rows move."""
        self._rescale()
        order = torch.sort(self.priority, descending=True, stable=True).indices
        target = self._target_tiers(order)
        del order
        current = self._tier_of_slots(self.row_slot)
        movers = (target != current).nonzero().squeeze(1)
        if movers.numel() == 0:
            return 0
        src, dst = current.index_select(0, movers), target.index_select(0, movers)
        del target, current
        encoded = []  # per chunk: its movers' values in their destination tiers' encodings
        for a in range(0, movers.numel(), CHUNK_ROWS):
            rows, to = movers[a : a + CHUNK_ROWS], dst[a : a + CHUNK_ROWS]
            values = self.read_rows(rows)
            encoded.append({k: CODECS[TIERS[k]].encode(values[to == k], "nearest") for k in range(len(self._tiers))})
        old_slots = self.row_slot.index_select(0, movers).long()
        new_slots = torch.empty_like(old_slots)
        for k in range(len(self._tiers)):
            leaving, arriving = (src == k).nonzero().squeeze(1), (dst == k).nonzero().squeeze(1)
            assert leaving.numel() == arriving.numel(), "tier sizes must be invariant"
            new_slots[arriving] = old_slots.index_select(0, leaving)
        self.row_slot[movers] = new_slots.to(self.row_slot.dtype)
        for i, a in enumerate(range(0, movers.numel(), CHUNK_ROWS)):
            slots, to = new_slots[a : a + CHUNK_ROWS], dst[a : a + CHUNK_ROWS]
            for k, (_, start, _) in enumerate(self._tiers):
                if encoded[i][k].shape[0]:
                    self._pool(k).index_copy_(0, slots[to == k] - start, encoded[i][k])
        self.version += 1
        self._moves += int(movers.numel())
        return int(movers.numel())

    def tier_activity(self, reset: bool = True) -> Dict[str, Dict[str, int]]:
        """Rows per tier, training lookups (sample-row pairs) served by each tier, and rows moved
        by re-tiering since the last reset.

        Example::

            table.tier_activity()  # {"rows": {"fp32": 10, ...}, "hits": {"fp32": 812, ...}, "moves": 37}
        """
        rows = {tier: 0 for tier in TIERS}
        rows.update(self.tier_counts())
        out = {"rows": rows, "hits": dict(zip(TIERS, (int(v) for v in self._tier_hits.tolist()))),
               "moves": self._moves}
        if reset:
            self._tier_hits.zero_()
            self._moves = 0
        return out

    # ------------------------------------------------------------------ logical state
    def logical_state_dict(self) -> Dict[str, torch.Tensor]:
        out = super().logical_state_dict()
        out["priority"] = self.priorities()
        return out

    def _load_logical_layout(self, state: Dict[str, torch.Tensor]) -> None:
        self.priority.copy_(state["priority"].to(self.priority))
        self.assign_tiers(state.get("tier"))

    @torch.no_grad()
    def assign_tiers(self, tier: Optional[torch.Tensor]) -> None:
        """Lay the rows out by tier: the given ``tier`` per row first (kept whenever the tier sizes
        allow), then the current priority, then row id, cut at this table's exact tier sizes; rows
        ascending within a tier. Only the layout changes (``row_slot``): write the values after."""
        self._set_age(0)
        self._pending = []
        order = torch.sort(self.priority, descending=True, stable=True).indices
        if tier is not None:
            tier = tier.to(device=order.device, dtype=torch.int64).index_select(0, order)
            order = order.index_select(0, torch.sort(tier, stable=True).indices)
        target = self._target_tiers(order)
        # slots: tier by tier, rows in ascending order
        by_tier = torch.sort(target.long() * self.num_embeddings + torch.arange(self.num_embeddings, device=order.device))
        slots = torch.empty_like(order)
        slots[by_tier.indices] = torch.arange(self.num_embeddings, device=order.device)
        self.row_slot.copy_(slots)


# ---------------------------------------------------------------------------- kinds
_WEIGHT_TIERS = {torch.float32: 0, torch.float16: 1, torch.uint8: 2}  # int8: codes + fp16 scale and bias


def _saved_tier_of_weight(t: torch.Tensor) -> int:
    """Tier id of a row-store ``weight`` tensor from its dtype (fp32, fp16, or int8 codes + scale/bias)."""
    if t.dtype not in _WEIGHT_TIERS:
        raise ValueError(f"a row-store weight of dtype {t.dtype} is not fp32, fp16 or int8 rows")
    return _WEIGHT_TIERS[t.dtype]


def source_row_batches(reader: StateReader, row_start: int, rows: int):
    """The saved rows ``[row_start, row_start + rows)`` of any row store, as
    ``(local rows, saved tier id, encoded rows)`` batches of at most :data:`CHUNK_ROWS` rows.

    A ``weight`` source (stock fp32, uniform fp16 / int8) comes in row order. A mixed-precision
    source (``shards``, ``row_slot`` and three pools) comes tier by tier in the order of its saved
    pools, so each saved pool window is read once whatever the sharding that saved it.
    """
    keys = set(reader.keys())
    if "weight" in keys:
        for a, enc in reader.chunks("weight", row_start, rows):
            yield torch.arange(a - row_start, a - row_start + enc.shape[0]), _saved_tier_of_weight(enc), enc
        return
    if not {"row_slot", *MIXED_POOLS} <= keys:
        raise ValueError(f"no row-store rows in a state with keys {sorted(keys)} (neither 'weight' nor "
                         f"mixed-precision pools)")
    shards = _saved_shards(reader)
    offsets = [0, 0, 0]
    for s0, sn, *sizes in shards:
        lo, hi = max(row_start, s0), min(row_start + rows, s0 + sn)
        if lo < hi:
            slots = torch.cat([c.long() for _, c in reader.chunks("row_slot", lo, hi - lo)])
            start = 0
            for k, pool in enumerate(MIXED_POOLS):
                sel = ((slots >= start) & (slots < start + sizes[k])).nonzero().squeeze(1)
                pos, order = torch.sort(slots.index_select(0, sel) - start)
                sel = sel.index_select(0, order)
                i, m = 0, pos.numel()
                while i < m:  # windows of the saved pool, each read once
                    w0 = int(pos[i])
                    j = int(torch.searchsorted(pos, w0 + CHUNK_ROWS))
                    window = reader.read(pool, offsets[k] + w0, int(pos[j - 1]) - w0 + 1)
                    yield sel[i:j] + (lo - row_start), k, window.index_select(0, pos[i:j] - w0)
                    i = j
                start += sizes[k]
        offsets = [o + n for o, n in zip(offsets, sizes)]


def source_tiers(reader: StateReader, row_start: int, rows: int) -> Optional[torch.Tensor]:
    """Saved tier id (int8) of each row of ``[row_start, row_start + rows)``, or ``None`` when the
    source has no per-row tiers (a stock or uniform table)."""
    if "row_slot" not in set(reader.keys()):
        return None
    out = torch.empty(rows, dtype=torch.int8)
    for s0, sn, n32, n16, _ in _saved_shards(reader):
        lo, hi = max(row_start, s0), min(row_start + rows, s0 + sn)
        for a, slots in (reader.chunks("row_slot", lo, hi - lo) if lo < hi else ()):
            slots = slots.long()
            out[a - row_start : a - row_start + slots.numel()] = (slots >= n32).to(torch.int8) + (slots >= n32 + n16).to(torch.int8)
    return out


MIXED_POOLS = ("fp32_rows", "fp16_rows", "int8_rows")


def _saved_shards(reader: StateReader) -> List[List[int]]:
    """``[row_start, rows, n32, n16, n8]`` of every saved shard (one for an unsharded table's state)."""
    if "shards" in set(reader.keys()):
        return reader.read("shards").long().tolist()
    return [[0, reader.size("row_slot")[0], *(reader.size(p)[0] for p in MIXED_POOLS)]]


class RowStoreKind(TableKind):
    """Row stores: tier pools (one for fp32 / uniform tables) plus row-indexed tensors.

    A shard's pool of tier ``k`` is the slice of the global pool at the sum of the lower shards'
    tier-``k`` sizes; every other tensor is indexed by row. Loading accepts any row store's state
    (stock ``weight``, uniform, mixed precision) and re-encodes rows only when their tier changes.
    """

    pool_names: Tuple[str, ...] = ("weight",)
    row_buffers: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}  # per-row extras: (trailing shape, dtype)
    scalar_buffers: Tuple[str, ...] = ()

    def tiers(self, config, rows: int) -> List[Tuple[str, int]]:
        raise NotImplementedError

    def build(self, config, optimizer, row_start, rows, device, seed, row_wise=False):
        return self.table_class(config, optimizer, device, row_start=row_start, rows=rows, seed=seed,
                                pooling=PoolingType.SUM if row_wise else None)

    def storage_bytes(self, config, optimizer, row_start, rows) -> Dict[str, int]:
        dim = int(config.embedding_dim)
        parts: Dict[str, int] = {}
        for tier, n in self.tiers(config, rows):
            codec = CODECS[tier]
            parts[f"{tier}_rows"] = parts.get(f"{tier}_rows", 0) + n * codec.width(dim) * codec.dtype.itemsize
        for name, (trail, dtype) in self.row_buffers.items():
            parts[name] = rows * math.prod(trail) * dtype.itemsize
        for name in self.scalar_buffers:
            parts[name] = 8
        parts["optimizer"] = RowOptimizer.state_bytes(optimizer, rows, dim)
        parts["total"] = sum(parts.values())
        return parts

    def state_layout(self, config, optimizer, ranges):
        n_rows, dim = int(config.num_embeddings), int(config.embedding_dim)
        per_range = [self.tiers(config, n) for _, n in ranges]
        totals = [sum(t[k][1] for t in per_range) for k in range(len(self.pool_names))]
        offsets = [0] * len(self.pool_names)
        out = []
        for j, ((r0, n), tiers) in enumerate(zip(ranges, per_range)):
            spec: Dict[str, PieceSpec] = {}
            for k, ((tier, cnt), pool) in enumerate(zip(tiers, self.pool_names)):
                codec = CODECS[tier]
                spec[pool] = PieceSpec((totals[k], codec.width(dim)), codec.dtype, offsets[k], cnt)
                offsets[k] += cnt
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
        out = {name: getattr(table, name) for name in (*self.pool_names, *self.row_buffers, *self.scalar_buffers)}
        out.update({f"optim.{k}": v for k, v in table.optim.state().items()})
        return out

    def unloadable(self, config, reader: StateReader, columns=None) -> Optional[str]:
        keys = set(reader.keys())
        if "weight" not in keys and not {"row_slot", *MIXED_POOLS} <= keys:
            return f"no row-store rows among the saved keys {sorted(keys)}"
        rows = reader.size("weight" if "weight" in keys else "row_slot")[0]
        if rows != config.num_embeddings:
            return f"{rows} saved rows, {config.num_embeddings} wanted"
        width = self.saved_width(reader)
        if columns is None and width != config.embedding_dim:
            return f"saved width {width}, {config.embedding_dim} wanted"
        if columns is not None and (len(columns) != config.embedding_dim or max(columns) >= width):
            return f"{len(columns)} columns (max {max(columns)}) cannot fill width {config.embedding_dim} from {width}"
        return None

    @staticmethod
    def saved_width(reader: StateReader) -> int:
        keys = set(reader.keys())
        key = "weight" if "weight" in keys else "fp32_rows"
        size = reader.size(key)
        if key == "weight" and reader.read(key, 0, 0).dtype != torch.uint8:
            return size[1]
        return size[1] - (Int8Codec.SCALE_BIAS_BYTES if key == "weight" else 0)

    @torch.no_grad()
    def load_state(self, table, reader: StateReader, row_start: int, columns=None) -> None:
        keys = set(reader.keys())
        n = table.num_embeddings
        self.load_layout(table, reader, row_start)
        tier_of_slot = table._tier_of_slots if hasattr(table, "_tier_of_slots") else None
        cols = None if columns is None else torch.as_tensor(list(columns), dtype=torch.long)
        for rows, saved_tier, enc in source_row_batches(reader, row_start, n):
            index = table.index_rows(rows)
            enc = enc.index_select(0, index.perm)
            if tier_of_slot is None:
                same = torch.full((rows.numel(),), table._tiers[0][0] == TIERS[saved_tier], dtype=torch.bool)
            else:
                same = tier_of_slot(index.slots) == saved_tier
            if cols is None and bool(same.all()):  # the stored bytes themselves: exact, no re-encoding
                for _, codec, pool, a, b, seg in table._runs(index):
                    pool.index_copy_(0, seg, enc[a:b].to(pool.dtype))
            else:
                values = CODECS[TIERS[saved_tier]].decode(enc)
                table._scatter(index, values if cols is None else values.index_select(1, cols), "nearest")
        for name in self.scalar_buffers:
            if name in keys:
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

    def load_layout(self, table, reader: StateReader, row_start: int) -> None:
        """Per-row layout state before the rows (tiered kinds)."""

    def cost_factor(self, config) -> float:
        dim = int(config.embedding_dim)
        rows = 1000
        read = sum(n * CODECS[t].width(dim) * CODECS[t].dtype.itemsize for t, n in self.tiers(config, rows)) / rows
        decoded = sum(n for t, n in self.tiers(config, rows) if t != "fp32") / rows
        extra = sum(math.prod(trail) * dt.itemsize for name, (trail, dt) in self.row_buffers.items() if name == "row_slot")
        return (read + extra + decoded * DECODE_FLOPS_PER_ELEMENT * dim / FLOPS_PER_BYTE) / (4.0 * dim)


# Machine balance assumed by the planner's perf model: flops a core completes in the time it streams one
# byte from memory, and the flops to decode (and re-encode after the update) one quantised element.
FLOPS_PER_BYTE = 4.0
DECODE_FLOPS_PER_ELEMENT = 2.0


class Fp32Kind(RowStoreKind):
    table_class = Fp32Table

    def tiers(self, config, rows):
        return [("fp32", rows)]

    def cost_factor(self, config) -> float:
        return 1.0


class UniformKind(RowStoreKind):
    table_class = UniformTable
    scalar_buffers = ("update_count",)

    def tiers(self, config, rows):
        return [(config.compression.dtype, rows)]


class MixedPrecisionKind(RowStoreKind):
    table_class = MixedPrecisionTable
    pool_names = MIXED_POOLS
    row_buffers = {"row_slot": ((), torch.int32), "priority": ((), torch.float32)}
    scalar_buffers = ("priority_age", "step", "update_count")

    def tiers(self, config, rows):
        return list(zip(TIERS, mixed_precision_tier_sizes(config.compression, rows)))

    def state_layout(self, config, optimizer, ranges):
        out = super().state_layout(config, optimizer, ranges)
        for j, spec in enumerate(out):  # where each shard's pools sit: lets a loader re-slice them by rows
            spec["shards"] = PieceSpec((len(ranges), 5), torch.int64, j, 1)
        return out

    def local_state(self, table, sync: bool = True) -> Dict[str, torch.Tensor]:
        out = super().local_state(table, sync)
        out["shards"] = table.shard_record()
        return out

    def storage_bytes(self, config, optimizer, row_start, rows):
        parts = super().storage_bytes(config, optimizer, row_start, rows)
        if rows >= 2**31:  # row_slot widens to int64
            parts["row_slot"] *= 2
            parts["total"] += parts["row_slot"] // 2
        return parts

    def load_layout(self, table, reader: StateReader, row_start: int) -> None:
        keys = set(reader.keys())
        n = table.num_embeddings
        if "priority" in keys:
            for a, v in reader.chunks("priority", row_start, n):
                table.priority[a - row_start : a - row_start + v.shape[0]].copy_(v)
        tier = source_tiers(reader, row_start, n)
        if tier is not None or "priority" in keys:
            table.assign_tiers(tier)


register_table_kind(type(None), Fp32Kind())
register_table_kind(Uniform, UniformKind())
register_table_kind(MixedPrecision, MixedPrecisionKind())
