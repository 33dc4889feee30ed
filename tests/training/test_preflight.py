"""Start-of-run checks: table memory, empty splits, the data position on resume."""

import warnings

import pytest

from torchrec_shark.config import ConfigError, DataConfig, SyntheticDataConfig
from torchrec_shark.data import DataError, build_dataset
from torchrec_shark.modules import CompressedEmbeddingBagConfig, TensorTrain
from torchrec_shark.modules import SparseOptimizerSpec, Uniform
from torchrec_shark.training.preflight import check_splits, check_table_memory, resume_data_offset


def _tt(name, rows, dim, rank):
    return CompressedEmbeddingBagConfig(num_embeddings=rows, embedding_dim=dim, name=name, feature_names=[name],
                                        compression=TensorTrain(num_cores=3, ranks=(rank,)))


def test_tt_cores_that_cannot_fit_are_refused_naming_the_table():
    small = _tt("t_small", 100_000, 32, 8)
    sizes = check_table_memory([small], SparseOptimizerSpec(), memory_bytes=1 << 30)
    assert 0 < sizes["t_small"] < 1 << 20
    with pytest.raises(ConfigError, match=r"t_huge: .* tensor_train ranks \[100000, 100000\].*"
                                          r"tables.compression.tensor_train.ranks"):
        check_table_memory([small, _tt("t_huge", 1_000_000, 64, 100_000)], SparseOptimizerSpec(),
                           memory_bytes=64 << 30)


def test_row_tables_that_cannot_fit_are_refused_with_their_exact_bytes():
    """Every kind is checked with its own bytes: 2e9 int8 rows of width 64 are 136 GB with their row-wise
    Adagrad state (2e9 * (68 + 4)), more than 100 GiB; 1e9 fit."""
    def int8(rows):
        return CompressedEmbeddingBagConfig(num_embeddings=rows, embedding_dim=64, name="t_big", feature_names=["f"],
                                            compression=Uniform("int8"))

    opt = SparseOptimizerSpec("rowwise_adagrad")
    assert check_table_memory([int8(10**9)], opt, memory_bytes=100 << 30)["t_big"] == 10**9 * 72 + 8
    with pytest.raises(ConfigError, match=r"144.0 GB .*t_big: 144.0 GB, int8, 2000000000 x 64.*num_embeddings"):
        check_table_memory([int8(2 * 10**9)], opt, memory_bytes=100 << 30)


def test_empty_validation_split_fails_naming_the_data():
    ds = build_dataset(DataConfig(synthetic=SyntheticDataConfig(cardinalities=[10, 20], num_noise_fields=0,
                                                                 pair_dims=[], multi_hot_fields=[],
                                                                 num_val_samples=0)))
    with pytest.raises(DataError, match="data.source=synthetic: val split"):
        check_splits(ds, 64, 0, 1, "data.source=synthetic")


def test_a_batch_larger_than_the_training_split_warns(tmp_path):
    synthetic = SyntheticDataConfig(cardinalities=[10, 20], num_noise_fields=0, pair_dims=[], multi_hot_fields=[],
                                    num_train_samples=100, num_val_samples=64)
    ds = build_dataset(DataConfig(synthetic=synthetic))
    with pytest.warns(UserWarning, match=r"trainer.batch_size=128 is larger than the whole training split \(100 rows\)"):
        check_splits(ds, 128, 0, 1, "data.source=synthetic")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_splits(ds, 64, 0, 1, "data.source=synthetic")
    # a streamed file: counted up to one batch
    (tmp_path / "d.csv").write_text("click,user\n" + "".join(f"{i % 2},u{i}\n" for i in range(50)))
    csv = build_dataset(DataConfig(source="tabular", path=str(tmp_path / "d.csv"), label="click", sparse=["user"],
                                   num_embeddings_per_feature=[100], min_count=0))
    with pytest.warns(UserWarning, match=r"larger than the whole training split \(45 rows\)"):
        check_splits(csv, 64, 0, 1, "data.path=d.csv")


def _meta(step, position, batch):
    return {"step": step, "data_position": position, "config": {"trainer": {"batch_size": batch}}}


@pytest.mark.parametrize("meta, batch, offset", [
    (_meta(10, 10, 256), 256, 0),     # same size: unchanged
    (_meta(10, 15, 256), 256, 5),     # a warm-started run that began 5 batches in
    (_meta(10, 10, 256), 512, -5),    # 2560 samples = 5 batches of 512: the stream goes on at batch 5
    (_meta(10, 10, 256), 128, 10),    # ... or at batch 20 of 128
])
def test_resume_continues_at_the_next_unread_sample(meta, batch, offset):
    got = resume_data_offset(meta, batch)
    assert got == offset
    assert (got + meta["step"]) * batch == meta["data_position"] * meta["config"]["trainer"]["batch_size"]


def test_resume_refuses_a_batch_size_that_splits_a_batch():
    with pytest.raises(ConfigError, match="trainer.batch_size=384 cannot resume"):
        resume_data_offset(_meta(10, 10, 256), 384)
