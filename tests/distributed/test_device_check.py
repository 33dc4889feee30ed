"""Every collective the trainer makes hands its process group tensors on the group's device (gloo: CPU,
NCCL: CUDA): the checker that enforces it, and a 2-rank training job under it (labels gathered, tensor-train
replicas and tier activity reduced, TorchRec's dists, an evaluation and a checkpoint)."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from tests.training.small_job import ROOT, SMALL
from torchrec_shark.distributed.device_check import CollectiveDeviceError, checked_collectives, collective_device

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


@pytest.fixture
def one_rank_group(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_tensor_off_the_groups_device_fails_naming_it(one_rank_group):
    assert collective_device() == torch.device("cpu")
    with checked_collectives() as seen:
        dist.all_reduce(torch.ones(2))
        with pytest.raises(CollectiveDeviceError, match="all_gather on a gloo group was given a tensor on meta"):
            dist.all_gather([torch.empty(2, device="meta")], torch.empty(2, device="meta"))
    assert seen[0] == {"collective": "all_reduce", "backend": "gloo", "devices": ["cpu"]}
    assert dist.all_reduce.__name__ == "all_reduce"  # put back after the block


@pytest.mark.slow
def test_training_collectives_use_the_groups_device(tmp_path):
    record = str(tmp_path / "coll")
    tt = ("tables.overrides={t_f00:{compression:{kind:tensor_train,tensor_train:{min_rows:100,ranks:[4],"
          "row_factors:[10,10,20]}}}}")
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "torchrec_shark.distributed.device_check",
           "--record", record, "--", f"hydra.run.dir={tmp_path / 'run'}", *SMALL, "tables=shark", tt, "planner.sharding_types=[row_wise]", "trainer.max_steps=6", "trainer.eval_every=6",
           "trainer.checkpoint_every=6", "trainer.log_every=3"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    files = sorted(glob.glob(record + ".*.jsonl"))
    assert len(files) == 2
    for path in files:
        with open(path) as f:
            seen = [json.loads(line) for line in f]
        names = {e["collective"] for e in seen}
        assert {"all_gather", "all_reduce", "all_to_all_single"} <= names, names
        assert all(set(e["devices"]) <= {"cpu"} for e in seen if e["backend"] == "gloo")
