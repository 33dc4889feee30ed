"""A finished run as later jobs read it: ``<run_dir>`` (latest checkpoint) or ``<run_dir>@best``.

A pass or a warm start reads several files of the source run: the recorded config and overrides
(``.hydra/``), ``metrics.json``, ``data_truth.json``, ``data_stats.json`` and one checkpoint.
:func:`resolve_run` turns the reference into all of them at once, so every reader sees the same
run dir and the same checkpoint, and ``@best`` never reaches a path join.

Example::

    ref = resolve_run("outputs/base@best")
    ref.run_dir          # "outputs/base"
    ref.checkpoint       # "outputs/base/checkpoints/step_00000020" (the best, not the latest)
    ref.metrics()        # metrics.json with val_auc / val_logloss / steps of that checkpoint
    ref.spec             # "/abs/outputs/base@best", for a command that reads the same run again
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

from torchrec_shark.training import checkpoint as ckpt

CONFIG = os.path.join(".hydra", "config.yaml")
OVERRIDES = os.path.join(".hydra", "overrides.yaml")
METRICS = "metrics.json"
DATA_TRUTH = "data_truth.json"


@dataclass(frozen=True)
class RunRef:
    """One source run: its dir, whether the reference named its best checkpoint, and that checkpoint."""

    run_dir: str
    best: bool
    checkpoint: Optional[str]  # None only when resolved without it (``resolve_run(..., checkpoint=False)``)

    @property
    def spec(self) -> str:
        """The reference with an absolute dir (``/abs/run`` or ``/abs/run@best``)."""
        return os.path.abspath(self.run_dir) + (ckpt.BEST_SUFFIX if self.best else "")

    def path(self, name: str) -> str:
        """A file of the run dir (``data_stats.json``, ``plan.json``, ...)."""
        return os.path.join(self.run_dir, name)

    def config(self):
        """The resolved :class:`~torchrec_shark.config.TrainConfig` the run was trained with."""
        from omegaconf import OmegaConf

        from torchrec_shark.config import TrainConfig

        path = self.path(CONFIG)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{self.run_dir!r} is not a train.py run dir: {path} is missing")
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path))
        return OmegaConf.to_object(merged)

    def overrides(self) -> List[str]:
        """The command-line overrides the run was started with."""
        from omegaconf import OmegaConf

        path = self.path(OVERRIDES)
        return list(OmegaConf.load(path)) if os.path.isfile(path) else []

    def metrics(self) -> Optional[Dict]:
        """``metrics.json`` (``None`` when the run did not finish); for ``@best`` its top-level
        ``val_auc``, ``val_logloss`` and ``steps`` are those of the best checkpoint."""
        path = self.path(METRICS)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            metrics = json.load(f)
        if self.best:
            best = self._best_evaluation(metrics)
            metrics.update(val_auc=best["val_auc"], val_logloss=best["val_logloss"], steps=best["step"])
        return metrics

    def data_truth(self) -> Optional[Dict]:
        """The planted truth of a synthetic-data run (``data_truth.json``), or ``None``."""
        path = self.path(DATA_TRUTH)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def _best_evaluation(self, metrics: Dict) -> Dict:
        """The evaluation the best checkpoint was saved at: from its own meta, else metrics.json's ``best``."""
        meta = ckpt.read_meta(self.checkpoint) if self.checkpoint else {}
        best = meta.get("best") or {}
        if best.get("step") == meta.get("step") and "val_auc" in best:
            return best
        recorded = metrics.get("best") or {}
        if recorded.get("checkpoint") and (self.checkpoint is None or os.path.basename(recorded["checkpoint"])
                                           == os.path.basename(self.checkpoint)):
            return recorded
        raise ckpt.CheckpointError(f"{self.checkpoint} has no recorded validation metrics (not saved as the best)")


def resolve_run(spec: str, checkpoint: bool = True) -> RunRef:
    """``<run_dir>`` or ``<run_dir>@best`` -> :class:`RunRef`; raises
    :class:`~torchrec_shark.training.checkpoint.CheckpointError` naming the run when the
    checkpoint it names does not exist. ``checkpoint=False``: the run's files only (a command
    that will read the checkpoint later, e.g. a retrain command)."""
    run_dir, best = ckpt.split_run_spec(spec)
    return RunRef(run_dir=run_dir, best=best, checkpoint=ckpt.require_checkpoint(spec) if checkpoint else None)
