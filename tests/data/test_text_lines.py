"""Lines that are not one record each are found line by line, under the CSV parser's own quote rules."""

import pyarrow as pa
import pyarrow.csv as pcsv

from torchrec_shark.data.text_lines import line_bounds, malformed_lines

LINES = [
    b"1,plain,x",
    b'2,"quoted, with the delimiter",x',
    b'3,"an ""escaped"" quote",x',
    b'4,a"quote inside a field is literal,x',
    b'5,"closed"then literal",x',
    b'6,"left open,x',  # the parser would read on over the line end
    b'7,a"b,"c',  # a literal quote, then one that opens at a field start and stays open
    b"8,too,many,fields",
    b"",  # blank: no record, not malformed
    b"9,last,x\r",  # CRLF
]


def test_malformed_lines_follow_the_parsers_quote_rules():
    block = b"\n".join(LINES) + b"\n"
    starts, ends = line_bounds(block)
    assert len(starts) == len(LINES) and block[starts[-1]:ends[-1]] == b"9,last,x"
    bad = malformed_lines(block, starts, ends, ord(","), fields=3)
    assert sorted(bad) == [5, 6, 7]
    assert "unbalanced quote" in bad[5] and "unbalanced quote" in bad[6] and bad[7] == "has 4 fields, expected 3"
    # every other line is exactly one record for pyarrow
    good = b"".join(block[starts[i]:ends[i]] + b"\n" for i in range(len(LINES)) if i not in bad and ends[i] > starts[i])
    table = pcsv.read_csv(pa.BufferReader(good), read_options=pcsv.ReadOptions(column_names=["a", "b", "c"]),
                          convert_options=pcsv.ConvertOptions(column_types={"a": pa.string()}))
    assert table.column("a").to_pylist() == ["1", "2", "3", "4", "5", "9"]
    assert table.column("b").to_pylist()[:5] == ["plain", "quoted, with the delimiter", 'an "escaped" quote',
                                                 'a"quote inside a field is literal', 'closedthen literal"']
