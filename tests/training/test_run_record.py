"""A run dir keeps its word: a resume continues the recorded config (a mismatch named key by key), and a
refused or failed ``train.py`` leaves the run dir byte for byte as it was (its log aside)."""

import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tests.training.small_job import ROOT, SMALL
from torchrec_shark.config import ConfigError, TrainConfig
from torchrec_shark.training.run_record import resume_config, resumed_overrides

# ---------------------------------------------------------------- the resume config


def _recorded(**trainer):
    cfg = OmegaConf.structured(TrainConfig)
    cfg.tables.name, cfg.tables.compression.kind, cfg.tables.embedding_dim = "shark", "mixed_precision", 16
    for k, v in trainer.items():
        cfg.trainer[k] = v
    return cfg


def test_resume_takes_the_recorded_config_and_the_resumable_overrides():
    given = OmegaConf.structured(TrainConfig)  # what `trainer.resume=true trainer.max_steps=60` composes to
    given.trainer.resume, given.trainer.max_steps = True, 60
    out = resume_config(given, _recorded(max_steps=30, embedding_lr=0.2), ["trainer.resume=true", "trainer.max_steps=60"])
    assert out.tables.name == "shark" and out.tables.compression.kind == "mixed_precision"
    assert out.trainer.max_steps == 60 and out.trainer.embedding_lr == 0.2 and out.trainer.resume


def test_resume_refuses_other_settings_naming_each_key():
    given = OmegaConf.structured(TrainConfig)
    given.tables.embedding_dim, given.trainer.embedding_lr = 8, 0.2
    with pytest.raises(ConfigError) as e:
        resume_config(given, _recorded(), ["trainer.resume=true", "tables=baseline", "tables.embedding_dim=8",
                                           "trainer.embedding_lr=0.2", "trainer.batch_size=4096"])
    msg = str(e.value)
    for part in ("tables.embedding_dim: the run has 16, this command gives 8",
                 "tables.compression.kind: the run has 'mixed_precision', this command gives 'none'",
                 "tables.name: the run has 'shark', this command gives 'baseline'",
                 "trainer.embedding_lr: the run has 0.05, this command gives 0.2"):
        assert part in msg, msg
    assert "batch_size" not in msg  # may change on resume


def test_resumed_overrides_replace_the_resumable_ones():
    assert resumed_overrides(["tables=shark", "trainer.max_steps=30"], ["trainer.resume=true", "trainer.max_steps=60"]) \
        == ["tables=shark", "trainer.max_steps=60"]


# ---------------------------------------------------------------- train.py on an existing run dir


def train(run_dir, *overrides, small=True):
    cmd = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *(SMALL if small else []), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    return proc.returncode, proc.stdout + proc.stderr


def snapshot(run_dir):
    """Every file of the run dir (its log aside) with its bytes."""
    out = {}
    for d, _, names in os.walk(run_dir):
        for n in names:
            path = os.path.join(d, n)
            if n != "train.log":
                with open(path, "rb") as f:
                    out[os.path.relpath(path, run_dir)] = f.read()
    return out


@pytest.mark.slow  # eight jobs one after the other: make test-slow
def test_refused_and_failed_jobs_leave_the_run_dir_as_it_was(tmp_path):
    run = tmp_path / "run"
    every = ["trainer.eval_every=5", "trainer.checkpoint_every=5"]
    code, out = train(run, "tables=shark", "trainer.max_steps=10", *every)
    assert code == 0, out[-3000:]
    assert out.count(f"run dir: {run} (metrics: {run / 'metrics.json'})") == 2  # at the start and the end
    before = snapshot(run)
    assert {".hydra/config.yaml", "plan.json", "plan.txt", "data_truth.json"} <= set(before)

    # Other settings on resume: refused before anything is built, each key named.
    code, out = train(run, "trainer.resume=true", "tables.embedding_dim=8", "tables=baseline", small=False)
    assert code == 2 and "tables.embedding_dim: the run has 16, this command gives 8" in out, out[-3000:]
    assert "tables.compression.kind: the run has 'mixed_precision', this command gives 'none'" in out
    assert snapshot(run) == before
    # A fresh run into it.
    code, out = train(run, "trainer.max_steps=3")
    assert code == 2 and "already holds checkpoints" in out, out[-3000:]
    assert snapshot(run) == before
    # Nothing to do: said so, nothing rewritten.
    code, out = train(run, "trainer.resume=true", "trainer.max_steps=10", small=False)
    assert code == 0 and "nothing to do" in out, out[-3000:]
    assert snapshot(run) == before
    # A record that disagrees with the checkpoint (it was edited): the checkpoint's tables are named.
    record = run / ".hydra" / "config.yaml"
    record.write_text(record.read_text().replace("embedding_dim: 16", "embedding_dim: 8"))
    edited = snapshot(run)
    code, out = train(run, "trainer.resume=true", "trainer.max_steps=15", small=False)
    assert code == 2 and "tables.embedding_dim: this run has 8, the checkpoint has 16" in out, out[-3000:]
    assert "t_f00: mixed_precision 2000 x 16 in the checkpoint, mixed_precision 2000 x 8 here" in out
    assert snapshot(run) == edited
    record.write_bytes(before[".hydra/config.yaml"])

    # `trainer.resume=true` alone resumes the shark run with its own settings; metrics.json covers it all.
    code, out = train(run, "trainer.resume=true", "trainer.max_steps=15", small=False)
    assert code == 0, out[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert {t["kind"] for t in metrics["tables"].values()} == {"mixed_precision"}
    assert [h["step"] for h in metrics["history"]] == [5, 10, 15] and metrics["steps"] == 15
    assert metrics["history"][:2] == json.loads(before["metrics.json"])["history"]
    assert "max_steps: 15" in record.read_text() and "tables=shark" in (run / ".hydra" / "overrides.yaml").read_text()

    # Every checkpoint's meta.json damaged: an error naming each, and no file deleted or changed.
    for name in ("step_00000010", "step_00000015"):
        (run / "checkpoints" / name / "meta.json").write_text('{"step": ')
    damaged = snapshot(run)
    code, out = train(run, "trainer.resume=true", "trainer.max_steps=20", small=False)
    assert code == 2 and "no readable checkpoint" in out, out[-3000:]
    assert "step_00000015/meta.json is not valid JSON" in out and "step_00000010/meta.json is not valid JSON" in out
    assert snapshot(run) == damaged


def test_two_jobs_at_once_the_first_keeps_its_record(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    jobs = [subprocess.Popen([sys.executable, "train.py", f"hydra.run.dir={run}", *SMALL, f"trainer.max_steps={n}",
                              "trainer.eval_every=100", "trainer.checkpoint_every=100"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in (4, 6)]
    outs = [j.communicate(timeout=300)[0] for j in jobs]
    codes = [j.returncode for j in jobs]
    assert sorted(codes) == [0, 2], outs
    winner = 4 if codes[0] == 0 else 6
    refused = outs[codes.index(2)]  # busy, or (had the first already finished) holding its checkpoints
    assert "is in use by another job" in refused or "already holds checkpoints" in refused, refused[-3000:]
    assert f"max_steps: {winner}" in (run / ".hydra" / "config.yaml").read_text()
    assert f"trainer.max_steps={winner}" in (run / ".hydra" / "overrides.yaml").read_text()
    assert json.loads((run / "metrics.json").read_text())["steps"] == winner
    assert not (run / ".lock.hydra").exists()
