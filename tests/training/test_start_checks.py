"""``train.py`` refuses what cannot work before its first step, with a message that names the cause."""

import fcntl
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = [
    "data.synthetic.cardinalities=[2000,500,100,50,20,10]",
    "data.synthetic.num_noise_fields=2",
    "data.synthetic.multi_hot_fields=[1]",
    "data.synthetic.num_train_samples=20000",
    "data.synthetic.num_val_samples=1024",
    "trainer.batch_size=256",
    "trainer.eval_batches=2",
    "trainer.progress=false",
    "tables.embedding_dim=16",
    "model.interaction_dim=16",
]


def train(run_dir, *overrides, timeout=300):
    cmd = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *SMALL, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("overrides, message", [
    (["+trainer.max_step=5"], "'trainer.max_step'"),
    (["trainer.embedding_lr=-0.1"], "trainer.embedding_lr=-0.1 must be positive"),
    (["tables=tt", "tables.compression.tensor_train.ranks=[1000000]", "tables.compression.tensor_train.min_rows=100"],
     "the embedding tables need"),
    (["data.synthetic.num_val_samples=0"], "val split: split 'val' has no rows"),
])
def test_refused_before_training(tmp_path, overrides, message):
    code, out = train(tmp_path / "run", "trainer.max_steps=2", *overrides)
    assert code == 2, out[-3000:]
    assert message in out, out[-3000:]
    assert not os.path.isdir(tmp_path / "run" / "checkpoints")


def test_second_job_in_a_busy_run_dir_is_refused_and_leaves_it_alone(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("the holder's config\n")
    with open(run / ".lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("pid 12345 on test\n")
        lock.flush()
        code, out = train(run, "trainer.max_steps=2")
    assert code == 2, out[-3000:]
    assert "is in use by another job (pid 12345 on test)" in out
    assert (run / ".hydra" / "config.yaml").read_text() == "the holder's config\n"
    assert not (run / "checkpoints").exists() and not (run / "metrics.json").exists()
    # free again: the job runs and holds the lock while it does
    code, out = train(run, "trainer.max_steps=2")
    assert code == 0, out[-3000:]
    assert "max_steps: 2" in (run / ".hydra" / "config.yaml").read_text()


def test_unwritable_run_dir_is_named(tmp_path):
    if os.geteuid() == 0:  # root writes through file modes: use a directory no one can write
        run = "/sys/kernel"
        if not os.path.isdir(run):
            pytest.skip("no read-only directory for root")
    else:
        run = tmp_path / "ro"
        run.mkdir()
        run.chmod(0o555)
    code, out = train(run, "trainer.max_steps=2", timeout=120)
    assert code == 2 and f"run dir '{run}' is not writable" in out, out[-3000:]


def _meta(run_dir):
    root = os.path.join(run_dir, "checkpoints")
    with open(os.path.join(root, sorted(n for n in os.listdir(root) if n.startswith("step_"))[-1], "meta.json")) as f:
        return json.load(f)


@pytest.mark.slow  # four jobs: make test-slow
def test_resume_under_another_batch_size_continues_at_the_next_sample_or_refuses(tmp_path):
    run = tmp_path / "run"
    every = ["trainer.checkpoint_every=4", "trainer.eval_every=4"]
    code, out = train(run, "trainer.max_steps=4", *every)
    assert code == 0, out[-3000:]
    assert _meta(run)["data_position"] * 256 == 1024
    # 1024 samples read: not a whole number of batches of 384
    code, out = train(run, "trainer.max_steps=6", "trainer.resume=true", "trainer.batch_size=384", *every)
    assert code == 2 and "trainer.batch_size=384 cannot resume this checkpoint exactly" in out, out[-3000:]
    # ...but 2 batches of 512: steps 5 and 6 read samples 1024..2047, as 8 steps of 256 would
    code, out = train(run, "trainer.max_steps=6", "trainer.resume=true", "trainer.batch_size=512", *every)
    assert code == 0, out[-3000:]
    meta = _meta(run)
    assert meta["step"] == 6 and meta["data_position"] * 512 == 2048
