"""Label bookkeeping of a fused store of mixed-precision tables: every member's priorities in one pass.

:class:`FusedMixedPrecisionStore` is the :class:`~torchrec_shark.modules.fused_store.FusedRowStore` of
mixed-precision tables. A step's labels are recorded once for all members (one dedupe of the
``(sample, row)`` pairs over the store's rows; a sample-major lookup handed the labels finds the pairs among the
distinct rows it resolves anyway, :meth:`FusedMixedPrecisionStore.record_sample_labels`), and
:meth:`FusedMixedPrecisionStore.step_end` folds them
into the fused ``priority`` tensor with one stochastically rounded update, steps every member's counters
at once, and re-tiers the members that are due (each as its own
:meth:`~torchrec_shark.modules.mixed_precision.MixedPrecisionTable.step_end` would: the same priorities,
bit for bit, and the same rounding bits from each member's seed and step).

Only label-aware stores do any of this: other stores' ``record_labels`` and ``step_end`` do nothing.

Example::

    store.record_labels(ids, offsets, feature_members, feature_ids, feature_bags, labels)  # before backward
    # or: store.lookup(ids, offsets, ..., labels=labels, sample_major=True) counts them itself
    store.step_end()                                          # after the step: priorities, re-tiering
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import numpy as np
import torch

from torchrec_shark.modules.base import TableInputError, all_finite
from torchrec_shark.modules.fused_store import FusedIndex, FusedRowStore
from torchrec_shark.modules.kernels.host import numpy_path
from torchrec_shark.modules.kernels.lookup import bag_of_ids
from torchrec_shark.modules.mixed_precision import (
    _PRIORITY_NOISE_SALT,
    MixedPrecisionTable,
    _round_to_bf16,
    added_by_row,
)
from torchrec_shark.modules.quantization import CounterNoise


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    """``np.unique(x)`` by a sort (numpy's default hashes, which is several times slower at these sizes)."""
    x = np.sort(x)
    keep = np.empty(x.size, dtype=bool)
    keep[:1] = True
    np.not_equal(x[1:], x[:-1], out=keep[1:])
    return x[keep]


def _same(values: np.ndarray) -> bool:
    return bool((values == values[0]).all())


class FusedMixedPrecisionStore(FusedRowStore):
    """A fused store of :class:`~torchrec_shark.modules.mixed_precision.MixedPrecisionTable` members,
    label-aware: see the module doc."""

    label_aware = True

    def bind(self, tables: Sequence[MixedPrecisionTable]) -> None:
        self.age = np.array([t._age for t in tables], dtype=np.int64)
        self.steps = np.array([t._step for t in tables], dtype=np.int64)
        super().bind(tables)
        specs = [t.spec for t in tables]
        self.decay = np.array([s.decay for s in specs], dtype=np.float64)
        self.pos = np.array([s.pos_weight for s in specs], dtype=np.float64)
        self.neg = np.array([s.neg_weight for s in specs], dtype=np.float64)
        self.retier_every = np.array([s.retier_every for s in specs], dtype=np.int64)
        self.lazy = np.array([t._lazy for t in tables])
        self.priority_seeds = np.array([t.seed ^ _PRIORITY_NOISE_SALT for t in tables], dtype=np.uint64)
        # counts of (row, sample) pairs: rows that may repeat, and the pairs against a lookup's distinct
        # rows (those rows, their members, each pair's position among them)
        self._pending: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self._pending_index: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    # ------------------------------------------------------------------ labels
    def record_labels(self, ids: torch.Tensor, offsets: torch.Tensor, feature_members: Sequence[int],
                      feature_ids: Sequence[int], feature_bags: Sequence[int], labels: torch.Tensor) -> None:
        """Count this step's positive/negative samples per row of every member (applied at :meth:`step_end`).

        Bags as in :meth:`~torchrec_shark.modules.fused_store.FusedRowStore.lookup`; bag ``b`` of a feature
        is sample ``b``, labelled ``labels[b]``. A row counts once per sample, however many of the sample's
        bags (of one feature or of several feeding the same table) hold it: what each member's
        ``record_labels`` counts given the sample's ids from all its features."""
        ids = ids.reshape(-1)
        labels = self._checked_labels(labels, feature_bags)
        n = ids.numel()
        if n == 0:
            return
        members = self.id_members(feature_members, feature_ids, ids)
        self.check_ids(ids, members)
        batch = labels.numel()
        bag = bag_of_ids(offsets.long(), n)  # feature f's bags follow feature f - 1's: sample = bag mod batch
        # (row, sample) keys row-major: the distinct pairs come out with each row's samples ascending and the
        # rows ascending, so step_end finds the distinct rows without another sort
        if numpy_path(ids):
            g = ids.numpy().astype(np.int64, copy=False) + self.row_base[members]
            key = _sorted_unique(g * batch + bag.numpy() % batch)
            rows_np = key // batch
            rows, sample = torch.from_numpy(rows_np), torch.from_numpy(key - rows_np * batch)
            owner = np.searchsorted(self.row_base, rows_np, side="right") - 1
        else:
            base = self._on("row_base", ids.device)
            g = ids.long() + base.index_select(0, members)
            key = torch.unique(g * batch + bag % batch)
            rows, sample = key // batch, key % batch
            owner = torch.searchsorted(base, rows, right=True) - 1
        self._pending.append((rows, self._contributions(labels.index_select(0, sample), lambda: owner)))

    def record_sample_labels(self, index: FusedIndex, offsets: torch.Tensor, features: int,
                             labels: torch.Tensor) -> None:
        """:meth:`record_labels` of a sample-major lookup, from the distinct rows its ``index`` found.

        The ids of a sample-major lookup come sample after sample, and ``index`` lists each distinct row's
        ids in their order (``perm``), so its ``(row, sample)`` pairs come out sorted, row by row with each
        row's samples ascending: the distinct pairs are found by comparing neighbours, with no sort, and
        the counts are kept against ``index``'s rows (summed at :meth:`step_end`), the same counts added
        in the same order as :meth:`record_labels` adds them."""
        batch = (offsets.numel() - 1) // max(features, 1)
        labels = self._checked_labels(labels, [batch] * features)
        n = index.inverse.numel()
        if n == 0:
            return
        starts = offsets[:: max(features, 1)]  # sample b's ids: starts[b] .. starts[b + 1]
        if numpy_path(index.perm):
            s = starts.numpy()
            sample = np.repeat(np.arange(batch, dtype=np.int64), np.diff(s))[index.perm.numpy()]
            new = np.empty(n, dtype=bool)
            new[:1] = True
            np.not_equal(sample[1:], sample[:-1], out=new[1:])
            first = index.offsets.numpy()[:-1]
            new[first] = True  # a row's first id
            keep = np.flatnonzero(new)
            row = np.repeat(np.arange(first.size, dtype=np.int64), np.diff(index.offsets.numpy()))[keep]
            row_t, sample_t = torch.from_numpy(row), torch.from_numpy(sample[keep])
            owners = lambda: index.members.numpy()[row]  # noqa: E731
        else:
            dev = index.perm.device
            lengths = starts[1:] - starts[:-1]
            per_id = torch.repeat_interleave(torch.arange(batch, device=dev), lengths, output_size=n)
            sample = per_id.index_select(0, index.perm)
            new = torch.ones(n, dtype=torch.bool, device=dev)
            torch.ne(sample[1:], sample[:-1], out=new[1:])
            new[index.offsets[:-1]] = True
            counts = index.offsets[1:] - index.offsets[:-1]
            row_of_id = torch.repeat_interleave(torch.arange(counts.numel(), device=dev), counts, output_size=n)
            row_t, sample_t = row_of_id[new], sample[new]
            owners = lambda: index.members.index_select(0, row_t)  # noqa: E731
        self._pending_index.append((index.rows, index.members, row_t,
                                    self._contributions(labels.index_select(0, sample_t), owners)))

    def _checked_labels(self, labels: torch.Tensor, feature_bags: Sequence[int]) -> torch.Tensor:
        labels = labels.reshape(-1).float()
        bad = [b for b in feature_bags if b != labels.numel()]
        if bad:
            raise TableInputError(f"tables {self.names}: {labels.numel()} labels for {bad[0]} bags per feature")
        if not all_finite(labels):
            raise TableInputError(f"tables {self.names}: labels contain NaN or inf")
        return labels

    def _contributions(self, per_sample: torch.Tensor, owners: Callable[[], object]) -> torch.Tensor:
        """``pos_weight * label + neg_weight * (1 - label)`` of each pair, with its member's weights (``owners()``:
        each pair's member, asked for only when the members' weights differ)."""
        if _same(self.pos) and _same(self.neg):  # scalars: the same arithmetic as a member's own count
            return per_sample * (float(self.pos[0]) - float(self.neg[0])) + float(self.neg[0])
        owner = owners()
        slope = self._per_member(self.pos - self.neg, owner, per_sample.device)
        return per_sample * slope + self._per_member(self.neg, owner, per_sample.device)

    @staticmethod
    def _per_member(values: np.ndarray, owner, device) -> torch.Tensor:
        """``values[owner]`` as fp32 (``owner``: a numpy array, or a tensor on ``device``)."""
        v = torch.from_numpy(values.astype(np.float32))
        if isinstance(owner, np.ndarray):
            return v.index_select(0, torch.from_numpy(owner))
        return v.to(device).index_select(0, owner)

    def _owners(self, rows: torch.Tensor):
        if numpy_path(rows):
            return np.searchsorted(self.row_base, rows.numpy(), side="right") - 1
        return torch.searchsorted(self._on("row_base", rows.device), rows, right=True) - 1

    # ------------------------------------------------------------------ step end
    def _add_priority(self, rows: torch.Tensor, contrib: torch.Tensor, rows_sorted: bool = False) -> None:
        """``priority[rows] += contrib`` over every member (rows may repeat), each touched row rounded once,
        stochastically, with its own table's bits (seed, step, global row id)."""
        priority = self.buffers["priority"]
        uniq, total = added_by_row(priority, rows, contrib, rows_sorted)
        owner = self._owners(uniq)
        self._write_priority(uniq, torch.from_numpy(owner) if isinstance(owner, np.ndarray) else owner, total)

    def _write_priority(self, uniq: torch.Tensor, owner: torch.Tensor, total: torch.Tensor) -> None:
        """``priority[uniq] = total`` (distinct rows of members ``owner``), stochastically rounded."""
        priority = self.buffers["priority"]
        noise = self._noise(CounterNoise.keys(self.priority_seeds, self.steps), owner, uniq)
        priority.index_copy_(0, uniq, _round_to_bf16(total, noise.int16((uniq.numel(), 1)).reshape(-1)))

    def _scaled(self, contrib: torch.Tensor, owners: Callable[[], object]) -> torch.Tensor:
        """Lazy members' counts scaled by ``decay ** -(age + 1)`` (see ``MixedPrecisionTable``); eager ones as
        they are. ``owners()``: each count's member, asked for only when the members' factors differ."""
        factor = np.where(self.lazy, self._growth(), 1.0)
        if _same(factor):
            return contrib * float(factor[0])
        return contrib * self._per_member(factor, owners(), contrib.device)

    def _growth(self) -> np.ndarray:
        """``decay ** -(age + 1)`` per member (inf where the decay is 0: those members are not lazy)."""
        with np.errstate(divide="ignore", over="ignore"):
            return self.decay ** -(self.age + 1).astype(np.float64)

    @torch.no_grad()
    def step_end(self) -> None:
        """Close a training step of every member: fold in its label counts, decay, re-tier those that are due."""
        pending, by_index = self._pending, self._pending_index
        self._pending, self._pending_index = [], []
        if len(by_index) == 1 and not pending and not any(t._pending for t in self.members):
            by_index, summed = [], by_index[0]  # one lookup's counts alone: summed against its distinct rows
        else:
            summed = None
            pending += [(rows.index_select(0, pair_row), c) for rows, _, pair_row, c in by_index]
        # one record_labels call and no member's own labels: its rows come ascending, no sort needed
        rows_sorted = len(pending) == 1 and not by_index
        for t in self.members:  # labels a member recorded itself
            if t._pending:
                base = int(self.row_base[t._member])
                pending += [(r + base, c) for r, c in t._pending]
                t._pending = []
                rows_sorted = False
        for i in np.flatnonzero(~self.lazy):  # eager decay (a decay outside the lazy range): before the counts
            self.members[i].priority.mul_(float(self.decay[i]))
        if pending:
            rows = pending[0][0] if len(pending) == 1 else torch.cat([r for r, _ in pending])
            contrib = pending[0][1] if len(pending) == 1 else torch.cat([c for _, c in pending])
            self._add_priority(rows, self._scaled(contrib, lambda: self._owners(rows)), rows_sorted)
        if summed is not None:
            rows, members, pair_row, contrib = summed
            priority = self.buffers["priority"]
            total = torch.zeros(rows.numel(), device=rows.device).index_add_(
                0, pair_row, self._scaled(contrib, lambda: members.index_select(0, pair_row)).float())
            self._write_priority(rows, members, total + priority.index_select(0, rows).float())
        self.age[self.lazy] += 1
        self.buffers["priority_age"].copy_(torch.from_numpy(self.age))
        limit = MixedPrecisionTable._RESCALE_LIMIT
        for i in np.flatnonzero(self.lazy & (self._growth() > limit)):
            self.members[i]._rescale()
        self.steps += 1
        self.buffers["step"].copy_(torch.from_numpy(self.steps))
        for i in np.flatnonzero(self.steps % self.retier_every == 0):
            self.members[i].retier()
