"""``ShardedCompressedEmbeddingBagCollection``: TorchRec's sharded EBC over compressed table shards.

Reuses TorchRec's table-wise / row-wise sharding end to end (input dist, output dist, MEAN
callback, ``TrainPipelineSparseDist``); only the lookup kernels are ours
(:mod:`~torchrec_shark.distributed.compressed_kernels`). Every table of the collection (stock
fp32 ones included) runs on the ``customized_kernel`` compute kernel, as a per-shard
:class:`~torchrec_shark.modules.base.CompressedTable`.

Training protocol, the same as the unsharded collection's::

    sharded.record_labels(local_kjt, local_labels)  # all-gathers the labels (global-batch order)
    loss = model(batch); loss.backward()             # tables update in backward
    optimizer.step()                                 # our KeyedOptimizer: TT replica all-reduce + step_end

Labels: each rank all-gathers the ``B`` local labels over the sharding group (rank order),
which is the bag order of the global batch the kernels receive after the input dist; the
kernel counts every (row, sample) pair of the rows it owns, so priorities count samples from
every rank. (The alternative, routing a per-id label through the KJT weights path, would
make the collection weighted and change the input dist.)

State: :meth:`state_dict` gives, per table, ``embedding_bags.<t>.<part>`` as ``ShardedTensor`` s
with global shapes (no collective to build them), so ``torch.distributed.checkpoint`` saves on
N ranks and loads on M ranks or under another sharding type:

* row stores: ``weight`` [N, D] fp32 (logical values), ``tier`` [N] int8, and for mixed
  precision ``priority`` [N] fp32; loading re-quantises the rows (nearest rounding) into the
  tiers, per shard budgets;
* tensor train: ``core_0`` [1, p1, q1, R1] sharded by first-core slices, ``core_<k>`` (k >= 1) as
  plain tensors (replicated: identical on every rank that holds the table), ``frequency`` [N]
  when the table has an LFU cache. The cache's rows are *not* carried: a loaded table starts
  with an empty cache and reads every row from the cores (checkpoint TT tables with caches after
  a cache refresh has folded rows back, or accept that the cached rows' latest updates are lost).

The fused optimizer (:class:`ShardedCompressedOptimizer`) exposes the tables' optimizer state
the same way (row-indexed state as ``[N, ...]`` ShardedTensors that are *views* of the live
state; TT first-core state by slice; replicated state as plain tensors).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata
from torch.distributed._shard.sharded_tensor.metadata import TensorProperties
from torch.distributed.tensor import DTensor
from torchrec.distributed.embedding_lookup import GroupedPooledEmbeddingsLookup
from torchrec.distributed.embedding_sharding import EmbeddingShardingInfo
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.distributed.sharding.rw_sharding import RwPooledEmbeddingSharding
from torchrec.distributed.sharding.tw_sharding import TwPooledEmbeddingSharding
from torchrec.distributed.types import ParameterSharding, ShardingEnv, ShardingType
from torchrec.modules.embedding_configs import EmbeddingTableConfig
from torchrec.optim.keyed import KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_shark.distributed.compressed_kernels import (
    CompressedEmbeddingBagKernel,
    LabelBox,
    TableShard,
    allocated_bytes,
    build_table_shard,
    shard_row_range,
    table_kind,
)
from torchrec_shark.distributed.fused_params import optimizer_spec_from_fused_params, with_optimizer
from torchrec_shark.modules.base import CompressedTable
from torchrec_shark.modules.specs import TensorTrain

logger = logging.getLogger(__name__)

SHARK_KIND = "shark_kind"


# ---------------------------------------------------------------------------- context
class _Context:
    """What the kernels need from the unsharded module; built before TorchRec's constructor runs."""

    def __init__(self, module, env: ShardingEnv, device: Optional[torch.device],
                 fused_params: Optional[Dict[str, Any]] = None) -> None:
        self.configs = {c.name: c for c in module.embedding_bag_configs()}
        # The sharder's fused_params choose the shards' optimizer, as they do a TBE's (never ignored).
        spec = optimizer_spec_from_fused_params(fused_params, module._optimizer_spec)
        self.sources: Dict[str, nn.Module] = {
            n: with_optimizer(t, self.configs[n], spec) for n, t in module.embedding_bags.items()
        }
        self.env = env
        self.device = device if device is not None else torch.device("cpu")
        self.labels = LabelBox()
        self.shards: Dict[str, TableShard] = {}
        self.lr = float(spec.lr)

    def build(self, table, sharding_type: str, pg) -> TableShard:
        r0, n = shard_row_range(table)
        shard = build_table_shard(table.name, self.configs[table.name], self.sources[table.name], sharding_type, r0, n,
                                  self.device, pg)
        if table.name in self.shards:
            raise ValueError(f"table {table.name!r}: more than one shard on one rank is not supported")
        self.shards[table.name] = shard
        return shard


class _CompressedLookup(GroupedPooledEmbeddingsLookup):
    def __init__(self, ctx: _Context, shark_sharding_type: str, **kwargs) -> None:
        self.__dict__["_shark_ctx"] = ctx
        self.__dict__["_shark_type"] = shark_sharding_type
        super().__init__(**kwargs)

    def _create_embedding_kernel(self, config, device, pg, sharding_type, env):
        if config.compute_kernel != EmbeddingComputeKernel.CUSTOMIZED_KERNEL:
            raise ValueError(
                f"compressed collection tables run on customized_kernel, got {config.compute_kernel} for "
                f"{config.table_names()}"
            )
        ctx: _Context = self.__dict__["_shark_ctx"]
        shards = [ctx.build(t, self.__dict__["_shark_type"], pg) for t in config.embedding_tables]
        return CompressedEmbeddingBagKernel(config, shards, ctx.labels)


class CompressedTwSharding(TwPooledEmbeddingSharding):
    def create_lookup(self, device=None, fused_params=None, feature_processor=None):
        return _CompressedLookup(
            self._shark_ctx, ShardingType.TABLE_WISE.value, grouped_configs=self._grouped_embedding_configs,
            pg=self._pg, device=device if device is not None else self._device, feature_processor=feature_processor,
            env=self._env,
        )


class CompressedRwSharding(RwPooledEmbeddingSharding):
    def create_lookup(self, device=None, fused_params=None, feature_processor=None):
        return _CompressedLookup(
            self._shark_ctx, ShardingType.ROW_WISE.value, grouped_configs=self._grouped_embedding_configs,
            pg=self._pg, device=device if device is not None else self._device, feature_processor=feature_processor,
            sharding_type=ShardingType.ROW_WISE, env=self._env,
        )


# ---------------------------------------------------------------------------- ShardedTensor helpers
def _placements(ps: ParameterSharding) -> List[Tuple[int, int, int, Any]]:
    """``(rank, first row, rows, placement)`` of every shard of a table, by first row."""
    shards = ps.sharding_spec.shards  # type: ignore[union-attr]
    out = [(md.placement.rank(), int(md.shard_offsets[0]), int(md.shard_sizes[0]), md.placement) for md in shards]
    return sorted(out, key=lambda x: x[1])


def make_sharded(
    local: Optional[torch.Tensor],
    pieces: List[Tuple[int, int, int, Any]],
    global_size: List[int],
    dim: int,
    dtype: torch.dtype,
    pg,
) -> ShardedTensor:
    """A ShardedTensor split along ``dim`` into ``pieces`` ``(rank, offset, length, placement)``; ``local``
    is this rank's piece (a detached view where possible). No collective."""
    me = dist.get_rank(pg)
    mds, local_shards = [], []
    for rank, off, length, placement in pieces:
        offsets = [0] * len(global_size)
        sizes = list(global_size)
        offsets[dim], sizes[dim] = off, length
        md = ShardMetadata(shard_offsets=offsets, shard_sizes=sizes, placement=placement)
        mds.append(md)
        if rank == me:
            assert local is not None and list(local.shape) == sizes, (list(local.shape) if local is not None else None, sizes)
            local_shards.append(Shard(tensor=local.detach(), metadata=md))
    meta = ShardedTensorMetadata(
        shards_metadata=mds, size=torch.Size(global_size), tensor_properties=TensorProperties(dtype=dtype)
    )
    return ShardedTensor._init_from_local_shards_and_global_metadata(local_shards, meta, process_group=pg)


def read_local(value: Any, offset: int, length: int, dim: int) -> torch.Tensor:
    """This rank's range ``[offset, offset + length)`` along ``dim`` of a loaded value (ShardedTensor whose
    local shards cover it, DTensor, or a full tensor)."""
    if isinstance(value, ShardedTensor):
        parts = []
        for s in sorted(value.local_shards(), key=lambda s: s.metadata.shard_offsets[dim]):
            o, n = s.metadata.shard_offsets[dim], s.metadata.shard_sizes[dim]
            lo, hi = max(o, offset), min(o + n, offset + length)
            if hi > lo:
                parts.append(s.tensor.narrow(dim, lo - o, hi - lo))
        out = torch.cat(parts, dim) if parts else None
        if out is None or out.shape[dim] != length:
            raise ValueError(f"loaded ShardedTensor does not cover rows [{offset}, {offset + length}) locally")
        return out
    if isinstance(value, DTensor):
        value = value.full_tensor()
    return value.narrow(dim, offset, length)


# ---------------------------------------------------------------------------- state layout
class _TableState:
    """How one table's state maps onto global tensors (known on every rank, shard or not)."""

    def __init__(self, name: str, config, source, ps: ParameterSharding) -> None:
        self.name = name
        self.config = config
        self.is_tt = isinstance(getattr(config, "compression", None), TensorTrain)
        self.pieces = _placements(ps)
        self.sharding_type = ps.sharding_type
        if self.is_tt:
            lay = source.layout
            self.layout = lay
            block = lay.first_core_block
            self.slice_pieces = []
            for i, (rank, r0, n, pl) in enumerate(self.pieces):
                last = i == len(self.pieces) - 1
                s0 = r0 // block
                ns = (lay.row_factors[0] - s0) if last else -(-n // block)
                self.slice_pieces.append((rank, s0, ns, pl))
            self.has_cache = bool(getattr(source, "cache_rows", 0))
        else:
            self.kind_keys = ["weight", "tier"] + (["priority"] if hasattr(source, "priorities") else [])

    def keys(self) -> List[str]:
        if self.is_tt:
            keys = [f"core_{k}" for k in range(self.layout.num_cores)]
            return keys + (["frequency"] if self.has_cache else [])
        return list(self.kind_keys)


class ShardedCompressedEmbeddingBagCollection(ShardedEmbeddingBagCollection):
    """Sharded :class:`~torchrec_shark.modules.embedding_bag_collection.CompressedEmbeddingBagCollection`."""

    def __init__(
        self,
        module,
        table_name_to_parameter_sharding: Dict[str, ParameterSharding],
        env: ShardingEnv,
        fused_params: Optional[Dict[str, Any]] = None,
        device: Optional[torch.device] = None,
        qcomm_codecs_registry=None,
        module_fqn: Optional[str] = None,
        sharded_module_order_overwrite: Optional[List[str]] = None,
    ) -> None:
        for name, ps in table_name_to_parameter_sharding.items():
            if ps.compute_kernel != EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value:
                raise ValueError(f"table {name!r}: compute kernel {ps.compute_kernel}; compressed collections need "
                                 "customized_kernel (use CompressedEmbeddingBagCollectionSharder)")
            if ps.sharding_type not in (ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value):
                raise ValueError(f"table {name!r}: sharding type {ps.sharding_type}; compressed tables shard "
                                 "table_wise or row_wise")
        self.__dict__["_shark"] = _Context(module, env, device, fused_params)
        super().__init__(module, table_name_to_parameter_sharding, env, fused_params, device, qcomm_codecs_registry,
                         module_fqn, sharded_module_order_overwrite)
        ctx: _Context = self.__dict__["_shark"]
        self._shark_pg = env.process_group
        self._table_states = {
            name: _TableState(name, ctx.configs[name], ctx.sources[name], table_name_to_parameter_sharding[name])
            for name in self._table_names
        }
        self._shark_optim = ShardedCompressedOptimizer(ctx, self._table_states, self._shark_pg)
        self._label_aware = any(
            type(t).record_labels is not CompressedTable.record_labels for t in ctx.sources.values()
        )
        self._warned_no_labels = False
        ctx.sources = {}  # the unsharded tables are no longer needed: keep only the local shards alive
        self._register_state_dict_hook(ShardedCompressedEmbeddingBagCollection._shark_post_state_dict_hook)
        self._register_load_state_dict_pre_hook(self._shark_load_pre_hook, with_module=True)

    # ------------------------------------------------------------------ construction overrides
    @classmethod
    def create_grouped_sharding_infos(
        cls, module, table_name_to_parameter_sharding, prefix, fused_params, suffix="weight"
    ) -> Dict[str, List[EmbeddingShardingInfo]]:
        shared: Dict[str, int] = {}
        for c in module.embedding_bag_configs():
            for f in c.feature_names:
                shared[f] = shared.get(f, 0) + 1
        out: Dict[str, List[EmbeddingShardingInfo]] = OrderedDict()
        for c in module.embedding_bag_configs():
            ps = table_name_to_parameter_sharding[c.name]
            names = [f"{f}@{c.name}" if shared[f] > 1 else f for f in c.feature_names]
            info = EmbeddingShardingInfo(
                embedding_config=EmbeddingTableConfig(
                    num_embeddings=c.num_embeddings, embedding_dim=c.embedding_dim, name=c.name,
                    data_type=c.data_type, feature_names=list(c.feature_names), pooling=c.pooling,
                    is_weighted=module.is_weighted(), has_feature_processor=False, embedding_names=names,
                    weight_init_max=c.weight_init_max, weight_init_min=c.weight_init_min,
                ),
                param_sharding=ps,
                param=torch.empty(c.num_embeddings, c.embedding_dim, device="meta"),
                fused_params={SHARK_KIND: table_kind(c)},
            )
            out.setdefault(ps.sharding_type, []).append(info)
        return out

    def create_embedding_bag_sharding(self, sharding_infos, env, device=None, permute_embeddings=False,
                                      qcomm_codecs_registry=None):  # type: ignore[override]
        st = sharding_infos[0].param_sharding.sharding_type
        cls = {ShardingType.TABLE_WISE.value: CompressedTwSharding, ShardingType.ROW_WISE.value: CompressedRwSharding}[st]
        sharding = cls(sharding_infos, env, device, qcomm_codecs_registry=qcomm_codecs_registry)
        sharding._shark_ctx = self.__dict__["_shark"]
        return sharding

    def reset_parameters(self) -> None:
        """Shards are initialised from the unsharded tables when they are built."""

    @property
    def unsharded_module_type(self):
        from torchrec_shark.modules.embedding_bag_collection import CompressedEmbeddingBagCollection

        return CompressedEmbeddingBagCollection

    # ------------------------------------------------------------------ training protocol
    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        return self._shark_optim

    @property
    def table_shards(self) -> Dict[str, TableShard]:
        """The local shards by table name (tables with no shard on this rank are absent)."""
        return self.__dict__["_shark"].shards

    def record_labels(self, features: KeyedJaggedTensor, labels: torch.Tensor) -> None:
        """All-gather a batch's labels (rank order = global-batch bag order) for its training lookup.

        Call once per training batch, in batch order, before that batch's forward (under
        ``TrainPipelineSparseDist`` too, ``DLRMTrain.forward`` does it); every rank must call it (a collective).
        """
        if isinstance(labels, torch.fx.Proxy):  # TrainPipelineSparseDist traces the model to find module inputs
            return
        labels = labels.reshape(-1).float()
        pg = self._shark_pg
        world = dist.get_world_size(pg)
        if world == 1:
            gathered = labels
        else:
            n = torch.tensor([labels.numel()], device=labels.device)
            sizes = [torch.zeros_like(n) for _ in range(world)]
            dist.all_gather(sizes, n, group=pg)
            sizes_l = [int(s) for s in sizes]
            m = max(sizes_l)
            padded = torch.zeros(m, device=labels.device)
            padded[: labels.numel()] = labels
            parts = [torch.zeros_like(padded) for _ in range(world)]
            dist.all_gather(parts, padded, group=pg)
            gathered = torch.cat([p[:s] for p, s in zip(parts, sizes_l)])
        self.__dict__["_shark"].labels.push(gathered)

    def _labelled(self, run, *args):
        """Run a lookup with the oldest recorded labels (training only; taken once even if nested)."""
        box = self.__dict__["_shark"].labels
        outer = not getattr(box, "busy", False)
        if outer:
            box.busy = True
            if self.training:
                box.take()
                if box.labels is None and self._label_aware and not self._warned_no_labels:
                    self._warned_no_labels = True
                    logger.warning("training lookup without recorded labels: mixed-precision priorities are not "
                                   "updated (call record_labels(features, labels) before each training forward)")
        try:
            return run(*args)
        finally:
            if outer:
                box.busy = False
                box.labels = None

    def compute_and_output_dist(self, ctx, input):  # type: ignore[override]
        return self._labelled(super().compute_and_output_dist, ctx, input)

    def compute(self, ctx, dist_input):  # type: ignore[override]
        return self._labelled(super().compute, ctx, dist_input)

    def step_end(self) -> None:
        """No-op: the fused optimizer's ``step()`` closes the step (a trainer may still call this)."""

    def memory_bytes(self) -> Dict[str, Any]:
        """Bytes of this rank's shards: ``{"total", "per_table": {name: {"table", "optimizer", "allocated"}}}``
        (``table``: storage without optimizer state; ``allocated``: every tensor the shard holds)."""
        per = {}
        for name, shard in self.table_shards.items():
            t = shard.table
            opt = sum(v.numel() * v.element_size() for v in t.optimizer_state().values())
            per[name] = {"table": int(t.memory_bytes()["total"]), "optimizer": int(opt),
                         "allocated": allocated_bytes(t)}
        return {"total": sum(p["table"] + p["optimizer"] for p in per.values()), "per_table": per}

    # ------------------------------------------------------------------ state
    @staticmethod
    def _shark_post_state_dict_hook(module, destination, prefix, _local_metadata) -> None:
        for name, st in module._table_states.items():
            for key, value in module._export_table(name, st).items():
                destination[f"{prefix}embedding_bags.{name}.{key}"] = value

    def _export_table(self, name: str, st: _TableState) -> Dict[str, Any]:
        shard = self.table_shards.get(name)
        pg = self._shark_pg
        cfg = st.config
        out: Dict[str, Any] = {}
        if st.is_tt:
            lay = st.layout
            t = shard.table if shard is not None else None
            c0 = None if t is None else t.core_0[:, : shard.slices]
            out["core_0"] = make_sharded(c0, st.slice_pieces, list(lay.core_shape(0)), 1, torch.float32, pg)
            if t is not None:
                for k in range(1, lay.num_cores):
                    out[f"core_{k}"] = getattr(t, f"core_{k}").detach()
            if st.has_cache:
                f = None if t is None else t.frequency
                out["frequency"] = make_sharded(f, st.pieces, [cfg.num_embeddings], 0, torch.int32, pg)
            return out
        logical = shard.table.logical_state_dict() if shard is not None else {}
        if shard is not None and "priority" in st.kind_keys:
            logical["priority"] = shard.table.priorities()
        sizes = {"weight": ([cfg.num_embeddings, cfg.embedding_dim], torch.float32),
                 "tier": ([cfg.num_embeddings], torch.int8), "priority": ([cfg.num_embeddings], torch.float32)}
        for key in st.kind_keys:
            size, dtype = sizes[key]
            local = logical.get(key)
            out[key] = make_sharded(None if local is None else local.to(dtype), st.pieces, size, 0, dtype, pg)
        return out

    @staticmethod
    def _shark_load_pre_hook(module, state_dict, prefix, *args) -> None:
        for name, st in module._table_states.items():
            keys = {k: f"{prefix}embedding_bags.{name}.{k}" for k in st.keys()}
            present = {k: state_dict.pop(full) for k, full in keys.items() if full in state_dict}
            if not present:
                continue
            module._import_table(name, st, present)

    @torch.no_grad()
    def _import_table(self, name: str, st: _TableState, values: Dict[str, Any]) -> None:
        shard = self.table_shards.get(name)
        if shard is None:
            return
        t = shard.table
        if st.is_tt:
            ns = shard.slices
            if "core_0" in values:
                t.core_0[:, :ns].copy_(read_local(values["core_0"], shard.slice_start, ns, 1))
            for k in range(1, st.layout.num_cores):
                if f"core_{k}" in values:
                    v = values[f"core_{k}"]
                    if isinstance(v, ShardedTensor):
                        v = read_local(v, 0, v.size(0), 0)
                    elif isinstance(v, DTensor):
                        v = v.full_tensor()
                    getattr(t, f"core_{k}").copy_(v)
            if "frequency" in values:
                t.frequency.copy_(read_local(values["frequency"], shard.row_start, shard.rows, 0))
            if getattr(t, "cache_rows", 0):
                t.cache_ids.fill_(t.num_embeddings)  # cache restarts empty; rows come from the cores
            return
        state = t.logical_state_dict()
        for key in ("weight", "tier", "priority"):
            if key in values:
                state[key] = read_local(values[key], shard.row_start, shard.rows, 0).to(state.get(key, values[key]).dtype
                                                                                          if key in state else torch.float32)
        t.load_logical_state_dict(state)


# ---------------------------------------------------------------------------- fused optimizer
class ShardedCompressedOptimizer(KeyedOptimizer):
    """The local shards' fused optimizers as one ``KeyedOptimizer`` (joins DMP's combined optimizer).

    ``params``: ``embedding_bags.<t>.weight`` -> a zero-size handle per local table; ``state[handle]``:
    ``<t>.<name>`` -> global-shape ``ShardedTensor`` views of row-indexed (or first-core-slice) state,
    plain tensors for replicated/scalar state. ``step()``: pushes ``lr`` to the tables, sums the
    row-wise TT replicated-core gradients over the group and applies them (one all-reduce per step,
    zeros included, same order on every rank), then runs every table's ``step_end``.
    """

    def __init__(self, ctx: _Context, states: Dict[str, _TableState], pg) -> None:
        self._ctx = ctx
        self._pg = pg
        params: Dict[str, torch.Tensor] = {}
        state: Dict[Any, Any] = {}
        lr = ctx.lr
        for name in sorted(ctx.shards):
            shard = ctx.shards[name]
            handle = torch.empty(0)
            params[f"embedding_bags.{name}.weight"] = handle
            state[handle] = self._state_of(shard, states[name], pg)
            if lr is None:
                lr = float(shard.table.optimizer_spec.lr if hasattr(shard.table, "optimizer_spec") else shard.table.optim.lr)
        super().__init__(params, state, [{"params": list(params.values()), "lr": lr if lr is not None else 0.0}])
        self._rw_tt = sorted(n for n, s in ctx.shards.items() if s.replicated_group is not None)

    @staticmethod
    def _state_of(shard: TableShard, st: _TableState, pg) -> Dict[str, Any]:
        t, name = shard.table, shard.name
        out: Dict[str, Any] = {}
        if st.is_tt:
            ns = shard.slices
            for k, opt in enumerate(t.core_optimizers):
                p = st.layout.row_factors[k]
                for bn, b in opt.named_buffers():
                    key = f"{name}.core_{k}.{bn}"
                    if k == 0 and b.dim() > 0:
                        out[key] = make_sharded(b[:ns], st.slice_pieces, [p, *b.shape[1:]], 0, b.dtype, pg)
                    else:
                        out[key] = b
            return out
        for bn, b in t.optimizer_state().items():
            key = f"{name}.{bn}"
            if b.dim() > 0:
                out[key] = make_sharded(b, st.pieces, [st.config.num_embeddings, *b.shape[1:]], 0, b.dtype, pg)
            else:
                out[key] = b
        return out

    def _push_lr(self) -> None:
        lr = float(self.param_groups[0]["lr"])  # type: ignore[index]
        for shard in self._ctx.shards.values():
            shard.table.set_learning_rate(lr)

    def sync_replicated(self) -> None:
        """Sum the pending replicated-core gradients of every row-wise TT shard over the group and apply them."""
        if not self._rw_tt:
            return
        tables = [self._ctx.shards[n].table for n in self._rw_tt]
        flats = [t.pending_flat() for t in tables]
        if all(getattr(t, "allreduce", True) for t in tables) and dist.get_world_size(self._pg) > 1:
            flat = torch.cat(flats)
            dist.all_reduce(flat, group=self._pg)
            flats = list(flat.split([f.numel() for f in flats]))
        for t, f in zip(tables, flats):
            t.apply_flat(f)

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        self._push_lr()
        self.sync_replicated()
        for name in sorted(self._ctx.shards):
            self._ctx.shards[name].table.step_end()

    def zero_grad(self, set_to_none: bool = False) -> None:
        self._push_lr()
