import numpy as np
import pytest
from data_helpers import rows_of, take

from torchrec_shark.config import DataConfig
from torchrec_shark.data import DataError, build_dataset

C = [f"C{i}" for i in range(1, 27)]


def write_day(path, day: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    dense = rng.random((n, 13), dtype=np.float32)
    sparse = rng.integers(0, 1 << 40, (n, 26))
    labels = rng.integers(0, 2, (n, 1)).astype(np.int32)
    np.save(path / f"day_{day}_dense.npy", dense)
    np.save(path / f"day_{day}_sparse.npy", sparse)
    np.save(path / f"day_{day}_labels.npy", labels)
    return dense, sparse, labels


def source(path, **kw):
    return build_dataset(DataConfig(source="criteo_npy", path=str(path), **kw))


def test_days_are_concatenated_and_ids_taken_modulo(tmp_path):
    d0 = write_day(tmp_path, 0, 70, 0)
    d1 = write_day(tmp_path, 1, 50, 1)
    d2 = write_day(tmp_path, 2, 30, 2)
    ds = source(tmp_path, train_days=[0, 1], val_days=[2], num_embeddings_per_feature=[997])
    got = rows_of(take(ds.batches("train", 40), 3), C)  # the third batch straddles the two days
    dense = np.concatenate([d0[0], d1[0]])[:120]
    sparse = np.concatenate([d0[1], d1[1]])[:120] % 997
    np.testing.assert_array_equal(got.dense, dense)
    np.testing.assert_array_equal(got.labels, np.concatenate([d0[2], d1[2]])[:120, 0])
    for f in range(26):
        np.testing.assert_array_equal(got.ids[f], sparse[:, f])
    val = rows_of(ds.batches("val", 16), C)  # 30 rows: one full batch and a short one
    assert len(val) == 30
    np.testing.assert_array_equal(val.ids[3], d2[1][:, 3] % 997)


def test_ranks_read_disjoint_slices_of_each_batch(tmp_path):
    write_day(tmp_path, 0, 64, 0)
    write_day(tmp_path, 1, 8, 1)
    one = rows_of(take(source(tmp_path, train_days=[0], val_days=[1]).batches("train", 32), 2), C)
    parts = [rows_of(take(source(tmp_path, train_days=[0], val_days=[1]).batches("train", 32, r, 2), 2), C)
             for r in range(2)]
    # global batch b = rank 0's 16 rows then rank 1's 16 rows
    for b in range(2):
        lo = b * 32
        np.testing.assert_array_equal(parts[0].dense[b * 16:(b + 1) * 16], one.dense[lo:lo + 16])
        np.testing.assert_array_equal(parts[1].dense[b * 16:(b + 1) * 16], one.dense[lo + 16:lo + 32])


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("missing", "does not exist"),
        ("shape", "expected [rows, 13]"),
        ("rows", "disagree in rows"),
    ],
)
def test_bad_files_fail_naming_the_file(tmp_path, breakage, message):
    write_day(tmp_path, 0, 20, 0)
    write_day(tmp_path, 1, 20, 1)
    if breakage == "missing":
        (tmp_path / "day_1_labels.npy").unlink()
    elif breakage == "shape":
        np.save(tmp_path / "day_1_dense.npy", np.zeros((20, 12), np.float32))
    else:
        np.save(tmp_path / "day_1_sparse.npy", np.zeros((19, 26), np.int64))
    with pytest.raises(DataError, match="day_1|disagree") as e:
        source(tmp_path, train_days=[0], val_days=[1])
    assert message in str(e.value)


def test_not_a_directory(tmp_path):
    with pytest.raises(DataError, match="must be a directory"):
        source(tmp_path / "nope")
