"""bench.presets: the summary over seeds, the dominance check and the report (on recorded metrics)."""

import json
import os

import pytest

from torchrec_shark.bench import presets as bp


def _metrics(auc, nbytes, fp32=1000):
    return {"val_auc": auc, "val_logloss": 0.5, "embedding_bytes": nbytes, "embedding_bytes_fp32": fp32,
            "embedding_bytes_allocated": nbytes, "train_samples_per_s": 100.0}


def test_presets_have_roles_from_their_kinds():
    assert bp.preset_role("shark") == "per_row"
    assert bp.preset_role("int8") == "uniform" and bp.preset_role("baseline") == "uniform"
    assert bp.preset_role("tt") == "other"
    assert "tt" not in bp.default_presets() and {"shark", "int8", "int4", "int2"} <= set(bp.default_presets())


def test_a_per_row_preset_beats_a_uniform_one_only_beyond_the_noise(tmp_path):
    seeds = [0, 1, 2]
    runs = {}
    for s, (a, b, c) in enumerate([(0.860, 0.850, 0.861), (0.862, 0.852, 0.859), (0.861, 0.851, 0.860)]):
        runs[bp.run_name("shark", 32, s)] = _metrics(a, 300)
        runs[bp.run_name("int8", 32, s)] = _metrics(b, 280)
        runs[bp.run_name("baseline", 32, s)] = _metrics(c, 1000)
    rows = bp.summarise(runs, ["baseline", "int8", "shark"], [32], seeds)
    shark = next(r for r in rows if r["preset"] == "shark")
    assert shark["val_auc"] == pytest.approx(0.861) and shark["val_auc_sd"] == pytest.approx(0.001)
    assert shark["bytes_vs_fp32"] == pytest.approx(0.3)
    checks = bp.dominance(rows)
    # baseline has more bytes than shark: not compared; int8 has fewer, and is 0.010 worse (noise ~0.0008)
    assert [(c["uniform"], c["per_row_better"]) for c in checks] == [("int8", True)]
    assert checks[0]["margin"] == pytest.approx(0.010) and checks[0]["noise"] == pytest.approx((2e-6 / 3) ** 0.5)
    path = bp.write_report(str(tmp_path), rows, checks, "python -m torchrec_shark.bench.presets ...")
    text = open(path).read()
    assert "| shark | 32 | 300 (0.300) | 0,1,2 | 0.8610 ± 0.0010 |" in text and "| shark | int8 | 32 | +0.0100 |" in text
    assert json.load(open(os.path.join(tmp_path, "presets.json")))["dominance"] == checks
    assert bp.plot(str(tmp_path), rows, "test") == ["bytes_vs_auc_d32.png"]


def test_report_only_summarises_the_runs_that_finished(tmp_path):
    for name, auc in ((bp.run_name("shark", 32, 0), 0.86), (bp.run_name("shark", 32, 2), 0.87),
                      (bp.run_name("int4", 32, 1), 0.82)):
        os.makedirs(tmp_path / "runs" / name)
        (tmp_path / "runs" / name / "metrics.json").write_text(json.dumps(_metrics(auc, 200)))
    os.makedirs(tmp_path / "runs" / bp.run_name("int8", 32, 0))  # started, not finished: no metrics.json
    metrics = bp.finished_runs(["shark", "int4", "int8"], [32, 64], [0, 1, 2], str(tmp_path))
    rows = bp.summarise(metrics, ["shark", "int4", "int8"], [32, 64], [0, 1, 2])
    assert [(r["preset"], r["dim"], r["seeds"]) for r in rows] == [("shark", 32, [0, 2]), ("int4", 32, [1])]
    assert rows[0]["val_auc"] == pytest.approx(0.865)
