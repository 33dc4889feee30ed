"""Load a finished ``train.py`` run (config + a checkpoint) and take gradients at its pooled embeddings.

Both passes work on pooled embeddings, so they apply to every table kind and sharding. A run is
named by ``<run_dir>`` (its latest checkpoint) or ``<run_dir>@best`` (its best one), resolved once
by :func:`~torchrec_shark.training.run_ref.resolve_run`.

Example::

    run = load_run("outputs/2026-01-01/12-00-00@best", out_dir=".", env=init_distributed())
    for sample in pooled_gradients(run, num_batches=8):
        sample.pooled["f00"], sample.grads["f00"]  # [b, D] each, this rank's slice of the batch
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence, Tuple, Union

import torch
from torch.nn import functional as F

from torchrec_shark.config import TrainConfig, validate
from torchrec_shark.models.dlrm import DLRM
from torchrec_shark.passes.command_line import hydra_quote
from torchrec_shark.training import checkpoint as ckpt
from torchrec_shark.training.env import DistEnv
from torchrec_shark.training.run_ref import RunRef, resolve_run
from torchrec_shark.training.trainer import Trainer


def _ref(run: Union[str, RunRef]) -> RunRef:
    return run if isinstance(run, RunRef) else resolve_run(run)


def run_config(run: Union[str, RunRef]) -> TrainConfig:
    """The resolved config a run was trained with (Hydra's ``<run_dir>/.hydra/config.yaml``)."""
    return _ref(run).config()


def run_overrides(run: Union[str, RunRef]) -> List[str]:
    """The command-line overrides the run was started with."""
    return _ref(run).overrides()


@dataclass
class LoadedRun:
    ref: RunRef
    cfg: TrainConfig
    trainer: Trainer

    @property
    def run_dir(self) -> str:
        return self.ref.run_dir

    @property
    def checkpoint(self) -> str:
        return self.ref.checkpoint

    @property
    def dlrm(self) -> DLRM:
        return self.trainer._unwrapped().model

    @property
    def env(self) -> DistEnv:
        return self.trainer.env


def load_run(run: Union[str, RunRef], out_dir: str, env: DistEnv) -> LoadedRun:
    """Rebuild a run's model (same data, tables, sharding) and load the checkpoint its reference names."""
    ref = _ref(run)
    cfg = ref.config()
    cfg.trainer.resume, cfg.trainer.init_from = False, None
    validate(cfg)
    trainer = Trainer(cfg, out_dir, env, statistics_from=ref.run_dir)  # the run's inputs, transformed as it saw them
    ckpt.load_checkpoint(ref.checkpoint, {"model": trainer.model})
    trainer.model.eval()
    return LoadedRun(ref, cfg, trainer)


@dataclass
class PooledGradients:
    """One evaluation batch (this rank's slice): pooled embeddings, per-sample loss gradients at them."""

    dense: torch.Tensor
    labels: torch.Tensor
    pooled: Dict[str, torch.Tensor]
    grads: Dict[str, torch.Tensor]
    losses: torch.Tensor


@dataclass
class PooledBatch:
    """One evaluation batch (this rank's slice) at the pooled embeddings, no gradients."""

    dense: torch.Tensor
    labels: torch.Tensor
    pooled: Dict[str, torch.Tensor]


def pooled_batches(run: LoadedRun, num_batches: int, split: str = "val") -> Iterator[PooledBatch]:
    """Data loading + embedding lookups only (no grad): ``num_batches`` of this rank's slices."""
    t, env = run.cfg.trainer, run.env
    batches = run.trainer.dataset.batches(split, t.batch_size, env.rank, env.world_size)
    for i, batch in enumerate(batches):
        if i >= num_batches:
            break
        batch = batch.to(env.device)
        with torch.no_grad():
            pooled = {k: v.detach() for k, v in run.dlrm.embed(batch.sparse_features).items()}
        yield PooledBatch(batch.dense_features, batch.labels, pooled)


def loss_gradients(
    run: LoadedRun, dense: torch.Tensor, labels: torch.Tensor, pooled: Dict[str, torch.Tensor]
) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """Per-sample ``dL(x)/de_j(x)`` for every field and the per-sample losses, one forward/backward of ``predict``.

    Each sample's loss depends only on its own pooled embeddings, so the gradient of the
    summed loss at ``e_j(x)`` is exactly ``dL(x)/de_j(x)``. Only the pooled embeddings are
    differentiated (no parameter gradients are formed).
    """
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in pooled.items()}
    with torch.enable_grad():
        logits = run.dlrm.predict(dense, leaves)
        losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        grads = torch.autograd.grad(losses.sum(), [leaves[k] for k in leaves])
    return dict(zip(leaves, grads)), losses.detach()


def pooled_gradients(run: LoadedRun, num_batches: int, split: str = "val") -> Iterator[PooledGradients]:
    """Per-sample ``dL(x)/de_j(x)`` at every field's pooled embedding, one forward/backward per batch.

    :func:`pooled_batches` followed by :func:`loss_gradients` on each batch.
    """
    for b in pooled_batches(run, num_batches, split):
        grads, losses = loss_gradients(run, b.dense, b.labels, b.pooled)
        yield PooledGradients(b.dense, b.labels, b.pooled, grads, losses)


def predict_with(run: LoadedRun, dense: torch.Tensor, pooled: Dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return run.dlrm.predict(dense, pooled)


def retrain_command(run: Union[str, RunRef], search_dir: str, tables_name: str, extra: Sequence[str] = (),
                    nproc: int = 0) -> str:
    """The ``torchrun train.py`` command that trains a rewritten tables config warm-started from ``run``.

    Every override of the source run is inherited except those the new config replaces and
    those whose key ``extra`` sets again (e.g. ``trainer.max_steps=200`` for fine-tuning). The
    warm start reads the checkpoint the pass read (``<run_dir>@best`` stays ``@best``).
    """
    ref = run if isinstance(run, RunRef) else resolve_run(run, checkpoint=False)
    def key(o: str) -> str:
        return o.split("=", 1)[0].lstrip("+~")

    replaced = ("tables", "hydra.", "trainer.resume", "trainer.init_from")
    again = {key(o) for o in extra}
    inherited = [o for o in ref.overrides() if not key(o).startswith(replaced) and key(o) not in again]
    nproc = nproc or int(os.environ.get("WORLD_SIZE", "1"))
    parts = [
        "torchrun", "--standalone", f"--nproc_per_node={nproc}", "train.py",
        f"hydra.searchpath=[{hydra_quote('file://' + os.path.abspath(search_dir))}]",
        f"tables={tables_name}",
        f"trainer.init_from={hydra_quote(ref.spec)}",
        *inherited,
        *extra,
    ]
    return shlex.join(parts)
