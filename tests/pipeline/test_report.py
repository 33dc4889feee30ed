import pytest

from torchrec_shark.pipeline.plots import label_offsets, pareto_front
from torchrec_shark.pipeline.report import add_ratios, compressed_table_bytes, variant_row
from torchrec_shark.pipeline.stages import command_from_pass, with_overrides


def metrics(auc, nbytes, sps, tables):
    return {"val_auc": auc, "val_logloss": 0.4, "embedding_bytes": nbytes,
            "embedding_bytes_fp32": sum(t["num_embeddings"] * t["embedding_dim"] * 4 for t in tables.values()),
            "train_samples_per_s": sps, "steps": 10, "num_fields": sum(len(t["features"]) for t in tables.values()),
            "tables": tables}


def table(rows, dim, kind="none", nbytes=None, features=("f",)):
    return {"num_embeddings": rows, "embedding_dim": dim, "kind": kind, "features": list(features),
            "bytes": rows * dim * 4 if nbytes is None else nbytes}


def test_rows_and_ratios():
    base = metrics(0.80, 4000 * 4 + 100 * 8 * 4, 1000.0, {"a": table(1000, 4), "b": table(100, 8)})
    tt = metrics(0.799, 400 + 100 * 8 * 4, 500.0, {"a": table(1000, 4, "tensor_train", 400), "b": table(100, 8)})
    rows = [variant_row("baseline", "", base, "r0", 1.0), variant_row("tt_only", "", tt, "r1", 1.0)]
    add_ratios(rows)
    b, t = rows
    assert b["delta_auc"] == 0 and b["bytes_vs_baseline"] == 1 and b["compressed_tables_ratio"] is None
    assert t["delta_auc"] == pytest.approx(-0.001)
    assert t["bytes_vs_baseline"] == pytest.approx((400 + 3200) / (16000 + 3200))
    assert t["compressed_tables_ratio"] == pytest.approx(16000 / 400)
    assert t["speed_vs_baseline"] == 0.5
    assert t["mean_width"] == pytest.approx(6.0) and t["fields_kept"] == 2
    assert compressed_table_bytes(tt) == {"bytes": 400, "fp32": 16000}


def test_pareto_front():
    rows = [{"name": n, "embedding_bytes": b, "val_auc": a}
            for n, b, a in [("big", 100, 0.80), ("mid", 50, 0.79), ("bad", 60, 0.78), ("small", 10, 0.70)]]
    assert [r["name"] for r in pareto_front(rows)] == ["small", "mid", "big"]


def test_labels_of_two_nearly_equal_variants_do_not_overlap():
    rows = [{"name": "shark", "embedding_bytes": 11_369_368, "val_auc": 0.8793},
            {"name": "ending_int8", "embedding_bytes": 11_465_288, "val_auc": 0.8796},
            {"name": "pruned_dims", "embedding_bytes": 30_829_760, "val_auc": 0.8735},
            {"name": "baseline", "embedding_bytes": 252_157_440, "val_auc": 0.8618},
            {"name": "baseline_continued", "embedding_bytes": 252_157_440, "val_auc": 0.8790}]
    off = label_offsets(rows)
    assert off["shark"] != off["ending_int8"]
    # points apart from every other keep the usual place, above right
    assert off["pruned_dims"] == off["baseline"] == off["baseline_continued"] == off["ending_int8"]


def test_overrides_replace_by_key():
    args = ["train.py", "trainer.max_steps=1500", "tables=pruned", "+x.y=1", "data=synthetic"]
    got = with_overrides(args, ["trainer.max_steps=10", "x.y=2"])
    assert got == ["train.py", "tables=pruned", "data=synthetic", "trainer.max_steps=10", "x.y=2"]


def test_command_from_pass_keeps_the_pass_settings():
    cmd = ("torchrun --standalone --nproc_per_node=2 train.py 'hydra.searchpath=[file:///o]' tables=sseds "
           "trainer.init_from=/r trainer.max_steps=1500 hydra.run.dir=<NEW_RUN_DIR>")
    got = command_from_pass(cmd, "/new", ["trainer.max_steps=5"])
    assert got[1:3] == ["--standalone", "--nproc_per_node=2"]
    assert got[3:] == ["train.py", "hydra.searchpath=[file:///o]", "tables=sseds", "trainer.init_from=/r",
                       "trainer.max_steps=5", "hydra.run.dir=/new"]
