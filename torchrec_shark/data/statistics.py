"""Statistics of a training split, computed in one streaming pass and kept with the run.

Dense columns: count, missing values, mean / std (Chan's pairwise update in float64), min / max,
the same moments of ``log(1 + max(x, 0))``, and a grid of quantiles. The quantiles come from a
uniform reservoir sample of ``RESERVOIR_ROWS`` rows (Vitter's algorithm R with a fixed seed, so
the same file gives the same sample): memory is ``RESERVOIR_ROWS * num_dense`` floats whatever
the file's length, and a quantile's rank is off by about ``1 / sqrt(RESERVOIR_ROWS)`` (0.4 %).
Missing values are left out of every dense statistic.

Sparse fields: how often each (hashed) id occurs, per table row, capped at ``COUNT_CAP`` so a
table costs one byte per row; that is all ``min_count`` (at most ``COUNT_CAP``) needs.

The statistics are written to ``<run_dir>/data_stats.json`` (dense) and
``<run_dir>/data_id_counts.npz`` (sparse) and read back by every later use of the run (resume,
warm starts, the passes), so the same row always becomes the same model input.

Example::

    stats = compute_statistics(dataset.chunks("train"), dense_names=["price"], hash_sizes={"user": 999})
    save_statistics(stats, run_dir)
    assert load_statistics(run_dir).dense["price"].mean == stats.dense["price"].mean
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

import numpy as np

from torchrec_shark.data.columns import Columns
from torchrec_shark.data.types import DataError

STATS_FILE = "data_stats.json"
COUNTS_FILE = "data_id_counts.npz"
RESERVOIR_ROWS = 65536
QUANTILE_POINTS = 1001  # quantiles at 0, 0.001, ..., 1
COUNT_CAP = 255
_SEED = 0x5EED


@dataclass
class DenseColumnStats:
    """One dense column over the training split (missing values left out)."""

    count: int
    missing: int
    mean: float
    std: float
    min: float
    max: float
    log_mean: float  # of log(1 + max(x, 0))
    log_std: float
    quantiles: List[float]  # at linspace(0, 1, QUANTILE_POINTS)


@dataclass
class DataStatistics:
    """What the transforms of a tabular source learn from its training split."""

    rows: int
    dense: Dict[str, DenseColumnStats] = field(default_factory=dict)
    # per sparse field: occurrences of each id (index: table row), capped at COUNT_CAP
    id_counts: Dict[str, np.ndarray] = field(default_factory=dict)

    def to_json(self) -> Dict:
        return {
            "rows": self.rows,
            "reservoir_rows": RESERVOIR_ROWS,
            "dense": {k: asdict(v) for k, v in self.dense.items()},
            "sparse_fields": {k: len(v) for k, v in self.id_counts.items()},
        }


class _Moments:
    """Count, mean and sum of squared deviations, merged chunk by chunk (Chan et al.).

    Squares are taken of values divided by a power of two at least the largest magnitude seen, so a
    column holding 1e300 keeps a finite std (squaring it overflows); dividing by a power of two is
    exact, so any other column gets the same bits as without it."""

    def __init__(self, width: int):
        self.n = np.zeros(width)
        self.mean = np.zeros(width)
        self.m2 = np.zeros(width)  # in units of scale**2
        self.scale = np.ones(width)

    def add(self, x: np.ndarray) -> None:
        present = ~np.isnan(x)
        n_b = present.sum(0).astype(np.float64)
        filled = np.where(present, x, 0.0)
        big = np.abs(filled).max(0) if len(filled) else np.zeros_like(self.scale)
        with np.errstate(divide="ignore"):
            need = np.where(np.isfinite(big) & (big > 1.0), np.exp2(np.ceil(np.log2(np.maximum(big, 1.0)))), 1.0)
        scale = np.maximum(self.scale, need)
        self.m2 = self.m2 * (self.scale / scale) ** 2
        self.scale = scale
        xs = filled / scale
        mean_b = xs.sum(0) / np.maximum(n_b, 1)
        m2_b = (np.where(present, xs - mean_b, 0.0) ** 2).sum(0)
        n = self.n + n_b
        mean = self.mean / scale
        delta = mean_b - mean
        with np.errstate(invalid="ignore", divide="ignore"):
            self.mean = np.where(n > 0, mean + delta * n_b / np.maximum(n, 1), 0.0) * scale
            self.m2 = self.m2 + m2_b + delta**2 * self.n * n_b / np.maximum(n, 1)
        self.n = n

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / np.maximum(self.n, 1)) * self.scale


class _Reservoir:
    """A uniform sample of at most ``size`` rows of a stream (algorithm R, seeded)."""

    def __init__(self, size: int, width: int):
        self.rows = np.empty((size, width))
        self.seen = 0
        self.rng = np.random.default_rng(_SEED)

    def add(self, x: np.ndarray) -> None:
        size = len(self.rows)
        fill = min(max(size - self.seen, 0), len(x))
        self.rows[self.seen : self.seen + fill] = x[:fill]
        rest = x[fill:]
        if len(rest):
            # row t (0-based over the stream) replaces a random slot with probability size / (t + 1)
            t = self.seen + fill + np.arange(len(rest))
            slot = (self.rng.random(len(rest)) * (t + 1)).astype(np.int64)
            take = slot < size
            self.rows[slot[take]] = rest[take]  # later rows win a shared slot, as in the sequential algorithm
        self.seen += len(x)

    def sample(self) -> np.ndarray:
        return self.rows[: min(self.seen, len(self.rows))]


def compute_statistics(chunks: Iterable[Columns], dense_names: List[str], hash_sizes: Dict[str, int]) -> DataStatistics:
    """One pass over raw training chunks (dense float64 with NaN for missing, ids below ``hash_sizes``)."""
    width = len(dense_names)
    raw, logs = _Moments(width), _Moments(width)
    lo, hi = np.full(width, np.inf), np.full(width, -np.inf)
    reservoir = _Reservoir(RESERVOIR_ROWS, width)
    counts = {f: np.zeros(n, np.uint8) for f, n in hash_sizes.items()}
    rows = 0
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        rows += len(chunk)
        x = np.asarray(chunk.dense, np.float64)
        if width:
            raw.add(x)
            logs.add(np.log1p(np.maximum(x, 0)))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-missing columns
                lo = np.fmin(lo, np.nanmin(x, 0))
                hi = np.fmax(hi, np.nanmax(x, 0))
            reservoir.add(x)
        for f, ids in zip(hash_sizes, chunk.ids):
            u, c = np.unique(ids, return_counts=True)
            counts[f][u] = np.minimum(counts[f][u].astype(np.int64) + c, COUNT_CAP)
    if rows == 0:
        raise DataError("the training split has no rows: cannot compute the data statistics")
    sample = reservoir.sample()
    grid = np.linspace(0.0, 1.0, QUANTILE_POINTS)
    dense = {}
    for i, name in enumerate(dense_names):
        present = sample[:, i][~np.isnan(sample[:, i])]
        quantiles = np.quantile(present, grid) if len(present) else np.zeros(QUANTILE_POINTS)
        n = int(raw.n[i])
        dense[name] = DenseColumnStats(
            count=n, missing=rows - n,
            mean=float(raw.mean[i]), std=float(raw.std[i]),
            min=float(lo[i]) if n else 0.0, max=float(hi[i]) if n else 0.0,
            log_mean=float(logs.mean[i]), log_std=float(logs.std[i]),
            quantiles=[float(q) for q in quantiles],
        )
    return DataStatistics(rows, dense, counts)


def save_statistics(stats: DataStatistics, run_dir: str, extra: Optional[Dict] = None) -> None:
    """``data_stats.json`` (with ``extra``, e.g. the transforms resolved from it) and ``data_id_counts.npz``."""
    os.makedirs(run_dir, exist_ok=True)
    np.savez_compressed(os.path.join(run_dir, COUNTS_FILE), **stats.id_counts)
    doc = {**stats.to_json(), **(extra or {})}
    tmp = os.path.join(run_dir, STATS_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, os.path.join(run_dir, STATS_FILE))  # readers never see half a file


def has_statistics(run_dir: Optional[str]) -> bool:
    return bool(run_dir) and os.path.isfile(os.path.join(run_dir, STATS_FILE))


def load_statistics(run_dir: str) -> DataStatistics:
    with open(os.path.join(run_dir, STATS_FILE)) as f:
        doc = json.load(f)
    counts_path = os.path.join(run_dir, COUNTS_FILE)
    counts = {}
    if os.path.isfile(counts_path):
        with np.load(counts_path) as z:
            counts = {k: z[k] for k in z.files}
    missing = set(doc.get("sparse_fields", {})) - set(counts)
    if missing:
        raise DataError(f"{counts_path} lacks the id counts of {sorted(missing)}")
    return DataStatistics(int(doc["rows"]), {k: DenseColumnStats(**v) for k, v in doc["dense"].items()}, counts)


def prepare_statistics(
    dataset,
    run_dir: str,
    source_dir: Optional[str],
    is_main: bool = True,
    from_main: Optional[Callable[[object], object]] = None,
    log: Callable[[str], None] = print,
) -> None:
    """Give ``dataset`` its training-split statistics and keep them in ``run_dir``.

    Taken from ``source_dir`` when it has them (the run being resumed, warm-started from or
    loaded by a pass), else computed by the main rank in one pass over the training split.
    Every rank then reads ``run_dir``'s copy, so all ranks and every later reader of the run
    transform a row the same way. ``from_main(obj)`` returns the main rank's ``obj`` on every
    rank (a broadcast; None for one process): it waits for the file and carries the main rank's
    error, so that no rank waits forever on a failed one. A dataset that learns nothing
    (``uses_statistics`` false) is left alone.
    """
    if not getattr(dataset, "uses_statistics", False):
        return
    if is_main:
        try:
            _write_statistics(dataset, run_dir, source_dir, log)
        except Exception as e:
            if from_main is not None:
                from_main(f"{type(e).__name__}: {e}")
            raise
    if from_main is not None:
        error = from_main(None)
        if error:
            raise DataError(f"the main rank could not prepare the data statistics: {error}")
    dataset.use_statistics(load_statistics(run_dir))


def _write_statistics(dataset, run_dir: str, source_dir: Optional[str], log: Callable[[str], None]) -> None:
    if has_statistics(source_dir):
        stats = load_statistics(source_dir)
        dataset.check_statistics(stats, source_dir)
        log(f"data statistics from {os.path.join(source_dir, STATS_FILE)}")
        if os.path.abspath(source_dir) == os.path.abspath(run_dir):  # a resume: the run's own files stay as they are
            return
    else:
        if source_dir:
            warnings.warn(
                f"{source_dir} has no {STATS_FILE} (a run from before dense transforms were learned, or of "
                "another source): computing them from this run's training split, so its inputs may differ "
                "from those the source run saw"
            )
        stats = dataset.compute_statistics()
        log(f"data statistics from one pass over the training split ({stats.rows:,} rows)")
    save_statistics(stats, run_dir, {"transforms": dataset.describe_transforms(stats)})
