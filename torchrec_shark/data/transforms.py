"""What a tabular row becomes before the model sees it: dense-column transforms and rare ids.

Per dense column (``data.dense_transform``, overridden per column by ``data.dense_transforms``):

- ``none``: the value as read.
- ``log1p``: ``log(1 + max(x, 0))``, negatives clamped to 0 as for Criteo.
- ``standardize``: ``(x - mean) / std``.
- ``minmax``: ``(x - min) / (max - min)``, clipped to [0, 1] (a value outside the training range
  is held at its edge).
- ``bucketize``: the column leaves the dense features and becomes a sparse feature of the same
  name with ``data.num_buckets + 1`` rows: id 0 for a missing value, ids ``1..num_buckets`` for
  the training split's quantile buckets (equal-frequency; repeated edges merge buckets).
- ``auto`` (the default): ``standardize``, or ``log1p`` then ``standardize`` for a non-negative
  column whose training maximum lies more than ``AUTO_LOG_Z`` standard deviations above its mean
  (counts, prices, durations: the long tail is compressed before it is scaled), then clipped to
  ``[-AUTO_CLIP, AUTO_CLIP]`` so a value far outside the training range cannot saturate the MLP.
  Every scale lands near unit variance: a Unix timestamp (~1.7e9, spread ~1e7) as well as a
  ratio in [0, 1]. A column whose mean and std a few extreme values dominate (one 1e300 per 100
  rows: a std ``AUTO_OUTLIER_RATIO`` times its interquartile scale) is centred on its median and
  scaled by that interquartile scale instead (``standardize_robust``), with a warning naming it:
  its ordinary values keep their spread and the extreme ones are clipped.

All statistics come from the training split (:mod:`torchrec_shark.data.statistics`). A missing
dense value becomes 0 for ``none`` and ``log1p`` (as before, and as for Criteo) and the training
mean for the scaled kinds (0 after ``standardize``).

Sparse fields: ids are hashed into the first ``n - 1`` rows of a field's table of ``n``; the last
row is the field's out-of-vocabulary row, shared by every id seen fewer than ``data.min_count``
times in the training split (counted per table row, so hash collisions add up). ``min_count=0``
turns the mapping off; with 1, only ids never seen in training (e.g. new in validation) share it.

Example::

    transforms = TabularTransforms.resolve(stats, {"ts": "auto", "price": "bucketize"}, num_buckets=16,
                                           sparse=["user"], table_sizes=[1000], min_count=2)
    model_rows = transforms.apply(raw_rows)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from torchrec_shark.data.columns import Columns
from torchrec_shark.data.statistics import QUANTILE_POINTS, DataStatistics, DenseColumnStats

TRANSFORMS = ("auto", "none", "log1p", "standardize", "minmax", "bucketize")
AUTO_LOG_Z = 10.0
AUTO_CLIP = 10.0
# std over the interquartile scale above which a few extreme values, not the column, set the std.
AUTO_OUTLIER_RATIO = 10.0
# A dense input this large (|x|) drives ReLU pre-activations to the same order and the logits
# with them: the sigmoid saturates and the log loss explodes.
SATURATING_MAGNITUDE = 100.0


def oov_row(table_size: int) -> int:
    """The row shared by a field's rare ids: the last one."""
    return table_size - 1


def hash_size(table_size: int) -> int:
    """Rows the hashed ids of a field spread over (all but the out-of-vocabulary row)."""
    return max(table_size - 1, 1)


@dataclass
class DenseTransform:
    """``y = clip((f(x) - shift) / scale)``; a missing ``x`` (NaN) gives ``fill``."""

    column: str
    requested: str
    # none | log1p | standardize | log1p_standardize | minmax | bucketize, or auto's
    # standardize_robust | log1p_standardize_robust
    applied: str
    shift: float = 0.0
    scale: float = 1.0
    clip: Optional[List[float]] = None
    fill: float = 0.0
    edges: List[float] = field(default_factory=list)  # bucketize only
    note: Optional[str] = None  # why the statistics were not used as usual (a warning at start)

    @property
    def is_bucketize(self) -> bool:
        return self.applied == "bucketize"

    def apply(self, x: np.ndarray) -> np.ndarray:
        missing = np.isnan(x)
        if self.is_bucketize:
            ids = 1 + np.searchsorted(np.asarray(self.edges), x, side="right")
            return np.where(missing, 0, ids).astype(np.int64)
        v = np.log1p(np.maximum(x, 0.0)) if self.applied.startswith("log1p") else x
        y = (v - self.shift) / self.scale
        if self.clip is not None:
            y = np.clip(y, self.clip[0], self.clip[1])
        return np.where(missing, self.fill, y)

    def magnitude(self, s: DenseColumnStats) -> float:
        """The largest ``|input|`` the model gets from the training split (transforms are monotone)."""
        if self.is_bucketize or s.count == 0:
            return 0.0
        return float(np.abs(self.apply(np.array([s.min, s.max]))).max())

    def describe(self) -> Dict:
        d = {"transform": self.requested, "applied": self.applied}
        if self.is_bucketize:
            d["edges"] = list(self.edges)
        else:
            d.update(shift=self.shift, scale=self.scale)
            if self.clip is not None:
                d["clip"] = list(self.clip)
        return d


def resolve_dense(column: str, kind: str, s: DenseColumnStats, num_buckets: int) -> DenseTransform:
    """The concrete transform ``kind`` stands for, given the column's training statistics."""
    if kind == "none":
        return DenseTransform(column, kind, "none")
    if kind == "log1p":
        return DenseTransform(column, kind, "log1p")
    if kind == "standardize":
        return DenseTransform(column, kind, "standardize", s.mean, _nonzero(s.std))
    if kind == "minmax":
        scale = _nonzero(s.max - s.min)
        return DenseTransform(column, kind, "minmax", s.min, scale, [0.0, 1.0], (s.mean - s.min) / scale)
    if kind == "bucketize":
        grid = np.linspace(0.0, 1.0, QUANTILE_POINTS)
        inner = np.interp(np.arange(1, num_buckets) / num_buckets, grid, s.quantiles)
        return DenseTransform(column, kind, "bucketize", edges=[float(e) for e in np.unique(inner)])
    if kind == "auto":
        # Only a long upper tail calls for log1p: a few zeros below a timestamp column must not log it.
        upper = (s.max - s.mean) / s.std if s.std > 0 else 0.0
        clip = [-AUTO_CLIP, AUTO_CLIP]
        if s.min >= 0 and upper > AUTO_LOG_Z:
            applied, mean, std = "log1p_standardize", s.log_mean, s.log_std
            q = np.log1p(np.maximum(np.asarray(s.quantiles), 0.0))
        else:
            applied, mean, std, q = "standardize", s.mean, s.std, np.asarray(s.quantiles)
        robust = robust_scale(q)
        if not (np.isfinite(mean) and np.isfinite(std)) or (robust > 0 and std > AUTO_OUTLIER_RATIO * robust):
            center = float(np.interp(0.5, np.linspace(0.0, 1.0, len(q)), q))
            beyond = float(np.mean(np.abs(q - center) > AUTO_OUTLIER_RATIO * robust)) if robust > 0 else 0.0
            note = (f"dense column {column!r}: a few extreme values set its mean and std (std {std:.3g}, "
                    f"interquartile scale {robust:.3g}; about {beyond:.1%} of its {s.count:,} training values lie "
                    f"beyond {AUTO_OUTLIER_RATIO:g} of those scales from the median, up to {s.max:.3g}): scaled by "
                    f"its median and interquartile range instead, extreme values clipped to +-{AUTO_CLIP:g}")
            return DenseTransform(column, kind, f"{applied}_robust", center, _nonzero(robust), clip, note=note)
        return DenseTransform(column, kind, applied, mean, _nonzero(std), clip)
    raise ValueError(f"dense transform {kind!r} of column {column!r} is not one of {list(TRANSFORMS)}")


def robust_scale(quantiles: np.ndarray) -> float:
    """A std-like scale from the quantiles (at evenly spaced levels) that extreme values do not move: the
    interquartile range / 1.349 (a normal column's std), or a wider central range where that is 0."""
    grid = np.linspace(0.0, 1.0, len(quantiles))
    for lo, z in ((0.25, 0.6745), (0.05, 1.6449), (0.01, 2.3263)):
        width = float(np.interp(1 - lo, grid, quantiles) - np.interp(lo, grid, quantiles))
        if width > 0 and np.isfinite(width):
            return width / (2 * z)
    return 0.0


def _nonzero(scale: float) -> float:
    return scale if scale > 0 and np.isfinite(scale) else 1.0  # a constant column: centred, not scaled


@dataclass
class TabularTransforms:
    """Raw tabular rows (all dense columns, hashed ids) to model rows."""

    dense: List[DenseTransform]  # one per raw dense column, in order
    sparse: List[str]
    oov_rows: List[int]
    keep: List[Optional[np.ndarray]]  # per sparse field: which rows are in the vocabulary (None: all)
    min_count: int

    @staticmethod
    def resolve(
        stats: DataStatistics,
        kinds: Dict[str, str],
        num_buckets: int,
        sparse: Sequence[str],
        table_sizes: Sequence[int],
        min_count: int,
    ) -> "TabularTransforms":
        dense = [resolve_dense(c, k, stats.dense[c], num_buckets) for c, k in kinds.items()]
        keep = [stats.id_counts[f] >= min_count if min_count > 0 else None for f in sparse]
        return TabularTransforms(dense, list(sparse), [oov_row(n) for n in table_sizes], keep, min_count)

    def apply(self, raw: Columns) -> Columns:
        x = np.asarray(raw.dense, np.float64)
        dense_cols, bucket_ids = [], []
        for i, t in enumerate(self.dense):
            (bucket_ids if t.is_bucketize else dense_cols).append(t.apply(x[:, i]))
        dense = np.stack(dense_cols, 1) if dense_cols else np.zeros((len(raw), 0))
        ids = []
        for v, keep, oov in zip(raw.ids, self.keep, self.oov_rows):
            ids.append(v if keep is None else np.where(keep[v], v, oov))
        return Columns(
            dense.astype(np.float32),
            raw.labels,
            ids + bucket_ids,
            list(raw.lengths) + [None] * len(bucket_ids),
        )

    def saturating(self, stats: DataStatistics) -> List[str]:
        """A warning per dense column that reaches the model at a magnitude that saturates it, or whose
        extreme values made ``auto`` scale it robustly."""
        out = [t.note for t in self.dense if t.note]
        for t in self.dense:
            mag = t.magnitude(stats.dense[t.column])
            if mag > SATURATING_MAGNITUDE:
                out.append(
                    f"dense column {t.column!r} reaches the model at |x| up to {mag:.3g} (transform {t.applied}); "
                    f"inputs beyond ~{SATURATING_MAGNITUDE:g} saturate the MLP and the log loss explodes: scale it, "
                    f"e.g. +data.dense_transforms.{t.column}=auto (or standardize, log1p, bucketize)"
                )
        return out

    def describe(self, stats: DataStatistics) -> Dict:
        """The transforms, for ``metrics.json`` and ``data_stats.json``."""
        oov = {}
        for f, keep, counts in zip(self.sparse, self.keep, (stats.id_counts[f] for f in self.sparse)):
            seen = counts > 0
            rare = (counts < self.min_count) & seen if keep is not None else np.zeros_like(seen)
            oov[f] = {
                "rows_seen": int(seen.sum()),
                "rows_kept": int((seen & ~rare).sum()),
                "training_ids_to_oov": int(counts[rare].astype(np.int64).sum()),
            }
        return {
            "dense": {t.column: t.describe() for t in self.dense},
            "sparse": {"min_count": self.min_count, "oov_row": "last row of each table", "fields": oov},
        }
