"""Per-shard compressed tables and the TorchRec lookup kernel that runs them.

A kernel (:class:`CompressedEmbeddingBagKernel`) is what TorchRec's
``GroupedPooledEmbeddingsLookup`` calls for one group of table shards: it takes the
post-input-dist ``KeyedJaggedTensor`` of its features (ids already *local* to the shard under
row-wise) and returns ``[B_global, sum of feature dims]``. Every shard is built by its table's
kind (:mod:`~torchrec_shark.modules.table_kind`) directly from the config, for the rows the rank
owns; nothing here depends on the kind.

Tables are *not* registered as submodules (DDP would broadcast their buffers from rank 0 and
dense optimizers would see them); the sharded collection handles their state and optimizer.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_kernel import BaseEmbedding
from torchrec.distributed.embedding_types import GroupedEmbeddingConfig, ShardedEmbeddingTable
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_shark.distributed.state_readers import DictStateReader
from torchrec_shark.modules.base import CompressedTable
from torchrec_shark.modules.fused_store import FusedRowStore
from torchrec_shark.modules.kinds import kind_of

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- helpers
def table_kind_key(config) -> str:
    """Kernel-group key of a table: its kind's name."""
    return kind_of(config).name


def rw_alignment_problem(config, num_rows_per_shard: int) -> Optional[str]:
    """Why a table cannot be row-wise sharded with blocks of ``num_rows_per_shard`` rows (None: it can)."""
    align = kind_of(config).row_alignment(config)
    if num_rows_per_shard % align == 0:
        return None
    return (
        f"table {config.name!r}: row-wise shards of {num_rows_per_shard} rows are not multiples of its row "
        f"alignment {align} ({kind_of(config).name}); a shard would split its storage, so the "
        "table is constrained to table_wise"
    )


def shard_row_range(table: ShardedEmbeddingTable) -> Tuple[int, int]:
    md = table.local_metadata
    if md is None:
        return 0, table.num_embeddings
    return int(md.shard_offsets[0]), int(md.shard_sizes[0])


def allocated_bytes(table: nn.Module) -> int:
    """Bytes really allocated by a table shard: the storages of all its tensors (buffers, parameters and
    tensors held as plain attributes, e.g. pending replica gradients), each storage counted once. A member
    of a fused store counts its own views of the store's tensors (its share), not the whole store."""
    tensors = list(table.buffers()) + list(table.parameters())
    for m in table.modules():
        tensors += [v for v in vars(m).values() if isinstance(v, torch.Tensor)]
    store = getattr(table, "_fused", None)
    shared = store.storage_ptrs() if store is not None else set()
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() in shared:
            key, nbytes = (t.data_ptr(), t.numel() * t.element_size()), t.numel() * t.element_size()
        else:
            key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in seen:
            continue
        seen.add(key)
        total += nbytes
    return total


# ---------------------------------------------------------------------------- building shards
@dataclasses.dataclass
class TableShard:
    """One local shard: the table, its global row range and the group its replicated state spans."""

    name: str
    config: object  # the unsharded table's config
    table: CompressedTable
    sharding_type: str
    row_start: int
    rows: int
    replicated_group: Optional[dist.ProcessGroup] = None  # row-wise: the group summing replicated gradients
    label_aware: bool = False  # its kind reads training labels


def shard_builder(config, optimizer, seed: int, sharding_type: str, row_start: int, rows: int,
                  source: Optional[nn.Module] = None) -> Callable[[torch.device], CompressedTable]:
    """What builds this rank's shard of a table (rows ``[row_start, row_start + rows)``) on a device: only the
    owned rows are allocated and initialised. ``source``: an unsharded table with real storage whose state
    the shard takes (a chunk at a time) instead of its own initial values."""
    if sharding_type not in (ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value):
        raise ValueError(f"table {config.name!r}: compressed tables shard table_wise or row_wise, not {sharding_type}")
    kind = kind_of(config)
    row_wise = sharding_type == ShardingType.ROW_WISE.value

    @torch.no_grad()
    def build(device: torch.device) -> CompressedTable:
        table = kind.build(config, optimizer, row_start, rows, device, seed, row_wise=row_wise)
        if source is not None and not _is_meta(source) and not _is_meta(table):
            kind.load_state(table, DictStateReader(kind.local_state(source)), row_start)
        return table

    return build


def build_table_shard(
    name: str,
    config,
    optimizer,
    seed: int,
    sharding_type: str,
    row_start: int,
    rows: int,
    device: torch.device,
    pg: Optional[dist.ProcessGroup],
    source: Optional[nn.Module] = None,
) -> TableShard:
    """This rank's shard of table ``name`` on its own (see :func:`shard_builder`; a kernel builds its shards
    together, in fused stores)."""
    table = shard_builder(config, optimizer, seed, sharding_type, row_start, rows, source)(device)
    return table_shard(name, config, table, sharding_type, row_start, rows, pg)


def table_shard(name: str, config, table: CompressedTable, sharding_type: str, row_start: int, rows: int,
                pg: Optional[dist.ProcessGroup]) -> TableShard:
    kind = kind_of(config)
    group = pg if sharding_type == ShardingType.ROW_WISE.value else None
    if group is not None and kind.replicated_state and dist.get_world_size(group) == 1:
        table.update_replicas_in_backward()  # no other rank holds a replica: nothing to sum
        group = None
    return TableShard(name, config, table, sharding_type, row_start, rows, group, kind.label_aware)


def _is_meta(table: nn.Module) -> bool:
    t = next(iter(table.buffers()), None)
    return t is not None and t.device.type == "meta"


# ---------------------------------------------------------------------------- lookup kernel
class LabelBox:
    """Labels of the global batch (rank order) for the coming training lookups, oldest first.

    ``record_labels`` appends one entry per batch; the first training lookup after it takes the
    oldest. A FIFO, not a slot: ``TrainPipelineSparseDist`` fetches batch ``i + 1`` (and a trainer
    records its labels) before batch ``i``'s forward runs.
    """

    def __init__(self) -> None:
        self.queue: "collections.deque[torch.Tensor]" = collections.deque()
        self.labels: Optional[torch.Tensor] = None  # the batch being looked up now
        self.busy = False  # inside a lookup (labels taken once per batch)

    def push(self, labels: torch.Tensor) -> None:
        self.queue.append(labels)

    def take(self) -> None:
        """Move the oldest recorded labels to :attr:`labels` (None if nothing was recorded)."""
        self.labels = self.queue.popleft() if self.queue else None

    def clear(self) -> None:
        self.queue.clear()
        self.labels = None


def _sample_bags(kjt_values: List[torch.Tensor], kjt_lengths: List[torch.Tensor], batch: int):
    """Merge the bags of several features sharing a table into one bag per sample (ids, offsets)."""
    if len(kjt_values) == 1:
        lengths = kjt_lengths[0]
        return kjt_values[0], torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
    ids = torch.cat(kjt_values)
    sample = torch.cat(
        [torch.repeat_interleave(torch.arange(batch, device=l.device), l) for l in kjt_lengths]
    )
    order = torch.sort(sample, stable=True).indices
    lengths = torch.stack(kjt_lengths).sum(0)
    return ids.index_select(0, order), torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)


class _Segment(NamedTuple):
    """One call of a kernel's lookup: a fused store over several shards (``members``: the member each feature
    reads) or one shard, and the features it reads (positions in the kernel's features)."""

    source: object
    features: List[int]
    members: List[int]
    shard: Optional[TableShard]


class CompressedEmbeddingBagKernel(BaseEmbedding):
    """TorchRec embedding kernel over local :class:`TableShard` s: one lookup per fused store of shards
    (:mod:`~torchrec_shark.modules.fused_store`) and one per shard outside any store."""

    def __init__(self, config: GroupedEmbeddingConfig, shards: List[TableShard], labels: LabelBox,
                 stores: Sequence[FusedRowStore] = ()) -> None:
        super().__init__()
        self._config = config
        # plain attributes: not submodules (see the module docstring)
        self.__dict__["_shards"] = shards
        self.__dict__["_labels"] = labels
        self.__dict__["_stores"] = list(stores)
        self._features_per_table = [t.num_features() for t in config.embedding_tables]
        self._dims = [t.local_cols for t in config.embedding_tables]
        first = [sum(self._features_per_table[:i]) for i in range(len(shards))]
        features_of = [list(range(f, f + n)) for f, n in zip(first, self._features_per_table)]
        position = {id(s.table): i for i, s in enumerate(shards)}
        segments, fused = [], set()
        for store in stores:
            tables = [position[id(t)] for t in store.members]
            fused.update(tables)
            segments.append(_Segment(store, [f for i in tables for f in features_of[i]],
                                     [j for j, i in enumerate(tables) for _ in features_of[i]], None))
        for i, shard in enumerate(shards):
            if i not in fused:
                segments.append(_Segment(shard.table, features_of[i], [0] * len(features_of[i]), shard))
        self.__dict__["_segments"] = segments
        self._whole = len(segments) == 1 and segments[0].features == list(range(sum(self._features_per_table)))

    @property
    def config(self) -> GroupedEmbeddingConfig:
        return self._config

    @property
    def shards(self) -> List[TableShard]:
        return self.__dict__["_shards"]

    @property
    def stores(self) -> List[FusedRowStore]:
        """The fused stores over this kernel's shards."""
        return self.__dict__["_stores"]

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        batch = features.stride()
        nf = len(features.keys())
        lengths = features.lengths().view(-1, batch) if features.lengths().numel() else features.lengths().new_zeros(
            nf, batch
        )
        values = features.values()
        weights = features.weights_or_none()
        counts = lengths.sum(1).tolist()
        labels = self.__dict__["_labels"].labels if self.training else None
        if labels is not None and labels.numel() != batch:
            raise RuntimeError(f"{labels.numel()} gathered labels for a global batch of {batch}")
        segments = self.__dict__["_segments"]
        if self._whole and isinstance(segments[0].source, FusedRowStore):  # one store reads every feature
            seg = segments[0]
            offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths.reshape(-1))
            return seg.source.lookup(values, offsets, seg.members, counts, [batch] * nf, weights, labels,
                                     sample_major=True)
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        out: List[Optional[torch.Tensor]] = [None] * nf
        for seg in segments:
            fs = seg.features
            if fs == list(range(fs[0], fs[-1] + 1)):  # contiguous features: slices
                ids = values[starts[fs[0]] : starts[fs[-1] + 1]]
                seg_lengths = lengths[fs[0] : fs[-1] + 1]
                psw = None if weights is None else weights[starts[fs[0]] : starts[fs[-1] + 1]]
            else:
                ids = torch.cat([values[starts[f] : starts[f + 1]] for f in fs])
                seg_lengths = lengths[fs]
                psw = None if weights is None else torch.cat([weights[starts[f] : starts[f + 1]] for f in fs])
            offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(seg_lengths.reshape(-1))
            if isinstance(seg.source, FusedRowStore):
                pooled = seg.source.lookup(ids, offsets, seg.members, [counts[f] for f in fs], [batch] * len(fs), psw,
                                           labels)
            else:
                pooled = self._shard_lookup(seg.shard, ids, offsets, psw, seg_lengths, labels, batch)
            for f, part in zip(fs, pooled.split(batch) if len(fs) > 1 else [pooled]):
                out[f] = part
        if not out:
            return values.new_zeros(batch, 0, dtype=torch.float32)
        return torch.cat(out, dim=1)  # type: ignore[arg-type]

    def _shard_lookup(self, shard: TableShard, ids, offsets, psw, lengths, labels, batch: int) -> torch.Tensor:
        """One shard's lookup of its features' bags (``F * B`` bags), recording labels for label-aware kinds."""
        table = shard.table
        if table.training != self.training:
            table.train(self.training)
        if labels is not None and shard.label_aware:
            nf = lengths.shape[0]
            fl = [lengths[i] for i in range(nf)]
            fv = list(ids.split(lengths.sum(1).tolist())) if nf > 1 else [ids]
            ids_s, off_s = _sample_bags(fv, fl, batch)
            table.record_labels(ids_s, off_s, labels)
        return table(ids, offsets, psw)  # [F * B, D]

    # TorchRec's lookup walks these; the kernel exposes no parameters and no state of its own.
    def state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False):  # type: ignore[override]
        if destination is None:
            from collections import OrderedDict

            destination = OrderedDict()
        return destination

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):  # type: ignore[override]
        return iter(())

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):  # type: ignore[override]
        return iter(())

    def named_parameters_by_table(self):
        return iter(())

    def flush(self) -> None:
        pass

    def purge(self) -> None:
        pass
