import gzip
import warnings

import numpy as np
import pytest
from data_helpers import SHARED_DATA, assert_same_rows, criteo_rows, reference_criteo, rows_of, take, write_lines

from torchrec_shark.config import DataConfig
from torchrec_shark.data import CriteoTsv, DataError, build_dataset

C = [f"C{i}" for i in range(1, 27)]


def source(path, **kw) -> CriteoTsv:
    return build_dataset(DataConfig(source="criteo_tsv", path=str(path), **kw))


@pytest.fixture
def file(tmp_path):
    rows = criteo_rows(1000)
    write_lines(tmp_path / "day.tsv", rows)
    return tmp_path / "day.tsv", rows


def test_parses_like_the_reference(file):
    path, rows = file
    ds = source(path)
    assert ds.feature_names == C and ds.num_dense == 13
    train = rows_of(ds.batches("val", 256), C)  # val: lines 0, 10, 20, ...
    assert_same_rows(train, reference_criteo(rows[::10]))
    train = rows_of(take(ds.batches("train", 300), 3), C)
    assert_same_rows(train, reference_criteo([r for i, r in enumerate(rows) if i % 10][:900]))
    assert ds.stats() == {"malformed_lines": 0}


def test_table_sizes_per_feature(file):
    path, rows = file
    sizes = [1000 + i for i in range(26)]
    b = next(source(path, num_embeddings_per_feature=sizes).batches("val", 100))
    ref = reference_criteo(rows[:1000:10], table=1 << 62)
    for i, f in enumerate(C):
        np.testing.assert_array_equal(b.sparse_features[f].values().numpy(), ref.ids[i] % sizes[i])
    with pytest.raises(DataError, match="num_embeddings_per_feature"):
        source(path, num_embeddings_per_feature=[10, 20])


def test_train_and_val_do_not_overlap(tmp_path):
    # C1 holds the line number: read it back from the ids.
    rows = criteo_rows(997)
    for i, r in enumerate(rows):
        r[14] = f"{i:08x}"
    write_lines(tmp_path / "d.tsv", rows)
    ds = source(tmp_path / "d.tsv", num_embeddings_per_feature=[1 << 30], val_fraction=0.25)
    val = rows_of(ds.batches("val", 64), C).ids[0]
    train = rows_of(take(ds.batches("train", 249), 3), C).ids[0]  # 747 train lines
    assert val.tolist() == list(range(0, 997, 4))
    assert train.tolist() == [i for i in range(997) if i % 4]
    assert not set(val) & set(train)


def test_rank_slices_start_batch_and_cycling(file):
    path, rows = file  # 900 train lines
    ds = source(path)
    whole = take(ds.batches("train", 400), 5)  # the third batch wraps around the end of the file
    for i in range(5):
        parts = [take(ds.batches("train", 400, rank=r, world_size=2), 5)[i] for r in range(2)]
        assert_same_rows(rows_of(parts, C), rows_of([whole[i]], C))
    train = [r for i, r in enumerate(rows) if i % 10]
    assert_same_rows(rows_of(whole[2:3], C), reference_criteo(train[800:] + train[:300]))
    resumed = take(ds.batches("train", 400, start_batch=3), 2)
    assert_same_rows(rows_of(resumed, C), rows_of(whole[3:], C))
    resumed = next(ds.batches("train", 400, start_batch=3 + 9))  # 9 batches = 4 epochs later
    assert_same_rows(rows_of([resumed], C), rows_of(whole[3:4], C))
    # val (100 lines) with 3 ranks: one global batch of 99 rows, 33 each.
    val = [list(ds.batches("val", 300, rank=r, world_size=3)) for r in range(3)]
    assert [len(v) for v in val] == [1, 1, 1] and len(val[2][0].labels) == 33
    assert_same_rows(rows_of([v[0] for v in val], C), reference_criteo(rows[::10][:99]))


def test_malformed_lines_are_counted_and_skipped(tmp_path):
    rows = criteo_rows(50)
    bad = {
        3: rows[3][:39],  # 39 fields
        13: rows[13] + ["x"],  # 41 fields
        23: rows[23][:5] + ["1.5"] + rows[23][6:],  # I5 not an integer
        33: ["2"] + rows[33][1:],  # label
        43: rows[43][:20] + ["zz"] + rows[43][21:],  # C7 not hex
    }
    lines = [bad.get(i, r) for i, r in enumerate(rows)]
    write_lines(tmp_path / "bad.tsv", lines)
    ds = source(tmp_path / "bad.tsv", val_fraction=0.5)  # val: even lines, train: odd lines
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = rows_of(take(ds.batches("train", 16), 1), C)
        rows_of(take(ds.batches("train", 32), 2), C)  # read again, past the epoch's end: counted once
    assert ds.stats() == {"malformed_lines": 5}
    assert len(caught) == 1 and "skipped 5 malformed lines" in str(caught[0].message)
    assert "bad.tsv:4: 39 tab-separated fields" in str(caught[0].message)
    assert_same_rows(got, reference_criteo([r for i, r in enumerate(rows) if i % 2 and i not in bad][:16]))
    rows_of(ds.batches("val", 32), C)
    assert ds.stats() == {"malformed_lines": 5}


@pytest.mark.parametrize(
    "line, message",
    [
        (lambda r: r[:39], "bad.tsv:8: 39 tab-separated fields, expected 40"),
        (lambda r: r[:5] + ["abc"] + r[6:], "bad.tsv:8: field I5 value 'abc' is not an integer"),
        (lambda r: ["-1"] + r[1:], "bad.tsv:8: field label value '-1' is not 0 or 1"),
        (lambda r: r[:16] + ["0x12"] + r[17:], "bad.tsv:8: field C3 value '0x12' is not a hex string"),
    ],
)
def test_strict_names_line_field_and_value(tmp_path, line, message):
    rows = criteo_rows(20)
    rows[7] = line(rows[7])
    write_lines(tmp_path / "bad.tsv", rows)
    with pytest.raises(DataError, match=message):
        list(source(tmp_path / "bad.tsv", strict=True).batches("train", 4))


def test_directory_of_files_gzip_and_crlf(tmp_path, file):
    path, rows = file
    d = tmp_path / "days"
    d.mkdir()
    write_lines(d / "day_0.tsv", rows[:600], end="\r\n")
    with gzip.open(d / "day_1.tsv.gz", "wt", newline="") as f:
        f.write("".join("\t".join(r) + "\n" for r in rows[600:]))
    for split, size in (("val", 100), ("train", 900)):
        assert_same_rows(
            rows_of(take(source(d).batches(split, size), 1), C), rows_of(take(source(path).batches(split, size), 1), C)
        )


def test_chunk_boundaries_do_not_matter(file, monkeypatch):
    path, _ = file
    whole = rows_of(source(path).batches("val", 64), C)
    monkeypatch.setattr("torchrec_shark.data.criteo_tsv.CHUNK_BYTES", 1000)
    assert_same_rows(rows_of(source(path).batches("val", 64), C), whole)


def test_missing_path():
    with pytest.raises(DataError, match="does not exist"):
        source("/nonexistent/day_0.tsv")


@pytest.mark.skipif(not (SHARED_DATA / "criteo_kaggle_train_head10k.tsv").exists(), reason="no ../shared/data")
def test_real_criteo_sample():
    path = SHARED_DATA / "criteo_kaggle_train_head10k.tsv"
    ds = source(path)
    val = rows_of(ds.batches("val", 512), C)
    assert len(val) == 1000 and ds.stats() == {"malformed_lines": 0}
    assert 0.15 < val.labels.mean() < 0.3
    rows = [line.rstrip("\n").split("\t") for line in open(path).readlines()[:2000:10]]
    assert_same_rows(val.slice(0, 200), reference_criteo(rows))
