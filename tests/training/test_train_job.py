"""``torchrun train.py`` end to end on 2 gloo ranks: sharding types, metrics.json, resume."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.training.small_job import ROOT, SMALL

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
METRIC_KEYS = {"val_auc", "val_logloss", "train_samples_per_s", "steps", "embedding_bytes", "embedding_bytes_fp32",
               "tables"}


def train(run_dir, *overrides, nproc=2):
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "train.py", f"hydra.run.dir={run_dir}",
           *SMALL, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.load(f), proc.stdout


@pytest.mark.parametrize("sharding_type", ["table_wise", "row_wise"])
def test_two_ranks_train_and_write_metrics(tmp_path, sharding_type):
    metrics, out = train(tmp_path / "run", "trainer.max_steps=60", "trainer.eval_every=20",
                         "trainer.checkpoint_every=60", f"planner.sharding_types=[{sharding_type}]")
    assert METRIC_KEYS <= set(metrics)
    assert metrics["steps"] == 60 and metrics["world_size"] == 2
    for name, info in metrics["tables"].items():
        assert info["sharding_type"] == sharding_type, name
        assert info["ranks"] and set(info["ranks"]) <= {0, 1}
    assert metrics["embedding_bytes"] == metrics["embedding_bytes_fp32"]  # stock fp32 tables
    losses = [h["val_logloss"] for h in metrics["history"]]
    assert losses[-1] < losses[0], losses
    assert "Sharding plan" in out and os.path.isfile(tmp_path / "run" / "plan.txt")
    # The console shows the plan and results, not TorchRec's or torch's notes; train.log keeps all of the run.
    assert "step 20: val_auc=" in out and "done: steps=60" in out
    assert "WARNING]" not in out and "FutureWarning" not in out and "[HYDRA]" not in out, out[:3000]
    log = (tmp_path / "run" / "train.log").read_text()
    for line in ("Sharding plan (2 rank(s), gloo)", "step 20: val_auc=", "step 60: val_auc=", "done: steps=60"):
        assert line in log, log[-3000:]
    assert os.path.isfile(tmp_path / "run" / "data_truth.json")
    if sharding_type == "row_wise":
        # Mixed-precision tables warm-start from these stock ones: rows re-encoded by tier, the model's
        # quality kept (a fresh start would be near chance), optimizer state continued.
        warm, _ = train(tmp_path / "shark", "tables=shark_3tier", "trainer.max_steps=1", "trainer.eval_every=1",
                        f"trainer.init_from={tmp_path / 'run'}", f"planner.sharding_types=[{sharding_type}]")
        with open(tmp_path / "shark" / "warm_start.json") as f:
            report = json.load(f)
        assert report["fresh_tables"] == [] and report["optimizer_state"]
        assert report["data_offset_batches"] == 60  # the data stream goes on where the source stopped
        assert all(t["kind"] == "mixed_precision" for t in warm["tables"].values())
        assert warm["val_auc"] == pytest.approx(metrics["val_auc"], abs=0.01)


def _model_state(run_dir):
    path = os.path.join(run_dir, "checkpoints", "step_00000030")
    md = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.items()
             if k.startswith("model.") and hasattr(v, "size")}
    dcp.load(state, checkpoint_id=path, no_dist=True)
    return state


@pytest.mark.parametrize("tables", [
    [],
    # stochastic rounding, re-tiering before and after the checkpoint: the noise is a function of
    # (seed, step, row), so it continues exactly
    ["tables=shark_3tier", "tables.compression.mixed_precision.retier_every=10"],
])
def test_resume_reaches_the_uninterrupted_state(tmp_path, tables):
    common = ["trainer.eval_every=15", "trainer.checkpoint_every=15", "planner.sharding_types=[row_wise]", *tables]
    full, _ = train(tmp_path / "full", "trainer.max_steps=30", *common)
    train(tmp_path / "split", "trainer.max_steps=15", *common)
    resumed, out = train(tmp_path / "split", "trainer.max_steps=30", "trainer.resume=true", *common)
    assert "resumed from" in out
    # what metrics.json reports is what the shards hold (rows, scales, slot map, priorities, shard record)
    assert full["embedding_bytes_allocated"] == full["embedding_bytes"] == resumed["embedding_bytes_allocated"]
    assert resumed["val_logloss"] == pytest.approx(full["val_logloss"], abs=1e-6)
    # metrics.json tells the whole run, not only the part after the resume
    assert [h["step"] for h in resumed["history"]] == [h["step"] for h in full["history"]] == [15, 30]
    for r, f in zip(resumed["history"], full["history"]):
        assert r["val_logloss"] == pytest.approx(f["val_logloss"], abs=1e-6)
        assert r["train_loss"] == pytest.approx(f["train_loss"], abs=1e-6)
    assert resumed["train_samples_per_s"] > 0 and resumed["job_samples_per_s"] > 0 and resumed["resumed_at_step"] == 15
    a, b = _model_state(tmp_path / "full"), _model_state(tmp_path / "split")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


AVAZU = os.path.join(os.path.dirname(ROOT), "shared", "data", "avazu_train_head9999.csv")
FINITE = ["data=tabular", f"data.path={AVAZU}", "data.num_embeddings_per_feature=[10000]", "tables.embedding_dim=16",
          "model.interaction_dim=16", "trainer.batch_size=512", "trainer.eval_batches=4", "trainer.progress=false",
          "trainer.embedding_lr=0.2", "trainer.best_metric=logloss"]


def train_one(run_dir, *overrides, check=True):
    cmd = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.skipif(not os.path.isfile(AVAZU), reason="shared Avazu sample not present")
@pytest.mark.slow  # three jobs on the Avazu sample: make test-slow
def test_finite_file_epochs_early_stopping_and_the_best_checkpoint(tmp_path):
    run = tmp_path / "run"
    # 8,999 training rows, 512 a batch: 2 epochs end at step 36, before max_steps.
    train_one(run, *FINITE, "trainer.max_epochs=2", "trainer.eval_every=6", "trainer.checkpoint_every=100")
    with open(run / "metrics.json") as f:
        m = json.load(f)
    assert m["steps"] == 36 and m["stop_reason"] == "max_epochs" and m["train_rows_per_epoch"] == 8999
    assert m["epochs"] == pytest.approx(36 * 512 / 8999)
    assert [h["step"] for h in m["history"]] == [6, 12, 18, 24, 30, 36]
    assert [s["step"] for s in m["speed_history"]] == [20, 36] and m["speed_history"][0]["samples_per_s"] > 0
    assert len(m["peak_rss_bytes_per_rank"]) == 1 and m["peak_rss_bytes_per_rank"][0] > 1 << 20
    best = min(m["history"], key=lambda h: h["val_logloss"])
    assert m["best"]["step"] == best["step"] and m["best"]["val_logloss"] == pytest.approx(best["val_logloss"])
    assert (run / m["best"]["checkpoint"]).is_dir()

    # Overfitting at this learning rate: early stopping ends the run, the best model stays on disk.
    stop = tmp_path / "stop"
    train_one(stop, *FINITE, "trainer.max_steps=300", "trainer.eval_every=10", "trainer.checkpoint_every=20",
              "trainer.early_stopping_patience=2")
    with open(stop / "metrics.json") as f:
        s = json.load(f)
    assert s["stop_reason"] == "early_stopping" and s["steps"] < 300
    assert s["steps"] == s["best"]["step"] + 20 and s["val_logloss"] > s["best"]["val_logloss"]
    assert (stop / s["best"]["checkpoint"]).is_dir()  # kept although older than the two newest

    # A fresh run into a run dir with checkpoints refuses instead of rotating them away.
    again = train_one(stop, *FINITE, "trainer.max_steps=5", check=False)
    assert again.returncode != 0 and "already holds checkpoints" in again.stderr + again.stdout
    assert (stop / s["best"]["checkpoint"]).is_dir()

    # Warm start from the best model: its quality, not the last one's.
    warm = tmp_path / "warm"
    train_one(warm, *FINITE, "trainer.max_steps=1", "trainer.eval_every=1", "trainer.embedding_lr=1e-9",
              "trainer.dense_lr=1e-9", f"trainer.init_from={stop}@best")
    with open(warm / "metrics.json") as f:
        w = json.load(f)
    assert w["val_logloss"] == pytest.approx(s["best"]["val_logloss"], abs=0.02)
