"""Per-shard compressed tables and the TorchRec lookup kernel that runs them.

A kernel (:class:`CompressedEmbeddingBagKernel`) is what TorchRec's
``GroupedPooledEmbeddingsLookup`` calls for one group of table shards: it takes the
post-input-dist ``KeyedJaggedTensor`` of its features (ids already *local* to the shard under
row-wise) and returns ``[B_global, sum of feature dims]``. Every shard is an ordinary
:class:`~torchrec_shark.modules.base.CompressedTable` built through ``build_table``:

* table-wise: a copy of the unsharded table (exactly the same state, same pooling);
* row-wise, row stores (fp32 / uniform / mixed precision): an independent table over the
  shard's rows (``num_embeddings = shard rows``; mixed precision: tier budgets per shard),
  initialised from the rows of the unsharded table's logical state, pooling forced to SUM
  (TorchRec divides MEAN features after the output dist, as for TBE);
* row-wise, tensor train: :class:`ShardTensorTrainTable`, a TT table whose first core is the
  slice range of the shard (boundaries must be multiples of ``p2 * ... * pd``) and whose
  other cores are replicas; their gradients are kept until the optimizer step and summed over
  the sharding group (:meth:`ShardTensorTrainTable.sync_replicated`) before the update.

Tables are *not* registered as submodules (DDP would broadcast their buffers from rank 0 and
dense optimizers would see them); the sharded collection handles their state and optimizer.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_kernel import BaseEmbedding
from torchrec.distributed.embedding_types import GroupedEmbeddingConfig, ShardedEmbeddingTable
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_shark.modules.base import CompressedTable, build_table
from torchrec_shark.modules.kernels.sparse_optimizer import RowOptimizer
from torchrec_shark.modules.specs import TensorTrain

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- helpers
def table_kind(config) -> str:
    """Kernel-group key of a table: the compression spec's class name, ``fp32`` for stock tables."""
    spec = getattr(config, "compression", None)
    return "fp32" if spec is None else type(spec).__name__


def optimizer_spec_of(table: CompressedTable):
    """The ``SparseOptimizerSpec`` a built table uses."""
    if hasattr(table, "optimizer_spec"):
        return table.optimizer_spec
    return table.optim.spec


def tt_first_core_block(table) -> int:
    return table.layout.first_core_block


def rw_alignment_problem(config, num_rows_per_shard: int, layout=None) -> Optional[str]:
    """Why a TT table cannot be row-wise sharded with blocks of ``num_rows_per_shard`` rows (None: it can)."""
    if not isinstance(getattr(config, "compression", None), TensorTrain):
        return None
    if layout is None:
        from torchrec_shark.modules.tt_factorization import resolve_layout

        layout = resolve_layout(config.name, config.num_embeddings, config.embedding_dim, config.compression)
    block = layout.first_core_block
    if num_rows_per_shard % block:
        return (
            f"table {config.name!r}: row-wise shards of {num_rows_per_shard} rows are not multiples of the TT "
            f"first-core block p2*...*pd = {block} (row factors {layout.row_factors}); a shard would split a "
            "first-core slice, so the table is constrained to table_wise"
        )
    return None


def shard_row_range(table: ShardedEmbeddingTable) -> Tuple[int, int]:
    md = table.local_metadata
    if md is None:
        return 0, table.num_embeddings
    return int(md.shard_offsets[0]), int(md.shard_sizes[0])


def row_layout(table: ShardedEmbeddingTable) -> List[Tuple[int, int, int]]:
    """``(rank, first row, rows)`` of every shard of the table, ordered by first row."""
    out = []
    for md in table.global_metadata.shards_metadata:
        out.append((md.placement.rank(), int(md.shard_offsets[0]), int(md.shard_sizes[0])))
    return sorted(out, key=lambda x: x[1])


def allocated_bytes(table: nn.Module) -> int:
    """Bytes really allocated by a table shard: the storages of all its tensors (buffers, parameters and
    tensors held as plain attributes, e.g. pending replica gradients), each storage counted once."""
    tensors = list(table.buffers()) + list(table.parameters())
    for m in table.modules():
        tensors += [v for v in vars(m).values() if isinstance(v, torch.Tensor)]
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


# ---------------------------------------------------------------------------- TT row-wise shard
def _tt_class():
    from torchrec_shark.modules.tensor_train import TensorTrainTable

    return TensorTrainTable


class DeferredRowOptimizer(RowOptimizer):
    """A :class:`RowOptimizer` whose ``update`` only records the gradient (dense per optimizer row) and
    returns the rows unchanged; :meth:`apply_pending` applies the (group-summed) gradients later."""

    def __init__(self, spec, num_rows: int, dim: int, device=None) -> None:
        super().__init__(spec, num_rows, dim, device)
        self.__dict__["pending_grad"] = torch.zeros(num_rows, dim, device=device)
        self.__dict__["pending_touched"] = torch.zeros(num_rows, device=device)

    @torch.no_grad()
    def update(self, rows: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        self.pending_grad.index_add_(0, rows, g.to(self.pending_grad.dtype))
        self.pending_touched.index_fill_(0, rows, 1.0)
        return w

    def apply_now(self, rows, w, g):
        return RowOptimizer.update(self, rows, w, g)


def make_shard_tt_class():
    TensorTrainTable = _tt_class()

    class ShardTensorTrainTable(TensorTrainTable):
        """A row-wise shard of a TT table: first-core slices ``[s0, s0 + p1')`` and replicas of the other cores.

        The fused backward updates the first core (and cache) at once, as the unsharded table does;
        the replicated cores' optimizers are :class:`DeferredRowOptimizer` s, so their gradients wait
        for :meth:`apply_flat`, which the sharded optimizer calls with the gradients summed over the
        sharding group. Every rank of the group must take part once per step, in the same table order,
        whether or not it saw ids (zeros are sent).
        """

        allreduce = True  # negative control: False applies local gradients only (replicas drift apart)

        def __init__(self, config, optimizer=None, device=None, **kw) -> None:
            super().__init__(config, optimizer, device, **kw)
            for k in range(1, self.layout.num_cores):
                old = self.core_optimizers[k]
                p = self.layout.row_factors[k]
                new = DeferredRowOptimizer(old.spec, p, math.prod(self.layout.core_shape(k)) // p, device)
                new.load_state_dict(old.state_dict())
                new.lr = old.lr
                self.core_optimizers[k] = new

        def pending_flat(self) -> torch.Tensor:
            parts = []
            for k in range(1, self.layout.num_cores):
                opt = self.core_optimizers[k]
                parts += [opt.pending_grad.reshape(-1), opt.pending_touched]
            return torch.cat(parts)

        @torch.no_grad()
        def apply_flat(self, flat: torch.Tensor) -> None:
            """Apply (summed) pending gradients laid out as :meth:`pending_flat`; reset them."""
            pos = 0
            for k in range(1, self.layout.num_cores):
                opt = self.core_optimizers[k]
                g_buf, t_buf = opt.pending_grad, opt.pending_touched
                g = flat[pos : pos + g_buf.numel()].view_as(g_buf)
                pos += g_buf.numel()
                touched = flat[pos : pos + t_buf.numel()]
                pos += t_buf.numel()
                ids = (touched > 0).nonzero().squeeze(1)
                slices = self.cores[k].transpose(0, 1)
                n = ids.numel()
                if n:
                    w = slices.index_select(0, ids).reshape(n, -1)
                    new = opt.apply_now(ids, w, g.index_select(0, ids))
                    slices.index_copy_(0, ids, new.view(n, *slices.shape[1:]))
                g_buf.zero_()
                t_buf.zero_()
            if hasattr(self, "version"):
                self.version += 1

    return ShardTensorTrainTable


_SHARD_TT = None


def shard_tt_class():
    global _SHARD_TT
    if _SHARD_TT is None:
        _SHARD_TT = make_shard_tt_class()
    return _SHARD_TT


# ---------------------------------------------------------------------------- building shards
@dataclasses.dataclass
class TableShard:
    """One local shard: the table, its global row range and how its state maps onto the global table."""

    name: str
    config: object  # the unsharded table's config
    table: CompressedTable
    sharding_type: str
    row_start: int
    rows: int
    slice_start: int = 0  # TT: first-core slices owned
    slices: int = 0
    replicated_group: Optional[dist.ProcessGroup] = None  # RW TT: group whose replicas must agree


def _shard_config(config, rows: int, spec=None, pooling=None):
    kw = dict(num_embeddings=rows)
    if spec is not None:
        kw["compression"] = spec
    if pooling is not None:
        kw["pooling"] = pooling
    return dataclasses.replace(config, **kw)


@torch.no_grad()
def build_table_shard(
    name: str,
    config,
    source: CompressedTable,
    sharding_type: str,
    row_start: int,
    rows: int,
    device: torch.device,
    pg: Optional[dist.ProcessGroup],
) -> TableShard:
    """Build the local shard of table ``name`` from the unsharded table ``source`` (same values and state)."""
    opt = optimizer_spec_of(source)
    if sharding_type == ShardingType.TABLE_WISE.value:
        table = copy.deepcopy(source).to(device)
        slices = source.layout.row_factors[0] if isinstance(getattr(config, "compression", None), TensorTrain) else 0
        return TableShard(name, config, table, sharding_type, 0, config.num_embeddings, 0, slices)
    if sharding_type != ShardingType.ROW_WISE.value:
        raise ValueError(f"table {name!r}: compressed tables shard table_wise or row_wise, not {sharding_type}")
    spec = getattr(config, "compression", None)
    if isinstance(spec, TensorTrain):
        lay = source.layout
        block = lay.first_core_block
        last = row_start + rows >= config.num_embeddings
        if row_start % block or (not last and rows % block):
            raise ValueError(
                f"table {name!r}: row-wise shard rows [{row_start}, {row_start + rows}) are not aligned to the TT "
                f"first-core block p2*...*pd = {block}; constrain the table to table_wise "
                "(compressed_constraints() does this)"
            )
        s0 = row_start // block
        ns = (lay.row_factors[0] - s0) if last else -(-rows // block)
        local_factors = (max(2, ns),) + tuple(lay.row_factors[1:])
        local_spec = dataclasses.replace(
            spec, row_factors=local_factors, col_factors=tuple(lay.col_factors), ranks=tuple(lay.ranks[1:-1])
        )
        cfg = _shard_config(config, rows, local_spec, PoolingType.SUM)
        table = shard_tt_class()(cfg, opt, device=device)
        table.core_0[:, :ns].copy_(source.core_0[:, s0 : s0 + ns])
        for k in range(1, lay.num_cores):
            getattr(table, f"core_{k}").copy_(getattr(source, f"core_{k}"))
        for k, (dst, src) in enumerate(zip(table.core_optimizers, source.core_optimizers)):
            for (bn, b), (_, sb) in zip(dst.named_buffers(), src.named_buffers()):
                if b.dim() == 0:
                    b.copy_(sb)
                elif k == 0:
                    b[:ns].copy_(sb[s0 : s0 + ns])
                else:
                    b.copy_(sb)
        if getattr(table, "cache_rows", 0):
            table.frequency.copy_(source.frequency[row_start : row_start + rows])
            if source._cached_count():
                logger.warning("table %r: the TT cache is not carried into row-wise shards (rows are read from the cores)", name)
        return TableShard(name, config, table, sharding_type, row_start, rows, s0, ns, pg)
    # row stores: an independent table over the shard's rows
    cfg = _shard_config(config, rows, pooling=PoolingType.SUM)
    table = build_table(cfg, opt, device)
    if not hasattr(source, "logical_state_dict"):
        raise ValueError(f"table {name!r}: kind {type(source).__name__} has no logical state to slice for row-wise")
    full = source.logical_state_dict()
    table.load_logical_state_dict(
        {k: (v if v.dim() == 0 else v[row_start : row_start + rows]).to(device) for k, v in full.items()}
    )
    return TableShard(name, config, table, sharding_type, row_start, rows)


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


class CompressedEmbeddingBagKernel(BaseEmbedding):
    """TorchRec embedding kernel over local :class:`TableShard` s (one lookup per table and step)."""

    def __init__(self, config: GroupedEmbeddingConfig, shards: List[TableShard], labels: LabelBox) -> None:
        super().__init__()
        self._config = config
        # plain attributes: not submodules (see the module docstring)
        self.__dict__["_shards"] = shards
        self.__dict__["_labels"] = labels
        self._features_per_table = [t.num_features() for t in config.embedding_tables]
        self._dims = [t.local_cols for t in config.embedding_tables]

    @property
    def config(self) -> GroupedEmbeddingConfig:
        return self._config

    @property
    def shards(self) -> List[TableShard]:
        return self.__dict__["_shards"]

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        batch = features.stride()
        lengths = features.lengths().view(-1, batch) if features.lengths().numel() else features.lengths().new_zeros(
            len(features.keys()), batch
        )
        values = features.values()
        weights = features.weights_or_none()
        counts = lengths.sum(1).tolist()
        vals = list(values.split(counts))
        wts = list(weights.split(counts)) if weights is not None else [None] * len(counts)
        labels = self.__dict__["_labels"].labels
        out: List[torch.Tensor] = []
        f = 0
        for shard, nf in zip(self.shards, self._features_per_table):
            table = shard.table
            if table.training != self.training:
                table.train(self.training)
            fv, fl, fw = vals[f : f + nf], [lengths[i] for i in range(f, f + nf)], wts[f : f + nf]
            f += nf
            if self.training and labels is not None and hasattr(table, "record_labels"):
                if labels.numel() != batch:
                    raise RuntimeError(
                        f"table {shard.name!r}: {labels.numel()} gathered labels for a global batch of {batch}"
                    )
                ids_s, off_s = _sample_bags(fv, fl, batch)
                table.record_labels(ids_s, off_s, labels)
            # one lookup per table: the features' bags one after another (F * B bags)
            ids = torch.cat(fv) if nf > 1 else fv[0]
            offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(torch.cat(fl) if nf > 1 else fl[0])
            psw = None
            if fw[0] is not None:
                psw = torch.cat(fw) if nf > 1 else fw[0]
            pooled = table(ids, offsets, psw)  # [F * B, D]
            out.extend(pooled.split(batch) if nf > 1 else [pooled])
        if not out:
            return values.new_zeros(batch, 0, dtype=torch.float32)
        return torch.cat(out, dim=1)

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
