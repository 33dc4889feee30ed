"""The pruning loop's control flow (which rounds are accepted, when it stops, what it writes), with a fake runner.

The real pass and the real fine-tuning are covered by test_prune_fields.py; here each command
writes the files the real one would, so the loop logic runs in milliseconds.
"""

import csv
import json
import os

import pytest
from omegaconf import OmegaConf

from torchrec_shark.passes.prune_loop import LoopError, PruneLoopConfig, run_loop
from torchrec_shark.training.checkpoint import split_run_spec

FIELDS = [f"f{i}" for i in range(6)]
IMPORTANCE = {"f0": 0.5, "f1": 0.001, "f2": 0.3, "f3": 0.002, "f4": 0.2, "f5": 0.1}
BYTES_PER_FIELD = 1000


def _fake_run(run_dir, fields, auc, overrides=()):
    os.makedirs(os.path.join(run_dir, "checkpoints", "step_1"))
    with open(os.path.join(run_dir, "checkpoints", "step_1", "meta.json"), "w") as f:
        json.dump({"step": 1}, f)
    os.makedirs(os.path.join(run_dir, ".hydra"))
    with open(os.path.join(run_dir, ".hydra", "overrides.yaml"), "w") as f:
        f.write(OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump({"val_auc": auc, "val_logloss": 1 - auc, "embedding_bytes": BYTES_PER_FIELD * len(fields),
                   "num_fields": len(fields), "fields": list(fields)}, f)


class FakeRunner:
    """Stands in for torchrun: the pass drops the ``drop=K`` least important fields of its run;
    fine-tuning loses ``auc_loss[field]`` of val AUC for every field dropped so far."""

    def __init__(self, auc_loss):
        self.auc_loss = auc_loss
        self.calls = []

    def __call__(self, argv, cwd, log_path):
        self.calls.append(argv)
        args = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("-"))
        if "torchrec_shark.passes.prune_fields" in argv:
            with open(os.path.join(split_run_spec(args["run_dir"])[0], "metrics.json")) as f:
                fields = json.load(f)["fields"]
            drop = sorted(fields, key=IMPORTANCE.get)[: int(args["drop"])]
            out = args["hydra.run.dir"]
            os.makedirs(os.path.join(out, "tables"))
            tables = os.path.join(out, "tables", f"{args['name']}.yaml")
            keep = [f for f in fields if f not in drop]
            OmegaConf.save(OmegaConf.create({"name": args["name"], "tables": {f"t_{f}": {"features": [f]} for f in keep},
                                             "init_columns": {"over.w": [0, 1]}}), tables)
            with open(os.path.join(out, "prune_report.json"), "w") as f:
                json.dump({"dropped": drop, "kept": keep, "tables_config": tables,
                           "estimated_loss_increase": sum(IMPORTANCE[x] for x in drop)}, f)
            return 0
        # Fine-tuning: train.py with the pruned tables, warm-started from the previous run.
        assert "train.py" in argv, argv
        src = split_run_spec(args["trainer.init_from"])[0]
        with open(os.path.join(src, "metrics.json")) as f:
            parent = json.load(f)
        tables = OmegaConf.load(os.path.join(args["hydra.searchpath"].strip("[]").replace("file://", ""), "tables",
                                             f"{args['tables']}.yaml"))
        kept = [f for t in tables.tables.values() for f in t.features]
        lost = sum(self.auc_loss[f] for f in parent["fields"] if f not in kept)
        _fake_run(args["hydra.run.dir"], kept, parent["val_auc"] - lost, overrides=argv[argv.index("train.py") + 1:])
        return 0


def _cfg(run_dir, **kw):
    return PruneLoopConfig(run_dir=str(run_dir), torchrun="torchrun", **kw)


def test_loop_prunes_until_auc_falls_out_of_tolerance(tmp_path):
    base = tmp_path / "base"
    _fake_run(str(base), FIELDS, 0.80, overrides=["trainer.max_steps=100", "data.synthetic.seed=3"])
    # f1 and f3 cost nothing, f5 and f4 a little, f2 too much.
    runner = FakeRunner({"f0": 0.05, "f1": 0.0, "f2": 0.01, "f3": 0.0, "f4": 0.002, "f5": 0.0005})
    out = tmp_path / "loop"
    summary = run_loop(_cfg(base, drop_per_round=2, auc_tolerance=0.002, finetune_steps=7), str(out), runner)
    rounds = summary["rounds"]
    assert [r["fields_kept"] for r in rounds] == [6, 4, 2]
    assert [r["accepted"] for r in rounds] == [True, True, False]
    assert rounds[1]["dropped"] == "f1 f3" and rounds[2]["dropped"] == "f5 f4"
    assert "lost more than auc_tolerance" in summary["stopped"]
    # The final model is the last accepted round, not the rejected one.
    assert summary["final_fields"] == ["f0", "f2", "f4", "f5"]
    assert summary["final_val_auc"] == pytest.approx(0.80)
    assert summary["final_embedding_bytes"] == 4 * BYTES_PER_FIELD
    final = OmegaConf.load(summary["final_tables_config"])
    assert sorted(final.tables) == ["t_f0", "t_f2", "t_f4", "t_f5"] and dict(final.init_columns) == {}
    with open(out / "prune_loop.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["round"], r["fields_kept"], r["embedding_bytes"]) for r in table] == \
        [("0", "6", "6000"), ("1", "4", "4000"), ("2", "2", "2000")]
    assert {"val_auc", "val_logloss"} <= set(table[0])
    assert "| 1 | 4 |" in (out / "prune_loop.md").read_text()
    # Round 2 fine-tunes warm-started from round 1's model, inheriting the base run's overrides.
    train_calls = [c for c in runner.calls if "train.py" in c]
    assert len(train_calls) == 2
    second = train_calls[1]
    assert f"trainer.init_from={out / 'round_01' / 'train'}" in second
    assert "trainer.max_steps=7" in second and "trainer.max_steps=100" not in second
    assert "data.synthetic.seed=3" in second


def test_loop_on_a_best_checkpoint_starts_from_it(tmp_path):
    """``run_dir=<run>@best``: the unpruned AUC is the best evaluation's, and the first round prunes and
    fine-tunes from the best checkpoint with the run's overrides."""
    base = tmp_path / "base"
    _fake_run(str(base), FIELDS, 0.70, overrides=["trainer.max_steps=100", "data.synthetic.seed=3"])
    os.makedirs(base / "checkpoints" / "step_0")
    with open(base / "checkpoints" / "step_0" / "meta.json", "w") as f:
        json.dump({"step": 0, "best": {"step": 0, "val_auc": 0.80, "val_logloss": 0.2}}, f)
    (base / "checkpoints" / "best").write_text("step_0")
    runner = FakeRunner({f: 0.0 for f in FIELDS})
    summary = run_loop(_cfg(f"{base}@best", drop_per_round=2, max_rounds=1), str(tmp_path / "loop"), runner)
    assert summary["base_val_auc"] == 0.80 and summary["rounds"][0]["val_auc"] == 0.80
    prune_call, train_call = runner.calls
    assert f"run_dir={base}@best" in prune_call
    assert f"trainer.init_from={base}@best" in train_call and "data.synthetic.seed=3" in train_call


def test_loop_stops_before_going_below_min_fields(tmp_path):
    base = tmp_path / "base"
    _fake_run(str(base), FIELDS, 0.80)
    runner = FakeRunner({f: 0.0 for f in FIELDS})
    summary = run_loop(_cfg(base, drop_per_round=2, min_fields=3), str(tmp_path / "loop"), runner)
    assert [r["fields_kept"] for r in summary["rounds"]] == [6, 4]
    assert "min_fields=3" in summary["stopped"]


@pytest.mark.parametrize("kw, match", [
    ({"drop_per_round": 2, "tolerance": 0.1}, "not both"),
    ({"drop_per_round": None}, "drop_per_round=K or tolerance=X"),
    ({"drop_per_round": 0}, "must be >= 1"),
])
def test_loop_rule_errors(tmp_path, kw, match):
    base = tmp_path / "base"
    _fake_run(str(base), FIELDS, 0.80)
    with pytest.raises(LoopError, match=match):
        run_loop(_cfg(base, **kw), str(tmp_path / "loop"), FakeRunner({}))


def test_loop_needs_a_finished_run(tmp_path):
    from torchrec_shark.training.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="does not exist"):
        run_loop(_cfg(tmp_path / "nope"), str(tmp_path / "loop"), FakeRunner({}))
