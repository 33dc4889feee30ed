"""Shared by the data tests: batches as numpy, and small Criteo-format files."""

from __future__ import annotations

from typing import Iterable, List, Sequence

import numpy as np

from torchrec_shark.data.columns import Columns

SHARED_DATA = __import__("pathlib").Path(__file__).resolve().parents[3] / "shared" / "data"


def rows_of(batches: Iterable, feature_names: Sequence[str]) -> Columns:
    """Concatenated rows of batches."""
    return Columns.concat([Columns.from_batch(b, feature_names) for b in batches])


def assert_same_rows(a: Columns, b: Columns) -> None:
    np.testing.assert_array_equal(a.dense, b.dense)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert len(a.ids) == len(b.ids)
    for f in range(len(a.ids)):
        np.testing.assert_array_equal(a.ids[f], b.ids[f])
        np.testing.assert_array_equal(a.lengths[f], b.lengths[f])


def take(it, n: int) -> List:
    return [next(it) for _ in range(n)]


def criteo_rows(n: int, seed: int = 0) -> List[List[str]]:
    """Random valid Criteo lines (40 fields) with missing values and negative integers."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = str(int(rng.random() < 0.3))
        ints = [str(int(v)) if rng.random() > 0.2 else "" for v in rng.integers(-3, 5000, 13)]
        cats = [f"{int(v):08x}" if rng.random() > 0.1 else "" for v in rng.integers(0, 1 << 32, 26)]
        rows.append([label] + ints + cats)
    return rows


def write_lines(path, rows: Sequence[Sequence[str]], end: str = "\n") -> None:
    with open(path, "w", newline="") as f:
        for r in rows:
            f.write("\t".join(r) + end)


def reference_criteo(rows: Sequence[Sequence[str]], table: int = 100_000) -> Columns:
    """What the criteo_tsv source must produce for valid rows, written the obvious way."""
    dense = np.array([[np.log1p(max(int(x or 0), 0)) for x in r[1:14]] for r in rows], np.float32).reshape(-1, 13)
    ids = np.array([[int(x or "0", 16) % table for x in r[14:]] for r in rows], np.int64).reshape(-1, 26)
    return Columns(
        dense,
        np.array([float(r[0]) for r in rows], np.float32),
        list(ids.T),
        [np.ones(len(rows), np.int32)] * 26,
    )
