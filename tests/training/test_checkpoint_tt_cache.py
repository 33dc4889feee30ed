"""A checkpoint of tensor-train tables with an LFU cache is the model that trained: the cached rows'
latest values (and their optimizer state and the repopulation clock) are saved, so a loaded checkpoint
evaluates as the live model did and trains on exactly as it would have."""

import os

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.dist_utils import run_ranks
from tests.training.small_job import ROOT, SMALL

TT_CACHE = [
    "tables=tt", "tables.compression.tensor_train.min_rows=1000", "tables.compression.tensor_train.ranks=[4]",
    # first-core block 100: 2 row-wise shards of 1000 rows each own whole slices
    "tables.compression.tensor_train.row_factors=[20,10,10]",
    "tables.compression.tensor_train.cache_fraction=0.05", "tables.compression.tensor_train.cache_refresh_every=3",
    "planner.sharding_types=[row_wise]", "trainer.max_steps=100",
]


def _trainer(run_dir, env, *extra):
    from torchrec_shark.training.trainer import Trainer

    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=[*SMALL, *TT_CACHE, *extra]))
    return Trainer(cfg, run_dir, env)


def _steps(trainer, pipeline, batches, n):
    for _ in range(n):
        pipeline.progress(batches)
        trainer.collection.step_end()


def _tt_state(trainer):
    table = trainer.collection.table_shards["t_f00"].table
    return {"weight": table.full_weight().clone(), "cache_ids": table.cache_ids.clone(), "steps": int(table.steps),
            "cached": table._cached_count()}


def _save_load_train_on(rank, world_size, run_dir):
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from torchrec_shark.conf_store import register_configs
    from torchrec_shark.training.env import init_distributed

    register_configs()
    env = init_distributed("cpu", 1)
    live = _trainer(run_dir, env)
    batches = live._train_batches(0)
    pipeline = TrainPipelineSparseDist(live.model, live.optimizer, env.device)
    _steps(live, pipeline, batches, 7)  # repopulated at steps 3 and 6, trained through the cache since
    pipeline.detach()
    live._save(7, 7 * 256)
    before, live_eval = _tt_state(live), live.evaluate()

    loaded = _trainer(run_dir, env, "trainer.resume=true")
    assert loaded._restore() == 7
    after, loaded_eval = _tt_state(loaded), loaded.evaluate()

    # Both train on over the next repopulation (step 9): the same batches, the same result.
    out = []
    for trainer in (live, loaded):
        pipe = TrainPipelineSparseDist(trainer.model, trainer.optimizer, env.device)
        _steps(trainer, pipe, trainer._train_batches(7), 3)
        pipe.detach()
        out.append((_tt_state(trainer), trainer.evaluate()))
    return before, after, live_eval, loaded_eval, out


def test_tt_cache_checkpoint_equals_the_live_model(tmp_path):
    for before, after, live_eval, loaded_eval, (a, b) in run_ranks(_save_load_train_on, 2, str(tmp_path)):
        assert before["cached"] > 0 and before["steps"] == 7
        torch.testing.assert_close(after["weight"], before["weight"], rtol=0, atol=0)
        assert torch.equal(after["cache_ids"], before["cache_ids"]) and after["steps"] == 7
        assert loaded_eval == live_eval
        torch.testing.assert_close(b[0]["weight"], a[0]["weight"], rtol=0, atol=1e-6)
        assert torch.equal(b[0]["cache_ids"], a[0]["cache_ids"])
        assert abs(b[1]["logloss"] - a[1]["logloss"]) < 1e-6 and abs(b[1]["auc"] - a[1]["auc"]) < 1e-6
