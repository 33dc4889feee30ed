"""Command-line conventions: overrides checked against the schema with the nearest valid key or preset
named, and one exit code for every refusal before the job starts (2), as documented in the README."""

import os
import subprocess
import sys

import pytest

from torchrec_shark.cli import EXIT_USAGE, check_overrides, nearest
from torchrec_shark.config import ConfigError, TrainConfig, validate
from torchrec_shark.passes.prune_fields import PruneFieldsConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "conf")


@pytest.mark.parametrize("override, message", [
    ("trainer.max_stepz=5", "unknown key 'trainer.max_stepz'.*did you mean 'trainer.max_steps'"),
    ("+trainer.eval_evry=5", "did you mean 'trainer.eval_every'"),
    ("trainer.embedding_dim=8", "did you mean 'tables.embedding_dim'"),  # the right key under another group
    ("tables=nonexistent", r"no preset 'nonexistent' in the 'tables' group \(presets: "
                           + ", ".join(sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "tables")))) + r"\)$"),
    ("tables=sharc", "did you mean tables=shark"),
    ("data=criteo_tvs", "did you mean data=criteo_tsv"),
    ("trainer.max_steps=[", "trainer.max_steps=\\["),  # does not parse
])
def test_bad_overrides_name_the_nearest_valid_one(override, message):
    with pytest.raises(ConfigError, match=message):
        check_overrides([override], TrainConfig, CONF)


def test_valid_overrides_pass():
    check_overrides(["trainer.max_steps=5", "+trainer.seed=1", "tables=shark", "planner.per_table.t_f00=[row_wise]",
                     "'tables.overrides={t_f00:{embedding_dim:16}}'".strip("'"), "tables.init_columns.t_f00=[0,1]",
                     "hydra.run.dir=/tmp/x", "hydra/job_logging=none", "~trainer.init_from"],
                    TrainConfig, CONF)
    check_overrides(["--cfg", "job", "trainer.max_stepz=1"], TrainConfig, CONF)  # Hydra's flags: Hydra checks
    with pytest.raises(ConfigError, match="drop"):
        check_overrides(["dropp=2"], PruneFieldsConfig)


def test_presets_of_a_search_path_count(tmp_path):
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "pruned.yaml").write_text("name: pruned\n")
    check_overrides([f"hydra.searchpath=[file://{tmp_path}]", "tables=pruned"], TrainConfig, CONF)
    with pytest.raises(ConfigError, match="no preset 'pruned'"):
        check_overrides(["tables=pruned"], TrainConfig, CONF)


def test_nearest_stays_quiet_when_nothing_is_close():
    assert nearest("trainer.typo", ["trainer.max_steps", "trainer.seed", "tables.name"]) is None
    assert nearest("trainer.max_stepz", ["trainer.max_steps", "trainer.max_epochs"]) == "trainer.max_steps"


def test_batch_size_must_split_evenly_over_the_ranks():
    cfg = TrainConfig()
    cfg.trainer.batch_size = 255
    validate(cfg, world_size=1)
    with pytest.raises(ConfigError, match="trainer.batch_size=255 must be divisible by the number of ranks \\(2\\)"):
        validate(cfg, world_size=2)


def _train(*args, env=None):
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("args, env, message", [
    # refused before Hydra composes: the nearest key is named
    (["trainer.max_stepz=5"], None, "did you mean 'trainer.max_steps'"),
    # refused by Hydra itself (a value of the wrong type): still a usage error
    (["trainer.max_steps=abc"], None, "Value 'abc' of type 'str' could not be converted to Integer"),
    # refused by the job before any table is built: one line, no traceback
    (["tables=tt", "tables.compression.tensor_train.min_rows=100", "tables.compression.tensor_train.row_factors=[3,3,3]",
      "trainer.max_steps=1"], None, "row_factors=(3, 3, 3) multiply to 27, fewer than num_embeddings=1000000"),
    # what each rank of `torchrun --nproc_per_node=2` sees: refused before the process group starts
    (["trainer.batch_size=255"], {"WORLD_SIZE": "2", "RANK": "0"}, "must be divisible by the number of ranks (2)"),
])
def test_refusals_exit_2_with_one_message(tmp_path, args, env, message):
    code, out = _train(*args, f"hydra.run.dir={tmp_path / 'run'}", env=env)
    assert code == EXIT_USAGE, out[-3000:]
    assert message in out and "Traceback" not in out, out[-3000:]
