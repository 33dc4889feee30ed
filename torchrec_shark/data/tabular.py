"""Any TSV / CSV (with a header row) or Parquet file with declared columns.

``data.label`` is the 0/1 label column, ``data.dense`` the numeric columns (a missing value may be empty) and
``data.sparse`` the categorical ones, which become the sparse features of the same names.
A categorical value is split by ``data.multi_hot_sep`` into a bag; every token is hashed
with pandas' stable SipHash (:func:`pandas.util.hash_array`, not Python's salted ``hash``)
modulo its table size less one; a missing value is id 0. The last row of every table is
the field's out-of-vocabulary row, shared by ids rarer than ``data.min_count`` in the training
split. Numbers in Parquet are hashed by their text, so a file hashes the same in either format.
Data row ``i`` (counted from 0 over all files) is a validation row when
``i % round(1 / val_fraction) == 0``.

Dense columns reach the model through the transforms of :mod:`torchrec_shark.data.transforms`
(``data.dense_transform`` / ``data.dense_transforms``; ``bucketize`` turns a column into a sparse
feature of its name), learned from the training split in one pass
(:mod:`torchrec_shark.data.statistics`). The trainer keeps those statistics with the run; a
dataset used on its own computes them at its first ``batches`` call.

Rows with a wrong number of columns, a label other than 0/1 or a non-numeric dense value
are skipped and counted, or raise :class:`DataError` under ``data.strict``. Files are read
in blocks with pyarrow.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from torchrec_shark.data.columns import Columns, StreamDataset, table_sizes, val_every
from torchrec_shark.data.criteo_tsv import list_files
from torchrec_shark.data.statistics import DataStatistics, compute_statistics
from torchrec_shark.data.transforms import TRANSFORMS, TabularTransforms, hash_size
from torchrec_shark.data.types import DataError

BLOCK_BYTES = 1 << 22
PARQUET_ROWS = 65536
_FORMATS = {".tsv": "tsv", ".txt": "tsv", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def file_format(path: str, declared: str) -> str:
    if declared != "auto":
        if declared not in ("tsv", "csv", "parquet"):
            raise DataError(f"data.file_format={declared!r} is not one of auto, tsv, csv, parquet")
        return declared
    name = path[:-3] if path.endswith(".gz") else path[:-4] if path.endswith(".bz2") else path
    ext = os.path.splitext(name)[1].lower()
    if ext not in _FORMATS:
        raise DataError(f"cannot tell the format of {path!r} from its extension: set data.file_format")
    return _FORMATS[ext]


class Tabular(StreamDataset):
    """The ``tabular`` source."""

    def __init__(self, cfg):
        super().__init__(bool(cfg.strict))
        if not cfg.path:
            raise DataError("data.path is required for data.source=tabular")
        self.files = [(f, file_format(f, cfg.file_format)) for f in list_files(cfg.path)]
        self.label = str(cfg.label)
        self.dense = [str(c) for c in cfg.dense]
        self.sparse = [str(c) for c in cfg.sparse]
        if not self.sparse:
            raise DataError("data.sparse is empty: declare the categorical columns of the file")
        self.columns = [self.label] + self.dense + self.sparse
        if len(set(self.columns)) != len(self.columns):
            raise DataError(f"data.label, data.dense and data.sparse name a column twice: {self.columns}")
        self.feature_names = list(self.sparse)
        self.num_embeddings_per_feature = table_sizes(
            cfg.num_embeddings_per_feature, self.feature_names, "data.num_embeddings_per_feature"
        )
        self.num_dense = len(self.dense)
        self.sep = str(cfg.multi_hot_sep)
        self.val_every = val_every(cfg.val_fraction)
        self._setup_transforms(cfg)
        for path, fmt in self.files:
            try:
                names = (pq.ParquetFile(path).schema_arrow.names if fmt == "parquet"
                         else self._open_csv(path, fmt, None).schema.names)
            except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
                raise DataError(f"{path}: cannot be read as {fmt} ({str(e).splitlines()[0]})") from None
            missing = [c for c in self.columns if c not in names]
            if missing:
                raise DataError(f"{path}: declared column(s) {missing} missing from the file (it has {names})")

    def _setup_transforms(self, cfg) -> None:
        """Features and table sizes as the model sees them; the statistics come later."""
        self.kinds: Dict[str, str] = {c: str(cfg.dense_transform) for c in self.dense}
        for c, kind in dict(cfg.dense_transforms).items():
            if c not in self.kinds:
                raise DataError(f"data.dense_transforms names {c!r}, not a data.dense column {self.dense}")
            self.kinds[c] = str(kind)
        for c, kind in self.kinds.items():
            if kind not in TRANSFORMS:
                raise DataError(f"dense transform {kind!r} of column {c!r} is not one of {list(TRANSFORMS)}")
        self.num_buckets = int(cfg.num_buckets)
        self.min_count = int(cfg.min_count)
        self.table_sizes = list(self.num_embeddings_per_feature)  # of the declared sparse columns
        self.hash_sizes = [hash_size(n) for n in self.table_sizes]
        buckets = [c for c in self.dense if self.kinds[c] == "bucketize"]
        self.feature_names = self.sparse + buckets
        self.num_embeddings_per_feature = self.table_sizes + [self.num_buckets + 1] * len(buckets)
        self.num_dense = len(self.dense) - len(buckets)
        self.transforms: Optional[TabularTransforms] = None
        self._described: Dict = {}

    # ------------------------------------------------------------ statistics and transforms
    uses_statistics = True

    def compute_statistics(self) -> DataStatistics:
        """One pass over the training split's raw rows."""
        return compute_statistics(self.chunks("train"), self.dense, dict(zip(self.sparse, self.hash_sizes)))

    def check_statistics(self, stats: DataStatistics, where: str = "given") -> None:
        """Raise :class:`DataError` unless ``stats`` cover this source's columns and tables."""
        missing = [c for c in self.dense if c not in stats.dense] + [f for f in self.sparse if f not in stats.id_counts]
        if missing:
            raise DataError(f"the data statistics ({where}) lack column(s) {missing}: they were computed for "
                            "other columns; train from scratch to compute new ones")
        for f, n in zip(self.sparse, self.hash_sizes):
            if len(stats.id_counts[f]) != n:
                raise DataError(f"the data statistics ({where}) count the ids of {f!r} over {len(stats.id_counts[f])} "
                                f"rows, this source hashes them into {n}: keep data.num_embeddings_per_feature")

    def _resolve(self, stats: DataStatistics) -> TabularTransforms:
        return TabularTransforms.resolve(stats, self.kinds, self.num_buckets, self.sparse, self.table_sizes,
                                         self.min_count)

    def describe_transforms(self, stats: DataStatistics) -> Dict:
        return self._resolve(stats).describe(stats)

    def use_statistics(self, stats: DataStatistics) -> None:
        """Transform every later batch with ``stats``; warn about dense inputs that saturate the model."""
        self.check_statistics(stats)
        self.transforms = self._resolve(stats)
        self._described = self.transforms.describe(stats)
        for message in self.transforms.saturating(stats):
            warnings.warn(message)

    def batches(self, split, batch_size, rank=0, world_size=1, start_batch=0):
        if self.transforms is None:
            self.use_statistics(self.compute_statistics())
        return super().batches(split, batch_size, rank, world_size, start_batch)

    def _batch(self, cols: Columns):
        return super()._batch(self.transforms.apply(cols))

    def stats(self) -> Dict:
        return {**super().stats(), "data_transforms": self._described}

    # ------------------------------------------------------------ reading
    def _open_csv(self, path, fmt: str, handler, column_names: Optional[List[str]] = None):
        return pcsv.open_csv(
            path,
            read_options=pcsv.ReadOptions(block_size=BLOCK_BYTES, column_names=column_names),
            parse_options=pcsv.ParseOptions(
                delimiter="\t" if fmt == "tsv" else ",",
                # Opening parses the first block: without a handler (the header check) a bad row there
                # would fail before the rows are read and counted.
                invalid_row_handler=handler or (lambda row: "skip"),
            ),
            convert_options=pcsv.ConvertOptions(
                include_columns=None if handler is None else self.columns,
                column_types={c: pa.string() for c in self.columns},
                strings_can_be_null=True,
                null_values=[""],
            ),
        )

    def _blocks(self, path: str, fmt: str) -> Iterator[Tuple[pa.RecordBatch, List["_BadLine"]]]:
        """Record batches, each with the rows of wrong shape skipped while reading it."""
        if fmt == "parquet":
            for rb in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_ROWS, columns=self.columns):
                yield rb, []
            return
        yield from self._csv_blocks(path, fmt, path, None)

    def _csv_blocks(self, source, fmt: str, path: str, names: Optional[List[str]]):
        """:meth:`_blocks` of a text file or of recovered lines (``names``: its header's columns).

        An unbalanced quote makes the parser read on to the next quote, over line ends, and hand
        over all those lines as one bad row. Only its first line is the bad row: the lines after
        it are parsed again on their own and follow the block they were found in (so they are
        read, and split into train and val, the same way on every pass)."""
        invalid: List[pcsv.InvalidRow] = []

        def handler(row):
            invalid.append(row)
            return "error" if self.strict and "\n" not in row.text else "skip"

        def split(rows):
            bad, recovered = [], []
            for row in rows:
                head, sep, rest = row.text.partition("\n")
                if not sep:
                    bad.append(_BadLine(row.text, f"has {row.actual_columns} columns, expected {row.expected_columns}"))
                    continue
                bad.append(_BadLine(head, "has an unbalanced quote (it would swallow the lines after it)"))
                recovered.append(rest)
            return bad, recovered

        try:
            reader = self._open_csv(source, fmt, handler, names)
        except pa.ArrowInvalid:  # strict: the handler stopped at a bad row of the first block
            if not invalid:
                raise
            yield None, split(invalid)[0]
            return
        names = names or reader.schema.names
        while True:
            try:
                rb = reader.read_next_batch()
            except StopIteration:
                break
            except pa.ArrowInvalid:
                if not invalid:
                    raise
                rb = None
            bad, recovered = split(invalid)
            invalid = []
            if self.strict and bad:
                yield None, bad
                return
            yield rb, bad
            for text in recovered:
                yield from self._csv_blocks(pa.BufferReader(text.encode()), fmt, path, names)
            if rb is None:
                break

    def chunks(self, split: str) -> Iterator[Columns]:
        first = 0  # index of the block's first data row over all files
        for path, fmt in self.files:
            key, delivered = f"file {path}", 0
            for rb, invalid in self._blocks(path, fmt):
                self.skip_malformed(
                    key,
                    np.full(len(invalid), delivered),
                    delivered + (0 if rb is None else rb.num_rows),
                    lambda i: f"{path}: row {invalid[i].text[:200]!r} {invalid[i].why}",
                )
                if rb is None or rb.num_rows == 0:
                    continue
                index = first + np.arange(rb.num_rows)
                keep = np.flatnonzero((index % self.val_every == 0) == (split == "val"))
                first += rb.num_rows
                delivered += rb.num_rows
                yield self._convert(split, path, rb.take(pa.array(keep)), index[keep], first)

    def _convert(self, split: str, path: str, rb: pa.RecordBatch, index: np.ndarray, upto: int) -> Columns:
        label, label_ok = _numbers(rb.column(self.label))
        label_ok &= (label == 0) | (label == 1)
        dense = np.zeros((rb.num_rows, len(self.dense)))
        ok = label_ok.copy()
        why = np.full(rb.num_rows, -1)  # column of the first bad value
        why[~label_ok] = 0
        for i, c in enumerate(self.dense):
            x, x_ok = _numbers(rb.column(c), missing=0.0)
            x_ok &= np.isfinite(x)
            why[ok & ~x_ok] = i + 1
            ok &= x_ok
            dense[:, i] = np.where(pc.is_valid(rb.column(c)).to_numpy(zero_copy_only=False), x, np.nan)  # missing
        bad = np.flatnonzero(~ok)

        def describe(i: int) -> str:
            r = bad[i]
            c = self.columns[why[r]]
            kind = "0 or 1" if why[r] == 0 else "a finite number"
            return f"{path}: data row {index[r]} (0-based), column {c!r} value {rb.column(c)[r].as_py()!r} is not {kind}"

        self.skip_malformed(split, index[bad], upto, describe)
        if len(bad):
            rb = rb.take(pa.array(np.flatnonzero(ok)))
        ids, lengths = [], []
        for c, n in zip(self.sparse, self.hash_sizes):
            v, ln = self._hash(rb.column(c), n)
            ids.append(v)
            lengths.append(ln)
        # raw float64 (NaN: missing) until the transforms: a timestamp keeps its seconds
        return Columns(dense[ok], label[ok].astype(np.float32), ids, lengths)

    def _hash(self, col: pa.Array, n: int) -> Tuple[np.ndarray, np.ndarray]:
        """Ids of a categorical column (bags split by ``multi_hot_sep``; missing: id 0)."""
        import pandas as pd

        if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
            col = pc.cast(col, pa.string())
        present = pc.is_valid(col).to_numpy(zero_copy_only=False)
        filled = pc.fill_null(col, "")
        if self.sep:
            bags = pc.split_pattern(filled, self.sep)  # a missing value: [""]
            lengths = pc.list_value_length(bags).to_numpy(zero_copy_only=False).astype(np.int32)
            tokens = pc.list_flatten(bags)
        else:
            lengths, tokens = np.ones(len(col), np.int32), filled
        codes = pc.dictionary_encode(tokens)
        words = codes.dictionary.to_numpy(zero_copy_only=False).astype(object)
        ids = (pd.util.hash_array(words) % np.uint64(n)).astype(np.int64)[codes.indices.to_numpy(zero_copy_only=False)]
        if not present.all():
            ids[~np.repeat(present, lengths)] = 0
        return ids, lengths


@dataclass(frozen=True)
class _BadLine:
    """A line skipped while parsing, and why."""

    text: str
    why: str


def _numbers(col: pa.Array, missing: float = np.nan) -> Tuple[np.ndarray, np.ndarray]:
    """A column as float64 and whether each value is a number (a missing one becomes ``missing``)."""
    valid = pc.is_valid(col).to_numpy(zero_copy_only=False)
    try:
        x = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
        ok = np.ones(len(col), bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        values = col.to_pylist()
        x, ok = np.empty(len(values)), np.ones(len(values), bool)
        for i, v in enumerate(values):
            try:
                x[i] = float(v) if v is not None else missing
            except (TypeError, ValueError):
                x[i], ok[i] = 0.0, False
    x = np.where(valid, x, missing)
    ok &= valid | ~np.isnan(missing)
    return x, ok
