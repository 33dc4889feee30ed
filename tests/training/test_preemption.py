"""SIGTERM (what a scheduler sends before it kills a job) ends ``train.py`` after the current step with a
checkpoint of that step, on every rank; a resume from it continues exactly."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.training.small_job import ROOT, SMALL
from torchrec_shark.training.preemption import EXIT_CODE

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
COMMON = [*SMALL, "trainer.checkpoint_every=3", "trainer.eval_every=1000"]


def _command(nproc, run_dir, *overrides):
    launch = [sys.executable] if nproc == 1 else [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}"]
    return [*launch, "train.py", f"hydra.run.dir={run_dir}", *COMMON, *overrides]


def _train(nproc, run_dir, *overrides):
    proc = subprocess.run(_command(nproc, run_dir, *overrides), cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.load(f)


def _model_state(checkpoint):
    md = dcp.FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.items()
             if k.startswith("model.") and hasattr(v, "size")}
    dcp.load(state, checkpoint_id=checkpoint, no_dist=True)
    return state


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])  # 2 ranks: make test-slow
def test_sigterm_saves_a_checkpoint_and_the_resume_is_exact(tmp_path, nproc):
    run = tmp_path / "run"
    # Its own session, signalled as a whole as a scheduler does (torchrun also forwards it to its workers).
    log = tmp_path / "preempted.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(_command(nproc, run, "trainer.max_steps=100000"), cwd=ROOT, start_new_session=True,
                                stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoints" / "latest").exists():  # step 3: training is under way
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = log.read_text()
    stopped = re.search(r"stopped by SIGTERM after step (\d+): checkpoint (\S+) written", out)
    assert stopped, out[-3000:]
    step = int(stopped.group(1))
    assert stopped.group(2) == str(run / "checkpoints" / f"step_{step:08d}")
    if nproc == 1:
        assert proc.returncode == EXIT_CODE
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert json.loads((latest / "meta.json").read_text())["step"] == step
    assert not (run / "metrics.json").exists()  # the run has not finished

    end = f"trainer.max_steps={step + 2}"
    resumed = _train(nproc, run, "trainer.resume=true", end)
    full = _train(nproc, tmp_path / "full", end)
    assert resumed["steps"] == full["steps"] == step + 2
    assert resumed["val_logloss"] == pytest.approx(full["val_logloss"], abs=1e-6)
    final = f"step_{step + 2:08d}"
    a, b = _model_state(str(run / "checkpoints" / final)), _model_state(str(tmp_path / "full" / "checkpoints" / final))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
