"""Criteo Kaggle / 1TB click logs as raw text, streamed in chunks.

Each line holds 40 tab-separated fields: ``label`` (0/1), ``I1``..``I13`` (integers, may be
negative) and ``C1``..``C26`` (hex strings); an empty field is missing. As in
``torchrec.datasets.criteo``, a categorical value is ``int(value, 16)`` (missing: 0) modulo
its table size; a dense value is ``log(1 + max(x, 0))`` (missing: 0). Line ``i`` (counted
over all files, from 0) is a validation row when ``i % round(1 / val_fraction) == 0``.

``data.path`` is one file or a directory of them (read in name order; ``.gz`` is
decompressed). Chunks are parsed with vectorised numpy on the raw bytes.
"""

from __future__ import annotations

import gzip
import os
from typing import Callable, Iterator, List, Tuple

import numpy as np

from torchrec_shark.data.columns import Columns, StreamDataset, table_sizes, val_every
from torchrec_shark.data.types import DataError

NUM_INT = 13
NUM_CAT = 26
NUM_FIELDS = 1 + NUM_INT + NUM_CAT
FIELD_NAMES = ["label"] + [f"I{i}" for i in range(1, NUM_INT + 1)] + [f"C{i}" for i in range(1, NUM_CAT + 1)]
CHUNK_BYTES = 1 << 22
_MAX_DEC = 19  # sign + 18 digits fit in int64
_MAX_HEX = 16  # 16 hex digits fit in uint64
_POW10 = 10.0 ** np.arange(_MAX_DEC - 1, -1, -1)
_POW16 = 16.0 ** np.arange(7, -1, -1)
_HEX = np.full(256, 255, np.uint8)
for _i, _c in enumerate("0123456789abcdef"):
    _HEX[ord(_c)] = _HEX[ord(_c.upper())] = _i


def list_files(path: str) -> List[str]:
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, f)
            for f in os.listdir(path)
            if not f.startswith(".") and os.path.isfile(os.path.join(path, f))
        )
        if not files:
            raise DataError(f"data.path={path!r} is an empty directory")
        return files
    if not os.path.isfile(path):
        raise DataError(f"data.path={path!r} does not exist")
    return [path]


def read_line_chunks(path: str, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Chunks of whole lines, each ending in ``\\n``."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        rest = b""
        while True:
            data = f.read(size)
            if not data:
                break
            data = rest + data
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            if cut:
                yield data[:cut]
        if rest:
            yield rest + b"\n"


class CriteoTsv(StreamDataset):
    """The ``criteo_tsv`` source."""

    def __init__(self, cfg):
        super().__init__(bool(cfg.strict))
        if not cfg.path:
            raise DataError("data.path is required for data.source=criteo_tsv")
        self.paths = list_files(cfg.path)
        self.feature_names = FIELD_NAMES[1 + NUM_INT :]
        self.num_embeddings_per_feature = table_sizes(
            cfg.num_embeddings_per_feature, self.feature_names, "data.num_embeddings_per_feature"
        )
        self.num_dense = NUM_INT
        self.val_every = val_every(cfg.val_fraction)
        self._tables = np.asarray(self.num_embeddings_per_feature, np.uint64)

    def chunks(self, split: str) -> Iterator[Columns]:
        first = 0  # index of the chunk's first line over all files
        for path in self.paths:
            file_first = first
            for buf in read_line_chunks(path):
                b = np.frombuffer(buf, np.uint8)
                ends = np.flatnonzero(b == 10)
                starts = np.concatenate([[0], ends[:-1] + 1])
                ends = ends - (b[np.maximum(ends - 1, 0)] == 13)  # \r\n
                index = first + np.arange(len(ends))
                keep = (index % self.val_every == 0) == (split == "val")
                keep &= ends > starts  # blank lines are no rows
                cols, bad, why = self.parse(b, starts[keep], ends[keep])
                lines = index[keep][bad]
                self.skip_malformed(
                    split,
                    lines,
                    first + len(ends),
                    lambda i: f"{path}:{lines[i] - file_first + 1}: {why(i)}",
                )
                first += len(ends)
                yield cols

    def parse(
        self, b: np.ndarray, starts: np.ndarray, ends: np.ndarray
    ) -> Tuple[Columns, np.ndarray, Callable[[int], str]]:
        """Parse lines ``b[starts[i]:ends[i]]``: the good rows, the positions of the bad
        lines, and ``why(i)``: what is wrong with bad line ``i``."""
        tabs = np.flatnonzero(b == 9)
        t0 = np.searchsorted(tabs, starts)
        ntabs = np.searchsorted(tabs, ends) - t0
        shaped = ntabs == NUM_FIELDS - 1
        seps = tabs[t0[shaped, None] + np.arange(NUM_FIELDS - 1)]
        fs = np.concatenate([starts[shaped, None], seps + 1], axis=1)  # [g, 40] field starts
        fe = np.concatenate([seps, ends[shaped, None]], axis=1)  # field ends
        fl = fe - fs
        label_ok = (fl[:, 0] == 1) & ((b[fs[:, 0]] == 48) | (b[fs[:, 0]] == 49))
        dense, dense_ok = _decimal(b, fs[:, 1 : 1 + NUM_INT], fe[:, 1 : 1 + NUM_INT])
        cat, cat_ok = _hex(b, fs[:, 1 + NUM_INT :], fe[:, 1 + NUM_INT :])
        ok_fields = np.concatenate([label_ok[:, None], dense_ok, cat_ok], axis=1)
        good = ok_fields.all(axis=1)
        bad = np.ones(len(starts), bool)
        bad[np.flatnonzero(shaped)[good]] = False

        cols = Columns(
            dense=np.log1p(np.maximum(dense[good], 0)).astype(np.float32),
            labels=(b[fs[good, 0]] - 48).astype(np.float32),
            ids=list((cat[good] % self._tables).astype(np.int64).T),
            lengths=[None] * NUM_CAT,
        )
        bad_pos = np.flatnonzero(bad)
        row_of = np.full(len(starts), -1)
        row_of[shaped] = np.arange(int(shaped.sum()))

        def why(i: int) -> str:
            line = bad_pos[i]
            if not shaped[line]:
                return f"{ntabs[line] + 1} tab-separated fields, expected {NUM_FIELDS}"
            r = row_of[line]
            f = int(np.flatnonzero(~ok_fields[r])[0])
            value = bytes(b[fs[r, f] : fs[r, f] + fl[r, f]]).decode(errors="replace")
            kind = "0 or 1" if f == 0 else "an integer" if f <= NUM_INT else "a hex string of <= 16 digits"
            return f"field {FIELD_NAMES[f]} value {value!r} is not {kind}"

        return cols, bad_pos, why


def _chars(b: np.ndarray, fe: np.ndarray, fl: np.ndarray, width: int):
    """The last ``width`` bytes before each field end ``fe`` (right-aligned fields, shape
    ``[..., width]``) and whether each byte lies inside its field of length ``fl``."""
    width = max(1, min(width, int(fl.max()) if fl.size else 1))
    padded = np.concatenate([np.zeros(width, np.uint8), b])
    windows = np.lib.stride_tricks.sliding_window_view(padded, width)
    inside = np.arange(width) >= (width - fl)[..., None]
    return windows[fe], inside


def _decimal(b, fs, fe):
    """Signed decimal integers as float64 (empty: 0) and whether each field parsed."""
    fl = fe - fs
    ch, inside = _chars(b, fe, fl, _MAX_DEC)
    width = ch.shape[-1]
    neg = (fl > 0) & (b[np.minimum(fs, len(b) - 1)] == ord("-"))
    inside &= ~(neg[..., None] & (np.arange(width) == (width - fl)[..., None]))  # the sign is no digit
    digit = np.where(inside, ch - np.uint8(ord("0")), 0)  # wraps around: non-digits become > 9
    ok = (digit <= 9).all(-1) & (fl <= _MAX_DEC) & ~(neg & (fl == 1))
    value = digit.astype(np.float64) @ _POW10[-width:]
    return np.where(neg, -value, value), ok


def _hex(b, fs, fe):
    """Hex values as uint64 (empty: 0) and whether each field parsed."""
    fl = fe - fs
    ch, inside = _chars(b, fe, fl, _MAX_HEX)
    nib = np.where(inside, _HEX[ch], 0)
    ok = (nib != 255).all(-1) & (fl <= _MAX_HEX)
    # Exact in float64: 8 hex digits at a time.
    low = (nib[..., -8:].astype(np.float64) @ _POW16[-min(8, nib.shape[-1]) :]).astype(np.uint64)
    if nib.shape[-1] <= 8:
        return low, ok
    high = (nib[..., :-8].astype(np.float64) @ _POW16[-(nib.shape[-1] - 8) :]).astype(np.uint64)
    return (high << np.uint64(32)) | low, ok
