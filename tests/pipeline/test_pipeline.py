"""A tiny pipeline end to end: every variant in the report, numbers equal to the runs' metrics."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = [
    "data.synthetic.cardinalities=[20000,500,100,50,20,10]",
    "data.synthetic.num_noise_fields=2",
    "data.synthetic.multi_hot_fields=[1]",
    "data.synthetic.num_train_samples=20000",
    "data.synthetic.num_val_samples=2048",
    "trainer.batch_size=256",
    "trainer.eval_every=10",
    "trainer.eval_batches=4",
    "trainer.checkpoint_every=1000",
    "tables.embedding_dim=16",
    "model.interaction_dim=16",
    "tables.compression.tensor_train.min_rows=10000",
]


@pytest.mark.slow  # ten train.py stages: make test-slow
def test_tiny_pipeline_report_matches_the_runs(tmp_path):
    out = tmp_path / "pipe"
    train = "[" + ",".join(f"'{o}'" for o in SMALL) + "]"
    cmd = [sys.executable, "-m", "torchrec_shark.pipeline", f"hydra.run.dir={out}", f"train={train}",
           "steps=20", "finetune_steps=10", "budget=0.5", "prune=['drop=1']",
           "narrow_tables=none"]  # tiny tables would all take int8; the mixed-precision path is what this checks
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    names = [v["name"] for v in report["variants"]]
    assert names == ["baseline", "pruned", "pruned_dims", "shark", "ending_int8", "baseline_continued", "tt_only",
                     "fp16_only", "int8_only"]
    base = report["variants"][0]
    for v in report["variants"]:
        m = json.loads((out / "runs" / v["name"] / "metrics.json").read_text())
        for key in ("val_auc", "val_logloss", "embedding_bytes", "embedding_bytes_fp32", "train_samples_per_s"):
            assert v[key] == pytest.approx(m[key]), (v["name"], key)
        assert v["delta_auc"] == pytest.approx(m["val_auc"] - base["val_auc"])
        assert v["bytes_vs_baseline"] == pytest.approx(m["embedding_bytes"] / base["embedding_bytes"])
    by = {v["name"]: v for v in report["variants"]}
    assert by["pruned"]["fields_kept"] == base["fields_kept"] - 1
    assert by["pruned_dims"]["mean_width"] < base["mean_width"]
    # The last stage stores the searched tables in mixed precision (at these tiny widths its per-row
    # tier map and priority may outweigh the savings, so bytes are not compared).
    shark_metrics = json.loads((out / "runs" / "shark" / "metrics.json").read_text())
    shark = shark_metrics["tables"]
    dims = json.loads((out / "runs" / "pruned_dims" / "metrics.json").read_text())["tables"]
    assert {t["kind"] for t in shark.values()} == {"mixed_precision"}
    assert {n: t["embedding_dim"] for n, t in shark.items()} == {n: t["embedding_dim"] for n, t in dims.items()}
    ending = json.loads((out / "runs" / "ending_int8" / "metrics.json").read_text())["tables"]
    assert {t["kind"] for t in ending.values()} == {"int8"}
    assert {n: t["embedding_dim"] for n, t in ending.items()} == {n: t["embedding_dim"] for n, t in dims.items()}
    # the control continues the baseline by the chain's fine-tuning steps (an ending variant is no link of it)
    assert by["baseline_continued"]["steps"] == 3 * 10
    assert by["int8_only"]["embedding_bytes"] < by["fp16_only"]["embedding_bytes"] < base["embedding_bytes"]
    md = (out / "report.md").read_text()
    for n in names:
        assert f"| {n} |" in md
    assert (out / "auc_vs_bytes.png").stat().st_size > 0
    # tier activity: every mixed-precision row is in exactly one tier; lookups were counted
    tiers = shark_metrics["tier_history"]
    assert tiers and sum(tiers[-1]["rows"].values()) == sum(t["num_embeddings"] for t in shark.values())
    assert sum(tiers[-1]["hits"].values()) > 0
    assert (out / "tier_occupancy.png").stat().st_size > 0
