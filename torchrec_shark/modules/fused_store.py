"""One batched store for many row-store tables, as FBGEMM's TBE batches its tables.

A :class:`FusedRowStore` holds the buffers of its *members* (row-store tables of one class, width,
rounding and buffer layout) in one tensor per role: one pool per precision (every member's tier of that
precision, member after member), one tensor per per-row buffer (slot map, priority, optimizer state),
one per counter. Each member's own buffers are views of these (:mod:`~torchrec_shark.modules.buffer_source`),
so its state dict, checkpoint pieces and byte counts stay per table and nothing is copied; and the store
runs a step of all its members at once:

* one id resolution and one dedupe over every member's ids (a row's *fused slot*: its precision's pool
  first, then the member, then its slot there; sorting by it groups rows by precision),
* one gather and decode per precision, one pooled ``embedding_bag`` for every feature,
* in backward one transposed ``embedding_bag`` (each touched row's summed gradient), one optimizer
  update over the fused optimizer state, one re-encode per precision,

so a step's cost follows the rows it touches, not the number of tables. Results equal the members'
own lookups and updates bit for bit: the same arithmetic per row, and each row's stochastic-rounding
bits still come from its own table's seed and update count (:class:`~torchrec_shark.modules.quantization.CounterNoise`).

The kernels are written here rather than taken from FBGEMM: its training TBE
(``SplitTableBatchedEmbeddingBagsCodegen``) keeps every row at a fixed position in one precision (no
tier pools behind a slot map), keeps optimizer state by storage position (ours follows the row id when it
changes tier) and draws stochastic-rounding bits from a stream, which would break the sharding-independent,
exactly resumable updates; its n-bit lookup (``IntNBitTableBatchedEmbeddingBagsCodegen``) is inference-only
and wants the scale and bias in front of the codes. What FBGEMM does offer per precision is used: its
fused n-bit row decoder (:mod:`~torchrec_shark.modules.quantization`) and ``asynchronous_complete_cumsum``.

Index bookkeeping runs in numpy for CPU tensors (single-threaded and several times cheaper than torch
per call at these sizes) and in torch ops on any other device.

Example::

    tables, stores = build_fused([lambda d, c=c: build_table(c, opt, d) for c in configs], device)
    store = stores[0]
    pooled = store.lookup(ids, offsets, feature_members=[0, 1], feature_ids=[n0, n1], feature_bags=[B, B])
    pooled.sum().backward()      # every member's touched rows updated, one call per precision
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_configs import PoolingType

from torchrec_shark.modules.base import TableInputError, all_finite
from torchrec_shark.modules.buffer_source import buffers_from
from torchrec_shark.modules.kernels.host import numpy_path
from torchrec_shark.modules.kernels.huge_pages import zeros_on_huge_pages
from torchrec_shark.modules.kernels.lookup import pooled_lookup, unique_index
from torchrec_shark.modules.kernels.row_copy import put_rows_, take_rows
from torchrec_shark.modules.kernels.sparse_optimizer import RowOptimizer
from torchrec_shark.modules.quantization import CODECS, CounterNoise, Fp32Codec
from torchrec_shark.modules.row_store import PRECISIONS, RowStoreTable

_NO_TIER = 1 << 62  # a tier start no slot reaches (members with fewer tiers than the store's most)


class _Request(NamedTuple):
    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    role: Tuple[str, ...]


class _Recorder:
    """Records what a table built on ``meta`` asks for (the plan of a fused store)."""

    def __init__(self) -> None:
        self.requests: List[_Request] = []

    def take(self, name, shape, dtype, device, role) -> torch.Tensor:
        self.requests.append(_Request(name, shape, dtype, role))
        return torch.zeros(shape, dtype=dtype, device="meta")


class _Server:
    """Hands a member being built the views the store planned for it, checking each request."""

    def __init__(self, views: Dict[str, torch.Tensor]) -> None:
        self.views = views
        self.served: List[str] = []

    def take(self, name, shape, dtype, device, role) -> torch.Tensor:
        view = self.views.get(name)
        same_device = view is not None and view.device.type == device.type and device.index in (None, view.device.index)
        if view is None or tuple(view.shape) != tuple(shape) or view.dtype != dtype or not same_device:
            raise RuntimeError(f"fused store: buffer {name!r} {shape} {dtype} on {device} was not planned "
                               f"(planned: {None if view is None else (tuple(view.shape), view.dtype, view.device)})")
        self.served.append(name)
        return view


def _signature(table: nn.Module, requests: Sequence[_Request]) -> Optional[tuple]:
    """Tables with equal signatures can share a store (None: not a row store)."""
    if not isinstance(table, RowStoreTable):
        return None
    layout = tuple(sorted((r.name, r.role, str(r.dtype), r.shape[1:] if r.role == ("rows",) else ())
                          for r in requests if r.role[0] not in ("pool", "hits")))
    return (type(table), table.embedding_dim, table.rounding, table.slotted, layout)


class FusedIndex(NamedTuple):
    """How one fused lookup's ids map onto distinct rows (the fields of a per-table ``RowIndex`` plus members).

    ``slots``: distinct fused slots, ascending (grouped by precision); ``rows``: their rows in the store's
    row space (member after member); ``members``: their member; ``inverse``, ``perm``, ``offsets``: as in
    ``RowIndex``; ``bounds[k]:bounds[k + 1]``: the run of the store's precision ``k``; ``hit_keys``: per id,
    ``member * max tiers + tier`` (slotted stores; the tier-hit counters).
    """

    slots: torch.Tensor
    rows: torch.Tensor
    members: torch.Tensor
    inverse: torch.Tensor
    perm: torch.Tensor
    offsets: torch.Tensor
    bounds: List[int]
    hit_keys: Optional[torch.Tensor] = None


@dataclass
class _Precision:
    name: str
    start: int  # first fused slot of its pool
    rows: int
    pool: torch.Tensor


class FusedRowStore:
    """The batched store of row-store tables of one layout (see the module doc); build with :func:`build_fused`."""

    #: its members read training labels (:meth:`record_labels` does something)
    label_aware = False

    def __init__(self, metas: Sequence[RowStoreTable], requests: Sequence[Sequence[_Request]],
                 device: torch.device) -> None:
        self.device = torch.device(device)
        self.members: List[RowStoreTable] = []
        m = len(metas)
        first = metas[0]
        self.dim = first.embedding_dim
        self.slotted = first.slotted
        self.rounding = first.rounding
        self.version = 0
        self.updates = np.zeros(m, dtype=np.int64)
        rows = np.array([t.num_embeddings for t in metas], dtype=np.int64)
        self.row_base = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)  # [M + 1]
        self.total_rows = int(self.row_base[-1])
        self.rows = rows
        self.max_tiers = max(len(t._tiers) for t in metas)
        # pools: precision p holds every member's tier of p, member after member
        counts = {p: [0] * m for p in PRECISIONS}
        for i, t in enumerate(metas):
            for p, _, n in t._tiers:
                counts[p][i] = n
        self.precisions: List[_Precision] = []
        member_base: Dict[Tuple[int, str], int] = {}
        start = 0
        for p in PRECISIONS:
            if not any(p in [q for q, _, _ in t._tiers] for t in metas):
                continue
            base = 0
            for i in range(m):
                member_base[(i, p)] = start + base
                base += counts[p][i]
            codec = CODECS[p]
            pool = zeros_on_huge_pages((base, codec.width(self.dim)), codec.dtype, self.device)
            self.precisions.append(_Precision(p, start, base, pool))
            start += base
        self.total_slots = start
        self._precision_starts = np.array([q.start for q in self.precisions[1:]], dtype=np.int64)
        # fused slot = table-local slot + delta[member, tier]; tier = how many of the member's tier starts <= slot
        delta = np.zeros((m, self.max_tiers), dtype=np.int64)
        starts = np.full((m, max(self.max_tiers - 1, 1)), _NO_TIER, dtype=np.int64)
        for i, t in enumerate(metas):
            for k, (p, s, _) in enumerate(t._tiers):
                delta[i, k] = member_base[(i, p)] - s
                if k:
                    starts[i, k - 1] = s
        self._delta = delta.reshape(-1)
        self._tier_starts = starts
        self._tier_start_columns = [np.ascontiguousarray(starts[:, k]) for k in range(starts.shape[1])]
        self._tier_start_cache: Dict[np.dtype, List[np.ndarray]] = {}
        # the other roles: one tensor each, member views by rows, by member, or a member's row of hits
        self.buffers: Dict[str, torch.Tensor] = {}
        self._view_specs: List[Dict[str, Tuple[str, int, int]]] = [{} for _ in range(m)]  # name -> (tensor, a, b)
        for i, (t, reqs) in enumerate(zip(metas, requests)):
            for r in reqs:
                kind = r.role[0]
                if kind == "pool":
                    q = next(q for q in self.precisions if q.name == r.role[1])
                    a = member_base[(i, q.name)] - q.start
                    self._view_specs[i][r.name] = (f"pool:{q.name}", a, a + r.shape[0])
                    continue
                if r.name not in self.buffers:
                    shape = {"rows": (self.total_rows, *r.shape[1:]), "scalar": (m,),
                             "hits": (m, self.max_tiers)}[kind]
                    self.buffers[r.name] = zeros_on_huge_pages(shape, r.dtype, self.device)
                if kind == "rows":
                    span = (int(self.row_base[i]), int(self.row_base[i + 1]))
                else:  # a member's counter (-1: the element itself), or its row of tier hits
                    span = (i, -1) if kind == "scalar" else (i, r.shape[0])
                self._view_specs[i][r.name] = (r.name, *span)
        self._views = [self._member_views(i) for i in range(m)]
        self.optim: Optional[RowOptimizer] = None
        self._anchor = torch.empty(0, requires_grad=True)
        self._row_slot_np: Optional[np.ndarray] = None

    def _member_views(self, i: int) -> Dict[str, torch.Tensor]:
        out = {}
        for name, (key, a, b) in self._view_specs[i].items():
            if key.startswith("pool:"):
                out[name] = next(q for q in self.precisions if q.name == key[5:]).pool[a:b]
            elif b == -1:  # a member's counter
                out[name] = self.buffers[key][a]
            elif key == "tier_hits":
                out[name] = self.buffers[key][a, :b]
            else:
                out[name] = self.buffers[key][a:b]
        return out

    # ------------------------------------------------------------------ members
    def bind(self, tables: Sequence[RowStoreTable]) -> None:
        """Make ``tables`` (built on this store's views) its members; their counters move into the store."""
        self.members = list(tables)
        self.names = [t.name for t in tables]
        for i, t in enumerate(tables):
            self.updates[i] = t.updates
            self.version = max(self.version, t.version)
        for i, t in enumerate(tables):
            t._fused, t._member = self, i
        self.row_start = np.array([t.row_start for t in tables], dtype=np.int64)
        self.noise_shift = self.row_start - self.row_base[:-1]  # store row -> the table's global row id
        self.seeds = np.array([t.seed for t in tables], dtype=np.uint64)
        self.mean = np.array([t.pooling == PoolingType.MEAN for t in tables])
        opt = tables[0].optim
        self.optim = RowOptimizer.over(opt.spec, opt.lr, {name: self.buffers[name] for name in opt.state()})
        self._device_tables: Dict[str, torch.Tensor] = {}
        self._row_slot_np = self.buffers["row_slot"].numpy() if self.slotted and self.device.type == "cpu" else None

    def _on(self, name: str, device: torch.device) -> torch.Tensor:
        """The per-member (or per-precision) table ``name`` (a numpy array attribute) as a tensor on ``device``,
        copied there once."""
        key = f"{name}@{device}"
        t = self._device_tables.get(key)
        if t is None:
            value = getattr(self, name)
            t = self._device_tables[key] = torch.from_numpy(value.view(np.int64) if value.dtype == np.uint64
                                                            else value).to(device)
        return t

    def owns(self, table: nn.Module) -> bool:
        return getattr(table, "_fused", None) is self

    def storage_ptrs(self) -> set:
        """Data pointers of the storages of the store's tensors (which members' buffers are views of)."""
        return {t.untyped_storage().data_ptr() for t in [*self.buffers.values(), *(q.pool for q in self.precisions)]}

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` (``Module._apply``'s: a move to another device) to the store's tensors and give every
        member its views of the results, so the members stay views (call before the module's own ``_apply``,
        which then finds every buffer already moved)."""
        for q in self.precisions:
            q.pool = fn(q.pool)
        self.buffers = {k: fn(v) for k, v in self.buffers.items()}
        self.device = next(iter(self.buffers.values()), self.precisions[0].pool).device
        for i, table in enumerate(self.members):
            self._views[i] = self._member_views(i)
            for module in table.modules():
                for name in list(module._buffers):
                    if name in self._views[i]:
                        module._buffers[name] = self._views[i][name]
        opt = self.optim
        self.optim = RowOptimizer.over(opt.spec, opt.lr, {name: self.buffers[name] for name in opt.state()})
        self._row_slot_np = self.buffers["row_slot"].numpy() if self.slotted and self.device.type == "cpu" else None
        self._device_tables = {}

    # ------------------------------------------------------------------ ids -> rows
    def _ids_np(self, ids: torch.Tensor, members: np.ndarray):
        """Store rows, fused slots and hit keys (slotted stores) of ``ids`` (local to their members), numpy."""
        local = ids.numpy().astype(np.int64, copy=False)
        g = local + self.row_base[members]
        if not self.slotted:
            return g, local + self._delta[members * self.max_tiers], None
        s = self._row_slot_np[g]
        # one gather and compare per tier boundary (a third of the time of an [ids, tiers] broadcast), in the
        # slot map's own width: int32 compares, no int64 copy of the slots
        key = members * self.max_tiers
        if self.max_tiers > 1:
            for column in self._tier_start_columns_like(s.dtype):
                key += s >= column[members]
        return g, s + self._delta[key], key

    def _tier_start_columns_like(self, dtype) -> List[np.ndarray]:
        """The members' tier starts per boundary in ``dtype`` (a slot map's): starts no slot of that width
        reaches (``_NO_TIER``) become its largest value, which no slot reaches either."""
        cached = self._tier_start_cache.get(dtype)
        if cached is None:
            top = np.iinfo(dtype).max
            cached = self._tier_start_cache[dtype] = [np.minimum(c, top).astype(dtype) for c in self._tier_start_columns]
        return cached

    def _ids_torch(self, ids: torch.Tensor, members: torch.Tensor):
        """As :meth:`_ids_np`, in torch ops on ``ids``' device."""
        dev = ids.device
        delta = self._on("_delta", dev)
        g = ids.long() + self._on("row_base", dev).index_select(0, members)
        if not self.slotted:
            return g, ids.long() + delta.index_select(0, members * self.max_tiers), None
        s = self.buffers["row_slot"].index_select(0, g).long()
        starts = self._on("_tier_starts", dev)
        tier = (s.unsqueeze(1) >= starts.index_select(0, members)).sum(1) if self.max_tiers > 1 else torch.zeros_like(s)
        key = members * self.max_tiers + tier
        return g, s + delta.index_select(0, key), key

    def index(self, ids: torch.Tensor, members) -> FusedIndex:
        """Distinct rows of ``ids`` (``members[i]``: the member of ``ids[i]``), sorted by fused slot."""
        if numpy_path(ids):
            g, fs, keys = self._ids_np(ids, members)
            g, fs = torch.from_numpy(g), torch.from_numpy(fs)
            keys = None if keys is None else torch.from_numpy(keys)
        else:
            g, fs, keys = self._ids_torch(ids, members)
        slots, rows, inverse, perm, offsets = unique_index(fs, g, self.total_slots)
        if numpy_path(rows):
            owner = torch.from_numpy(np.searchsorted(self.row_base, rows.numpy(), side="right") - 1)
            cuts = np.searchsorted(slots.numpy(), self._precision_starts).tolist()
        else:
            owner = torch.searchsorted(self._on("row_base", rows.device), rows, right=True) - 1
            cuts = torch.searchsorted(slots, self._on("_precision_starts", slots.device)).tolist()
        return FusedIndex(slots, rows, owner, inverse, perm, offsets, [0, *cuts, slots.numel()], keys)

    def index_rows(self, rows: torch.Tensor, members: torch.Tensor) -> FusedIndex:
        """A :class:`FusedIndex` for distinct store ``rows`` of ``members``."""
        local = rows - self._on("row_base", rows.device).index_select(0, members)
        return self.index(local, members.numpy() if numpy_path(rows) else members)

    def _runs(self, index: FusedIndex):
        """``(precision, first, last, slots in its pool)`` per non-empty precision run of ``index``."""
        b = index.bounds
        for k, q in enumerate(self.precisions):
            if b[k + 1] > b[k]:
                yield q, b[k], b[k + 1], index.slots[b[k] : b[k + 1]] - q.start

    # ------------------------------------------------------------------ what pooled_lookup calls
    def gather(self, index: FusedIndex) -> torch.Tensor:
        """fp32 values of the rows of ``index``, ``[U, D]``: one gather (and decode) per precision."""
        runs = list(self._runs(index))
        if len(runs) == 1 and CODECS[runs[0][0].name] is not Fp32Codec:  # one precision holds every row:
            q, _, _, local = runs[0]  # its decoded rows are the result
            return CODECS[q.name].decode(take_rows(q.pool, local))
        out = torch.empty(index.slots.numel(), self.dim, device=self.device)
        for q, a, b, local in runs:
            codec = CODECS[q.name]
            if codec is Fp32Codec:
                torch.index_select(q.pool, 0, local, out=out[a:b])
            else:
                out[a:b] = codec.decode(take_rows(q.pool, local))
        return out

    def _scatter(self, index: FusedIndex, values: torch.Tensor, rounding: str) -> None:
        """Encode ``values`` into the rows of ``index``: one encode per precision; every row's stochastic
        rounding bits are its own table's (seed, update count, global row id)."""
        keys = None
        for q, a, b, local in self._runs(index):
            codec = CODECS[q.name]
            noise = None
            if rounding == "stochastic" and codec is not Fp32Codec:
                if keys is None:
                    keys = CounterNoise.keys(self.seeds, self.updates)
                noise = self._noise(keys, index.members[a:b], index.rows[a:b])
            put_rows_(q.pool, local, codec.encode(values[a:b], rounding, noise))
        self.version += 1

    def _noise(self, keys: np.ndarray, members: torch.Tensor, rows: torch.Tensor) -> CounterNoise:
        """Rounding noise of store ``rows`` (of ``members``): each row's own table's key and global row id."""
        if numpy_path(members):
            m = members.numpy()
            return CounterNoise.per_row(keys[m], rows + torch.from_numpy(self.noise_shift[m]))
        dev = members.device
        k = torch.from_numpy(keys.view(np.int64)).to(dev).index_select(0, members)
        return CounterNoise.per_row(k, rows + self._on("noise_shift", dev).index_select(0, members))

    @torch.no_grad()
    def apply_gradients(self, index: FusedIndex, grad: torch.Tensor, values: Optional[torch.Tensor] = None) -> None:
        """One optimizer step on every member's rows of ``index`` with their summed gradients: one update
        over the fused optimizer state and one re-encode per precision; each member's update count steps."""
        if not all_finite(grad):
            bad = ~torch.isfinite(grad).all(dim=1)
            names = sorted({self.names[i] for i in index.members[bad].tolist()})
            raise TableInputError(f"table {names[0]!r}: non-finite gradient for {int(bad.sum())} row(s) of tables "
                                  f"{names}; the tables were not updated")
        if index.hit_keys is not None:  # lookups (ids, repeats included) served by each member's tiers
            hits = self.buffers["tier_hits"].view(-1)
            if numpy_path(index.hit_keys):
                hits += torch.from_numpy(np.bincount(index.hit_keys.numpy(), minlength=hits.numel()))
            else:
                hits += torch.bincount(index.hit_keys, minlength=hits.numel())
        if values is None:  # written since the lookup (e.g. re-tiered): locate the rows afresh
            fresh = self.index_rows(index.rows, index.members)
            grad = grad.index_select(0, fresh.perm)
            index, values = fresh, self.gather(fresh)
        self.optim.lr = self.members[0].optim.lr
        t = None
        if self.optim.spec.name == "adam":
            steps = self.buffers["iter"]
            steps += 1
            t = int(steps[0]) if bool((steps == steps[0]).all()) else steps.index_select(0, index.members)
        new = self.optim.rule(index.rows, values, grad, t)
        self.updates += 1
        self._scatter(index, new, self.rounding)

    # ------------------------------------------------------------------ the lookup
    def id_members(self, feature_members: Sequence[int], feature_ids: Sequence[int], ids: torch.Tensor):
        """The member of every one of ``ids``, a lookup's whose features (ids ``feature_ids[f]`` each) read
        ``feature_members[f]`` (a numpy array for ids on the numpy path, a tensor on ``ids``' device otherwise)."""
        if numpy_path(ids):
            return np.repeat(np.asarray(feature_members, dtype=np.int64), np.asarray(feature_ids, dtype=np.int64))
        counts = torch.tensor(list(feature_ids), device=ids.device)
        return torch.repeat_interleave(torch.tensor(list(feature_members), device=ids.device), counts,
                                       output_size=int(sum(feature_ids)))

    def check_ids(self, ids: torch.Tensor, members) -> None:
        """:class:`TableInputError` naming the first member with ids outside its rows."""
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TableInputError(f"table {self.names[0]!r}: ids must be integers, got {ids.dtype}")
        if ids.numel() == 0:
            return
        if numpy_path(ids):
            v = ids.numpy()
            bad = (v < 0) | (v >= self.rows[members])
            if not bad.any():
                return
            m = int(members[int(np.argmax(bad))])
            mine = v[members == m]
        else:
            limit = self._on("rows", ids.device).index_select(0, members)
            bad = (ids < 0) | (ids >= limit)
            if not bool(bad.any()):
                return
            m = int(members[bad.nonzero()[0, 0]])
            mine = ids[members == m]
        raise TableInputError(f"table {self.names[m]!r}: ids must be in [0, {int(self.rows[m])}), got min "
                              f"{int(mine.min())}, max {int(mine.max())}")

    def lookup(self, ids: torch.Tensor, offsets: torch.Tensor, feature_members: Sequence[int],
               feature_ids: Sequence[int], feature_bags: Sequence[int],
               per_sample_weights: Optional[torch.Tensor] = None,
               labels: Optional[torch.Tensor] = None, sample_major: bool = False) -> torch.Tensor:
        """Pooled rows of every feature's bags: feature ``f`` reads member ``feature_members[f]`` and has
        ``feature_ids[f]`` ids in ``feature_bags[f]`` bags (``offsets``: every bag's, feature after feature,
        ``bags + 1`` entries). Each member pools as its table does (SUM or MEAN).

        Returns ``[bags, D]`` with the features' bags one after another, or with ``sample_major`` (every
        feature ``B`` bags) ``[B, F * D]``: sample ``b``'s pooled row of every feature, side by side (the
        bags are pooled in that order, so the output needs no transposing copy, nor its gradient).
        ``labels`` (training, label-aware stores): each sample's label, recorded as the members'
        ``record_labels`` would (bags of feature ``f`` are samples ``0 .. feature_bags[f] - 1``)."""
        ids = ids.reshape(-1)
        nf = len(feature_bags)
        if sample_major and len(set(feature_bags)) > 1:
            raise ValueError(f"sample_major pooling needs the same number of bags per feature, got {feature_bags}")
        if ids.device.type == "meta" or self.device.type == "meta":
            out = torch.empty(offsets.numel() - 1, self.dim, device="meta")
            return out.view(-1, nf * self.dim) if sample_major else out
        members = self.id_members(feature_members, feature_ids, ids)
        self.check_ids(ids, members)
        if offsets.numel() < 1 or int(offsets[-1]) != ids.numel():
            raise TableInputError(f"tables {self.names}: offsets must have bags + 1 entries ending at "
                                  f"len(ids)={ids.numel()}")
        if per_sample_weights is not None:
            if per_sample_weights.numel() != ids.numel():
                raise TableInputError(f"tables {self.names}: {per_sample_weights.numel()} per-id weights for "
                                      f"{ids.numel()} ids")
            if not all_finite(per_sample_weights):
                raise TableInputError(f"tables {self.names}: per-id weights contain NaN or inf")
        record = labels is not None and self.label_aware
        if record and not sample_major:
            self.record_labels(ids, offsets, feature_members, feature_ids, feature_bags, labels)
        if sample_major and nf > 1:
            order, offsets = _sample_major(offsets.long(), nf, feature_bags[0])
            ids = ids.index_select(0, order)
            members = members[order.numpy()] if isinstance(members, np.ndarray) else members.index_select(0, order)
            if per_sample_weights is not None:
                per_sample_weights = per_sample_weights.index_select(0, order)
        index = self.index(ids, members)
        if record and sample_major:
            self.record_sample_labels(index, offsets, nf, labels)
        divisor = self._divisor(offsets, feature_members, feature_bags, sample_major)
        anchor = self._anchor if torch.is_grad_enabled() else self._anchor.detach()
        out = pooled_lookup(self, index, offsets, per_sample_weights, divisor, anchor)
        return out.view(-1, nf * self.dim) if sample_major else out

    def _divisor(self, offsets: torch.Tensor, feature_members: Sequence[int], feature_bags: Sequence[int],
                 sample_major: bool = False):
        """Per bag: its length for members pooling by MEAN, 1 for SUM (None: every member sums)."""
        mean = self.mean[np.asarray(feature_members, dtype=np.int64)]
        if not mean.any():
            return None
        offsets = offsets.long()
        lengths = (offsets[1:] - offsets[:-1]).clamp(min=1).float()
        if mean.all():
            return lengths
        flags_f = torch.tensor(mean.tolist(), device=offsets.device)
        if sample_major:  # bag b * F + f is feature f's
            flags = flags_f.repeat(lengths.numel() // len(feature_bags))
        else:
            bags = torch.tensor(list(feature_bags), device=offsets.device)
            flags = torch.repeat_interleave(flags_f, bags, output_size=lengths.numel())
        return torch.where(flags, lengths, torch.ones_like(lengths))

    # ------------------------------------------------------------------ labels and step end
    def record_labels(self, ids: torch.Tensor, offsets: torch.Tensor, feature_members: Sequence[int],
                      feature_ids: Sequence[int], feature_bags: Sequence[int], labels: torch.Tensor) -> None:
        """Record a step's labels (label-aware stores override; the others read none)."""

    def record_sample_labels(self, index: FusedIndex, offsets: torch.Tensor, features: int,
                             labels: torch.Tensor) -> None:
        """As :meth:`record_labels`, for a sample-major lookup's ``index`` (bag ``b * features + f``: sample
        ``b``) and its ``offsets`` (label-aware stores override; the others read none)."""

    def step_end(self) -> None:
        """Close a training step of every member (label-aware stores override)."""


def _sample_major(offsets: torch.Tensor, features: int, batch: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(order, offsets)`` of the same bags in sample-major order (bag ``b * F + f`` is feature ``f``'s bag of
    sample ``b``) from feature-major ``offsets`` (bag ``f * B + b``): ``order[j]`` is the old position of the id
    at new position ``j``."""
    n = int(offsets[-1]) if offsets.numel() else 0
    # each id moves by its bag's shift (where the bag starts in sample-major order less where it starts now),
    # found per bag and repeated over the bag's ids
    if numpy_path(offsets):
        o = offsets.numpy()
        lengths = np.diff(o)
        new_offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths.reshape(features, batch).T.reshape(-1), out=new_offsets[1:])
        start = new_offsets[:-1].reshape(batch, features).T.reshape(-1)  # bag f * B + b's new start
        every = np.arange(n, dtype=np.int64)
        position = np.repeat(start - o[:-1], lengths) + every
        order = np.empty(n, dtype=np.int64)
        order[position] = every
        return torch.from_numpy(order), torch.from_numpy(new_offsets)
    lengths = offsets[1:] - offsets[:-1]
    new_offsets = torch.zeros_like(offsets)
    torch.cumsum(lengths.view(features, batch).t().reshape(-1), 0, out=new_offsets[1:])
    start = new_offsets[:-1].view(batch, features).t().reshape(-1)
    every = torch.arange(n, device=offsets.device)
    position = torch.repeat_interleave(start - offsets[:-1], lengths, output_size=n) + every
    order = torch.empty(n, dtype=torch.int64, device=offsets.device)
    order[position] = every
    return order, new_offsets


def _meta_device(device) -> bool:
    return device is not None and torch.device(device).type == "meta"


def build_fused(builders: Sequence[Callable[[Optional[torch.device]], nn.Module]], device: Optional[torch.device],
                min_members: int = 2) -> Tuple[List[nn.Module], List[FusedRowStore]]:
    """Build tables ``builders[i](device)``, the row stores among them that share a layout inside one
    :class:`FusedRowStore` each (groups of at least ``min_members``); returns the tables (in order) and
    the stores. Each builder is called on ``meta`` first (the plan: nothing allocated), then once on
    ``device``; a member's buffers are views of its store's, so nothing is allocated twice. On ``meta``
    nothing is fused (the tables hold no storage)."""
    if _meta_device(device):
        return [b(device) for b in builders], []
    plans = []
    for b in builders:
        recorder = _Recorder()
        with buffers_from(recorder):
            meta = b(torch.device("meta"))
        plans.append((meta, recorder.requests, _signature(meta, recorder.requests)))
    groups: Dict[tuple, List[int]] = {}
    for i, (_, _, sig) in enumerate(plans):
        if sig is not None:
            groups.setdefault(sig, []).append(i)
    tables: List[Optional[nn.Module]] = [None] * len(builders)
    stores = []
    real = torch.empty(0, device=device).device if device is not None else torch.empty(0).device
    for sig, members in groups.items():
        if len(members) < min_members:
            continue
        metas = [plans[i][0] for i in members]
        store = metas[0].fused_store_type()(metas, [plans[i][1] for i in members], real)
        built = []
        for j, i in enumerate(members):
            server = _Server(store._views[j])
            with buffers_from(server):
                built.append(builders[i](device))
            missing = set(server.views) - set(server.served)
            if missing:
                raise RuntimeError(f"fused store: table {built[-1].name!r} did not take buffers {sorted(missing)}")
            tables[i] = built[-1]
        store.bind(built)
        stores.append(store)
    for i, b in enumerate(builders):
        if tables[i] is None:
            tables[i] = b(device)
    return tables, stores  # type: ignore[return-value]
