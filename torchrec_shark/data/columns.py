"""Columnar rows in numpy and the batching every source shares.

A :class:`Columns` holds rows of one split: dense features, labels and, per sparse
feature, its ids and bag lengths. Sources produce them either by row range
(:class:`IndexedDataset`: synthetic, ``.npy``) or as a stream of chunks
(:class:`StreamDataset`: text and Parquet files); both bases cut the same global
batches, give rank ``r`` its slice and check it with :func:`validate_batch`.
"""

from __future__ import annotations

import abc
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_shark.data.types import ClickDataset, DataError
from torchrec_shark.data.validate import BatchRowError, validate_batch

SPLITS = ("train", "val")


@dataclass
class Columns:
    """Rows as numpy arrays; ``lengths[f] is None`` means one id per row."""

    dense: np.ndarray  # [n, num_dense] float32
    labels: np.ndarray  # [n] float32
    ids: List[np.ndarray]  # per feature: int64 ids, bags concatenated
    lengths: List[Optional[np.ndarray]]  # per feature: int32 bag lengths, or None

    def __len__(self) -> int:
        return len(self.labels)

    def slice(self, start: int, stop: int) -> "Columns":
        ids, lengths = [], []
        for v, ln in zip(self.ids, self.lengths):
            if ln is None:
                ids.append(v[start:stop])
            else:
                lo = int(ln[:start].sum())
                hi = lo + int(ln[start:stop].sum())
                ids.append(v[lo:hi])
                ln = ln[start:stop]
            lengths.append(ln)
        return Columns(self.dense[start:stop], self.labels[start:stop], ids, lengths)

    @staticmethod
    def concat(parts: Sequence["Columns"]) -> "Columns":
        if len(parts) == 1:
            return parts[0]
        ids, lengths = [], []
        for f in range(len(parts[0].ids)):
            ids.append(np.concatenate([p.ids[f] for p in parts]))
            if all(p.lengths[f] is None for p in parts):
                lengths.append(None)
            else:
                lengths.append(np.concatenate([_lengths_of(p, f) for p in parts]))
        return Columns(
            np.concatenate([p.dense for p in parts]), np.concatenate([p.labels for p in parts]), ids, lengths
        )

    @staticmethod
    def from_batch(batch: Batch, feature_names: Sequence[str]) -> "Columns":
        """The rows of a batch (on CPU) as numpy arrays."""
        kjt = batch.sparse_features.to_dict()
        return Columns(
            batch.dense_features.cpu().numpy(),
            batch.labels.cpu().numpy(),
            [kjt[f].values().cpu().numpy() for f in feature_names],
            [kjt[f].lengths().cpu().numpy().astype(np.int32) for f in feature_names],
        )

    def to_batch(self, feature_names: Sequence[str]) -> Batch:
        n = len(self)
        values = np.concatenate(self.ids) if self.ids else np.zeros(0, np.int64)
        lengths = [_lengths_of(self, f) for f in range(len(self.ids))]
        return Batch(
            dense_features=torch.from_numpy(np.ascontiguousarray(self.dense, dtype=np.float32)),
            sparse_features=KeyedJaggedTensor(
                keys=list(feature_names),
                values=torch.from_numpy(values.astype(np.int64, copy=False)),
                lengths=torch.from_numpy(np.concatenate(lengths) if lengths else np.zeros(0, np.int32)),
                stride=n,
                length_per_key=[len(v) for v in self.ids],
            ),
            labels=torch.from_numpy(np.ascontiguousarray(self.labels, dtype=np.float32)),
        )


def _lengths_of(c: Columns, f: int) -> np.ndarray:
    ln = c.lengths[f]
    return np.ones(len(c), np.int32) if ln is None else ln.astype(np.int32, copy=False)


def table_sizes(values: Sequence[int], feature_names: Sequence[str], key: str) -> List[int]:
    """Expand ``num_embeddings_per_feature`` (one value for all, or one per feature)."""
    values = [int(v) for v in values]
    if len(values) == 1:
        values = values * len(feature_names)
    if len(values) != len(feature_names):
        raise DataError(
            f"{key} has {len(values)} values; give one for all features or one per feature ({len(feature_names)})"
        )
    for name, v in zip(feature_names, values):
        if v < 1:
            raise DataError(f"{key}: table size {v} of feature {name!r} must be >= 1")
    return values


def val_every(val_fraction: float) -> int:
    """Row ``i`` belongs to val when ``i % val_every(f) == 0`` (about a fraction ``f`` of the rows)."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must be in (0, 1)")
    return max(2, round(1.0 / val_fraction))


def _check_args(split: str, batch_size: int, rank: int, world_size: int, start_batch: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
    if batch_size < 1 or batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} must be a positive multiple of world_size={world_size}")
    if start_batch < 0:
        raise ValueError(f"start_batch={start_batch} must be >= 0")


def _local_rows(n: int, batch_size: int, world_size: int) -> int:
    """Rows each rank gets from a global batch of ``n`` rows (the last val batch may be short;
    its ``n % world_size`` trailing rows are dropped so that every rank gets as many)."""
    return (n if n == batch_size else n - n % world_size) // world_size


class _BatchingDataset(ClickDataset):
    feature_names: List[str]
    num_embeddings_per_feature: List[int]
    num_dense: int

    def _batch(self, cols: Columns) -> Batch:
        batch = cols.to_batch(self.feature_names)
        validate_batch(batch, self.feature_names, self.num_embeddings_per_feature)
        return batch


class IndexedDataset(_BatchingDataset):
    """A source with random access to rows: reads only the rank's rows of each batch."""

    @abc.abstractmethod
    def num_rows(self, split: str) -> int:
        """Rows of one epoch of ``split``."""

    @abc.abstractmethod
    def rows(self, split: str, start: int, stop: int) -> Columns:
        """Rows ``[start, stop)`` of ``split``, ``0 <= start < stop <= num_rows(split)``."""

    def epoch_rows(self, split: str = "train", count: bool = False) -> Optional[int]:
        return int(self.num_rows(split))

    def describe_row(self, split: str, row: int) -> str:
        """Where row ``row`` of ``split`` comes from (a file and its row, where the source has files)."""
        return f"{split} row {row}"

    def batches(self, split, batch_size, rank=0, world_size=1, start_batch=0) -> Iterator[Batch]:
        _check_args(split, batch_size, rank, world_size, start_batch)
        total = self.num_rows(split)
        if total <= 0:
            raise DataError(f"split {split!r} has no rows")
        i = start_batch
        while True:
            first = i * batch_size
            n = batch_size
            if split == "val":
                if first >= total:
                    return
                n = min(batch_size, total - first)
            b = _local_rows(n, batch_size, world_size)
            if b == 0:
                return
            lo = first + rank * b
            try:
                batch = self._batch(self._wrapped_rows(split, lo, lo + b, total))
            except BatchRowError as e:  # name the row in the data, not in the batch
                raise DataError(f"{e.what}: {self.describe_row(split, (lo + e.row) % total)}") from None
            yield batch
            i += 1

    def _wrapped_rows(self, split: str, start: int, stop: int, total: int) -> Columns:
        """Rows of the endless stream epoch after epoch: row ``g`` is row ``g % total``."""
        parts = []
        while start < stop:
            lo = start % total
            hi = min(total, lo + stop - start)
            parts.append(self.rows(split, lo, hi))
            start += hi - lo
        return Columns.concat(parts)


class StreamDataset(_BatchingDataset):
    """A source read front to back in chunks; every rank reads the stream and keeps its slice.

    Malformed rows are skipped and counted (:meth:`skip_malformed`), with one summary
    warning per split, or raise :class:`DataError` when ``strict``.
    """

    def __init__(self, strict: bool):
        self.strict = strict
        self._bad: Dict[str, int] = defaultdict(int)  # malformed rows counted per key (split or file)
        self._bad_seen: Dict[str, int] = defaultdict(int)  # rows below this index are counted
        self._bad_first: Dict[str, str] = {}
        self._bad_warned = 0

    @abc.abstractmethod
    def chunks(self, split: str) -> Iterable[Columns]:
        """One pass over ``split`` in chunks of any size."""

    def stats(self) -> Dict[str, int]:
        return {"malformed_lines": sum(self._bad.values())}

    def epoch_rows(self, split: str = "train", count: bool = False) -> Optional[int]:
        """Counted by one pass over ``split`` (well-formed rows only) when ``count``; cached."""
        known = getattr(self, "_epoch_rows", {})
        if split not in known and count:
            known[split] = sum(len(chunk) for chunk in self.chunks(split))
            self._epoch_rows = known
        return known.get(split)

    def skip_malformed(self, key: str, rows: np.ndarray, upto: int, describe: Callable[[int], str]) -> None:
        """Note malformed rows, or raise :class:`DataError` for the first when ``strict``.

        ``rows`` are their (sorted) positions in the sequence ``key`` names (a split, or a
        file read in every pass), all below ``upto``, the end of the part read so far;
        ``describe(i)`` tells what is wrong with ``rows[i]``. A row is counted once, however
        often it is read."""
        if len(rows) and self.strict:
            raise DataError(describe(0))
        fresh = np.flatnonzero(np.asarray(rows) >= self._bad_seen[key])
        if len(fresh):
            self._bad[key] += len(fresh)
            self._bad_first.setdefault(key, describe(int(fresh[0])))
        self._bad_seen[key] = max(self._bad_seen[key], upto)

    def _warn_malformed(self) -> None:
        total = sum(self._bad.values())
        if total > self._bad_warned:
            first = "; ".join(list(self._bad_first.values())[:3])
            warnings.warn(
                f"{type(self).__name__}: skipped {total - self._bad_warned} malformed lines (first: {first}); "
                "set data.strict=true to stop at the first one"
            )
            self._bad_warned = total

    def batches(self, split, batch_size, rank=0, world_size=1, start_batch=0) -> Iterator[Batch]:
        _check_args(split, batch_size, rank, world_size, start_batch)
        pending: List[Columns] = []
        have = 0
        try:
            for chunk in self._rows_after(split, start_batch * batch_size):
                pending.append(chunk)
                have += len(chunk)
                while have >= batch_size:
                    rows = Columns.concat(pending)
                    b = batch_size // world_size
                    yield self._batch(rows.slice(rank * b, (rank + 1) * b))
                    rest = rows.slice(batch_size, have)
                    pending, have = ([rest], len(rest)) if len(rest) else ([], 0)
            b = _local_rows(have, batch_size, world_size)  # val only: train never ends
            if b:
                yield self._batch(Columns.concat(pending).slice(rank * b, (rank + 1) * b))
        finally:
            self._warn_malformed()

    def _rows_after(self, split: str, skip: int) -> Iterator[Columns]:
        """``split``'s rows from row ``skip`` on; ``train`` starts over at its end, forever."""
        while True:
            epoch_rows = 0
            for chunk in self.chunks(split):
                n = len(chunk)
                epoch_rows += n
                if skip >= n:
                    skip -= n
                    continue
                if skip:
                    chunk, skip = chunk.slice(skip, n), 0
                yield chunk
            if split != "train":
                return
            if epoch_rows == 0:
                raise DataError(f"split {split!r} has no rows")
            skip %= epoch_rows
