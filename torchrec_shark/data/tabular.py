"""Any TSV / CSV (with a header row) or Parquet file with declared columns.

``data.label`` is the 0/1 label column, ``data.dense`` the numeric columns (a missing value may be empty) and
``data.sparse`` the categorical ones, which become the sparse features of the same names.
A categorical value is split by ``data.multi_hot_sep`` into a bag; every token is hashed
with pandas' stable SipHash (:func:`pandas.util.hash_array`, not Python's salted ``hash``)
modulo its table size less one; a missing value is id 0. The last row of every table is
the field's out-of-vocabulary row, shared by ids rarer than ``data.min_count`` in the training
split. Numbers in Parquet are hashed by their text, so a file hashes the same in either format.
Data row ``i`` (counted from 0 over all files: a Parquet row, a non-blank line after a text file's
header, malformed or not, so that a bad line moves no other row between the splits) is a validation
row when ``i % round(1 / val_fraction) == 0``.

Dense columns reach the model through the transforms of :mod:`torchrec_shark.data.transforms`
(``data.dense_transform`` / ``data.dense_transforms``; ``bucketize`` turns a column into a sparse
feature of its name), learned from the training split in one pass
(:mod:`torchrec_shark.data.statistics`). The trainer keeps those statistics with the run; a
dataset used on its own computes them at its first ``batches`` call.

Rows with a wrong number of columns, a quoted field left open at the line's end (a quoted field
may not span lines: :mod:`torchrec_shark.data.text_lines`), a label other than 0/1 or a
non-numeric dense value are skipped and counted, or raise :class:`DataError` under ``data.strict``;
every data row is either read or counted. Files are read in blocks of whole lines with pyarrow.
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
from torchrec_shark.data.criteo_tsv import list_files, read_line_chunks
from torchrec_shark.data.statistics import DataStatistics, compute_statistics
from torchrec_shark.data.text_lines import line_bounds, malformed_lines
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
        self._present: Optional[Dict[str, int]] = None  # values seen per column, while computing statistics

    # ------------------------------------------------------------ statistics and transforms
    uses_statistics = True

    def compute_statistics(self) -> DataStatistics:
        """One pass over the training split's raw rows; warns about a declared column with no value in it."""
        self._present = dict.fromkeys(self.dense + self.sparse, 0)
        try:
            stats = compute_statistics(self.chunks("train"), self.dense, dict(zip(self.sparse, self.hash_sizes)))
            present = self._present
        finally:
            self._present = None
        for c, n in present.items():
            if n == 0:
                group = "data.dense" if c in self.dense else "data.sparse"
                warnings.warn(f"column {c!r} ({group}) has no value in any of the {stats.rows:,} training rows: it "
                              "carries no information (an empty or misnamed column?)")
        return stats

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
        return pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=BLOCK_BYTES, column_names=column_names),
                             parse_options=self._parse_options(fmt, handler),
                             convert_options=self._convert_options(handler is not None))

    def _parse_options(self, fmt: str, handler) -> pcsv.ParseOptions:
        # Opening parses the first block: without a handler (the header check) a bad row there
        # would fail before the rows are read and counted.
        return pcsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",",
                                 invalid_row_handler=handler or (lambda row: "skip"))

    def _convert_options(self, declared_only: bool) -> pcsv.ConvertOptions:
        return pcsv.ConvertOptions(
            include_columns=self.columns if declared_only else None,
            column_types={c: pa.string() for c in self.columns},
            strings_can_be_null=True,
            null_values=[""],
        )

    def _blocks(self, path: str, fmt: str) -> Iterator[Tuple[Optional[pa.RecordBatch], np.ndarray, List["_BadLine"], int]]:
        """``(records, their data rows, the bad lines skipped, data rows scanned)`` per block of the file;
        data rows count from 0 in the file."""
        if fmt == "parquet":
            row = 0
            for rb in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_ROWS, columns=self.columns):
                yield rb, row + np.arange(rb.num_rows), [], rb.num_rows
                row += rb.num_rows
            return
        yield from self._text_blocks(path, fmt)

    def _text_blocks(self, path: str, fmt: str):
        """:meth:`_blocks` of a text file, a block of whole lines at a time. A block whose records are its
        non-blank lines one to one (no line malformed, no quoted field over a line end) is taken as
        parsed; any other block is parsed again without its malformed lines (found line by line), and
        must then give one record per line."""
        delimiter = ord("\t" if fmt == "tsv" else ",")
        names: Optional[List[str]] = None
        row, line = 0, 1  # data rows before the block; the block's first line in the file (1-based)
        for block in read_line_chunks(path, BLOCK_BYTES):
            if names is None:
                header, _, block = block.partition(b"\n")
                names = pcsv.read_csv(pa.BufferReader(header + b"\n"),
                                      parse_options=self._parse_options(fmt, None)).schema.names
                line = 2
            starts, ends = line_bounds(block)
            nonblank = np.flatnonzero(ends > starts)
            rows = row + np.arange(len(nonblank))
            lines = line + nonblank
            rb, invalid = self._parse_block(block, fmt, names)
            bad: List[_BadLine] = []
            if invalid or rb is None or rb.num_rows != len(nonblank):
                why = malformed_lines(block, starts, ends, delimiter, len(names))
                bad = [_BadLine(block[starts[i]:ends[i]].decode(errors="replace"), why[int(i)], int(row + k),
                                int(line + i)) for k, i in enumerate(nonblank) if int(i) in why]
                if self.strict and bad:
                    yield None, rows[:0], bad[:1], len(nonblank)
                    return
                good = [int(i) for i in nonblank if int(i) not in why]
                clean = b"".join(block[starts[i]:ends[i]] + b"\n" for i in good)
                rb, invalid = self._parse_block(clean, fmt, names) if good else (None, [])
                kept = np.asarray([k for k, i in enumerate(nonblank) if int(i) not in why], np.int64)
                if invalid or (rb.num_rows if rb is not None else 0) != len(good):
                    raise DataError(f"{path}: lines {line}-{line + len(starts) - 1} do not parse to one record each "
                                    f"({0 if rb is None else rb.num_rows} records from {len(good)} well-formed lines)")
                rows = rows[kept]
            yield rb, rows, bad, len(nonblank)
            row += len(nonblank)
            line += len(starts)

    def _parse_block(self, block: bytes, fmt: str, names: List[str]):
        """``(one record batch of the block or None, rows the parser rejected)``."""
        invalid: List[pcsv.InvalidRow] = []

        def handler(r):
            invalid.append(r)
            return "skip"

        if not block.strip():
            return None, invalid
        try:
            table = pcsv.read_csv(pa.BufferReader(block),
                                  read_options=pcsv.ReadOptions(column_names=names, block_size=len(block) + 1),
                                  parse_options=self._parse_options(fmt, handler),
                                  convert_options=self._convert_options(True))
        except pa.ArrowInvalid:
            return None, invalid or [None]  # type: ignore[list-item]
        batches = table.combine_chunks().to_batches()
        return (batches[0] if batches else None), invalid

    def chunks(self, split: str) -> Iterator[Columns]:
        first = 0  # data rows of the files before this one
        for path, fmt in self.files:
            key, scanned = f"file {path}", 0
            for rb, rows, bad, n in self._blocks(path, fmt):
                scanned += n
                self.skip_malformed(
                    key,
                    np.asarray([b.row for b in bad], np.int64),
                    scanned,
                    lambda i: f"{path}:{bad[i].line}: {bad[i].text[:200]!r} {bad[i].why}",
                )
                if rb is None or rb.num_rows == 0:
                    continue
                index = first + rows
                keep = np.flatnonzero((index % self.val_every == 0) == (split == "val"))
                yield self._convert(split, path, rb.take(pa.array(keep)), index[keep], first + scanned)
            first += scanned

    def _convert(self, split: str, path: str, rb: pa.RecordBatch, index: np.ndarray, upto: int) -> Columns:
        if self._present is not None:
            for c in self._present:
                self._present[c] += rb.num_rows - rb.column(c).null_count
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
    """A line skipped while parsing, and why: its data row (from 0 in its file) and line (from 1)."""

    text: str
    why: str
    row: int = 0
    line: int = 0


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
