"""``<run_dir>`` and ``<run_dir>@best`` resolve once into every file a pass or a warm start reads."""

import json
import os

import pytest
from omegaconf import OmegaConf

from torchrec_shark.passes.run_loader import retrain_command
from torchrec_shark.training import checkpoint as ckpt
from torchrec_shark.training.run_ref import resolve_run


def _checkpoint(run_dir, step, best=None):
    path = os.path.join(run_dir, ckpt.CHECKPOINT_DIR, f"step_{step:08d}")
    os.makedirs(path)
    with open(os.path.join(path, ckpt.META), "w") as f:
        json.dump({"step": step, **({"best": best} if best else {})}, f)
    return path


def _run(tmp_path):
    """A finished run whose best evaluation (step 10) is not its last (step 20)."""
    run = tmp_path / "run"
    best = {"step": 10, "epoch": 1, "val_auc": 0.75, "val_logloss": 0.45}
    first = _checkpoint(str(run), 10, best)
    _checkpoint(str(run), 20, best)
    (run / ckpt.CHECKPOINT_DIR / ckpt.LATEST).write_text("step_00000020")
    (run / ckpt.CHECKPOINT_DIR / ckpt.BEST).write_text("step_00000010")
    os.makedirs(run / ".hydra")
    OmegaConf.save(OmegaConf.create({"trainer": {"max_steps": 20}}), run / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(["trainer.max_steps=20", "tables.embedding_dim=8", "data.synthetic.seed=3"]),
                   run / ".hydra" / "overrides.yaml")
    (run / "metrics.json").write_text(json.dumps({
        "val_auc": 0.70, "val_logloss": 0.50, "steps": 20, "fields": ["f0", "f1"],
        "best": {**best, "checkpoint": "checkpoints/step_00000010"}}))
    (run / "data_truth.json").write_text(json.dumps({"noise_fields": ["f1"]}))
    return run, first


def test_best_names_the_best_checkpoint_and_its_metrics(tmp_path):
    run, first = _run(tmp_path)
    ref = resolve_run(f"{run}@best")
    assert (ref.run_dir, ref.best, ref.checkpoint) == (str(run), True, first)
    assert ref.spec == f"{os.path.abspath(run)}@best"
    m = ref.metrics()
    assert (m["val_auc"], m["val_logloss"], m["steps"], m["fields"]) == (0.75, 0.45, 10, ["f0", "f1"])
    assert ref.config().trainer.max_steps == 20
    assert ref.overrides() == ["trainer.max_steps=20", "tables.embedding_dim=8", "data.synthetic.seed=3"]
    assert ref.data_truth() == {"noise_fields": ["f1"]}
    assert ref.path("data_stats.json") == os.path.join(str(run), "data_stats.json")


def test_plain_reference_is_the_latest_checkpoint_and_last_evaluation(tmp_path):
    run, _ = _run(tmp_path)
    ref = resolve_run(str(run))
    assert ref.checkpoint.endswith("step_00000020") and not ref.best and ref.spec == os.path.abspath(run)
    assert ref.metrics()["val_auc"] == 0.70


def test_retrain_command_keeps_the_runs_overrides_and_its_best_checkpoint(tmp_path):
    run, _ = _run(tmp_path)
    command = retrain_command(f"{run}@best", str(tmp_path / "pass"), "pruned", extra=["trainer.max_steps=5"], nproc=1)
    assert f"trainer.init_from={os.path.abspath(run)}@best" in command
    assert "tables.embedding_dim" not in command  # replaced by the new tables config
    assert "data.synthetic.seed=3" in command and "trainer.max_steps=5" in command
    assert "trainer.max_steps=20" not in command


def test_a_checkpoint_directory_resolves_to_itself(tmp_path):
    run, first = _run(tmp_path)
    assert ckpt.require_checkpoint(first) == first


def test_missing_best_is_named(tmp_path):
    run = tmp_path / "run"
    _checkpoint(str(run), 10)
    with pytest.raises(ckpt.CheckpointError, match="no best checkpoint"):
        resolve_run(f"{run}@best")
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        resolve_run(f"{tmp_path / 'nope'}@best")
