"""Train a sharded DLRM with TorchRec: ``torchrun --nproc_per_node=N train.py [hydra overrides]``.

Examples::

    torchrun --standalone --nproc_per_node=2 train.py planner.sharding_types=[row_wise]
    torchrun --standalone --nproc_per_node=2 train.py data=criteo_tsv data.path=day_0.tsv
    python train.py tables=shark trainer.max_steps=200
    python train.py trainer.resume=true hydra.run.dir=outputs/my_run trainer.max_steps=3000   # go on
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from torchrec_shark.cli import EXIT_FAILED, EXIT_USAGE, job, refuse, run_hydra_app
from torchrec_shark.config import ConfigError, TrainConfig, check_known_keys, validate
from torchrec_shark.conf_store import register_configs
from torchrec_shark.data.types import DataError
from torchrec_shark.training.checkpoint import CheckpointError
from torchrec_shark.training.env import distributed_job, shared_run_dir
from torchrec_shark.training.job_log import setup_job_logging
from torchrec_shark.training.preemption import EXIT_CODE as PREEMPTED_EXIT_CODE
from torchrec_shark.training.run_dir import RunDirError, refuse_unwritable_run_dir, run_dir_lock
from torchrec_shark.training.run_record import (
    record_files,
    recorded_config,
    recorded_overrides,
    resume_config,
    resumed_overrides,
    write_files,
)
from torchrec_shark.training.trainer import NothingToDo, Preempted, Trainer, TrainingDiverged

register_configs()
LOG_NAME = "train.log"
# TorchRec's DMP passes a deprecated DDP argument internally; nothing for a user to act on.
warnings.filterwarnings("ignore", message=".*broadcast_buffers.*is deprecated")
# The run's log only (training.job_log): what the console gets is printed.
logger = logging.getLogger("train")


def _stop(message: str, code: int) -> None:
    """Print ``message`` to stderr, keep it in the run's log, exit with ``code``."""
    logger.error(message)
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@job
def main(dcfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    own_dir = hydra_cfg.runtime.output_dir
    overrides = [str(o) for o in hydra_cfg.overrides.task]
    record_hydra, run_overrides = HydraConfig.instance().cfg, overrides
    try:
        check_known_keys(dcfg, TrainConfig)
        recorded = recorded_config(own_dir) if dcfg.trainer.resume else None
        if recorded is not None:  # a resume continues the run's own settings
            dcfg = resume_config(dcfg, recorded, overrides)
            record_hydra, run_overrides = None, resumed_overrides(recorded_overrides(own_dir), overrides)
        cfg: TrainConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
        validate(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        refuse(str(e))
    with distributed_job(cfg.trainer.device, cfg.trainer.num_threads) as env:
        run_dir = shared_run_dir(own_dir, LOG_NAME)
        setup_job_logging(run_dir, LOG_NAME, env.rank, env.world_size)
        metrics = os.path.join(run_dir, "metrics.json")
        if env.is_main:
            print(f"run dir: {run_dir} (metrics: {metrics})", flush=True)
        where = f" (rank {env.rank})" if env.world_size > 1 else ""
        try:
            with run_dir_lock(run_dir, env) as lock:
                trainer = Trainer(cfg, run_dir, env)
                if lock is not None:  # the record of how the run was started, once the job is accepted
                    files = record_files(dcfg, record_hydra, run_overrides)
                    trainer.on_accepted += [lock.claim, lambda: write_files(run_dir, files)]
                trainer.run()
        except NothingToDo as e:
            if env.is_main:
                logger.info(str(e))
                print(f"{e}\nrun dir: {run_dir} (metrics: {metrics})", flush=True)
            return
        except Preempted as e:
            if env.is_main:
                logger.warning(str(e))
                print(str(e), flush=True)
            sys.exit(PREEMPTED_EXIT_CODE)
        except TrainingDiverged as e:
            _stop(f"error{where}: {e}", EXIT_FAILED)
        except (RunDirError, ConfigError, DataError, CheckpointError) as e:
            logger.warning("refused: %s", e)
            if isinstance(e, ConfigError):
                refuse(str(e))  # the same on every rank: said once
            print(f"error{where}: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USAGE)
        if env.is_main:
            print(f"run dir: {run_dir} (metrics: {metrics})", flush=True)


if __name__ == "__main__":
    unwritable_dir = refuse_unwritable_run_dir(sys.argv[1:])
    if unwritable_dir:
        print(f"error: run dir {unwritable_dir}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    run_hydra_app(main, TrainConfig, conf_dir=os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf"))
