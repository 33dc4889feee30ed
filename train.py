"""Train a sharded DLRM with TorchRec: ``torchrun --nproc_per_node=N train.py [hydra overrides]``.

Examples::

    torchrun --standalone --nproc_per_node=2 train.py planner.sharding_types=[row_wise]
    torchrun --standalone --nproc_per_node=2 train.py data=criteo_tsv data.path=day_0.tsv
    python train.py tables=shark trainer.max_steps=200
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from torchrec_shark.cli import EXIT_USAGE, job, refuse, run_hydra_app
from torchrec_shark.config import ConfigError, TrainConfig, check_known_keys, validate
from torchrec_shark.conf_store import register_configs
from torchrec_shark.data.types import DataError
from torchrec_shark.training.checkpoint import CheckpointError
from torchrec_shark.training.env import distributed_job, shared_run_dir
from torchrec_shark.training.job_log import setup_job_logging
from torchrec_shark.training.run_dir import RunDirError, refuse_unwritable_run_dir, run_dir_lock
from torchrec_shark.training.trainer import Trainer

register_configs()
LOG_NAME = "train.log"
# TorchRec's DMP passes a deprecated DDP argument internally; nothing for a user to act on.
warnings.filterwarnings("ignore", message=".*broadcast_buffers.*is deprecated")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@job
def main(dcfg: DictConfig) -> None:
    try:
        check_known_keys(dcfg, TrainConfig)
        cfg: TrainConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
        validate(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        refuse(str(e))
    with distributed_job(cfg.trainer.device, cfg.trainer.num_threads) as env:
        run_dir = shared_run_dir(HydraConfig.get().runtime.output_dir, LOG_NAME)
        setup_job_logging(run_dir, LOG_NAME, env.rank, env.world_size)
        try:
            with run_dir_lock(run_dir, env):
                Trainer(cfg, run_dir, env).run()
        except (RunDirError, ConfigError, DataError, CheckpointError) as e:
            logging.getLogger("train").warning("refused: %s", e)  # the run's log only: the line below is the console's
            if isinstance(e, ConfigError):
                refuse(str(e))  # the same on every rank: said once
            where = f" (rank {env.rank})" if env.world_size > 1 else ""
            print(f"error{where}: {e}", file=sys.stderr)
            sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    unwritable_dir = refuse_unwritable_run_dir(sys.argv[1:])
    if unwritable_dir:
        print(f"error: run dir {unwritable_dir}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    run_hydra_app(main, TrainConfig, conf_dir=os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf"))
