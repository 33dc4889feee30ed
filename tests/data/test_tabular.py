import warnings

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from data_helpers import SHARED_DATA, assert_same_rows, rows_of, take

from torchrec_shark.config import DataConfig
from torchrec_shark.data import DataError, build_dataset

SPARSE = ["user", "tags"]
CONF = __import__("pathlib").Path(__file__).resolve().parents[2] / "conf"


def source(path, **kw):
    kw.setdefault("label", "click")
    kw.setdefault("dense", ["price"])
    kw.setdefault("sparse", SPARSE)
    kw.setdefault("num_embeddings_per_feature", [1000])
    kw.setdefault("val_fraction", 0.5)
    kw.setdefault("dense_transform", "none")  # the rows as read (transforms: test_transforms.py)
    kw.setdefault("min_count", 0)
    return build_dataset(DataConfig(source="tabular", path=str(path), **kw))


def frame(n=40):
    rng = np.random.default_rng(0)
    return pd.DataFrame({
        "click": rng.integers(0, 2, n),
        "price": np.round(rng.random(n) * 10, 3),
        "user": [f"u{int(i)}" for i in rng.integers(0, 7, n)],
        "tags": ["|".join(f"t{int(j)}" for j in rng.integers(0, 5, 1 + i % 3)) for i in range(n)],
        "unused": np.arange(n),
    })


def expected_ids(values, n=1000):
    """Hashed into all rows but the last (the out-of-vocabulary row)."""
    return (pd.util.hash_array(np.asarray(values, dtype=object)) % np.uint64(n - 1)).astype(np.int64)


def test_csv_tsv_and_parquet_give_the_same_rows(tmp_path):
    df = frame()
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_csv(tmp_path / "d.tsv", index=False, sep="\t")
    df.to_parquet(tmp_path / "d.parquet", index=False)
    got = {ext: rows_of(take(source(tmp_path / f"d.{ext}").batches("train", 20), 1), SPARSE)
           for ext in ("csv", "tsv", "parquet")}
    assert_same_rows(got["csv"], got["tsv"])
    assert_same_rows(got["csv"], got["parquet"])
    train = df.iloc[1::2]  # val_fraction 0.5: even rows are validation rows
    c = got["csv"]
    np.testing.assert_array_equal(c.labels, train.click.to_numpy(np.float32))
    np.testing.assert_allclose(c.dense[:, 0], train.price.to_numpy(np.float32))
    np.testing.assert_array_equal(c.ids[0], expected_ids(train.user))
    tokens = [t for v in train.tags for t in v.split("|")]
    np.testing.assert_array_equal(c.ids[1], expected_ids(tokens))
    np.testing.assert_array_equal(c.lengths[1], [len(v.split("|")) for v in train.tags])


def test_malformed_rows_are_counted_and_strict_stops(tmp_path):
    lines = ["click,price,user,tags", "1,1.0,a,x", "0,2.0,b,y", "2,3.0,c,z", "1,abc,d,w", "0,1.0,e", "1,1.0,f,v"]
    (tmp_path / "bad.csv").write_text("\n".join(lines) + "\n")
    ds = source(tmp_path / "bad.csv", val_fraction=0.1)  # rows 1.. are train (row 0 is val)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = rows_of(take(ds.batches("train", 2), 1), SPARSE)
    assert ds.stats()["malformed_lines"] == 3  # label 2, price 'abc', a row with 3 columns
    assert any("malformed" in str(w.message) for w in caught)
    np.testing.assert_array_equal(got.labels, [0, 1])  # rows "b" and "f"
    with pytest.raises(DataError):
        next(source(tmp_path / "bad.csv", val_fraction=0.1, strict=True).batches("train", 2))


def test_declared_column_missing_is_named(tmp_path):
    frame().to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(DataError, match=r"\['nope'\] missing"):
        source(tmp_path / "d.csv", sparse=["user", "nope"])


def test_unknown_extension_needs_a_format(tmp_path):
    frame().to_csv(tmp_path / "d.dat", index=False)
    with pytest.raises(DataError, match="data.file_format"):
        source(tmp_path / "d.dat")
    assert len(rows_of(take(source(tmp_path / "d.dat", file_format="csv").batches("train", 4), 1), SPARSE)) == 4


@pytest.mark.skipif(not (SHARED_DATA / "avazu_train_head9999.csv").exists(), reason="Avazu sample not present")
def test_avazu_sample_with_the_default_config(tmp_path):
    cfg = OmegaConf.load(CONF / "data" / "tabular.yaml")
    cfg.path = str(SHARED_DATA / "avazu_train_head9999.csv")
    ds = build_dataset(cfg)
    b = next(ds.batches("train", 256))
    assert len(ds.feature_names) == 21 and b.labels.shape == (256,)
    assert 0.05 < float(b.labels.mean()) < 0.4
    assert ds.stats()["malformed_lines"] == 0


def _quoted_csv(path, n, stray_at, quoted_at=None):
    lines = ["click,price,user,tags"]
    for i in range(n):
        user = f"u{i % 7}"
        if i == stray_at:
            user = '"u_stray'  # opens a quote that is never closed on this line
        if i == quoted_at:
            user = '"u, quoted"'  # a valid quoted value with the delimiter inside
        lines.append(f"{i % 2},{i / 10:.1f},{user},t{i % 5}")
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("quoted_at", [None, 60])
def test_a_stray_quote_loses_only_its_own_row(tmp_path, quoted_at):
    # Before, the parser read on to the next quote (or the end of the file) and the rows between
    # were dropped as one malformed line.
    _quoted_csv(tmp_path / "q.csv", 100, stray_at=10, quoted_at=quoted_at)
    ds = source(tmp_path / "q.csv", val_fraction=0.1)
    rows = {s: sum(len(c) for c in ds.chunks(s)) for s in ("train", "val")}
    assert rows["train"] + rows["val"] == 99
    assert ds.stats()["malformed_lines"] == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = rows_of(ds.batches("val", 100), SPARSE)
    assert len(got) == rows["val"]
    assert any("unbalanced quote" in str(w.message) and "u_stray" in str(w.message) for w in caught)
    if quoted_at is not None:  # the quoted value reads as one token, with its comma
        ids = np.concatenate([c.ids[0] for s in ("train", "val") for c in ds.chunks(s)])
        assert expected_ids(["u, quoted"])[0] in ids
    with pytest.raises(DataError, match="unbalanced quote"):
        next(source(tmp_path / "q.csv", val_fraction=0.1, strict=True).batches("train", 8))


def _quote_pair_csv(path, n, first, second, stray=True):
    """``n`` rows; with ``stray``, row ``first`` opens a quote and row ``second`` closes it, so that the text
    between them parses as one row of the right width."""
    lines = ["click,price,user,tags"]
    for i in range(n):
        user, tags = f"u{i % 7}", f"t{i % 5}"
        if stray and i == first:
            user = '"u_open'
        if stray and i == second:
            user = 'u_close"'
        lines.append(f"{i % 2},{i / 10:.1f},{user},{tags}")
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("distance", [10, 47])
def test_a_quote_pair_swallows_no_row_unseen(tmp_path, distance):
    # Before, rows 100 .. 100 + distance read as one well-formed row: 3,600 - distance rows trained on,
    # malformed_lines 0, and every later row moved between train and validation.
    _quote_pair_csv(tmp_path / "pair.csv", 3600, 100, 100 + distance)
    _quote_pair_csv(tmp_path / "clean.csv", 3600, 100, 100 + distance, stray=False)
    ds, clean = source(tmp_path / "pair.csv", val_fraction=0.1), source(tmp_path / "clean.csv", val_fraction=0.1)
    rows = {s: np.concatenate([c.dense[:, 0] for c in ds.chunks(s)]) for s in ("train", "val")}
    assert len(rows["train"]) + len(rows["val"]) + ds.stats()["malformed_lines"] == 3600
    assert ds.stats()["malformed_lines"] == 1  # the line that opens the quote; the closing one reads as it is
    for split in ("train", "val"):  # every other row in its own split, as in the clean file
        expected = np.concatenate([c.dense[:, 0] for c in clean.chunks(split)])
        np.testing.assert_array_equal(rows[split], expected[expected != 10.0])  # row 100: price 10.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        list(ds.batches("val", 100))
    assert any("pair.csv:102:" in str(w.message) and "unbalanced quote" in str(w.message) for w in caught)


def test_a_declared_column_with_no_value_warns(tmp_path):
    df = frame()
    df["user"] = ""
    df.to_csv(tmp_path / "d.csv", index=False)
    with pytest.warns(UserWarning, match=r"column 'user' \(data.sparse\) has no value in any of the 20 training rows"):
        source(tmp_path / "d.csv").compute_statistics()


@pytest.mark.parametrize("content", [b"", b"\x00\x01\x02garbage\xff\xfe\n\x00"])
def test_empty_or_garbage_file_is_named(tmp_path, content):
    (tmp_path / "x.csv").write_bytes(content)
    with pytest.raises(DataError, match="x.csv"):
        source(tmp_path / "x.csv")
