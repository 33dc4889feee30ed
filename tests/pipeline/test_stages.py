"""Pipeline stages are reused only when built with the same settings (theirs and their inputs')."""

import json
import os
import sys

from torchrec_shark.pipeline import stages
from torchrec_shark.pipeline.stages import STAGE_FILE, StageRunner

WRITE = "import sys, os; open(os.path.join(sys.argv[1], 'done.txt'), 'a').write(sys.argv[2] + '\\n')"


def stage(runner, name, value, after=()):
    out = runner.path(name)
    return runner.run(name, "train", out, [sys.executable, "-c", WRITE, out, value], "done.txt", after)


def runs_of(runner, name):
    with open(runner.path(name, "done.txt")) as f:
        return f.read().split()


def test_changed_settings_rerun_the_stage_and_the_stages_after_it(tmp_path):
    first = StageRunner(str(tmp_path))
    assert not stage(first, "base", "steps=20").skipped
    assert not stage(first, "tuned", "budget=0.5", after=["base"]).skipped
    assert not stage(first, "other", "x").skipped

    same = StageRunner(str(tmp_path))
    assert stage(same, "base", "steps=20").skipped
    assert stage(same, "tuned", "budget=0.5", after=["base"]).skipped

    changed = StageRunner(str(tmp_path))
    assert not stage(changed, "base", "steps=30").skipped  # other steps: run again, old output moved aside
    assert runs_of(changed, "base") == ["steps=30"]
    assert os.listdir(tmp_path / "base.replaced-1") and runs_of(changed, "base.replaced-1") == ["steps=20"]
    # its own settings unchanged, but its input was rebuilt
    assert not stage(changed, "tuned", "budget=0.5", after=["base"]).skipped
    assert stage(changed, "other", "x").skipped  # independent of "base"

    budget = StageRunner(str(tmp_path))
    assert stage(budget, "base", "steps=30").skipped
    assert not stage(budget, "tuned", "budget=0.3", after=["base"]).skipped
    assert runs_of(budget, "tuned") == ["budget=0.3"]
    saved = json.loads((tmp_path / "tuned" / STAGE_FILE).read_text())
    assert saved["fingerprint"] == budget.results["tuned"].fingerprint and saved["after"] == ["base"]


def test_stage_without_recorded_settings_is_rerun(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "done.txt").write_text("built by an older version\n")
    runner = StageRunner(str(tmp_path))
    assert not stage(runner, "base", "steps=20").skipped
    assert runs_of(runner, "base") == ["steps=20"]


def test_a_finished_training_stage_with_checkpoints_is_not_run_again():
    # A stage's dir keeps its checkpoints, so the pipeline adds trainer.resume=true to its command when it runs
    # again; that flag does not change what the stage computes and must not change its fingerprint.
    base = ["torchrun", "train.py", "tables=baseline", "hydra.run.dir=/out/runs/baseline"]
    with_resume = base[:3] + [stages.RESUME] + base[3:]
    assert stages.stage_fingerprint(with_resume, "/out", {}) == stages.stage_fingerprint(base, "/out", {})
    assert stages.stage_fingerprint(base + ["tables=shark"], "/out", {}) != stages.stage_fingerprint(base, "/out", {})


def test_an_edited_preset_file_changes_the_fingerprint_of_the_stages_that_read_it(tmp_path):
    # A preset edited in conf/ between two pipeline runs must not let a stage built with the old one be reused.
    conf = tmp_path / "conf"
    for group, option in [("tables", "shark"), ("tables", "int8"), ("tables", "baseline"), ("data", "synthetic"),
                          ("passes", "prune_fields")]:
        (conf / group).mkdir(parents=True, exist_ok=True)
        (conf / group / f"{option}.yaml").write_text(f"# {option}\n")
    (conf / "config.yaml").write_text("defaults:\n  - data: synthetic\n  - tables: baseline\n  - _self_\n")
    shark = ["torchrun", "train.py", "tables=shark", "hydra.run.dir=/out/runs/s"]
    base = ["torchrun", "train.py", "hydra.run.dir=/out/runs/b"]
    prune = ["torchrun", "-m", "torchrec_shark.passes.prune_fields", "run_dir=/out/runs/b"]

    def prints():
        return [stages.stage_fingerprint(c, "/out", {}, conf_dir=str(conf)) for c in (shark, base, prune)]

    before = prints()
    (conf / "tables" / "int8.yaml").write_text("# int8, edited: read by none of them\n")
    assert prints() == before
    (conf / "tables" / "shark.yaml").write_text("# shark, edited\n")
    after_shark = prints()
    assert after_shark[0] != before[0] and after_shark[1:] == before[1:]
    (conf / "data" / "synthetic.yaml").write_text("# the default data, edited\n")
    after_data = prints()
    assert after_data[0] != after_shark[0] and after_data[1] != after_shark[1] and after_data[2] == before[2]
    (conf / "passes" / "prune_fields.yaml").write_text("# edited\n")
    assert prints()[2] != before[2]
