"""The SSEDS pass: its configs, the tables YAML it writes (loaded by train.py's schema), and the pass end to end
under torchrun (search on a row-wise run, retrain table-wise, saliency independent of the world size)."""

import csv
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from torchrec_shark.config import TablesConfig, TrainConfig, validate
from torchrec_shark.conf_store import register_configs as register_train
from torchrec_shark.passes import dim_search
from torchrec_shark.passes import saliency as sal
from torchrec_shark.passes.tables_yaml import write_tables_config
from torchrec_shark.training.table_factory import build_table_configs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = [
    "data.synthetic.cardinalities=[2000,500,100,50,20,10]",
    "data.synthetic.num_noise_fields=2",
    "data.synthetic.multi_hot_fields=[1]",
    "data.synthetic.num_train_samples=8192",
    "data.synthetic.num_val_samples=1024",
    "trainer.batch_size=256",
    "trainer.eval_batches=4",
    "trainer.progress=false",
    "tables.embedding_dim=16",
    "model.interaction_dim=16",
]
FEATURES = ["f00", "f01", "f02", "f03"]
ROWS = [1000, 300, 30, 10]


def _selection():
    tables = build_table_configs(TablesConfig(embedding_dim=16), FEATURES, ROWS)
    g = torch.Generator().manual_seed(0)
    s = {f: torch.rand(16, generator=g, dtype=torch.float64) for f in FEATURES}
    return tables, sal.select_dims(s, sal.table_infos(tables), budget=0.3)


def test_tables_yaml_loads_into_the_train_schema(tmp_path):
    tables, sel = _selection()
    write_tables_config(str(tmp_path), "sseds", TablesConfig(embedding_dim=16), tables,
                        widths=sel.table_widths, init_columns=sel.columns)
    register_train()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        dcfg = compose("config", overrides=[f"hydra.searchpath=[file://{tmp_path}]", "tables=sseds"])
    cfg: TrainConfig = OmegaConf.to_object(dcfg)
    validate(cfg)
    assert cfg.tables.name == "sseds"
    assert {k: list(v) for k, v in cfg.tables.init_columns.items()} == sel.columns
    rebuilt = build_table_configs(cfg.tables, FEATURES, ROWS)
    assert {c.name: c.embedding_dim for c in rebuilt} == sel.table_widths
    assert [c.num_embeddings for c in rebuilt] == ROWS
    assert {c.name: list(c.feature_names) for c in rebuilt} == {f"t_{f}": [f] for f in FEATURES}


def test_pass_config_composes_and_rejects_bad_values():
    dim_search.register_configs()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf", "passes"), version_base="1.3"):
        dcfg = compose("dim_search", overrides=["run_dir=/somewhere", "budget=0.1"])
    cfg = OmegaConf.to_object(dcfg)
    assert isinstance(cfg, dim_search.DimSearchConfig) and cfg.budget == 0.1 and cfg.min_width == 4
    dim_search.check_config(cfg)
    for key, value in [("budget", 0.0), ("budget", 1.5), ("budget_on", "x"), ("multiple", 6), ("min_width", 0),
                       ("num_batches", -1), ("split", "test")]:
        bad = OmegaConf.to_object(dcfg)
        setattr(bad, key, value)
        with pytest.raises(ValueError, match=key):
            dim_search.check_config(bad)


def test_truth_check_reads_data_truth():
    truth = {"fields": {
        "a": {"informative": True, "intrinsic_dim": 16}, "b": {"informative": True, "intrinsic_dim": 8},
        "c": {"informative": True, "intrinsic_dim": 1}, "n": {"informative": False, "intrinsic_dim": 0}},
        "noise_fields": ["n"]}
    tables = [sal.TableInfo(f"t_{f}", 100, 32, (f,)) for f in "abcn"]
    s = {"a": torch.full((32,), 4.0), "b": torch.full((32,), 2.0), "c": torch.full((32,), 1.0),
         "n": torch.full((32,), 0.1)}
    sel = sal.select_dims(sal.normalise(s), tables, budget=0.45)
    out = dim_search.truth_check(truth, tables, sel, {f: float(v.sum()) for f, v in s.items()})
    assert sel.field_widths["a"] > sel.field_widths["b"] >= sel.field_widths["c"] >= sel.field_widths["n"] == 4
    assert out["informative"] == ["a", "b", "c"] and out["noise_fields"] == ["n"]
    assert out["spearman_saliency"] == pytest.approx(1.0) and out["noise_at_min_width"]
    assert dim_search.spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)
    assert dim_search.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


# ---------------------------------------------------------------------------- end to end
def _compose(overrides):
    register_train()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _train(run_dir, overrides, env):
    """What ``train.py`` does in a Hydra run dir, in this process (its .hydra/ files included)."""
    from torchrec_shark.training.trainer import Trainer

    dcfg = _compose(overrides)
    if env.is_main:
        os.makedirs(os.path.join(run_dir, ".hydra"), exist_ok=True)
        OmegaConf.save(dcfg, os.path.join(run_dir, ".hydra", "config.yaml"))
        OmegaConf.save(OmegaConf.create(list(overrides)), os.path.join(run_dir, ".hydra", "overrides.yaml"))
    cfg = OmegaConf.to_object(dcfg)
    validate(cfg)
    return Trainer(cfg, run_dir, env).run()


def _two_ranks(rank, world_size, root, tables=()):
    """Train row-wise on two ranks, search on the two ranks, retrain its widths table-wise from its command."""
    from torchrec_shark.training.env import init_distributed

    env = init_distributed("cpu", 1)  # joins the group the test harness created
    base, search, retrain = (os.path.join(root, n) for n in ("base", "search", "retrain"))
    _train(base, [*SMALL, *tables, "trainer.max_steps=12", "trainer.eval_every=12", "trainer.checkpoint_every=12",
                  "planner.sharding_types=[row_wise]"], env)
    cfg = dim_search.DimSearchConfig(run_dir=base, budget=0.5, num_batches=4)
    summary = dim_search.search(cfg, search, env)
    command = shlex.split(summary["retrain_command"]) if env.is_main else None
    obj = [command]
    torch.distributed.broadcast_object_list(obj, src=0)
    argv = obj[0]
    assert argv[:3] == ["torchrun", "--standalone", f"--nproc_per_node={world_size}"] and argv[3] == "train.py"
    again = ["trainer.max_steps=2", "trainer.eval_every=2", "trainer.checkpoint_every=2",
             "planner.sharding_types=[table_wise]"]
    keys = {o.split("=", 1)[0] for o in again}
    _train(retrain, [o for o in argv[4:] if o.split("=", 1)[0] not in keys] + again, env)
    return summary["table_widths"]


def test_search_on_two_ranks_matches_one_and_retrains_under_other_sharding(tmp_path):
    from tests.dist_utils import run_ranks

    root = str(tmp_path)
    widths_by_rank = run_ranks(_two_ranks, 2, root)
    assert widths_by_rank[0] == widths_by_rank[1]
    base, search, single, retrain = (os.path.join(root, n) for n in ("base", "search", "single", "retrain"))
    for name in ("dim_saliency.csv", "dim_saliency.png", "widths.json", "tables/sseds.yaml", "retrain_command.txt",
                 "truth_check.json"):
        assert os.path.isfile(os.path.join(search, name)), name
    with open(os.path.join(search, "widths.json")) as f:
        widths = json.load(f)
    rows = dict(zip([f"t_f0{i}" for i in range(6)], [2000, 500, 100, 50, 20, 10]))
    assert widths["table_widths"] == widths_by_rank[0]
    assert widths["params"]["current"] == 16 * sum(rows.values())
    assert widths["params"]["selected"] <= 0.5 * widths["params"]["current"]
    assert widths["params"]["final"] == sum(rows[t] * w for t, w in widths["table_widths"].items())
    assert all(w % 4 == 0 and 4 <= w <= 16 for w in widths["table_widths"].values())
    assert any(w < 16 for w in widths["table_widths"].values())
    sal_2 = _saliency(os.path.join(search, "dim_saliency.csv"))
    assert len(sal_2) == 6 * 16 and sum(sal_2.values()) == pytest.approx(1.0, rel=1e-4)

    # The Hydra app on one process, no torchrun: the same saliency (the two row-wise ranks' sums add up).
    out = _run([sys.executable, "-m", "torchrec_shark.passes.dim_search", f"run_dir={base}", "budget=0.5",
                "num_batches=4", f"hydra.run.dir={single}"])
    sal_1 = _saliency(os.path.join(single, "dim_saliency.csv"))
    for k in sal_2:
        assert sal_1[k] == pytest.approx(sal_2[k], rel=1e-3, abs=1e-6), k
    printed = [line for line in out.splitlines() if line.startswith("torchrun ")]
    assert printed and "tables=sseds" in printed[-1] and f"trainer.init_from={base}" in printed[-1]

    # budget_on=final promises the written size: a budget below min_width everywhere fails, writing nothing
    over = os.path.join(root, "over_budget")
    proc = subprocess.run([sys.executable, "-m", "torchrec_shark.passes.dim_search", f"run_dir={base}", "budget=0.1",
                           "budget_on=final", "min_width=8", "num_batches=2", f"hydra.run.dir={over}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "budget=0.1 (budget_on=final) cannot be met: min_width=8" in proc.stderr
    assert not os.path.exists(os.path.join(over, "widths.json"))

    # The retrained model has the searched widths, table-wise, and inherited the kept columns.
    with open(os.path.join(retrain, "metrics.json")) as f:
        metrics = json.load(f)
    assert {t: i["embedding_dim"] for t, i in metrics["tables"].items()} == widths["table_widths"]
    assert {i["sharding_type"] for i in metrics["tables"].values()} == {"table_wise"}
    with open(os.path.join(retrain, "warm_start.json")) as f:
        report = json.load(f)
    assert len(report["narrowed"]) == 6 and report["fresh_tables"] == []
    narrowed = [t for t, w in widths["table_widths"].items() if w != 16]
    assert sorted(report["projections"]) == sorted(f"model.projection.proj.{t[2:]}.weight" for t in narrowed)


def test_search_on_a_sharded_mixed_precision_run_narrows_its_tables(tmp_path):
    """The pass loads a row-wise mixed-precision run; its retrain (table-wise) starts every narrowed table from
    the kept columns of the compressed rows, read a chunk at a time from the checkpoint."""
    from tests.dist_utils import run_ranks

    widths = run_ranks(_two_ranks, 2, str(tmp_path), ["tables=shark"])[0]
    with open(os.path.join(tmp_path, "retrain", "warm_start.json")) as f:
        report = json.load(f)
    assert report["fresh_tables"] == [] and len(report["narrowed"]) == 6
    with open(os.path.join(tmp_path, "retrain", "metrics.json")) as f:
        metrics = json.load(f)
    assert {t: i["embedding_dim"] for t, i in metrics["tables"].items()} == widths
    assert all(i["kind"] == "mixed_precision" for i in metrics["tables"].values())
    assert metrics["val_auc"] > 0.55  # a start from the searched columns, not from scratch


def _run(cmd, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _saliency(csv_path):
    with open(csv_path) as f:
        return {(r["field"], int(r["dim"])): float(r["saliency"]) for r in csv.DictReader(f)}
