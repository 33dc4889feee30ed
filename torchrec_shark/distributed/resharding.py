"""Loading a DCP checkpoint into a model sharded differently from the one that saved it.

Most table state has the same global shape under any sharding (rows, first-core slices, optimizer
state), so ``torch.distributed.checkpoint.load`` reshards it in place. A mixed-precision table's tier
pools are sized per shard (each shard keeps its own fp32 / fp16 / int8 budgets), so their global shapes
change with the sharding: :func:`load` leaves every such table out of DCP's in-place load and has the
table re-slice its state from the checkpoint for this rank's rows (a bounded chunk at a time, see
:class:`~torchrec_shark.distributed.state_readers.CheckpointStateReader`). So does a table with state
laid out per shard (keys under ``per_shard.``, e.g. a tensor-train table's LFU cache), whatever the
shapes: its global shape can coincide under another sharding.

Example::

    state = {"model": dmp.state_dict(), "optim": optimizer.state_dict()}
    load(state, "run/checkpoints/step_00000500", dmp)      # instead of dcp.load(state, ...)
    dmp.load_state_dict(state["model"]); optimizer.load_state_dict(state["optim"])
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from torchrec_shark.distributed.state_readers import CheckpointStateReader

_MARK = "embedding_bags."
_PER_SHARD = ".per_shard."


def _table_prefix(key: str) -> Optional[str]:
    head, sep, tail = key.partition(_MARK)
    if not sep or "." not in tail:
        return None
    return head + sep + tail.split(".", 1)[0] + "."


def resharded_tables(state: Dict, checkpoint: str, top: str = "model") -> List[str]:
    """Prefixes (``<top>.<...>embedding_bags.<table>.``) of the tables in ``state[top]`` with a tensor whose
    saved global shape differs from the current one, or with state laid out per shard."""
    md = FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    out = set()
    for key, value in state.get(top, {}).items():
        full = f"{top}.{key}"
        saved = md.get(full)
        if not isinstance(saved, TensorStorageMetadata) or not hasattr(value, "size"):
            continue
        prefix = _table_prefix(full)
        if prefix is not None and (tuple(saved.size) != tuple(value.size()) or _PER_SHARD in full):
            out.add(prefix)
    return sorted(out)


def load(state: Dict, checkpoint: str, model: nn.Module, process_group=None, top: str = "model") -> None:
    """``dcp.load(state, checkpoint)`` that also loads tables whose saved layout depends on the sharding
    (their keys are taken out of ``state[top]`` and read by the tables themselves)."""
    tables = resharded_tables(state, checkpoint, top)
    if tables:
        state[top] = {k: v for k, v in state[top].items() if _table_prefix(f"{top}.{k}") not in tables}
    dcp.load(state, checkpoint_id=checkpoint, process_group=process_group)
    wanted = {_unwrapped(p): p for p in tables}
    for module, name, prefix in _sharded_tables(model, top):
        if _unwrapped(prefix) in wanted:
            module.load_table(name, CheckpointStateReader(checkpoint, wanted[_unwrapped(prefix)]))


def _unwrapped(key: str) -> str:
    """``key`` without the wrappers' path components (DistributedModelParallel and DDP drop them from the
    keys of the model's state dict, not from the prefixes its modules see)."""
    return ".".join(part for part in key.split(".") if part not in ("module", "_dmp_wrapped_module"))


def _sharded_tables(model: nn.Module, top: str) -> List[Tuple[nn.Module, str, str]]:
    """``(sharded collection, table, checkpoint prefix)`` for every compressed table of ``model`` (after a
    ``state_dict()`` call, which records each collection's key prefix)."""
    out = []
    for m in model.modules():
        prefix = getattr(m, "state_prefix", None) if hasattr(m, "load_table") else None
        if prefix is None:
            continue
        for name in m.table_shards.keys() | set(getattr(m, "_table_states", {})):
            out.append((m, name, f"{top}.{prefix}{_MARK}{name}."))
    return out
