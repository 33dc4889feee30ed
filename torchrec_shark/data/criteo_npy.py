"""Criteo in TorchRec's preprocessed per-day ``.npy`` format.

``data.path`` holds ``day_{i}_dense.npy`` (float32 ``[n, 13]``, already log-transformed),
``day_{i}_sparse.npy`` (integer ``[n, 26]``) and ``day_{i}_labels.npy`` (``[n, 1]``), as
written by ``torchrec.datasets.criteo.BinaryCriteoUtils.tsv_to_npys``. ``data.train_days``
and ``data.val_days`` pick the days; ids are taken modulo the table sizes as
``InMemoryBinaryCriteoIterDataPipe`` does. Files are memory-mapped and each rank reads only
the rows of its slice of every global batch.
"""

from __future__ import annotations

import os
from typing import Dict, List

import numpy as np
from torchrec.datasets.criteo import CAT_FEATURE_COUNT, INT_FEATURE_COUNT

from torchrec_shark.data.columns import Columns, IndexedDataset, table_sizes
from torchrec_shark.data.types import DataError

FEATURE_NAMES = [f"C{i}" for i in range(1, CAT_FEATURE_COUNT + 1)]  # as criteo_tsv


class CriteoNpy(IndexedDataset):
    """The ``criteo_npy`` source."""

    def __init__(self, cfg):
        if not cfg.path or not os.path.isdir(cfg.path):
            raise DataError(f"data.path={cfg.path!r} must be a directory of day_<i>_{{dense,sparse,labels}}.npy")
        self.feature_names = list(FEATURE_NAMES)
        self.num_embeddings_per_feature = table_sizes(
            cfg.num_embeddings_per_feature, self.feature_names, "data.num_embeddings_per_feature"
        )
        self.num_dense = INT_FEATURE_COUNT
        self._tables = np.asarray(self.num_embeddings_per_feature, np.int64)
        self.path = cfg.path
        self._day_numbers = {"train": list(cfg.train_days), "val": list(cfg.val_days)}
        self._days: Dict[str, List[Dict[str, np.ndarray]]] = {
            "train": [self._load_day(cfg.path, d) for d in cfg.train_days],
            "val": [self._load_day(cfg.path, d) for d in cfg.val_days],
        }
        if not self._days["train"] or not self._days["val"]:
            raise DataError("data.train_days and data.val_days must each name at least one day")
        self._starts = {s: np.cumsum([0] + [len(d["labels"]) for d in days]) for s, days in self._days.items()}

    def _load_day(self, path: str, day: int) -> Dict[str, np.ndarray]:
        arrays = {}
        for kind, width in (("dense", INT_FEATURE_COUNT), ("sparse", CAT_FEATURE_COUNT), ("labels", 1)):
            f = os.path.join(path, f"day_{day}_{kind}.npy")
            if not os.path.isfile(f):
                raise DataError(f"criteo_npy: {f} does not exist")
            a = np.load(f, mmap_mode="r")
            if a.ndim == 1 and kind == "labels":
                a = a.reshape(-1, 1)
            if a.ndim != 2 or a.shape[1] != width:
                raise DataError(f"criteo_npy: {f} has shape {a.shape}, expected [rows, {width}]")
            arrays[kind] = a
        if not len(arrays["dense"]) == len(arrays["sparse"]) == len(arrays["labels"]):
            raise DataError(
                f"criteo_npy: day {day} files disagree in rows: "
                + ", ".join(f"{k} {len(a)}" for k, a in arrays.items())
            )
        return arrays

    def num_rows(self, split: str) -> int:
        return int(self._starts[split][-1])

    def describe_row(self, split: str, row: int) -> str:
        days = self._day_numbers[split]
        i = int(np.searchsorted(self._starts[split], row, side="right")) - 1
        local = row - int(self._starts[split][i])
        return f"{split} row {row}: day {days[i]} row {local} ({os.path.join(self.path, f'day_{days[i]}_*.npy')})"

    def rows(self, split: str, start: int, stop: int) -> Columns:
        starts = self._starts[split]
        parts = []
        day = int(np.searchsorted(starts, start, side="right")) - 1
        while start < stop:
            arrays = self._days[split][day]
            lo, hi = start - starts[day], min(stop, starts[day + 1]) - starts[day]
            sparse = np.asarray(arrays["sparse"][lo:hi], dtype=np.int64) % self._tables
            parts.append(
                Columns(
                    dense=np.asarray(arrays["dense"][lo:hi], dtype=np.float32),
                    labels=np.asarray(arrays["labels"][lo:hi, 0], dtype=np.float32),
                    ids=list(sparse.T),
                    lengths=[None] * CAT_FEATURE_COUNT,
                )
            )
            start += hi - lo
            day += 1
        return Columns.concat(parts)
