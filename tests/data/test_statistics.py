import json
import warnings

import numpy as np
import pytest

from torchrec_shark.config import DataConfig
from torchrec_shark.data import DataError, build_dataset
from torchrec_shark.data import statistics as st
from torchrec_shark.data.columns import Columns


def chunks_of(x, ids=None, size=7):
    ids = np.zeros(len(x), np.int64) if ids is None else ids
    for i in range(0, len(x), size):
        yield Columns(x[i:i + size], np.zeros(len(x[i:i + size]), np.float32), [ids[i:i + size]], [None])


def test_streamed_moments_match_numpy_and_leave_missing_values_out():
    rng = np.random.default_rng(0)
    x = np.stack([9e8 + rng.random(500) * 3e7, rng.lognormal(2, 1.5, 500), -rng.random(500)], 1)
    x[rng.random(x.shape) < 0.1] = np.nan
    stats = st.compute_statistics(chunks_of(x), ["ts", "price", "neg"], {"f": 3})
    for i, name in enumerate(["ts", "price", "neg"]):
        s, v = stats.dense[name], x[:, i][~np.isnan(x[:, i])]
        assert (s.count, s.missing) == (len(v), 500 - len(v))
        assert s.mean == pytest.approx(v.mean(), rel=1e-12)
        assert s.std == pytest.approx(v.std(), rel=1e-9)
        assert (s.min, s.max) == (v.min(), v.max())
        lv = np.log1p(np.maximum(v, 0))
        assert (s.log_mean, s.log_std) == (pytest.approx(lv.mean()), pytest.approx(lv.std()))
        # fewer rows than the reservoir holds: the quantiles are exact
        np.testing.assert_allclose(s.quantiles, np.quantile(v, np.linspace(0, 1, st.QUANTILE_POINTS)))


def test_reservoir_quantiles_of_a_long_stream_are_close_and_repeatable(monkeypatch):
    monkeypatch.setattr(st, "RESERVOIR_ROWS", 2000)
    x = np.random.default_rng(1).exponential(5.0, (50_000, 1))
    a = st.compute_statistics(chunks_of(x, size=3001), ["x"], {})
    b = st.compute_statistics(chunks_of(x, size=3001), ["x"], {})
    assert a.dense["x"].quantiles == b.dense["x"].quantiles
    q = np.array(a.dense["x"].quantiles)[[250, 500, 750, 900]]  # the 0.25, 0.5, 0.75, 0.9 quantiles
    # each estimate's rank in the full stream is within a few 1/sqrt(2000) of the target
    ranks = np.searchsorted(np.sort(x[:, 0]), q) / len(x)
    np.testing.assert_allclose(ranks, [0.25, 0.5, 0.75, 0.9], atol=0.04)
    assert a.dense["x"].max == x.max()  # exact, not from the sample


def test_id_counts_are_capped_at_one_byte():
    ids = np.array([0] * 300 + [1] * 2 + [2])
    stats = st.compute_statistics(chunks_of(np.zeros((len(ids), 0)), ids, size=50), [], {"f": 4})
    np.testing.assert_array_equal(stats.id_counts["f"], [st.COUNT_CAP, 2, 1, 0])
    assert stats.id_counts["f"].dtype == np.uint8


def test_saved_statistics_read_back_exactly(tmp_path):
    x = np.random.default_rng(2).normal(9e8, 1e7, (100, 1))
    stats = st.compute_statistics(chunks_of(x, np.arange(100) % 5), ["ts"], {"f": 5})
    st.save_statistics(stats, str(tmp_path), {"transforms": {"note": 1}})
    back = st.load_statistics(str(tmp_path))
    assert back.dense == stats.dense and back.rows == 100
    np.testing.assert_array_equal(back.id_counts["f"], stats.id_counts["f"])
    assert json.loads((tmp_path / st.STATS_FILE).read_text())["transforms"] == {"note": 1}


def _dataset(path, **kw):
    kw.setdefault("num_embeddings_per_feature", [100])
    return build_dataset(DataConfig(source="tabular", path=str(path), label="click", dense=["ts"], sparse=["user"],
                                    **kw))


def _write(path, ts_offset=0.0, n=200):
    rng = np.random.default_rng(3)
    ts = 9e8 + ts_offset + rng.random(n) * 1e7
    path.write_text("click,ts,user\n" + "".join(f"{i % 2},{t:.0f},u{i % 13}\n" for i, t in enumerate(ts)))


def test_prepare_reuses_a_source_runs_statistics_and_keeps_a_copy(tmp_path, monkeypatch):
    _write(tmp_path / "a.csv")
    _write(tmp_path / "b.csv", ts_offset=5e8)  # another file: its own statistics would differ
    first = _dataset(tmp_path / "a.csv")
    st.prepare_statistics(first, str(tmp_path / "run_a"), None, log=lambda m: None)
    assert (tmp_path / "run_a" / st.STATS_FILE).is_file() and (tmp_path / "run_a" / st.COUNTS_FILE).is_file()

    second = _dataset(tmp_path / "b.csv")
    monkeypatch.setattr(type(second), "compute_statistics", lambda self: pytest.fail("statistics recomputed"))
    st.prepare_statistics(second, str(tmp_path / "run_b"), str(tmp_path / "run_a"), log=lambda m: None)
    assert (tmp_path / "run_b" / st.STATS_FILE).read_text() == (tmp_path / "run_a" / st.STATS_FILE).read_text()
    row_a = next(first.batches("val", 8)).dense_features
    row_b = next(_reading(second, tmp_path / "a.csv").batches("val", 8)).dense_features
    assert row_a.equal(row_b)  # the same rows, the same model inputs


def _reading(ds, path):
    ds.files = [(str(path), "csv")]  # the same transforms over another file's rows
    return ds


def test_prepare_without_source_statistics_warns_and_computes(tmp_path):
    _write(tmp_path / "a.csv")
    (tmp_path / "old_run").mkdir()
    ds = _dataset(tmp_path / "a.csv")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        st.prepare_statistics(ds, str(tmp_path / "run"), str(tmp_path / "old_run"), log=lambda m: None)
    assert any("has no data_stats.json" in str(w.message) for w in caught)
    assert st.load_statistics(str(tmp_path / "run")).rows == 180  # 200 rows, every 10th is validation


def test_statistics_of_other_columns_are_refused(tmp_path):
    _write(tmp_path / "a.csv")
    st.prepare_statistics(_dataset(tmp_path / "a.csv"), str(tmp_path / "run"), None, log=lambda m: None)
    wider = _dataset(tmp_path / "a.csv", num_embeddings_per_feature=[50])
    with pytest.raises(DataError, match="hashes them into 49"):
        st.prepare_statistics(wider, str(tmp_path / "run2"), str(tmp_path / "run"), log=lambda m: None)

