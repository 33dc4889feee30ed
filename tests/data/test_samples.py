"""The generated sample files read cleanly with the readers the README points them at, carry a learnable
signal, and are the same on every machine."""

import hashlib

import numpy as np
import pytest

from torchrec_shark.config import DataConfig
from torchrec_shark.data import build_dataset
from torchrec_shark.data.samples import write_samples

ROWS = 2000


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return write_samples(str(tmp_path_factory.mktemp("samples")), rows=ROWS)


def _train_labels(ds, batches=3):
    """Labels of the first ``batches`` training batches of 500 (a streamed file cycles for ever)."""
    if getattr(ds, "uses_statistics", False):
        ds.use_statistics(ds.compute_statistics())
    return np.concatenate([b.labels.numpy() for b, _ in zip(ds.batches("train", 500), range(batches))])


def test_criteo_sample_reads_without_a_malformed_line(samples):
    ds = build_dataset(DataConfig(source="criteo_tsv", path=samples["criteo_sample.tsv"], num_embeddings_per_feature=[10000]))
    labels = _train_labels(ds)
    assert len(ds.feature_names) == 26 and ds.num_dense == 13
    assert ds.stats()["malformed_lines"] == 0
    assert 0.15 < labels.mean() < 0.35 and len(labels) == 1500


def test_avazu_sample_reads_with_the_tabular_defaults(samples):
    from omegaconf import OmegaConf

    defaults = OmegaConf.load("conf/data/tabular.yaml")
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), defaults, {"path": samples["avazu_sample.csv"]})
    ds = build_dataset(cfg)
    labels = _train_labels(ds)
    assert len(ds.feature_names) == 21 and 0.08 < labels.mean() < 0.3
    assert ds.stats()["malformed_lines"] == 0


def test_timestamp_sample_has_its_dense_columns(samples):
    import pandas as pd

    df = pd.read_csv(samples["clicks_ts.csv"])
    assert list(df.columns) == ["click", "ts", "price", "ratio", "user", "item", "site"] and len(df) == 2 * ROWS
    assert df.ts.min() > 8e8 and 0.3 < df.click.mean() < 0.7


def _auc(scores, labels):
    ranks = np.argsort(np.argsort(scores)) + 1
    pos = labels == 1
    return (ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum())


def test_the_planted_model_is_learnable(samples):
    """Per-id click rates of the categorical fields, counted on the first half of the rows, rank the
    second half's clicks well above chance (no signal: AUC 0.5)."""
    rows = [line.rstrip("\n").split("\t") for line in open(samples["criteo_sample.tsv"])]
    labels = np.array([int(r[0]) for r in rows])
    half = len(rows) // 2
    score = np.zeros(len(rows) - half)
    for col in range(14, 40):
        seen = {}
        for r, y in zip(rows[:half], labels[:half]):
            seen.setdefault(r[col], []).append(y)
        rate = {v: (sum(ys) + labels.mean()) / (len(ys) + 1) for v, ys in seen.items()}  # smoothed
        score += np.log([rate.get(r[col], labels.mean()) for r in rows[half:]])
    assert _auc(score, labels[half:]) > 0.6


def test_same_files_on_every_run(samples, tmp_path):
    again = write_samples(str(tmp_path), rows=ROWS)
    for name, path in samples.items():
        digest = [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in (path, again[name])]
        assert digest[0] == digest[1], name
