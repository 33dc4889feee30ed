"""Field pruning pass: rules, config rewrite, over-arch column map, warm start, errors, and one end-to-end run."""

import csv
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from tests.dist_utils import run_ranks
from torchrec_shark.config import TableConfig, TablesConfig
from torchrec_shark.models.dlrm import DLRM
from torchrec_shark.passes.prune_fields import (
    PruneError,
    PruneFieldsConfig,
    check_request,
    check_rule,
    choose_fields_to_drop,
    interaction_columns,
    over_arch_input_key,
    prune_tables,
)
from torchrec_shark.passes.tables_yaml import write_tables_config
from torchrec_shark.training.table_factory import build_table_configs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")

FIELDS = ["a", "b", "c", "d", "e"]
IMP = {"a": 0.5, "b": 0.01, "c": 0.2, "d": 0.001, "e": 0.05}


# ------------------------------------------------------------------ rules
def test_drop_k_least_important():
    assert choose_fields_to_drop(FIELDS, IMP, drop=2) == ["d", "b"]
    assert choose_fields_to_drop(FIELDS, IMP, drop=0) == []
    assert choose_fields_to_drop(FIELDS, IMP) == []  # no rule: importances only


def test_tolerance_drops_while_the_summed_importance_stays_under_it():
    assert choose_fields_to_drop(FIELDS, IMP, tolerance=0.0) == []
    assert choose_fields_to_drop(FIELDS, IMP, tolerance=0.011) == ["d", "b"]
    assert choose_fields_to_drop(FIELDS, IMP, tolerance=0.07) == ["d", "b", "e"]
    assert choose_fields_to_drop(FIELDS, IMP, tolerance=100.0) == ["d", "b", "e", "c"]  # one field always stays


def test_named_fields():
    assert choose_fields_to_drop(FIELDS, IMP, names=["c", "a"]) == ["c", "a"]


@pytest.mark.parametrize("kwargs, match", [
    ({"drop": 5}, "at most 4 can be dropped"),
    ({"drop": 9}, "at most 4 can be dropped"),
    ({"drop": -1}, "must be >= 0"),
    ({"tolerance": -0.1}, "must be >= 0"),
    ({"names": ["a", "zz"]}, r"\['zz'\] are not in the model"),
    ({"names": FIELDS}, "would drop all 5 fields"),
    ({"drop": 1, "tolerance": 0.1}, "give one rule"),
])
def test_rule_errors(kwargs, match):
    with pytest.raises(PruneError, match=match):
        choose_fields_to_drop(FIELDS, IMP, **kwargs)


def test_check_rule_before_measuring():
    check_rule(PruneFieldsConfig(run_dir="x", drop=2), FIELDS)
    with pytest.raises(PruneError, match="exact=true"):
        check_rule(PruneFieldsConfig(run_dir="x", by="exact"), FIELDS)
    with pytest.raises(PruneError, match="not in the model"):
        check_rule(PruneFieldsConfig(run_dir="x", fields=["nope"]), FIELDS)
    with pytest.raises(PruneError, match="at most 4"):
        check_rule(PruneFieldsConfig(run_dir="x", drop=5), FIELDS)


def _finished_run(path, fields):
    step = path / "checkpoints" / "step_1"
    step.mkdir(parents=True)
    (step / "meta.json").write_text("{}")
    (path / "metrics.json").write_text(json.dumps({"fields": fields}))
    return path


def test_request_errors_before_the_model_is_built(tmp_path):
    from torchrec_shark.training.checkpoint import CheckpointError

    run = str(_finished_run(tmp_path / "run", FIELDS))
    check_request(PruneFieldsConfig(run_dir=run, drop=4))
    with pytest.raises(PruneError, match="drop=5 but the model has 5 fields"):
        check_request(PruneFieldsConfig(run_dir=run, drop=5))
    with pytest.raises(PruneError, match=r"fields \['zz'\] are not in the model"):
        check_request(PruneFieldsConfig(run_dir=run, fields=["a", "zz"]))
    with pytest.raises(PruneError, match="run_dir=<a train.py run dir> is required"):
        check_request(PruneFieldsConfig())
    (tmp_path / "bare").mkdir()
    with pytest.raises(CheckpointError, match="has no complete checkpoint"):
        check_request(PruneFieldsConfig(run_dir=str(tmp_path / "bare"), drop=1))
    with pytest.raises(CheckpointError, match="does not exist"):
        check_request(PruneFieldsConfig(run_dir=str(tmp_path / "nope"), drop=1))


# ------------------------------------------------------------------ config rewrite
def _tables_with_a_shared_table():
    tables = TablesConfig(embedding_dim=8, tables={
        "t_ab": TableConfig(features=["a", "b"]),
        "t_c": TableConfig(features=["c"], embedding_dim=4),
        "t_d": TableConfig(features=["d"], pooling="mean"),
        "t_e": TableConfig(features=["e"]),
    })
    configs = build_table_configs(tables, FIELDS, [50, 30, 20, 10, 10])
    return tables, configs


def test_rewrite_drops_fields_and_tables_and_keeps_shared_tables(tmp_path):
    tables, configs = _tables_with_a_shared_table()
    dropped = ["a", "c"]
    plan = prune_tables(configs, dropped)
    assert plan == {"keep_tables": ["t_ab", "t_d", "t_e"], "dropped_tables": ["t_c"], "shared_tables_kept": ["t_ab"]}
    path = write_tables_config(str(tmp_path), "pruned", tables, configs, keep_tables=plan["keep_tables"],
                               drop_features=dropped, header="test")
    doc = OmegaConf.load(path)
    assert set(doc.tables) == {"t_ab", "t_d", "t_e"}
    assert list(doc.tables.t_ab.features) == ["b"]
    assert doc.tables.t_ab.num_embeddings == 50  # the shared table keeps its rows (warm start by shape)
    assert doc.tables.t_d.pooling == "mean"
    # Loads in train.py's schema and builds the model's tables from the data's features.
    loaded = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TablesConfig), doc))
    new = build_table_configs(loaded, FIELDS, [50, 30, 20, 10, 10])
    assert [c.name for c in new] == ["t_ab", "t_d", "t_e"]
    assert [f for c in new for f in c.feature_names] == ["b", "d", "e"]


def test_rewritten_config_composes_with_train_py(tmp_path):
    from hydra import compose, initialize_config_dir

    from torchrec_shark.conf_store import register_configs
    from torchrec_shark.config import TrainConfig

    tables, configs = _tables_with_a_shared_table()
    write_tables_config(str(tmp_path), "pruned", tables, configs, drop_features=["c"],
                        init_columns={"model.over_arch.w": [0, 2]})
    register_configs()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra.searchpath=[file://{tmp_path}]", "tables=pruned"])
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, TrainConfig)
    assert set(obj.tables.tables) == {"t_ab", "t_d", "t_e"}
    assert obj.tables.init_columns == {"model.over_arch.w": [0, 2]}


# ------------------------------------------------------------------ over-arch warm start
def _dlrm(widths, seed):
    torch.manual_seed(seed)
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=w, num_embeddings=10, feature_names=[f])
              for f, w in widths.items()]
    return DLRM(EmbeddingBagCollection(tables=tables), 3, [8], [16, 8, 1])


def test_interaction_columns_keep_the_remaining_interactions():
    widths = {"a": 8, "b": 4, "c": 8, "d": 12}
    src = _dlrm(widths, 0)
    kept = ["a", "c", "d"]
    dst = _dlrm({f: widths[f] for f in kept}, 1)
    cols = interaction_columns(list(widths), kept, 8)
    assert len(cols) == 8 + 4 * 3 // 2
    key_src = over_arch_input_key(src, 8 + 5 * 4 // 2)
    key_dst = over_arch_input_key(dst, 8 + 4 * 3 // 2)
    assert key_src == key_dst
    sd_src, sd_dst = src.state_dict(), dst.state_dict()
    for k, v in sd_dst.items():
        if k == key_dst:
            v.copy_(sd_src[k][:, cols])
        elif k in sd_src and sd_src[k].shape == v.shape:
            v.copy_(sd_src[k])
    g = torch.Generator().manual_seed(2)
    dense = torch.randn(6, 3, generator=g)
    pooled = {f: torch.randn(6, w, generator=g) for f, w in widths.items()}
    zeroed = dict(pooled, b=torch.zeros(6, 4))
    with torch.no_grad():  # the pruned model computes the source model with the dropped field at zero
        torch.testing.assert_close(dst.predict(dense, {f: pooled[f] for f in kept}), src.predict(dense, zeroed))
    assert interaction_columns(["a", "b"], ["a", "b"], 2) == list(range(2 + 3))
    with pytest.raises(PruneError, match="not in the source"):
        interaction_columns(["a"], ["z"], 2)


# ------------------------------------------------------------------ CLI errors (no training needed)
def _cli(*args, timeout=120):
    cmd = [sys.executable, "-m", "torchrec_shark.passes.prune_fields", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_cli_run_dir_without_checkpoint(tmp_path):
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    proc = _cli(f"run_dir={tmp_path / 'run'}", "drop=1", f"hydra.run.dir={tmp_path / 'out'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "has no complete checkpoint" in proc.stderr


# ------------------------------------------------------------------ end to end on a tiny synthetic run
SMALL = [
    "data.synthetic.cardinalities=[2000,500,100,50,20,10]",
    "data.synthetic.num_noise_fields=2",
    "data.synthetic.multi_hot_fields=[1]",
    "data.synthetic.pair_dims=[2]",
    "data.synthetic.num_train_samples=20000",
    "data.synthetic.num_val_samples=2048",
    "trainer.batch_size=256",
    "trainer.eval_batches=4",
    "trainer.progress=false",
    "tables.embedding_dim=16",
    "model.interaction_dim=16",
    "trainer.max_steps=40",
    "trainer.eval_every=20",
    "trainer.checkpoint_every=20",
]


def _torchrun(args, nproc, timeout=300):
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny trained run (1 rank) and the pass on it (2 ranks: the tables are re-planned and resharded)."""
    root = tmp_path_factory.mktemp("prune")
    run, out = root / "run", root / "pass"
    _torchrun(["train.py", f"hydra.run.dir={run}", *SMALL], nproc=1)
    stdout = _torchrun(["-m", "torchrec_shark.passes.prune_fields", f"run_dir={run}", "drop=2", "exact=true",
                        f"hydra.run.dir={out}"], nproc=2)
    with open(out / "prune_report.json") as f:
        report = json.load(f)
    return run, out, report, stdout


def test_pass_writes_importances_config_and_command(pruned):
    run, out, report, stdout = pruned
    fields = [f"f{i:02d}" for i in range(6)]
    assert report["fields"] == fields
    with open(out / "field_importance.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["field"] for r in rows] == sorted(fields, key=lambda x: -report["fperm"][x])
    assert [int(r["rank"]) for r in rows] == list(range(1, 7))
    assert all(r["exact_importance"] for r in rows)
    assert sorted(r["field"] for r in rows if r["dropped"] == "1") == sorted(report["dropped"])
    assert len(report["dropped"]) == 2
    least = sorted(fields, key=lambda x: report["fperm"][x])[:2]
    assert sorted(report["dropped"]) == sorted(least)
    assert os.path.getsize(out / "field_importance.png") > 1000
    with open(out / "importance_timing.json") as f:
        timing = json.load(f)
    assert timing["world_size"] == 2 and timing["num_samples"] == 1024
    assert timing["fperm_s"] > 0 and timing["exact_s"] > 0
    # The rewritten config: no dropped field, no table of a dropped field.
    doc = OmegaConf.load(report["tables_config"])
    assert sorted(doc.tables) == sorted(f"t_{f}" for f in fields if f not in report["dropped"])
    assert report["dropped_tables"] == [f"t_{f}" for f in fields if f in report["dropped"]]
    # The command: warm start from the run, the new tables, every other override inherited.
    cmd = (out / "retrain_command.txt").read_text().strip()
    assert cmd == report["command"] and cmd in stdout
    argv = shlex.split(cmd)
    assert argv[:3] == ["torchrun", "--standalone", "--nproc_per_node=2"]
    assert f"trainer.init_from={run}" in argv and "tables=pruned" in argv
    assert f"hydra.searchpath=[file://{out}]" in argv
    for o in SMALL:
        assert (o in argv) == (not o.startswith("tables.")), o
    assert report["truth"]["noise_fields"] and "fperm_noise_below_informative" in report["truth"]


def _warm_start_state(rank, world_size, overrides, run_dir, out_dir):
    from hydra import compose, initialize_config_dir

    from torchrec_shark.conf_store import register_configs
    from torchrec_shark.training import checkpoint as ckpt
    from torchrec_shark.training.env import init_distributed
    from torchrec_shark.training.trainer import Trainer

    register_configs()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=overrides))
    env = init_distributed("cpu", 1)
    trainer = Trainer(cfg, out_dir, env)
    assert trainer._restore() == 0  # warm start (not a resume): training would start at step 0
    state = {}
    for k, v in trainer.model.state_dict().items():
        if hasattr(v, "local_shards"):  # one rank: the only shard is the whole table
            v = v.local_shards()[0].tensor
        state[k] = v.detach().clone()
    path = ckpt.latest_checkpoint(str(run_dir))
    shapes = ckpt.checkpoint_tensor_shapes(path)
    source = {k: torch.empty(s) for k, s in shapes.items()}
    import torch.distributed.checkpoint as dcp

    dcp.load({"model": source}, checkpoint_id=path, no_dist=True)
    return state, source, list(cfg.tables.init_columns.items())


def test_warm_start_keeps_the_kept_tables_and_interactions(pruned, tmp_path):
    run, out, report, _ = pruned
    argv = shlex.split(report["command"])
    overrides = argv[argv.index("train.py") + 1:]
    (state, source, init_columns), = run_ranks(_warm_start_state, 1, overrides, run, str(tmp_path))
    tables = [k for k in state if ".embedding_bags." in k]
    assert sorted(k.split(".embedding_bags.")[1].split(".")[0] for k in tables) == \
        sorted(f"t_{f}" for f in report["kept"])
    (key, cols), = init_columns
    for k, v in state.items():
        if k == key:  # the over arch's input layer: the source's columns of the remaining interactions
            torch.testing.assert_close(v, source[k][:, cols], rtol=0, atol=0)
        else:  # kept tables and every other dense parameter: identical to the source checkpoint
            torch.testing.assert_close(v, source[k], rtol=0, atol=0, msg=k)


def test_cli_rejects_dropping_every_field_before_loading_the_model(pruned, tmp_path):
    run, _, _, _ = pruned
    proc = _cli(f"run_dir={run}", "drop=6", f"hydra.run.dir={tmp_path / 'out'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "drop=6 but the model has 6 fields; at most 5 can be dropped" in proc.stderr
    assert not (tmp_path / "out" / "field_importance.csv").exists()


def test_pass_on_a_best_checkpoint_reads_it_and_its_fine_tune_starts_from_it(pruned, tmp_path):
    """``run_dir=<run>@best``: the pass loads the best checkpoint (not the latest), and the command it
    writes keeps the run's overrides and warm-starts from that same checkpoint."""
    trained, _, _, _ = pruned
    run, out, fine_tune = tmp_path / "run", tmp_path / "pass", tmp_path / "fine_tune"
    shutil.copytree(trained, run)
    # Step 20 recorded itself as the best when it was saved (the first evaluation always improves):
    # name it the best, as a run whose last evaluation did not improve would have.
    (run / "checkpoints" / "best").write_text("step_00000020")
    _torchrun(["-m", "torchrec_shark.passes.prune_fields", f"run_dir={run}@best", "drop=1",
               "extra=['trainer.max_steps=2']", f"hydra.run.dir={out}"], nproc=1)
    report = json.loads((out / "prune_report.json").read_text())
    assert report["checkpoint"] == str(run / "checkpoints" / "step_00000020")
    argv = shlex.split(report["command"])
    assert f"trainer.init_from={run}@best" in argv
    kept = [o for o in SMALL if not o.startswith("tables.") and o != "trainer.max_steps=40"]
    assert [o for o in argv if o in SMALL] == kept
    _torchrun(["train.py", *argv[argv.index("train.py") + 1:], f"hydra.run.dir={fine_tune}"], nproc=1)
    warm = json.loads((fine_tune / "warm_start.json").read_text())
    assert warm["source_checkpoint"] == str(run / "checkpoints" / "step_00000020")
    assert warm["data_offset_batches"] == 20
