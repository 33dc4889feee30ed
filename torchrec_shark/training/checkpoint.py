"""Checkpoints with ``torch.distributed.checkpoint`` (DCP): atomic, resumable, warm-startable.

Layout under ``<run_dir>/checkpoints/``::

    step_00000500/        one complete DCP checkpoint (model, optimizer) + meta.json
    latest                name of the newest complete checkpoint
    best                  name of the checkpoint with the best validation metric (never rotated away)

A checkpoint is written to a hidden ``.tmp-*`` directory and renamed only after every
rank has finished writing, so a crash mid-write never leaves a directory that
:func:`latest_checkpoint` would return. A state with a non-finite value is never written
(:class:`NonFiniteStateError`). ``<run_dir>@best`` names a run's best checkpoint wherever a run
dir is accepted (:func:`require_checkpoint`: warm start, the passes).

Nothing trained is lost by accident: a ``step_*`` directory whose ``meta.json`` is missing or does
not parse is a damaged checkpoint, never an absent one (:func:`checkpoint_dirs` lists it, a resume
that finds only damaged ones stops naming each); every fallback past a checkpoint warns naming
both; rotation deletes only readable checkpoints older than the one just written, and a save
whose name is taken moves the old directory aside (``step_N.replaced-K``) instead of deleting it.

Example::

    save_checkpoint(run_dir, step, {"model": model, "optim": optimizer}, meta={"step": step})
    ckpt = latest_checkpoint(run_dir)
    meta = load_checkpoint(ckpt, {"model": model, "optim": optimizer})
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from torchrec_shark.training.transient_group import transient_group

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
BEST = "best"
META = "meta.json"
BEST_SUFFIX = "@best"
_STEP_DIR = re.compile(r"step_(\d+)")


class CheckpointError(RuntimeError):
    """A run dir without a usable checkpoint."""


class NonFiniteStateError(CheckpointError):
    """The state to save holds NaN or Inf: nothing was written."""


def _barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _state(stateful: Dict[str, object]) -> Dict[str, object]:
    return {k: v.state_dict() for k, v in stateful.items()}  # type: ignore[attr-defined]


def _local_tensors(obj: object, prefix: str = "") -> Iterator[Tuple[str, torch.Tensor]]:
    """``(key, local tensor)`` of every tensor in a nested state dict (shards of sharded tensors)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _local_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _local_tensors(v, f"{prefix}.{i}")
    elif hasattr(obj, "local_shards"):
        for shard in obj.local_shards():  # type: ignore[attr-defined]
            yield prefix, shard.tensor
    elif hasattr(obj, "to_local"):
        yield prefix, obj.to_local()  # type: ignore[attr-defined]
    elif isinstance(obj, torch.Tensor):
        yield prefix, obj


def non_finite_keys(state: Dict[str, object], limit: int = 5) -> List[str]:
    """Up to ``limit`` keys of floating tensors in ``state`` (this rank's shards) with NaN or Inf."""
    bad = []
    for key, t in _local_tensors(state):
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad.append(key)
            if len(bad) >= limit:
                break
    return bad


def save_checkpoint(
    run_dir: str, step: int, stateful: Dict[str, object], meta: Dict, keep: int = 2, best: bool = False,
    unhealthy: Optional[str] = None,
) -> Optional[str]:
    """Save ``{name: obj.state_dict()}`` for every rank; returns the checkpoint directory.

    ``keep`` newest checkpoints stay, plus the one ``best`` last marked. Raises
    :class:`NonFiniteStateError` (on every rank, nothing written) when any rank's state holds
    NaN or Inf; the checkpoints already there stay as they were. ``unhealthy``: this rank's reason
    not to keep the state (see :mod:`~torchrec_shark.training.health`); when any rank gives one,
    nothing is written and every rank returns ``None``.
    """
    root = os.path.join(run_dir, CHECKPOINT_DIR)
    name = f"step_{step:08d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".tmp-{name}")
    state = _state(stateful)
    # DCP's plan gather runs on gloo's worker threads: a short-lived group takes them (and the
    # OpenMP teams their copies start) away after the save (see transient_group).
    with transient_group() as group:
        bad = non_finite_keys(state)
        if dist.is_initialized():
            found = [None] * dist.get_world_size()
            dist.all_gather_object(found, (dist.get_rank(), bad, unhealthy), group=group)
        else:
            found = [(0, bad, unhealthy)]
        unfit = [p for _, _, p in found if p]
        found = [(r, b) for r, b, _ in found if b]
        if not found and unfit:
            return None  # finite but unfit to resume (on some rank): the last checkpoint stays latest
        if found:
            last = latest_checkpoint(run_dir)
            raise NonFiniteStateError(
                f"not saving step {step}: non-finite values in " + "; ".join(f"rank {r}: {b}" for r, b in found)
                + f". The last finite checkpoint is {last or 'none'}")
        if _is_main():
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier(group)
        dcp.save(state, checkpoint_id=tmp, process_group=group)
        _barrier(group)
        if _is_main():
            with open(os.path.join(tmp, META), "w") as f:
                json.dump(meta, f, indent=2)
            if os.path.exists(final):
                _move_aside(final)
            os.rename(tmp, final)
            _write_atomic(os.path.join(root, LATEST), name)
            if best:
                _write_atomic(os.path.join(root, BEST), name)
            _rotate(root, step, keep)
        _barrier(group)
    return final


def _move_aside(path: str) -> str:
    """Rename a checkpoint directory that a save would replace (one this run never wrote: a damaged
    checkpoint a resume went past, or one from a run that was resumed further back) to
    ``<name>.replaced-<k>``; returns the new path."""
    k = 1
    while os.path.exists(f"{path}.replaced-{k}"):
        k += 1
    aside = f"{path}.replaced-{k}"
    os.rename(path, aside)
    # the job's console shows this package's warnings on the main rank (training.job_log)
    logger.warning(f"{path} already existed (not written by this run): kept as {aside}")
    return aside


def _rotate(root: str, step: int, keep: int) -> None:
    """Delete readable checkpoints older than the ``keep`` newest up to ``step`` (never the best one,
    never a damaged one, never one of a later step)."""
    kept = _pointed(root, BEST)
    older = [n for n in _step_dirs(root) if _step_of(n) <= step and _meta_problem(os.path.join(root, n)) is None]
    for old in older[:-keep] if keep > 0 else older:
        if old != kept:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _pointed(root: str, pointer: str) -> Optional[str]:
    path = os.path.join(root, pointer)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def _step_of(name: str) -> int:
    return int(_STEP_DIR.fullmatch(name).group(1))  # type: ignore[union-attr]


def _step_dirs(root: str) -> List[str]:
    """Names of every ``step_<N>`` directory under ``root``, readable or not, by step."""
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if _STEP_DIR.fullmatch(n) and os.path.isdir(os.path.join(root, n))]
    return sorted(names, key=_step_of)


def _meta_problem(path: str) -> Optional[str]:
    """Why ``<path>/meta.json`` does not describe a checkpoint (missing, not a JSON object), or ``None``."""
    try:
        meta = read_meta(path)
    except FileNotFoundError:
        return f"{os.path.join(path, META)} is missing"
    except (OSError, CheckpointError) as e:
        return str(e)
    if not isinstance(meta, dict):
        return f"{os.path.join(path, META)} is not a JSON object"
    return None


def checkpoint_dirs(run_dir: str) -> List[str]:
    """Every checkpoint directory of a run (``checkpoints/step_<N>``), readable or not, oldest first.

    A directory whose ``meta.json`` is damaged is still a checkpoint (of a model that trained):
    a resume must stop on it rather than start afresh and rotate it away."""
    root = os.path.join(run_dir, CHECKPOINT_DIR)
    return [os.path.join(root, n) for n in _step_dirs(root)]


def damaged_checkpoints(run_dir: str) -> Dict[str, str]:
    """``{checkpoint dir: why its meta.json does not read}`` of a run."""
    out = {}
    for path in checkpoint_dirs(run_dir):
        problem = _meta_problem(path)
        if problem is not None:
            out[path] = problem
    return out


def complete_checkpoints(run_dir: str) -> List[str]:
    """Complete checkpoint directories of a run (readable meta.json), oldest first."""
    return [p for p in checkpoint_dirs(run_dir) if _meta_problem(p) is None]


def _warn_fallback(chosen: str, skipped: List[str]) -> None:
    # the job's console shows this package's warnings on the main rank (training.job_log)
    logger.warning(f"using checkpoint {chosen}, not the newer one(s) that cannot be read: " + " | ".join(skipped))


def _candidates(run_dir: str) -> List[str]:
    """Checkpoint dirs to try, newest first: up to the one ``latest`` names (when it names one)."""
    root = os.path.join(run_dir, CHECKPOINT_DIR)
    dirs = checkpoint_dirs(run_dir)
    name = _pointed(root, LATEST)
    if name is not None and _STEP_DIR.fullmatch(name):
        newer = [p for p in dirs if _step_of(os.path.basename(p)) > _step_of(name)]
        dirs = [p for p in dirs if p not in newer]
        if not any(os.path.basename(p) == name for p in dirs):  # the pointer names a missing dir
            dirs.append(os.path.join(root, name))
    return dirs[::-1]


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """Newest complete checkpoint directory of a run, or ``None``; warns when it is not the one
    ``latest`` names (or newer ones exist that cannot be read)."""
    skipped = []
    for path in _candidates(run_dir):
        problem = _meta_problem(path) if os.path.isdir(path) else f"{path} does not exist"
        if problem is None:
            if skipped:
                _warn_fallback(path, skipped)
            return path
        skipped.append(problem)
    return None


def best_checkpoint(run_dir: str) -> Optional[str]:
    """The run's checkpoint marked best by its validation metric, or ``None``."""
    root = os.path.join(run_dir, CHECKPOINT_DIR)
    name = _pointed(root, BEST)
    if name is not None and _meta_problem(os.path.join(root, name)) is None:
        return os.path.join(root, name)
    return None


def split_run_spec(spec: str) -> Tuple[str, bool]:
    """``"runs/a@best"`` -> ``("runs/a", True)``; ``"runs/a"`` -> ``("runs/a", False)``."""
    if spec.endswith(BEST_SUFFIX):
        return spec[: -len(BEST_SUFFIX)], True
    return spec, False


def require_checkpoint(run_dir: str) -> str:
    """Like :func:`latest_checkpoint` but raises a clear error when there is none.

    ``<run_dir>@best`` returns the run's best checkpoint instead of its latest; a checkpoint
    directory (one already resolved, e.g. by :func:`~torchrec_shark.training.run_ref.resolve_run`)
    is returned as it is.
    """
    if os.path.isdir(run_dir) and _meta_problem(run_dir) is None:  # a checkpoint directory itself
        return run_dir
    run_dir, want_best = split_run_spec(run_dir)
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"run dir {run_dir!r} does not exist")
    if want_best:
        path = best_checkpoint(run_dir)
        if path is None:
            raise CheckpointError(f"run dir {run_dir!r} has no best checkpoint ({CHECKPOINT_DIR}/{BEST}); it was "
                                  "trained without a validation improvement being recorded")
        return path
    path = latest_checkpoint(run_dir)
    if path is None:
        damaged = damaged_checkpoints(run_dir)
        if damaged:
            raise CheckpointError(f"run dir {run_dir!r}: no readable checkpoint: " + " | ".join(damaged.values()))
        raise CheckpointError(f"run dir {run_dir!r} has no complete checkpoint under {CHECKPOINT_DIR}/")
    return path


def read_meta(checkpoint: str) -> Dict:
    path = os.path.join(checkpoint, META)
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:  # JSONDecodeError, or bytes that are not text
        raise CheckpointError(f"{path} is not valid JSON (truncated or overwritten?): {e}") from None


def load_checkpoint(checkpoint: str, stateful: Dict[str, object]) -> Dict:
    """Load every object of ``stateful`` in place (resharding as needed); returns the meta dict.

    Raises :class:`CheckpointError` naming ``checkpoint`` when it cannot be read (on every rank).
    """
    for obj in stateful.values():
        if hasattr(obj, "init_state"):
            obj.init_state()  # type: ignore[attr-defined]  # optimizers create lazy state first
    state = _state(stateful)
    model = stateful.get("model")
    try:
        meta = read_meta(checkpoint)
        with transient_group() as group:
            if isinstance(model, torch.nn.Module):  # compressed tables whose saved layout depends on the sharding
                from torchrec_shark.distributed import resharding

                resharding.load(state, checkpoint, model, process_group=group)
            else:
                dcp.load(state, checkpoint_id=checkpoint, process_group=group)
    except (Exception, CheckpointException) as e:  # DCP raises every rank's read errors on all ranks
        raise CheckpointError(f"checkpoint {checkpoint} cannot be read: {type(e).__name__}: {e}") from e
    for key, obj in stateful.items():
        obj.load_state_dict(state[key])  # type: ignore[attr-defined]
    return meta


def load_newest_readable(run_dir: str, stateful: Dict[str, object]) -> Tuple[str, Dict]:
    """Load the newest checkpoint of ``run_dir`` that reads; falls back past unreadable ones with a
    warning naming both.

    Returns ``(checkpoint, meta)``; raises :class:`CheckpointError` naming every one tried (nothing
    is deleted or changed on disk either way).
    """
    failed: List[str] = []
    for path in _candidates(run_dir):
        problem = _meta_problem(path) if os.path.isdir(path) else f"{path} does not exist"
        if problem is not None:
            failed.append(problem)
            continue
        try:
            meta = load_checkpoint(path, stateful)
        except CheckpointError as e:
            failed.append(str(e))
            continue
        if failed:
            _warn_fallback(path, failed)
        return path, meta
    raise CheckpointError(f"run dir {run_dir!r}: no readable checkpoint: " + (" | ".join(failed) or "none found"))


def newest_readable_meta(run_dir: str) -> Tuple[Optional[str], Optional[Dict], List[str]]:
    """``(checkpoint, meta, problems)``: the checkpoint a resume would load first (newest with a
    readable meta.json), without loading it, and why each newer one cannot be read."""
    failed: List[str] = []
    for path in _candidates(run_dir):
        problem = _meta_problem(path) if os.path.isdir(path) else f"{path} does not exist"
        if problem is None:
            return path, read_meta(path), failed
        failed.append(problem)
    return None, None, failed


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
    source columns a narrower table inherits (dimension search); a key that is a full
    state-dict key of a 2-D tensor (e.g. the over arch's first weight after field pruning)
    selects that tensor's source columns the same way. Stock tables (sharded or not) and
    compressed row-store tables (fp16, int8, mixed precision: decoded, sliced, re-encoded, tiers
    kept) narrow; a tensor-train table has no columns to keep and starts fresh. Returns
    ``{"loaded": [...], "narrowed": [...], "skipped": [...], "fresh_tables": [...]}`` (tables with a
    tensor the source lacks or holds in another shape start from their own initialisation).
    """
    checkpoint = require_checkpoint(source_run_dir)
    saved = checkpoint_tensor_shapes(checkpoint)
    current = model.state_dict()
    columns = dict(columns or {})
    # Compressed tables (sharded or not) load themselves, a chunk at a time, from any row-store kind and
    # any sharding, narrowed to init_columns where asked.
    compressed = _warm_start_compressed_tables(checkpoint, saved, model, columns)
    current = {k: v for k, v in current.items() if _table_prefix(k) not in compressed["prefixes"]}
    wanted = {k: v for k, v in current.items() if k in saved and _global_shape(v) == saved[k]}
    narrowed = _narrowed_tables(current, saved, {t: c for t, c in columns.items() if t not in compressed["tables"]})
    # A table loads whole or not at all.
    keep = {k.rsplit(".", 1)[0] for k in narrowed}
    fresh = _changed_tables(current, wanted, keep)
    wanted = {k: v for k, v in wanted.items() if _table_prefix(k) not in fresh}
    with transient_group() as group:  # see transient_group: the default group's threads would slow training
        dcp.load({"model": wanted}, checkpoint_id=checkpoint, planner=DefaultLoadPlanner(allow_partial_load=True),
                 process_group=group)
    # DistributedModelParallel's load hook renames the keys of the dict it is given: hand it a copy.
    model.load_state_dict(dict(wanted), strict=False)
    for key, cols in narrowed.items():
        # Each rank reads the whole source table once and keeps its shard of the kept columns.
        full = {key: torch.empty(saved[key], dtype=torch.float32)}
        dcp.load({"model": full}, checkpoint_id=checkpoint, no_dist=True,
                 planner=DefaultLoadPlanner(allow_partial_load=True))
        _copy_global_into(current[key], full[key][:, cols])
        # A sharded compressed table exports copies of its rows: hand them back through its load hook.
        model.load_state_dict({key: current[key]}, strict=False)
    narrowed_keys = set(narrowed)
    skipped = sorted(set(current) - set(wanted) - narrowed_keys)
    fresh_tables = sorted([p.rsplit(".", 1)[1] for p in fresh] + compressed["fresh"])
    wanted.update({k: None for k in compressed["loaded"]})
    narrowed_keys |= set(compressed["narrowed"])
    if _is_main():
        logger.info("warm start from %s: %d tensors loaded, %d narrowed, %d skipped, tables initialised afresh: %s",
                    checkpoint, len(wanted), len(narrowed_keys), len(skipped), fresh_tables)
    return {"loaded": sorted(wanted), "narrowed": sorted(narrowed_keys),
            "narrowed_columns": {k: list(c) for k, c in narrowed.items()}, "skipped": skipped,
            "fresh_tables": fresh_tables}


def _warm_start_compressed_tables(checkpoint: str, saved: Dict, model: torch.nn.Module,
                                  columns: Dict[str, List[int]]) -> Dict:
    """Warm-start every table of the model's compressed collections, sharded or not, through its kind's
    chunked load (stock rows into any row store, any sharding; ``columns`` narrow row stores). Returns the
    tables and their key prefixes handled here, and what was loaded, narrowed or left fresh (why: logged)."""
    from torchrec_shark.distributed.resharding import _unwrapped
    from torchrec_shark.distributed.state_readers import CheckpointStateReader
    from torchrec_shark.modules.kinds import kind_of

    out: Dict = {"prefixes": set(), "tables": set(), "loaded": [], "narrowed": [], "fresh": []}
    for path, module in model.named_modules():
        if hasattr(module, "load_table"):  # sharded: each rank loads its own shards
            prefix = getattr(module, "state_prefix", None)
            if prefix is None:
                continue
            tables = {name: (module.unloadable, module.load_table) for name in module._table_states}
        elif isinstance(getattr(module, "embedding_bags", None), torch.nn.ModuleDict) \
                and hasattr(module, "init_seed"):  # an unsharded compressed collection
            prefix = f"{path}." if path else ""
            configs = {c.name: c for c in module.embedding_bag_configs()}

            def unloadable(name, reader, cols, c=configs):
                return kind_of(c[name]).unloadable(c[name], reader, cols)

            def load(name, reader, columns=None, c=configs, m=module):
                kind_of(c[name]).load_state(m.embedding_bags[name], reader, 0, columns)

            tables = {name: (unloadable, load) for name in configs}
        else:
            continue
        for name, (unloadable, load) in tables.items():
            table_key = _unwrapped(f"{prefix}embedding_bags.{name}")
            out["prefixes"].add(table_key)
            out["tables"].add(name)
            if not any(k.startswith(table_key + ".") for k in saved):
                out["fresh"].append(name)
                continue
            reader = CheckpointStateReader(checkpoint, f"model.{table_key}.")
            cols = columns.get(name)
            problem = unloadable(name, reader, cols)
            if problem is not None:
                logger.info("warm start: table %s starts fresh (%s)", name, problem)
                out["fresh"].append(name)
                continue
            load(name, reader, columns=cols)
            # the optimizer state is keyed by the table's "weight" handle: it continues where shapes allow
            out["narrowed" if cols is not None else "loaded"].append(f"{table_key}.weight")
    return out


def _table_prefix(key: str) -> Optional[str]:
    """``...embedding_bags.<table>`` of a table's state-dict key, else ``None``."""
    head, sep, tail = key.partition("embedding_bags.")
    if not sep or "." not in tail:
        return None
    return head + sep + tail.split(".", 1)[0]


# Per-row state of a mixed-precision table beside its rows: a source table without it (stock fp32,
# uniform fp16/int8) still hands over its rows; tiers start from the initial layout and re-form
# from the priorities counted from then on.
_OPTIONAL_TABLE_STATE = ("tier", "priority")


def _changed_tables(current: Dict, wanted: Dict, keep: set) -> set:
    """Prefixes of tables (other than ``keep``) with a tensor the source lacks or has in another shape."""
    out = set()
    for k in current:
        prefix = _table_prefix(k)
        if prefix is None or prefix in keep or k in wanted:
            continue
        if k.rsplit(".", 1)[1] in _OPTIONAL_TABLE_STATE and f"{prefix}.weight" in wanted:
            continue
        out.add(prefix)
    return out


def _saved_width(saved: Dict, prefix: str, own: Dict[str, object], width: int) -> int:
    """The saved table's width: this one's plus the difference of any width-dependent 2-D tensor.

    ``own`` maps this table's state-dict keys (without ``prefix``) to tensors; every kind of
    table keeps its rows in 2-D tensors whose second dim is the width plus a constant.
    """
    for k, v in own.items():
        shape, mine = saved.get(f"{prefix}.{k}" if prefix else k), _global_shape(v)
        if shape is not None and mine is not None and len(shape) == 2 and len(mine) == 2 \
                and shape[0] == mine[0] and shape[1] != mine[1]:
            return width + int(shape[1]) - int(mine[1])
    return width


def _narrowed_tables(current: Dict, saved: Dict, columns: Dict[str, List[int]]) -> Dict[str, List[int]]:
    out = {}
    for table, cols in columns.items():
        # A table name, or the full state-dict key of a 2-D dense weight (field pruning keeps the
        # over-arch input columns of the remaining fields' interactions).
        key = table if table in current else next(
            (k for k in current if k.endswith(f".embedding_bags.{table}.weight")), None)
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


def warm_start_optimizer(
    source_run_dir: str, optimizer: object, params: List[str], columns: Optional[Dict[str, List[int]]] = None
) -> List[str]:
    """Continue the optimizer state of ``params`` (state-dict keys) from another run's checkpoint.

    A fine-tune that starts Adam's moments and Adagrad's accumulators from zero takes full-size
    steps on every parameter at once (Adam's first updates are ~lr whatever the gradient), which
    knocks a converged model off its optimum; carrying the state over keeps the step sizes the
    source had reached. Entries whose saved shape equals the current one load as they are; the
    2-D state of a parameter narrowed to ``columns[param]`` (e.g. the over arch's first weight
    after field pruning) keeps those columns, like the parameter itself. Returns
    ``["<param>/<state>", ...]`` loaded.
    """
    checkpoint = require_checkpoint(source_run_dir)
    saved = checkpoint_tensor_shapes(checkpoint, prefix="optim.")
    columns = columns or {}
    if hasattr(optimizer, "init_state"):
        optimizer.init_state()  # type: ignore[attr-defined]  # lazy state must exist to be filled
    full = optimizer.state_dict()  # type: ignore[attr-defined]
    wanted_params = set(params)
    subset: Dict[str, Dict[str, object]] = {}
    narrowed: Dict[str, Dict[str, object]] = {}
    for param, entries in full.get("state", {}).items():
        if param not in wanted_params:
            continue
        cols = columns.get(param)
        for name, value in entries.items():
            shape, src = _global_shape(value), saved.get(f"state.{param}.{name}")
            if shape is None or src is None:
                continue
            if src == shape:
                subset.setdefault(param, {})[name] = value
            elif cols is not None and len(shape) == 2 and len(src) == 2 and src[0] == shape[0] \
                    and len(cols) == shape[1] and max(cols) < src[1]:
                narrowed.setdefault(param, {})[name] = value
    if subset:
        with transient_group() as group:
            dcp.load({"optim": {"state": subset}}, checkpoint_id=checkpoint,
                     planner=DefaultLoadPlanner(allow_partial_load=True), process_group=group)
    for param, entries in narrowed.items():
        whole = {name: torch.empty(saved[f"state.{param}.{name}"], dtype=torch.float32) for name in entries}
        dcp.load({"optim": {"state": {param: whole}}}, checkpoint_id=checkpoint, no_dist=True,
                 planner=DefaultLoadPlanner(allow_partial_load=True))
        for name, value in entries.items():
            _copy_global_into(value, whole[name][:, columns[param]].to(value.dtype))  # type: ignore[union-attr]
    for part in (subset, narrowed):
        for param, entries in part.items():
            full["state"][param].update(entries)
    if subset or narrowed:
        optimizer.load_state_dict(full)  # type: ignore[attr-defined]
    return sorted(f"{p}/{n}" for part in (subset, narrowed) for p, entries in part.items() for n in entries)


def warm_start_projections(
    source_run_dir: str,
    model: torch.nn.Module,
    columns: Dict[str, List[int]],
    table_features: Dict[str, List[str]],
) -> List[str]:
    """Start the field projections of narrowed tables where the source model left off.

    A field of table ``t`` that keeps source columns ``cols`` and now needs a linear
    projection (width != interaction width) gets ``P_new = P_src[:, cols]``, where ``P_src``
    is the source's projection of that field, or the identity (``[I | 0]`` for a narrower
    zero-padded source) when the source field had none. The narrowed model then computes
    exactly the source model with the dropped columns masked to zero, instead of sending the
    inherited columns through a random map. Returns the state-dict keys it set.
    """
    checkpoint = require_checkpoint(source_run_dir)
    saved = checkpoint_tensor_shapes(checkpoint)
    current = model.state_dict()
    done = []
    for table, cols in columns.items():
        own = {k: v for k, v in current.items() if f"embedding_bags.{table}." in k}
        src_width = _saved_width(saved, "", own, len(cols)) if any(k in saved for k in own) else None
        for feat in table_features.get(table, []):
            key = next((k for k in current if k.endswith(f".projection.proj.{feat}.weight")), None)
            if key is None:
                continue  # the new width needs no projection (or zero_pad)
            dst = current[key]
            out_dim, width = dst.shape
            if width != len(cols):
                raise CheckpointError(f"init_columns for table {table!r}: {len(cols)} columns for projection "
                                      f"{key} of width {width}")
            if key in saved:
                full = {key: torch.empty(saved[key], dtype=torch.float32)}
                dcp.load({"model": full}, checkpoint_id=checkpoint, no_dist=True,
                         planner=DefaultLoadPlanner(allow_partial_load=True))
                src = full[key]
            elif src_width is not None and src_width <= out_dim:
                src = torch.eye(out_dim)[:, :src_width]
            else:
                continue
            if src.shape[0] != out_dim or max(cols) >= src.shape[1]:
                continue
            dst.detach().copy_(src[:, list(cols)].to(dst.dtype))
            done.append(key)
    return done
