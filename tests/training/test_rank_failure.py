"""An error on one rank of ``torchrun train.py`` ends the whole job at once, with the error printed."""

import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
BATCH = 64


def write_npy_days(path, bad_row):
    """criteo_npy days 0 (train) and 1 (val); training row ``bad_row`` has the label 2."""
    rng = np.random.default_rng(0)
    for day, n in ((0, 4096), (1, 512)):
        np.save(path / f"day_{day}_dense.npy", rng.random((n, 13), dtype=np.float32))
        np.save(path / f"day_{day}_sparse.npy", rng.integers(0, 1000, (n, 26)))
        labels = (rng.random((n, 1)) < 0.3).astype(np.float32)
        if day == 0:
            labels[bad_row] = 2.0
        np.save(path / f"day_{day}_labels.npy", labels)


def test_one_rank_failing_ends_the_job_within_seconds(tmp_path):
    # Global batch 5, second half: only rank 1 reads the bad label, while rank 0 goes on into the
    # step's collectives (before, rank 1 then waited at a barrier and rank 0 in the all-to-all
    # until gloo's 30-minute timeout).
    write_npy_days(tmp_path, 5 * BATCH + BATCH // 2 + 8)
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", "train.py", f"hydra.run.dir={tmp_path / 'run'}",
           "data=criteo_npy", f"data.path={tmp_path}", "data.num_embeddings_per_feature=[100]",
           "tables.embedding_dim=8", "model.interaction_dim=8", f"trainer.batch_size={BATCH}",
           "trainer.max_steps=20", "trainer.eval_batches=2", "trainer.progress=false"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=90,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    seconds = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "error (rank 1): label 2.0" in out, out[-5000:]
    # the row in the data, and where in the run it came
    bad = 5 * BATCH + BATCH // 2 + 8
    assert f"train row {bad}: day 0 row {bad} ({tmp_path}/day_0_*.npy) (rank 1, training step 6" in out, out[-5000:]
    print(f"failed job ended after {seconds:.1f} s")
