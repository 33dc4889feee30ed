import json
import warnings

import numpy as np
import pandas as pd
import pytest
from data_helpers import rows_of

from torchrec_shark.config import DataConfig
from torchrec_shark.data import DataError, build_dataset
from torchrec_shark.data.columns import Columns
from torchrec_shark.data.statistics import compute_statistics
from torchrec_shark.data.transforms import AUTO_CLIP, SATURATING_MAGNITUDE, resolve_dense

N = 400  # rows; every 4th (i % 4 == 0) is a validation row
TABLES = [100_000, 1_000_000]  # user, item (large: no two values share a row)


def table(tmp_path, n=N):
    rng = np.random.default_rng(0)
    ts = 9e8 + np.arange(n) * 3600.0 + rng.integers(0, 60, n)
    counts = rng.lognormal(1.0, 2.0, n).round()  # a long tail
    signed = rng.normal(0, 3, n).round(3)
    signed[5] = np.nan  # missing (a train row)
    df = pd.DataFrame({"click": np.arange(n) % 2, "ts": ts, "count": counts, "signed": signed,
                       "user": [f"u{i % 50}" for i in range(n)], "item": [f"i{i}" for i in range(n)]})
    path = tmp_path / "t.csv"
    df.to_csv(path, index=False)
    train = df[np.arange(n) % 4 != 0].reset_index(drop=True)
    return path, df, train


def dataset(path, **kw):
    kw.setdefault("num_embeddings_per_feature", TABLES)
    return build_dataset(DataConfig(source="tabular", path=str(path), label="click", dense=["ts", "count", "signed"],
                                    sparse=["user", "item"], val_fraction=0.25, **kw))


def train_rows(ds, n=300):
    return rows_of([next(ds.batches("train", n))], ds.feature_names)


def test_none_keeps_values_and_log1p_clamps_negatives_as_criteo(tmp_path):
    path, _, train = table(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ts untransformed: the saturation warning (tested below)
        got = train_rows(dataset(path, dense_transform="none")).dense
    np.testing.assert_allclose(got[:, 0], train.ts.to_numpy(np.float32))
    np.testing.assert_allclose(got[:, 2], np.nan_to_num(train.signed.to_numpy()), rtol=1e-6)  # missing: 0
    got = train_rows(dataset(path, dense_transform="log1p")).dense
    np.testing.assert_allclose(got[:, 2], np.log1p(np.maximum(np.nan_to_num(train.signed.to_numpy()), 0)), rtol=1e-6)


def test_standardize_and_minmax_use_training_statistics(tmp_path):
    path, df, train = table(tmp_path)
    ds = dataset(path, dense_transform="standardize")
    got = train_rows(ds).dense
    ts = train.ts.to_numpy()
    np.testing.assert_allclose(got[:, 0], (ts - ts.mean()) / ts.std(), atol=1e-5)
    assert got[:, 2][np.isnan(train.signed.to_numpy())] == 0.0  # a missing value: the mean
    # validation rows are scaled with the training split's statistics, not their own
    val = rows_of(ds.batches("val", 100), ds.feature_names).dense
    np.testing.assert_allclose(val[:, 0], (df.ts.to_numpy()[::4] - ts.mean()) / ts.std(), atol=1e-5)

    got = train_rows(dataset(path, dense_transform="minmax")).dense
    np.testing.assert_allclose(got[:, 0], (ts - ts.min()) / (ts.max() - ts.min()), atol=1e-6)
    assert got.min() >= 0 and got.max() <= 1
    val = rows_of(dataset(path, dense_transform="minmax").batches("val", 100), ["user", "item"]).dense
    assert val[:, 0].max() <= 1.0  # the last timestamp (a validation row) is past the training max: held at 1


def test_bucketize_turns_a_column_into_a_sparse_feature_of_quantile_buckets(tmp_path):
    path, _, train = table(tmp_path)
    ds = dataset(path, dense_transforms={"count": "bucketize", "signed": "bucketize"}, num_buckets=4)
    assert ds.feature_names == ["user", "item", "count", "signed"] and ds.num_dense == 1
    assert ds.num_embeddings_per_feature[2:] == [5, 5]
    got = train_rows(ds)
    assert got.dense.shape == (300, 1)
    signed = train.signed.to_numpy()
    ids = got.ids[3]
    present = ~np.isnan(signed)
    assert ids[~present] == 0  # missing
    assert set(ids[present]) == {1, 2, 3, 4}
    assert np.all(np.diff(ids[present][np.argsort(signed[present])]) >= 0)  # monotone in the value
    assert np.abs(np.bincount(ids[present])[1:] - present.sum() / 4).max() <= 3  # equal frequency
    edges = ds.stats()["data_transforms"]["dense"]["signed"]["edges"]
    assert len(edges) == 3


def test_auto_standardizes_a_timestamp_and_logs_a_long_tail(tmp_path):
    path, _, train = table(tmp_path)
    ds = dataset(path)  # the default
    got = train_rows(ds).dense
    described = ds.stats()["data_transforms"]["dense"]
    assert described["ts"]["applied"] == "standardize"
    assert described["count"]["applied"] == "log1p_standardize"
    assert described["signed"]["applied"] == "standardize"  # negative values: no log
    ts = train.ts.to_numpy()
    np.testing.assert_allclose(got[:, 0], (ts - ts.mean()) / ts.std(), atol=1e-5)
    lc = np.log1p(train["count"].to_numpy())
    np.testing.assert_allclose(got[:, 1], np.clip((lc - lc.mean()) / lc.std(), -AUTO_CLIP, AUTO_CLIP), atol=1e-5)
    assert np.abs(got).max() <= AUTO_CLIP


def test_auto_clips_values_far_outside_the_training_range(tmp_path):
    n = 40
    lines = ["click,x,user"] + [f"{i % 2},{1.0 + (i % 3)},u" for i in range(n)]
    lines[1] = "1,1e12,u"  # data row 0: a validation row (val_fraction 0.5), far outside training values
    (tmp_path / "o.csv").write_text("\n".join(lines) + "\n")
    ds = build_dataset(DataConfig(source="tabular", path=str(tmp_path / "o.csv"), label="click", dense=["x"],
                                  sparse=["user"], num_embeddings_per_feature=[10], val_fraction=0.5))
    val = rows_of(ds.batches("val", 4), ["user"]).dense
    assert val[0, 0] == AUTO_CLIP


def test_a_saturating_column_is_named_in_a_warning(tmp_path):
    path, _, _ = table(tmp_path)
    with pytest.warns(UserWarning, match=r"dense column 'ts' reaches the model at \|x\| up to 9\.\d+e\+08") as rec:
        next(dataset(path, dense_transform="none").batches("train", 8))
    named = {m for w in rec for m in ("ts", "count", "signed") if f"column '{m}'" in str(w.message)}
    assert "ts" in named and "signed" not in named  # |signed| < 100: fine as it is
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default: nothing saturates
        next(dataset(path).batches("train", 8))
    assert SATURATING_MAGNITUDE < 9e8


def test_rare_ids_share_the_fields_last_row(tmp_path):
    path, _, train = table(tmp_path)
    ds = dataset(path, min_count=2)
    got = train_rows(ds)
    # user: 50 values, each in 4 (even ones) or 8 (odd ones) training rows -> kept;
    # item: every value once -> its OOV row
    assert np.all(got.ids[1] == TABLES[1] - 1)
    assert len(set(got.ids[0])) == 50 and TABLES[0] - 1 not in set(got.ids[0])
    fields = ds.stats()["data_transforms"]["sparse"]["fields"]
    assert fields["item"] == {"rows_seen": 300, "rows_kept": 0, "training_ids_to_oov": 300}
    assert fields["user"]["rows_kept"] == 50 and fields["user"]["training_ids_to_oov"] == 0
    # min_count 5: users seen 4 times (100 of 300 rows) are rare now, those seen 8 times are not
    strict = train_rows(dataset(path, min_count=5)).ids[0]
    assert np.sum(strict == TABLES[0] - 1) == 100 and len(set(strict)) == 26
    # 0: off; ids hash into rows 0..998 and keep them
    off = train_rows(dataset(path, min_count=0))
    assert len(set(off.ids[1])) == 300 and off.ids[1].max() < TABLES[1] - 1


def test_ids_new_in_validation_map_to_the_oov_row(tmp_path):
    path, _, _ = table(tmp_path)
    ds = dataset(path, min_count=1)
    val = rows_of(ds.batches("val", 100), ds.feature_names)
    assert np.all(val.ids[1] == TABLES[1] - 1)  # items of validation rows never occur in training
    assert TABLES[0] - 1 not in set(val.ids[0])


def test_transform_names_are_checked(tmp_path):
    path, _, _ = table(tmp_path)
    with pytest.raises(DataError, match="not a data.dense column"):
        dataset(path, dense_transforms={"nope": "log1p"})
    with pytest.raises(DataError, match="'sqrt' of column 'ts'"):
        dataset(path, dense_transforms={"ts": "sqrt"})


def test_auto_logs_only_a_long_upper_tail():
    rng = np.random.default_rng(4)
    ts = np.r_[np.zeros(3), 9e8 + rng.random(3000) * 3e7]  # a few zeros (a missing date written as 0)
    x = np.stack([ts, rng.lognormal(0, 2, len(ts)), rng.normal(0, 1, len(ts))], 1)
    x[0, 2] = -1e6  # one far negative value
    stats = compute_statistics([Columns(x, np.zeros(len(x), np.float32), [], [])], ["ts", "tail", "neg"], {})
    applied = {c: resolve_dense(c, "auto", stats.dense[c], 16).applied for c in ("ts", "tail", "neg")}
    # one value -1e6 sets the std of "neg" (18,000 where the other 3,002 have 1): it is scaled robustly
    assert applied == {"ts": "standardize", "tail": "log1p_standardize", "neg": "standardize_robust"}
    neg = resolve_dense("neg", "auto", stats.dense["neg"], 16)
    assert neg.apply(np.array([-1e6]))[0] == -AUTO_CLIP
    assert 0.8 < float(np.std(neg.apply(x[1:, 2]))) < 1.2  # the ordinary values keep their spread


def test_an_extreme_value_every_100_rows_leaves_finite_statistics_and_a_usable_column(tmp_path):
    rng = np.random.default_rng(5)
    n = 5000
    price = rng.lognormal(2, 0.5, n)
    price[3::100] = 1e300  # a sentinel or a typo, 1% of the rows (training rows: not a multiple of 10)
    pd.DataFrame({"click": rng.integers(0, 2, n), "price": price, "user": [f"u{i % 50}" for i in range(n)]}) \
        .to_csv(tmp_path / "x.csv", index=False)
    ds = build_dataset(DataConfig(source="tabular", path=str(tmp_path / "x.csv"), label="click", dense=["price"],
                                  sparse=["user"], num_embeddings_per_feature=[100]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = ds.compute_statistics()
        ds.use_statistics(stats)
    col = stats.dense["price"]
    assert all(np.isfinite([col.mean, col.std, col.log_mean, col.log_std]))
    json.dumps(stats.to_json(), allow_nan=False)  # data_stats.json holds no NaN
    assert any("'price': a few extreme values" in str(w.message) for w in caught)
    x = np.concatenate([c.dense[:, 0] for c in (ds.transforms.apply(c) for c in ds.chunks("train"))])
    ordinary = x[x < AUTO_CLIP]
    assert np.all(x[x >= AUTO_CLIP] == AUTO_CLIP) and (x == AUTO_CLIP).sum() < 0.02 * len(x)
    assert float(np.std(ordinary)) > 0.5  # before: every ordinary value became -10
