"""A run that is blowing up keeps no checkpoint of the blow-up: ``latest`` stays at the last healthy one,
and the failure names it and the learning rate."""

import os
import re
import subprocess
import sys

import torch
import torch.distributed.checkpoint as dcp

from tests.training.small_job import ROOT, SMALL
from torchrec_shark.training.health import HealthMonitor

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def test_loss_far_above_its_median_is_unhealthy():
    health = HealthMonitor(lambda: [torch.ones(3)])
    for i in range(30):
        health.record_loss(0.5 + 0.01 * (i % 3))
    assert health.problem() is None
    for _ in range(5):
        health.record_loss(3.0)
    assert "the loss of the last 5 steps (3)" in health.problem()


def test_dense_norm_grown_by_orders_of_magnitude_is_unhealthy():
    w = torch.ones(4)
    health = HealthMonitor(lambda: [w])
    w.mul_(50)
    assert health.problem() is None  # 50x: large, not yet orders of magnitude
    health.kept()
    w.mul_(3)
    assert "since the job started" in health.problem()  # 150x the start, though 3x the last kept
    w.div_(150)
    assert health.problem() is None
    w.fill_(float("nan"))
    assert "norm grew" in health.problem()


def _dense_norm(checkpoint):
    md = dcp.FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    dense = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.items()
             if k.startswith("model.") and "embedding_bag" not in k and hasattr(v, "size")}
    dcp.load(dense, checkpoint_id=checkpoint, no_dist=True)
    return float(torch.sqrt(sum(t.double().square().sum() for t in dense.values())))


def test_diverging_run_keeps_the_last_healthy_checkpoint(tmp_path):
    run = tmp_path / "run"
    # Dense SGD at lr 60: finite for about 4 steps while the dense weights grow ~20x a step, NaN at step 5.
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", "train.py", f"hydra.run.dir={run}", *SMALL,
           "trainer.dense_optimizer=sgd", "trainer.dense_lr=60", "trainer.checkpoint_every=1",
           "trainer.eval_every=1000", "trainer.max_steps=40"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "not kept as a checkpoint, the run looks unstable" in out, out[-3000:]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    kept = re.search(r"The last checkpoint kept is (\S+):", out)
    assert kept and kept.group(1).endswith(latest), out[-3000:]
    assert "learning rate too high (trainer.dense_lr=60 with sgd" in out and "trainer.init_from=" in out
    # The checkpoint kept is no blow-up: its dense weights are within 100x of the fresh model's.
    start = float(re.search(r"norm grew from (\S+) to \S+ since the job started", out).group(1))
    assert _dense_norm(str(run / "checkpoints" / latest)) < 100 * start
