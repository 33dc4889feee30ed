"""The lines of a delimited text block: where each is, which are blank, which are malformed and why.

A CSV parser reads a quoted field over line ends: a stray ``"`` makes it read on to the next ``"``,
10 or 1,000 lines later, and when the merged text happens to have the right number of fields the
lines in between become one row that no count reports. Here a quoted field may not span lines: a
line that opens a quote it does not close is malformed on its own, and so is a line with another
number of fields than the header; every other line is one record. The quote rules are the
parser's (pyarrow's defaults: a ``"`` opens a quoted field only at the start of a field, ``""`` inside
one is a literal quote, any other ``"`` is literal), so the well-formed lines parse to exactly one
record each.

Example::

    starts, ends = line_bounds(block)                     # block: whole lines, each ending in \\n
    bad = malformed_lines(block, starts, ends, ord(","), fields=4)   # {line: why}
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

QUOTE = ord('"')
NEWLINE = ord("\n")
CR = ord("\r")


def line_bounds(block: bytes) -> Tuple[np.ndarray, np.ndarray]:
    """``(starts, ends)`` of every line of ``block`` (whole lines, each ending in ``\\n``); ``ends``
    excludes the line end (``\\n`` or ``\\r\\n``)."""
    b = np.frombuffer(block, np.uint8)
    nl = np.flatnonzero(b == NEWLINE)
    if not len(nl):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.concatenate([[0], nl[:-1] + 1]).astype(np.int64)
    ends = nl - (b[np.maximum(nl - 1, 0)] == CR) * (nl > starts)
    return starts, ends.astype(np.int64)


def _quoted_line(line: bytes, delimiter: int) -> Tuple[int, bool]:
    """``(fields, quote left open)`` of one line under the parser's quote rules."""
    fields, i, n = 1, 0, len(line)
    at_field_start, quoted = True, False
    while i < n:
        c = line[i]
        if quoted:
            if c == QUOTE:
                if i + 1 < n and line[i + 1] == QUOTE:  # "" inside quotes: a literal quote
                    i += 2
                    continue
                quoted = False
            i += 1
            continue
        if c == QUOTE and at_field_start:
            quoted, at_field_start = True, False
        elif c == delimiter:
            fields, at_field_start = fields + 1, True
        else:
            at_field_start = False
        i += 1
    return fields, quoted


def malformed_lines(block: bytes, starts: np.ndarray, ends: np.ndarray, delimiter: int, fields: int) -> Dict[int, str]:
    """``{line index: why}`` of the non-blank lines of ``block`` that are not one record of ``fields`` fields."""
    b = np.frombuffer(block, np.uint8)
    out: Dict[int, str] = {}
    if not len(starts):
        return out
    # Delimiters and quotes per line, from running counts (a line is [start, end)).
    delims = np.concatenate([[0], np.cumsum(b == delimiter)])
    quotes = np.concatenate([[0], np.cumsum(b == QUOTE)])
    n_delims = delims[ends] - delims[starts]
    has_quote = (quotes[ends] - quotes[starts]) > 0
    blank = ends <= starts
    for i in np.flatnonzero(~has_quote & ~blank & (n_delims + 1 != fields)):
        out[int(i)] = f"has {int(n_delims[i]) + 1} fields, expected {fields}"
    for i in np.flatnonzero(has_quote & ~blank):
        n, open_quote = _quoted_line(block[starts[i]:ends[i]], delimiter)
        if open_quote:
            out[int(i)] = "has an unbalanced quote (it opens a quoted field that does not close on its line)"
        elif n != fields:
            out[int(i)] = f"has {n} fields, expected {fields}"
    return out
