"""Checkpoints with ``torch.distributed.checkpoint`` (DCP): atomic, resumable, warm-startable.

Layout under ``<run_dir>/checkpoints/``::

    step_00000500/        one complete DCP checkpoint (model, optimizer) + meta.json
    latest                name of the newest complete checkpoint

A checkpoint is written to a hidden ``.tmp-*`` directory and renamed only after every
rank has finished writing, so a crash mid-write never leaves a directory that
:func:`latest_checkpoint` would return.

Example::

    save_checkpoint(run_dir, step, {"model": model, "optim": optimizer}, meta={"step": step})
    ckpt = latest_checkpoint(run_dir)
    meta = load_checkpoint(ckpt, {"model": model, "optim": optimizer})
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
META = "meta.json"


class CheckpointError(RuntimeError):
    """A run dir without a usable checkpoint."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _state(stateful: Dict[str, object]) -> Dict[str, object]:
    return {k: v.state_dict() for k, v in stateful.items()}  # type: ignore[attr-defined]


def save_checkpoint(run_dir: str, step: int, stateful: Dict[str, object], meta: Dict, keep: int = 2) -> str:
    """Save ``{name: obj.state_dict()}`` for every rank; returns the checkpoint directory."""
    root = os.path.join(run_dir, CHECKPOINT_DIR)
    name = f"step_{step:08d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".tmp-{name}")
    if _is_main():
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    dcp.save(_state(stateful), checkpoint_id=tmp)
    _barrier()
    if _is_main():
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        _write_atomic(os.path.join(root, LATEST), name)
        for old in _complete_checkpoints(root)[:-keep]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    _barrier()
    return final


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _complete_checkpoints(root: str) -> List[str]:
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if n.startswith("step_") and os.path.isfile(os.path.join(root, n, META))]
    return sorted(names)


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """Newest complete checkpoint directory of a run, or ``None``."""
    root = os.path.join(run_dir, CHECKPOINT_DIR)
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            path = os.path.join(root, f.read().strip())
        if os.path.isfile(os.path.join(path, META)):
            return path
    names = _complete_checkpoints(root)
    return os.path.join(root, names[-1]) if names else None


def require_checkpoint(run_dir: str) -> str:
    """Like :func:`latest_checkpoint` but raises a clear error when there is none."""
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"run dir {run_dir!r} does not exist")
    path = latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"run dir {run_dir!r} has no complete checkpoint under {CHECKPOINT_DIR}/")
    return path


def read_meta(checkpoint: str) -> Dict:
    with open(os.path.join(checkpoint, META)) as f:
        return json.load(f)


def load_checkpoint(checkpoint: str, stateful: Dict[str, object]) -> Dict:
    """Load every object of ``stateful`` in place (resharding as needed); returns the meta dict."""
    for obj in stateful.values():
        if hasattr(obj, "init_state"):
            obj.init_state()  # type: ignore[attr-defined]  # optimizers create lazy state first
    state = _state(stateful)
    dcp.load(state, checkpoint_id=checkpoint)
    for key, obj in stateful.items():
        obj.load_state_dict(state[key])  # type: ignore[attr-defined]
    return read_meta(checkpoint)


def checkpoint_tensor_shapes(checkpoint: str, prefix: str = "model.") -> Dict[str, torch.Size]:
    """Global shapes of the tensors a checkpoint holds under ``prefix`` (prefix stripped)."""
    md = FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    out = {}
    for key, item in md.items():
        if key.startswith(prefix) and hasattr(item, "size"):
            out[key[len(prefix):]] = torch.Size(item.size)
    return out


def warm_start(
    source_run_dir: str, model: torch.nn.Module, columns: Optional[Dict[str, List[int]]] = None
) -> Dict[str, List[str]]:
    """Load another run's model parameters where names and shapes match.

    Tables (and dense layers) absent from this model or of another shape are skipped, so a
    pruned or re-dimensioned model starts from its parent. ``columns[table]`` lists the
    source columns a narrower table inherits (dimension search). Returns
    ``{"loaded": [...], "skipped": [...]}``.
    """
    checkpoint = require_checkpoint(source_run_dir)
    saved = checkpoint_tensor_shapes(checkpoint)
    current = model.state_dict()
    wanted = {k: v for k, v in current.items() if k in saved and _global_shape(v) == saved[k]}
    narrowed = _narrowed_tables(current, saved, columns or {})
    skipped = sorted(set(current) - set(wanted) - set(narrowed))
    dcp.load({"model": wanted}, checkpoint_id=checkpoint, planner=DefaultLoadPlanner(allow_partial_load=True))
    model.load_state_dict(wanted, strict=False)
    for key, cols in narrowed.items():
        # Each rank reads the whole source table once and keeps its shard of the kept columns.
        full = {key: torch.empty(saved[key], dtype=torch.float32)}
        dcp.load({"model": full}, checkpoint_id=checkpoint, no_dist=True,
                 planner=DefaultLoadPlanner(allow_partial_load=True))
        _copy_global_into(current[key], full[key][:, cols])
    if _is_main():
        logger.info("warm start from %s: %d tensors loaded, %d narrowed, %d skipped",
                    checkpoint, len(wanted), len(narrowed), len(skipped))
    return {"loaded": sorted(wanted), "narrowed": sorted(narrowed), "skipped": skipped}


def _narrowed_tables(current: Dict, saved: Dict, columns: Dict[str, List[int]]) -> Dict[str, List[int]]:
    out = {}
    for table, cols in columns.items():
        key = next((k for k in current if k.endswith(f".embedding_bags.{table}.weight")), None)
        if key is None or key not in saved:
            continue
        shape = _global_shape(current[key])
        if shape is None or shape[0] != saved[key][0] or len(cols) != shape[1] or max(cols) >= saved[key][1]:
            raise CheckpointError(
                f"init_columns for table {table!r}: {len(cols)} columns (max {max(cols)}) cannot fill "
                f"shape {tuple(shape or ())} from saved {tuple(saved[key])}"
            )
        out[key] = list(cols)
    return out


def _copy_global_into(dst: object, src: torch.Tensor) -> None:
    """Copy a full tensor into a (possibly sharded) destination by its shard offsets."""
    if hasattr(dst, "local_shards"):
        for shard in dst.local_shards():  # type: ignore[attr-defined]
            (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            shard.tensor.detach().copy_(src[r0:r0 + nr, c0:c0 + nc])
    else:
        dst.detach().copy_(src)  # type: ignore[attr-defined]


def _global_shape(t: object) -> Optional[torch.Size]:
    if hasattr(t, "metadata") and callable(getattr(t, "metadata")):  # ShardedTensor
        return torch.Size(t.metadata().size)  # type: ignore[attr-defined]
    if isinstance(t, torch.Tensor):
        return t.shape
    return None
