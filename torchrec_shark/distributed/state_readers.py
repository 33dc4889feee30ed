"""Readers of a table's saved state by row range: from tensors in memory, or from a DCP checkpoint on disk.

A table kind loads itself from a :class:`~torchrec_shark.modules.table_kind.StateReader` a chunk at a
time, so neither source is ever copied whole:

* :class:`DictStateReader`: ``{key: tensor}`` where a value is a full tensor, a ``ShardedTensor``
  (read from this rank's local shards) or a ``DTensor``;
* :class:`CheckpointStateReader`: the tensors under one prefix of a ``torch.distributed.checkpoint``
  directory; a read loads only the saved chunks that overlap the range (the table state is saved in
  chunks of bounded size), with no collective, so each rank reads what it owns.

Example::

    reader = CheckpointStateReader("run/checkpoints/step_00000500", "model.embedding_bags.t_user.")
    rows = reader.read("row_slot", offset=1_000_000, length=65_536)
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from torchrec_shark.modules.table_kind import DictStateReader, StateReader  # noqa: F401  (DictStateReader: re-exported)


def _region(size: Sequence[int], offset: int, length: Optional[int], dim: int) -> Tuple[list, list]:
    offsets, sizes = [0] * len(size), list(size)
    if sizes:
        length = sizes[dim] - offset if length is None else length
        offsets[dim], sizes[dim] = offset, length
    return offsets, sizes


class _RegionLoadPlanner(DefaultLoadPlanner):
    """Loads one region of one saved tensor into ``dest`` (only the saved chunks that overlap it are read)."""

    def __init__(self, fqn: str, offsets: list, sizes: list, dest: torch.Tensor) -> None:
        super().__init__(allow_partial_load=True)
        self._fqn, self._offsets, self._sizes, self._dest = fqn, offsets, sizes, dest

    def create_local_plan(self) -> LoadPlan:
        md = self.metadata.state_dict_metadata[self._fqn]
        chunk = ChunkStorageMetadata(offsets=torch.Size(self._offsets), sizes=torch.Size(self._sizes))
        return LoadPlan(create_read_items_for_chunk_list(self._fqn, md, [chunk]))

    def lookup_tensor(self, index) -> torch.Tensor:
        return self._dest


class _CachedMetadataReader(FileSystemReader):
    """A checkpoint reader that parses the metadata file once (a table is read in many small loads)."""

    @functools.lru_cache(maxsize=1)
    def read_metadata(self):  # type: ignore[override]
        return super().read_metadata()


class CheckpointStateReader(StateReader):
    """Ranges of the tensors saved under ``prefix`` in a DCP checkpoint directory (keys without the prefix)."""

    def __init__(self, checkpoint: str, prefix: str) -> None:
        self._reader = _CachedMetadataReader(checkpoint)
        self._prefix = prefix
        md = self._reader.read_metadata().state_dict_metadata
        self._md = {k[len(prefix):]: v for k, v in md.items()
                    if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)}

    def keys(self) -> Sequence[str]:
        return list(self._md)

    def size(self, key: str) -> Tuple[int, ...]:
        return tuple(self._md[key].size)

    def read(self, key: str, offset: int = 0, length: Optional[int] = None, dim: int = 0) -> torch.Tensor:
        md = self._md[key]
        offsets, sizes = _region(md.size, offset, length, dim)
        dest = torch.empty(sizes, dtype=md.properties.dtype)
        fqn = self._prefix + key
        dcp_load({fqn: dest}, storage_reader=self._reader, planner=_RegionLoadPlanner(fqn, offsets, sizes, dest),
                 no_dist=True)
        return dest
