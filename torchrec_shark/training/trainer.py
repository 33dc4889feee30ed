"""The training job behind ``train.py``: data, DLRM, planning and sharding, the loop, metrics, checkpoints.

A job that will be refused (a fresh run into a run dir with checkpoints, a resume whose checkpoints
all fail to read or were trained with other tables, a resume with nothing left to do) is refused
before the model is built, and a job writes nothing into its run dir (plan, data truth, the
caller's record) until it is accepted: its checkpoint, if any, has loaded (:meth:`Trainer.run`).

Example::

    env = init_distributed()
    metrics = Trainer(cfg, run_dir="outputs/run", env=env).run()
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torchrec.datasets.utils import Batch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.keyed import CombinedOptimizer
from tqdm import tqdm

from torchrec_shark.config import ConfigError, TrainConfig, validate
from torchrec_shark import data as data_sources
from torchrec_shark.data.types import DataError
from torchrec_shark.data.statistics import has_statistics, prepare_statistics
from torchrec_shark.distributed.model_parallel import compressed_sharders, plan_model, shard_model
from torchrec_shark.distributed.planner import describe_plan
from torchrec_shark.models.dlrm import DLRM, DLRMTrain
from torchrec_shark.modules.table_kind import without_initial_values
from torchrec_shark.training import checkpoint as ckpt
from torchrec_shark.training.env import DistEnv
from torchrec_shark.training.health import HealthMonitor, dense_parameters
from torchrec_shark.training.metrics import EvalMetrics
from torchrec_shark.training.optimizers import (
    apply_embedding_optimizer,
    dense_optimizer,
    sparse_optimizer_spec,
)
from torchrec_shark.training.preemption import StopRequest
from torchrec_shark.training.run_ref import resolve_run
from torchrec_shark.training.preflight import (
    check_splits,
    check_table_memory,
    memory_budget_bytes,
    resume_data_offset,
)
from torchrec_shark.modules.kinds import kind_of
from torchrec_shark.training.run_record import config_differences, describe_differences, resumable
from torchrec_shark.training.storage import compressed_plan_table, embedding_storage, format_plan_table
from torchrec_shark.training.table_factory import build_collection, build_table_configs, is_compressed
from torchrec_shark.training.tier_activity import collect_tier_activity
from torchrec_shark.training.transient_group import transient_group

logger = logging.getLogger(__name__)


class NothingToDo(Exception):
    """A resume whose checkpoint already reaches the run's end: nothing to train."""


class Preempted(Exception):
    """The job stopped on a signal after writing a checkpoint (its message says where and how to go on)."""


class TrainingDiverged(RuntimeError):
    """The loss or the state to save stopped being finite; the message names the checkpoint to go on from."""


class Trainer:
    """Builds everything from a validated :class:`TrainConfig` and trains it.

    Stock tables are planned by TorchRec's ``EmbeddingShardingPlanner`` and trained through
    ``DistributedModelParallel`` + ``TrainPipelineSparseDist``; a collection with compressed
    tables goes the same way, planned from its real compressed bytes and sharded by
    ``CompressedEmbeddingBagCollectionSharder`` (``DLRMTrain`` records each batch's labels with it
    before the lookup; its fused optimizer's ``step()`` closes the tables' step).
    """

    def __init__(self, cfg: TrainConfig, run_dir: str, env: DistEnv, statistics_from: Optional[str] = None) -> None:
        """``statistics_from``: the run whose data statistics to use (a pass loading that run); by default
        this run's own on resume, else ``trainer.init_from``'s, else computed from the training split."""
        self.cfg = cfg
        self.run_dir = run_dir
        self.env = env
        t = cfg.trainer
        validate(cfg, env.world_size)
        self.local_batch = t.batch_size // env.world_size
        self.data_offset = 0  # global training batches read before this run's step 0 (see _restore)
        # Files for the run dir (name -> dict for JSON, or text) and callbacks of the main rank, both held
        # back until the job is accepted (see run): a refused or failed job leaves the run dir as it was.
        self.pending_files: Dict[str, object] = {}
        self.on_accepted: List[Callable[[], None]] = []
        torch.manual_seed(t.seed)
        np.random.seed(t.seed)
        # What a resume starts from, checked before anything is read or built.
        self._resume_checkpoint, self._resume_meta = self._check_checkpoints()

        # The warm-start source, resolved once: its statistics and its checkpoint come from the same run.
        self.init_source = resolve_run(t.init_from) if t.init_from else None
        self.dataset = data_sources.build_dataset(cfg.data)
        self.last_step, self.train_rows = self._last_step()
        if self._resume_meta is not None:
            self._check_work_left(self._resume_checkpoint, self._resume_meta)
        if statistics_from is None:
            if t.resume and has_statistics(run_dir):
                statistics_from = run_dir
            elif self.init_source is not None:
                statistics_from = self.init_source.run_dir
        prepare_statistics(self.dataset, run_dir, statistics_from, env.is_main,
                           _from_main if env.world_size > 1 else None, self._log)
        check_splits(self.dataset, t.batch_size, env.rank, env.world_size,
                     f"data.path={cfg.data.path}" if cfg.data.path else f"data.source={cfg.data.source}")
        try:
            self.table_configs = build_table_configs(
                cfg.tables, self.dataset.feature_names, self.dataset.num_embeddings_per_feature
            )
            if self._resume_meta is not None:
                self._check_checkpoint_tables(self._resume_checkpoint, self._resume_meta)
            check_table_memory(self.table_configs, sparse_optimizer_spec(t.embedding_optimizer, t.embedding_lr),
                               memory_budget_bytes(env.device.type, env.world_size, cfg.planner.hbm_cap_gb,
                                                   cfg.planner.ddr_cap_gb))
        except (ConfigError, data_sources.DataError, ckpt.CheckpointError):
            raise
        except ValueError as e:  # a table spec that cannot be built (e.g. a tensor-train shape): the config's fault
            raise ConfigError(str(e)) from e
        self.feature_names = [f for c in self.table_configs for f in c.feature_names]
        self.compressed = is_compressed(self.table_configs)
        self.sharded = True  # compressed collections shard too (their own sharder)
        truth = self.dataset.truth()
        if truth is not None:
            self.pending_files["data_truth.json"] = truth
        self._build_model()

    # ---------------------------------------------------------------- start checks
    def _check_checkpoints(self) -> Tuple[Optional[str], Optional[Dict]]:
        """``(checkpoint, meta)`` a resume starts from (``(None, None)``: none, start from scratch).

        Refuses a fresh run into a run dir with checkpoints (rotation would delete them, or they its own)
        and a resume whose every checkpoint has a damaged ``meta.json`` (a damaged checkpoint is never
        taken for no checkpoint: starting afresh would rotate the trained model away)."""
        dirs = ckpt.checkpoint_dirs(self.run_dir)
        if not self.cfg.trainer.resume:
            if dirs:
                raise ckpt.CheckpointError(
                    f"run dir {self.run_dir!r} already holds checkpoints "
                    f"({', '.join(os.path.basename(p) for p in dirs)}): pass trainer.resume=true to continue that run, "
                    "or choose another run dir")
            return None, None
        if not dirs:
            return None, None
        path, meta, problems = ckpt.newest_readable_meta(self.run_dir)
        if path is None:
            raise ckpt.CheckpointError(
                f"run dir {self.run_dir!r}: no readable checkpoint, nothing was changed: " + " | ".join(problems)
                + ". Repair or restore a meta.json to resume; a new run needs another hydra.run.dir")
        return path, meta

    def _check_work_left(self, checkpoint: str, meta: Dict) -> None:
        """Raise :class:`NothingToDo` when the checkpoint already reaches the run's end."""
        step, t = int(meta["step"]), self.cfg.trainer
        if meta.get("stopped_early"):
            raise NothingToDo(f"nothing to do: the run stopped early at step {step} ({checkpoint}); "
                              "its metrics.json and checkpoints are left as they are")
        if step >= self.last_step:
            limit = f"trainer.max_steps={t.max_steps}"
            if self.last_step < t.max_steps:
                limit = f"trainer.max_epochs={t.max_epochs} ({self.last_step} steps)"
            raise NothingToDo(f"nothing to do: the run's checkpoint {checkpoint} is at step {step} and {limit} ends "
                              "it there; raise trainer.max_steps (or trainer.max_epochs) to train on. The run dir is "
                              "left as it is")

    def _check_checkpoint_tables(self, checkpoint: str, meta: Dict) -> None:
        """Refuse a resume whose checkpoint was trained with other tables (kind, rows, width) or other
        settings, naming each differing key."""
        saved = meta.get("config")
        if not saved:
            return
        own = OmegaConf.structured(self.cfg)
        diffs = [d for d in config_differences(own, OmegaConf.merge(OmegaConf.structured(TrainConfig), saved))
                 if not resumable(d[0]) and d[0] != "trainer.init_from"]
        tables = _table_summary(self.table_configs)
        saved_tables = meta.get("tables") or {}
        table_diffs = [f"{n}: {saved_tables.get(n, 'absent')} in the checkpoint, {tables.get(n, 'absent')} here"
                       for n in sorted(set(tables) | set(saved_tables)) if saved_tables and
                       saved_tables.get(n) != tables.get(n)]
        if diffs or table_diffs:
            raise ckpt.CheckpointError(
                f"checkpoint {checkpoint} was trained with other settings than this resume's"
                + (f" (tables {'; '.join(table_diffs)})" if table_diffs else "") + ": "
                + (describe_differences(diffs, "this run has", "the checkpoint has") if diffs else "")
                + ". Resume with the checkpoint's settings, or start a new run dir (trainer.init_from warm-starts "
                "the tables that fit)")

    # ---------------------------------------------------------------- set-up
    def _build_model(self) -> None:
        cfg, env = self.cfg, self.env
        t = cfg.trainer
        # No table is allocated before sharding: each rank builds only the shards it owns.
        ebc_device = torch.device("meta")
        ebc = build_collection(
            self.table_configs, ebc_device, optimizer=sparse_optimizer_spec(t.embedding_optimizer, t.embedding_lr)
        )
        dlrm = DLRM(
            ebc,
            dense_in_features=self.dataset.num_dense,
            dense_arch_layer_sizes=list(cfg.model.dense_arch_layer_sizes) + [cfg.model.interaction_dim],
            over_arch_layer_sizes=list(cfg.model.over_arch_layer_sizes),
            projection=cfg.model.projection,
            dense_device=env.device,
        )
        train_model = DLRMTrain(dlrm)
        self.plan = None
        if self.sharded:
            sharders = compressed_sharders() if self.compressed else None
            if not self.compressed:
                apply_embedding_optimizer(ebc, t.embedding_optimizer, t.embedding_lr)
            self.plan = plan_model(
                train_model,
                env.world_size,
                env.device.type,
                self.local_batch,
                [c.name for c in self.table_configs],
                cfg.planner.sharding_types,
                dict(cfg.planner.per_table),
                cfg.planner.hbm_cap_gb,
                cfg.planner.ddr_cap_gb,
                sharders=sharders,
                compressed_configs=self.table_configs if self.compressed else None,
            )
            # A resume loads over every row: its shards skip drawing initial values.
            resuming = self._resume_checkpoint is not None
            with without_initial_values() if resuming else contextlib.nullcontext():
                self.model = shard_model(train_model, self.plan, env.device, sharders=sharders)
            fused = self.model.fused_optimizer
            self.plan_table = describe_plan(self.plan)
            if self.compressed:  # kind, sharding, ranks and real bytes per table (a collective)
                self.plan_table = compressed_plan_table(self.plan_table, self.table_configs, self.collection)
            if env.is_main:
                text = str(self.plan)
                if self.compressed:
                    text += "\n" + format_plan_table(self.plan_table)
                self._log(f"Sharding plan ({env.world_size} rank(s), {env.backend}):\n{text}")
                self.pending_files["plan.txt"] = text + "\n"
                self.pending_files["plan.json"] = self.plan_table
        else:
            self.model = train_model
            fused = ebc.fused_optimizer
            self.plan_table = {c.name: {"sharding_type": "unsharded", "compute_kernel": "compressed", "ranks": [0]}
                               for c in self.table_configs}
        self.optimizer = CombinedOptimizer([fused, dense_optimizer(self.model, t.dense_optimizer, t.dense_lr)])

    def _write_json(self, name: str, obj) -> None:
        with open(os.path.join(self.run_dir, name), "w") as f:
            json.dump(obj, f, indent=2, default=str)

    def _accept(self) -> None:
        """The job is accepted (its checkpoint, if any, has loaded): the main rank writes what was held back."""
        if not self.env.is_main:
            return
        for name, obj in self.pending_files.items():
            if isinstance(obj, str):
                with open(os.path.join(self.run_dir, name), "w") as f:
                    f.write(obj)
            else:
                self._write_json(name, obj)
        for hook in self.on_accepted:
            hook()

    def _stateful(self) -> Dict[str, object]:
        return {"model": self.model, "optim": self.optimizer}

    @property
    def collection(self):
        return self._unwrapped().model.embedding_bag_collection

    def _unwrapped(self) -> DLRMTrain:
        m = self.model
        return getattr(m, "module", m)

    # ---------------------------------------------------------------- state
    def _restore(self) -> int:
        """Resume from this run's latest checkpoint, or warm-start from another run. Returns the step."""
        t = self.cfg.trainer
        if t.resume:
            if self._resume_checkpoint is not None:
                path, meta = ckpt.load_newest_readable(self.run_dir, self._stateful())
                self._resumed_meta = meta
                self.data_offset = resume_data_offset(meta, t.batch_size)
                self._log(f"resumed from {path} at step {meta['step']}")
                return int(meta["step"])
            self._log("trainer.resume=true but the run dir has no checkpoint: starting from scratch")
        if self.init_source is not None:
            source = self.init_source.checkpoint
            columns = {k: list(v) for k, v in self.cfg.tables.init_columns.items()}
            report = ckpt.warm_start(source, self.model, columns)
            if columns:  # narrowed tables: their fields' projections start as the source's, masked
                features = {c.name: list(c.feature_names) for c in self.table_configs}
                report["projections"] = ckpt.warm_start_projections(source, self.model, columns, features)
                report["skipped"] = [k for k in report["skipped"] if k not in set(report["projections"])]
            report["optimizer_state"] = ckpt.warm_start_optimizer(
                source, self.optimizer, report["loaded"] + report["narrowed"], report["narrowed_columns"])
            self._log(f"warm start from {source}: {len(report['loaded'])} tensors loaded, "
                      f"{len(report.get('narrowed', []))} narrowed to init_columns, "
                      f"{len(report.get('projections', []))} projections from the source, "
                      f"{len(report['skipped'])} not in the source (fresh init), "
                      f"{len(report['optimizer_state'])} optimizer state tensors continued")
            if report.get("fresh_tables"):
                self._log(f"tables initialised afresh (absent from the source or of another shape, e.g. "
                          f"tensor-train cores at a new width): {report['fresh_tables']}")
            # Continue the source's data stream: re-reading the samples it has already fitted pushes
            # the rows of rare ids further toward those samples' labels (a second epoch overfits).
            meta = ckpt.read_meta(source)
            source_batch = int(meta.get("config", {}).get("trainer", {}).get("batch_size", t.batch_size))
            self.data_offset = int(meta.get("data_position", meta.get("step", 0))) * source_batch // t.batch_size
            report["data_offset_batches"] = self.data_offset
            report["source_checkpoint"] = os.path.abspath(source)
            if self.env.is_main:
                self._write_json("warm_start.json", report)
        return 0

    def _save(self, step: int, samples: int, best: Optional[Dict] = None, evals_since_best: int = 0,
              record: Optional[Dict] = None, health: Optional[HealthMonitor] = None,
              stopped_early: bool = False) -> Optional[str]:
        """Write a checkpoint of this step, or none when ``health`` finds the state unfit to resume
        (then ``latest`` stays at the last healthy one). Returns the checkpoint written, or ``None``."""
        meta = {"step": step, "samples": samples, "data_position": self.data_offset + step,
                "config": OmegaConf.to_container(OmegaConf.structured(self.cfg), resolve=True),
                "tables": _table_summary(self.table_configs)}
        if best is not None:  # resume continues best tracking and early stopping's count
            meta["best"], meta["evals_since_best"] = best, evals_since_best
        if record is not None:  # what metrics.json reports of the steps so far (a resume continues it)
            meta["record"] = record
        if stopped_early:
            meta["stopped_early"] = True
        problem = health.problem() if health is not None else None
        try:
            path = ckpt.save_checkpoint(self.run_dir, step, self._stateful(), meta,
                                        best=best is not None and best["step"] == step, unhealthy=problem)
        except ckpt.NonFiniteStateError as e:
            raise TrainingDiverged(f"{e}. {self._learning_rate_hint()}") from None
        if path is None:
            why = problem or "on another rank"
            self._log(f"warning: step {step} not kept as a checkpoint, the run looks unstable ({why}); "
                      f"the latest checkpoint stays {ckpt.latest_checkpoint(self.run_dir) or 'none'}")
        elif health is not None:
            health.kept()
        return path

    def _learning_rate_hint(self) -> str:
        t = self.cfg.trainer
        last = ckpt.latest_checkpoint(self.run_dir)
        where = (f"The last checkpoint kept is {last}: go on from it in a new run dir with a lower learning rate, "
                 f"e.g. trainer.init_from={self.run_dir} trainer.dense_lr={t.dense_lr / 10:g} "
                 f"trainer.embedding_lr={t.embedding_lr / 10:g}" if last else
                 "No checkpoint was kept: start again with a lower learning rate")
        return (f"A loss that grows until it is not finite usually means a learning rate too high "
                f"(trainer.dense_lr={t.dense_lr:g} with {t.dense_optimizer}, trainer.embedding_lr={t.embedding_lr:g} "
                f"with {t.embedding_optimizer}). {where}")

    def before_step(self, step: int) -> None:
        """Called before each training step, outside the step timer (``speed_history`` does not count
        it); does nothing here. Subclasses may wait here: the steady-state benchmark makes two runs
        take turns step by step, so that whatever else slows the machine slows both alike."""

    def _log(self, msg: str) -> None:
        """A line for the console (rank 0) and the run's log (see ``job_log``)."""
        if self.env.is_main:
            logger.info(msg)

    # ---------------------------------------------------------------- loop
    def _train_batches(self, start: int) -> Iterator[Batch]:
        """Training batches from data position ``start``; a data error names the step and rank it came at."""
        batches = self.dataset.batches("train", self.cfg.trainer.batch_size, self.env.rank, self.env.world_size, start)
        position = start
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except DataError as e:
                raise DataError(f"{e} (rank {self.env.rank}, training step {position - self.data_offset + 1}, "
                                f"global batch {position} of the data stream)") from None
            position += 1
            yield batch

    def evaluate(self) -> Dict[str, float]:
        """AUC and log loss over ``trainer.eval_batches`` validation batches, reduced over ranks."""
        # The metric gather runs on a short-lived group: see transient_group for why.
        with transient_group() as group:
            metrics = EvalMetrics(self.env.device, process_group=group)
            self.model.eval()
            batches = self.dataset.batches("val", self.cfg.trainer.batch_size, self.env.rank, self.env.world_size)
            with torch.no_grad():
                for i, batch in enumerate(batches):
                    if i >= self.cfg.trainer.eval_batches:
                        break
                    _, (_, logits, labels) = self.model(batch.to(self.env.device))
                    metrics.update(logits, labels)
            self.model.train()
            out = metrics.compute()
            del metrics
        return out

    def _last_step(self) -> Tuple[int, Optional[int]]:
        """The step the run stops at (``max_steps`` or the end of ``max_epochs``) and the training rows per epoch."""
        t = self.cfg.trainer
        rows = self.dataset.epoch_rows("train", count=t.max_epochs is not None)
        last = t.max_steps
        if t.max_epochs is not None and rows:
            last = min(last, max(1, math.ceil(t.max_epochs * rows / t.batch_size)))
        return last, rows

    def _improves(self, m: Dict[str, float], best: Optional[Dict]) -> bool:
        if best is None:
            return True
        if self.cfg.trainer.best_metric == "logloss":
            return m["logloss"] < best["val_logloss"]
        return m["auc"] > best["val_auc"]

    def run(self) -> Dict:
        """Train from the checkpoint (or step 0) to the run's end; returns ``metrics.json``'s content.

        Raises :class:`Preempted` after writing a checkpoint when SIGTERM reaches any rank, and
        :class:`TrainingDiverged` when the loss or the state to save is not finite."""
        t = self.cfg.trainer
        self._resumed_meta: Dict = {}
        step = self._restore()
        self._accept()
        start_step = step
        last_step, train_rows = self.last_step, self.train_rows
        epoch_of = (lambda s: s * t.batch_size / train_rows) if train_rows else (lambda s: None)
        it = self._train_batches(self.data_offset + step)
        pipeline = TrainPipelineSparseDist(self.model, self.optimizer, self.env.device) if self.sharded else None
        bar = tqdm(total=last_step, initial=step, disable=not (self.env.is_main and t.progress),
                   desc="train", dynamic_ncols=True, mininterval=1.0)
        # What metrics.json reports covers the whole run: a resume continues the checkpoint's record.
        record = self._resumed_meta.get("record") or {}
        history: List[Dict] = list(record.get("history", []))
        tier_history: List[Dict] = list(record.get("tier_history", []))
        speed_history: List[Dict] = list(record.get("speed_history", []))
        train_time = float(record.get("train_time_s", 0.0))
        timed_samples = int(record.get("timed_samples", 0))
        loss_ema: Optional[float] = record.get("loss_ema")
        best: Optional[Dict] = self._resumed_meta.get("best")
        evals_since_best = int(self._resumed_meta.get("evals_since_best", 0))
        stop_reason = "max_steps"
        interval_time, interval_steps = 0.0, 0
        job_time, job_samples = train_time, timed_samples  # what the run had timed before this job
        health = HealthMonitor(lambda: dense_parameters(self.model))

        def current_record() -> Dict:
            return {"history": history, "speed_history": speed_history, "tier_history": tier_history,
                    "train_time_s": train_time, "timed_samples": timed_samples, "loss_ema": loss_ema}

        if step == last_step == 0:
            # trainer.max_steps=0 (validated: a warm start only): the loaded state is the model, kept as step 0
            # under this run's world size and sharding, so exports and scores of a resharded model need no step.
            m = self.evaluate()
            best = {"step": 0, "epoch": epoch_of(0), "val_auc": m["auc"], "val_logloss": m["logloss"]}
            history.append({**best, "train_loss": None})
            self._log(f"step 0 (warm start, no training step): val_auc={m['auc']:.4f} val_logloss={m['logloss']:.4f}")
            self._save(0, 0, best if t.keep_best else None, 0, current_record(), health)

        self.model.train()
        with StopRequest() as stop_request:
            while step < last_step:
                self.before_step(step)
                t0 = time.perf_counter()
                if pipeline is not None:
                    loss, _, _ = pipeline.progress(it)
                    if self.compressed:
                        self.collection.step_end()
                else:
                    loss = self._unsharded_step(next(it))
                step += 1
                dt = time.perf_counter() - t0
                train_time += dt
                timed_samples += t.batch_size
                interval_time += dt
                interval_steps += 1
                lv = float(loss)
                if not np.isfinite(lv):
                    raise TrainingDiverged(f"training loss is {lv} at step {step}. {self._learning_rate_hint()}")
                health.record_loss(lv)
                loss_ema = lv if loss_ema is None else 0.95 * loss_ema + 0.05 * lv
                epoch = epoch_of(step)
                if step % t.log_every == 0 or step == last_step:
                    # This interval's rate, not the run's average: a slowdown mid-run shows at once.
                    recent = interval_steps * t.batch_size / max(interval_time, 1e-9)
                    speed_history.append({"step": step, "samples_per_s": recent, "epoch": epoch})
                    interval_time, interval_steps = 0.0, 0
                    postfix = {"loss": f"{loss_ema:.4f}", "samples_per_s": f"{recent:,.0f}"}
                    if epoch is not None:
                        postfix["epoch"] = f"{epoch:.2f}"
                    bar.set_postfix(postfix)
                    if self.compressed:  # a collective: every rank at the same steps
                        activity = collect_tier_activity(self.collection, self.env.device)
                        if activity is not None:
                            tier_history.append({"step": step, **activity})
                bar.update(1)
                final, improved, stop = step == last_step, False, False
                if step % t.eval_every == 0 or final:
                    if pipeline is not None:
                        pipeline.detach()  # the pipeline rewrote forward; call the model directly
                    m = self.evaluate()
                    history.append({"step": step, "epoch": epoch, "val_auc": m["auc"], "val_logloss": m["logloss"],
                                    "train_loss": loss_ema})
                    self._log(f"step {step}: val_auc={m['auc']:.4f} val_logloss={m['logloss']:.4f} "
                              f"train_loss={loss_ema:.4f}")
                    if self._improves(m, best):
                        best = {"step": step, "epoch": epoch, "val_auc": m["auc"], "val_logloss": m["logloss"]}
                        improved, evals_since_best = True, 0
                    else:
                        evals_since_best += 1
                        if t.early_stopping_patience and evals_since_best >= t.early_stopping_patience:
                            stop, stop_reason = True, "early_stopping"
                            self._log(f"early stopping at step {step}: val_{t.best_metric} has not improved for "
                                      f"{evals_since_best} evaluations (best at step {best['step']})")
                saved = None
                if step % t.checkpoint_every == 0 or final or stop or (improved and t.keep_best):
                    saved = self._save(step, step * t.batch_size, best if t.keep_best else None, evals_since_best,
                                       current_record(), health, stopped_early=stop)
                if stop:
                    break
                if not final and stop_request.agreed(self.env.device if self.env.backend == "nccl" else None):
                    if saved is None:
                        saved = self._save(step, step * t.batch_size, best if t.keep_best else None,
                                           evals_since_best, current_record(), health)
                    bar.close()
                    kept = saved or ckpt.latest_checkpoint(self.run_dir)
                    raise Preempted(
                        f"stopped by {stop_request.name} after step {step}: "
                        + (f"checkpoint {kept} written" if saved else f"the latest checkpoint is {kept or 'none'}")
                        + f"; continue with trainer.resume=true hydra.run.dir={self.run_dir}")
        bar.close()
        if stop_reason != "early_stopping" and step == last_step and last_step < t.max_steps:
            stop_reason = "max_epochs"
        sps = timed_samples / train_time if train_time > 0 else 0.0
        job_time, job_samples = train_time - job_time, timed_samples - job_samples
        extra = {"speed_history": speed_history, "stop_reason": stop_reason, "epochs": epoch_of(step),
                 "train_rows_per_epoch": train_rows, "best": None, "resumed_at_step": start_step or None,
                 # this job's own steps (a resumed run's train_samples_per_s covers the whole run)
                 "job_samples_per_s": job_samples / job_time if job_time > 0 else 0.0}
        if best is not None and t.keep_best:
            path = ckpt.best_checkpoint(self.run_dir)
            extra["best"] = {**best, "checkpoint": os.path.relpath(path, self.run_dir) if path else None}
        return self._finish(step, sps, history, tier_history, extra)

    def _unsharded_step(self, batch: Batch) -> torch.Tensor:
        loss, _ = self.model(batch.to(self.env.device))
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        step_end = getattr(self.collection, "step_end", None)
        if step_end is not None:
            step_end()
        return loss.detach()

    def _peak_memory(self) -> Dict[str, List[int]]:
        """Peak RSS of every rank (and peak CUDA memory on CUDA), gathered over ranks."""
        own = {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux reports KiB
        if self.env.device.type == "cuda":
            own["cuda"] = int(torch.cuda.max_memory_allocated(self.env.device))
        every = [own]
        if dist.is_initialized() and self.env.world_size > 1:
            every = [None] * self.env.world_size
            with transient_group() as group:
                dist.all_gather_object(every, own, group=group)
        out = {"peak_rss_bytes_per_rank": [int(e["rss"]) for e in every]}
        if "cuda" in own:
            out["peak_cuda_bytes_per_rank"] = [int(e["cuda"]) for e in every]
        return out

    def _finish(self, step: int, samples_per_s: float, history: List[Dict], tier_history: List[Dict],
                extra: Optional[Dict] = None) -> Dict:
        storage = embedding_storage(self.collection, self.table_configs, self.sharded, self.model)
        tables = {}
        for c in self.table_configs:
            info = dict(self.plan_table.get(c.name, {}))
            info.update(kind=kind_of(c).name,
                        num_embeddings=c.num_embeddings, embedding_dim=c.embedding_dim,
                        features=list(c.feature_names), bytes=storage["per_table"].get(c.name))
            tables[c.name] = info
        last = history[-1]
        metrics = {
            "val_auc": last["val_auc"],
            "val_logloss": last["val_logloss"],
            "train_samples_per_s": samples_per_s,
            "steps": step,
            "world_size": self.env.world_size,
            "embedding_bytes": storage["total"],
            "embedding_bytes_fp32": storage["fp32_total"],
            # what the tables' tensors really occupy (storages counted once), to set against embedding_bytes
            "embedding_bytes_allocated": storage["allocated_total"],
            **self._peak_memory(),
            "num_fields": len(self.feature_names),
            "fields": self.feature_names,
            "tables": tables,
            "history": history,
            # mixed-precision tables: rows per tier, lookups served per tier and rows moved per interval
            "tier_history": tier_history,
            # speed_history (samples/s per logging interval), epochs, stop_reason, best (see run)
            **(extra or {}),
            **self.dataset.stats(),
        }
        if self.env.is_main:
            self._write_json("metrics.json", metrics)
            self._log(f"done: steps={step} val_auc={metrics['val_auc']:.4f} val_logloss={metrics['val_logloss']:.4f} "
                      f"samples/s={samples_per_s:,.0f} embedding_bytes={storage['total']:,} "
                      f"(fp32 {storage['fp32_total']:,})")
        return metrics


def _table_summary(configs) -> Dict[str, str]:
    """``{table: "<kind> <rows> x <width>"}``: what a checkpoint's tables must match to load."""
    return {c.name: f"{kind_of(c).name} {c.num_embeddings} x {c.embedding_dim}" for c in configs}


def _from_main(obj):
    """Rank 0's ``obj`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
