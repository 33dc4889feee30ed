"""``train.py data=tabular`` on a file with a timestamp column: sane log loss, statistics kept with the run."""

import dataclasses
import json
import math
import os
import subprocess

import pandas as pd

from torchrec_shark.bench.tabular_transforms import train_command, write_timestamp_table
from torchrec_shark.data.statistics import COUNTS_FILE, STATS_FILE
from tests.dist_utils import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DENSE = "data.dense=[ts,price,ratio]"


def train(data, run_dir, steps, *extra):
    cmd = train_command(str(data), str(run_dir), steps, 256, DENSE, "trainer.eval_batches=8", *extra)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.load(f), proc.stdout + proc.stderr


def test_timestamp_column_trains_and_statistics_follow_the_run(tmp_path):
    data = tmp_path / "clicks.csv"
    write_timestamp_table(str(data), 8000)
    assert pd.read_csv(data).ts.min() > 8e8
    run = tmp_path / "run"
    metrics, out = train(data, run, 40, "trainer.checkpoint_every=20")
    assert math.isfinite(metrics["val_logloss"]) and metrics["val_logloss"] < 0.7, metrics["val_logloss"]
    assert metrics["val_auc"] > 0.6
    ts = metrics["data_transforms"]["dense"]["ts"]
    assert (ts["transform"], ts["applied"]) == ("auto", "standardize") and ts["shift"] > 8e8
    assert {"val_auc", "val_logloss", "steps", "malformed_lines"} <= set(metrics)
    assert "saturate" not in out
    saved = (run / STATS_FILE).read_text()
    assert json.loads(saved)["transforms"] == metrics["data_transforms"]

    # The file changes under the run (later timestamps): a resumed run keeps its own statistics ...
    shifted = tmp_path / "shifted.csv"
    df = pd.read_csv(data)
    df["ts"] += 300_000_000
    df.to_csv(shifted, index=False)
    data.write_bytes(shifted.read_bytes())
    resumed, out = train(data, run, 60, "trainer.resume=true", "trainer.checkpoint_every=20")
    assert "resumed from" in out and (run / STATS_FILE).read_text() == saved
    assert resumed["data_transforms"] == metrics["data_transforms"]

    # ... and a warm start takes its source's, whatever file it reads (also from the source's best checkpoint)
    warm_dir = tmp_path / "warm"
    warm, out = train(shifted, warm_dir, 10, f"trainer.init_from={run}@best")
    assert f"data statistics from {run / STATS_FILE}" in out
    assert (warm_dir / STATS_FILE).read_text() == saved
    assert (warm_dir / COUNTS_FILE).read_bytes() == (run / COUNTS_FILE).read_bytes()
    assert warm["data_transforms"] == metrics["data_transforms"]


def _train_then_load_on_ranks(rank, world_size, root):
    """Train on the ranks (rank 0 computes the statistics, the others read its file), then load the run as
    a pass does after its file has changed: the pass must see the run's inputs."""
    import numpy as np
    import torch.distributed as dist
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from torchrec_shark.config import validate
    from torchrec_shark.conf_store import register_configs
    from torchrec_shark.passes.run_loader import load_run
    from torchrec_shark.training.env import init_distributed
    from torchrec_shark.data import DataError, build_dataset
    from torchrec_shark.data.statistics import prepare_statistics
    from torchrec_shark.training.trainer import Trainer, _from_main

    env = init_distributed("cpu", 1)
    data, run = os.path.join(root, "clicks.csv"), os.path.join(root, "run")
    overrides = [o for o in train_command(data, run, 6, 256, DENSE, "trainer.eval_batches=2")[2:]
                 if not o.startswith("hydra.")]
    register_configs()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        dcfg = compose("config", overrides=overrides)
    if env.is_main:
        os.makedirs(os.path.join(run, ".hydra"), exist_ok=True)
        OmegaConf.save(dcfg, os.path.join(run, ".hydra", "config.yaml"))
    cfg = OmegaConf.to_object(dcfg)
    validate(cfg)
    trainer = Trainer(cfg, run, env)
    before = next(trainer.dataset.batches("val", 256, env.rank, world_size)).dense_features.numpy()
    metrics = trainer.run()
    dist.barrier()
    if env.is_main:
        df = pd.read_csv(data)
        df["ts"] *= 2
        df.to_csv(data, index=False)
    dist.barrier()
    loaded = load_run(run, os.path.join(root, "pass"), env)
    ds = loaded.trainer.dataset
    ds.files = [(os.path.join(root, "original.csv"), "csv")]  # the rows the run saw
    after = next(ds.batches("val", 256, env.rank, world_size)).dense_features.numpy()

    # Statistics that do not fit (other table sizes) fail on the main rank, and the others hear of it.
    other = build_dataset(dataclasses.replace(cfg.data, num_embeddings_per_feature=[50]))
    try:
        prepare_statistics(other, os.path.join(root, "other"), run, env.is_main, _from_main, log=lambda m: None)
        error = None
    except DataError as e:
        error = str(e)
    return metrics["data_transforms"], ds.stats()["data_transforms"], bool(np.array_equal(before, after)), error


def test_ranks_and_passes_share_the_runs_statistics(tmp_path):
    write_timestamp_table(str(tmp_path / "clicks.csv"), 3000)
    (tmp_path / "original.csv").write_bytes((tmp_path / "clicks.csv").read_bytes())
    results = run_ranks(_train_then_load_on_ranks, 2, str(tmp_path))
    for trained, loaded, same_inputs, _ in results:
        assert loaded == trained == results[0][0]
        assert same_inputs
    assert "hashes them into 49" in results[0][3]
    assert results[1][3].startswith("the main rank could not prepare") and "hashes them into 49" in results[1][3]
    assert json.loads((tmp_path / "pass" / STATS_FILE).read_text())["transforms"] == results[0][0]
