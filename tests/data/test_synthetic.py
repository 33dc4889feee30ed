import json

import numpy as np
import pytest
from data_helpers import assert_same_rows, rows_of, take

from torchrec_shark.config import DataConfig, SyntheticDataConfig
from torchrec_shark.data import DataError, SyntheticClicks, build_dataset
from torchrec_shark.data.synthetic import auc, zipf_ranks

SMALL = dict(
    cardinalities=[5000, 2000, 1000, 500, 300, 200, 100, 50, 20, 10],
    num_noise_fields=3,
    pair_dims=[8, 4, 2],
    multi_hot_fields=[1, 6],
    num_dense=4,
    num_train_samples=6000,
    num_val_samples=3001,
)


def small(**kw) -> SyntheticClicks:
    return SyntheticClicks(SyntheticDataConfig(**{**SMALL, **kw}))


@pytest.fixture(scope="module")
def default():
    return build_dataset(DataConfig())


@pytest.fixture(scope="module")
def ds():
    return small()


def test_batch_layout(ds):
    b = next(ds.batches("train", 512))
    assert b.dense_features.shape == (512, 4) and b.labels.shape == (512,)
    assert ds.feature_names == [f"f{j:02d}" for j in range(10)]
    kjt = b.sparse_features.to_dict()
    for j, f in enumerate(ds.feature_names):
        lengths = kjt[f].lengths()
        if j in (1, 6):
            assert 1 <= int(lengths.min()) and int(lengths.max()) <= 3 and int(lengths.max()) > 1
        else:
            assert bool((lengths == 1).all())
        assert 0 <= int(kjt[f].values().min()) and int(kjt[f].values().max()) < ds.num_embeddings_per_feature[j]


def test_deterministic_by_seed(ds):
    a = rows_of(take(ds.batches("train", 700), 3), ds.feature_names)
    assert_same_rows(a, rows_of(take(small().batches("train", 700), 3), ds.feature_names))
    other = rows_of(take(small(seed=1).batches("train", 700), 3), ds.feature_names)
    assert not np.array_equal(a.ids[0], other.ids[0])


def test_rows_do_not_depend_on_batch_size(ds):
    a = rows_of(take(ds.batches("train", 1000), 3), ds.feature_names)
    assert_same_rows(a, rows_of(take(ds.batches("train", 300), 10), ds.feature_names))


@pytest.mark.parametrize("split", ["train", "val"])
def test_rank_slices_concatenate_to_the_global_batch(ds, split):
    whole = take(ds.batches(split, 1000), 3)
    ranks = [take(ds.batches(split, 1000, rank=r, world_size=2), 3) for r in range(2)]
    for i in range(3):
        glued = rows_of([ranks[0][i], ranks[1][i]], ds.feature_names)
        assert_same_rows(glued, rows_of([whole[i]], ds.feature_names))


def test_val_is_finite_and_the_last_batch_short(ds):
    sizes = [len(b.labels) for b in ds.batches("val", 1024)]
    assert sizes == [1024, 1024, 953]
    # world size 3: the short batch loses its 955 % 3 = 1 trailing row so every rank gets as many.
    sizes = [len(b.labels) for b in ds.batches("val", 1023, rank=2, world_size=3)]
    assert sizes == [341, 341, 318]


def test_train_cycles_and_start_batch_resumes(ds):
    it = ds.batches("train", 1000)
    first = take(it, 9)  # 6000 rows per epoch: batches 6.. repeat batches 0..
    for a, b in zip(first[6:], first[:3]):
        assert_same_rows(rows_of([a], ds.feature_names), rows_of([b], ds.feature_names))
    resumed = take(ds.batches("train", 1000, start_batch=4), 2)
    assert_same_rows(rows_of(resumed, ds.feature_names), rows_of(first[4:6], ds.feature_names))


def test_train_and_val_are_different_draws(ds):
    t = rows_of(take(ds.batches("train", 1000), 1), ds.feature_names)
    v = rows_of(take(ds.batches("val", 1000), 1), ds.feature_names)
    assert not np.array_equal(t.dense, v.dense)


def test_hot_ids_are_spread_over_the_id_range(default):
    ids = rows_of(take(default.batches("train", 4096), 2), default.feature_names).ids[0]
    counts = np.bincount(ids, minlength=1_000_000)
    hottest = np.argsort(counts)[-20:]
    assert counts[hottest[-1]] > 100  # skewed: the top id is in > 1 % of rows
    assert hottest.max() > 100_000 and hottest.min() < 900_000


def test_zipf_ranks_follow_a_power_law():
    rng = np.random.default_rng(0)
    r = zipf_ranks(rng.random(400_000), np.full(400_000, 1000), 1.1)
    assert r.min() == 0 and r.max() <= 999
    freq = np.bincount(r, minlength=1000).astype(float)
    slope = np.polyfit(np.log(np.arange(10, 200) + 1), np.log(freq[10:200]), 1)[0]
    assert -1.2 < slope < -1.0
    assert zipf_ranks(np.array([0.0, 0.999999]), np.array([10, 10]), 1.0).tolist() == [0, 9]


def test_truth(default):
    t = default.truth()
    json.dumps(t)  # JSON-able
    fields = t["fields"]
    assert list(fields) == default.feature_names
    assert len(t["noise_fields"]) == 8 and len(t["importance_order"]) == 16
    for name in t["noise_fields"]:
        assert fields[name] == {**fields[name], "informative": False, "importance": 0.0, "intrinsic_dim": 0}
    imp = [fields[f]["importance"] for f in t["importance_order"]]
    assert imp == sorted(imp, reverse=True) and imp[-1] > 0.05
    dims = sorted({f["intrinsic_dim"] for f in fields.values()})
    assert dims == [0, 1, 2, 4, 8, 12, 16]
    for name, f in fields.items():
        if f["partner"] is not None:
            partner = fields[f["partner"]]
            assert partner["partner"] == name and partner["intrinsic_dim"] == f["intrinsic_dim"] >= 2
            assert f["cardinality"] >= 8 * f["intrinsic_dim"]
    # Importance grows with intrinsic dimension.
    by_dim = [np.mean([f["importance"] for f in fields.values() if f["intrinsic_dim"] == d]) for d in dims[1:]]
    assert by_dim == sorted(by_dim)
    assert 0.2 <= t["base_ctr"] <= 0.3
    assert t["bayes_auc_val"] >= 0.85
    assert sum(f["multi_hot"] for f in fields.values()) == 3


def test_labels_follow_the_planted_logits(default):
    batches = take(default.batches("val", 4096), 4)
    logits = np.concatenate([default.batch_logits(b) for b in batches])
    labels = np.concatenate([b.labels.numpy() for b in batches])
    assert abs(labels.mean() - (1 / (1 + np.exp(-logits))).mean()) < 0.02
    assert auc(labels, logits) > 0.85


def test_noise_fields_have_no_effect(ds):
    b = next(ds.batches("val", 2000))
    cols = rows_of([b], ds.feature_names)
    base = ds.true_logits(cols.dense, cols.ids, cols.lengths)
    rng = np.random.default_rng(0)
    truth = ds.truth()["fields"]
    for j, name in enumerate(ds.feature_names):
        ids = list(cols.ids)
        ids[j] = rng.integers(0, ds.num_embeddings_per_feature[j], len(ids[j]))
        changed = ds.true_logits(cols.dense, ids, cols.lengths)
        if truth[name]["informative"]:
            assert not np.allclose(changed, base), name
        else:
            np.testing.assert_array_equal(changed, base)


def test_bad_config():
    with pytest.raises(DataError, match="num_noise_fields"):
        small(num_noise_fields=11)
    with pytest.raises(DataError, match="multi_hot_fields"):
        small(multi_hot_fields=[10])
