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
    shard_builder,
    shard_row_range,
    table_kind_key,
    table_shard,
)
from torchrec_shark.modules.fused_store import FusedRowStore, build_fused
from torchrec_shark.modules.kinds import kind_of
from torchrec_shark.distributed.fused_params import optimizer_spec_from_fused_params
from torchrec_shark.distributed.label_gather import LabelGather
from torchrec_shark.distributed.state_readers import DictStateReader
from torchrec_shark.modules.base import SparseOptimizerSpec
from torchrec_shark.modules.table_kind import CHUNK_ROWS, PieceSpec, StateReader, table_seed

logger = logging.getLogger(__name__)

SHARK_KIND = "shark_kind"


# ---------------------------------------------------------------------------- context
class _Context:
    """What the kernels need from the unsharded module; built before TorchRec's constructor runs."""

    def __init__(self, module, env: ShardingEnv, device: Optional[torch.device],
                 fused_params: Optional[Dict[str, Any]] = None) -> None:
        self.configs = {c.name: c for c in module.embedding_bag_configs()}
        # Unsharded tables with real storage hand their state to the shards; on ``meta`` they hold nothing
        # and each shard initialises its own rows.
        self.sources: Dict[str, nn.Module] = dict(module.embedding_bags.items())
        self.init_seed = int(getattr(module, "init_seed", torch.initial_seed()))
        # The sharder's fused_params choose the shards' optimizer, as they do a TBE's (never ignored).
        self.optimizer: SparseOptimizerSpec = optimizer_spec_from_fused_params(
            fused_params, getattr(module, "_optimizer_spec", SparseOptimizerSpec()))
        self.env = env
        self.device = device if device is not None else torch.device("cpu")
        self.labels = LabelBox()
        self.shards: Dict[str, TableShard] = {}
        self.stores: List[FusedRowStore] = []  # fused stores over this rank's shards (one per kernel and layout)
        self.lr = float(self.optimizer.lr)
        self.fused = bool(getattr(module, "fused", True))

    def build(self, tables, sharding_type: str, pg) -> Tuple[List[TableShard], List[FusedRowStore]]:
        """This rank's shards of a kernel's ``tables``; row stores of one layout share a fused store."""
        builders, ranges = [], []
        for table in tables:
            if table.name in self.shards:
                raise ValueError(f"table {table.name!r}: more than one shard on one rank is not supported")
            r0, n = shard_row_range(table)
            ranges.append((r0, n))
            builders.append(shard_builder(self.configs[table.name], self.optimizer,
                                          table_seed(self.init_seed, table.name), sharding_type, r0, n,
                                          self.sources.get(table.name)))
        built, stores = build_fused(builders, self.device) if self.fused else ([b(self.device) for b in builders], [])
        shards = []
        for table, (r0, n), t in zip(tables, ranges, built):
            shard = table_shard(table.name, self.configs[table.name], t, sharding_type, r0, n, pg)
            self.shards[table.name] = shard
            shards.append(shard)
        self.stores.extend(stores)
        return shards, stores


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
        shards, stores = ctx.build(config.embedding_tables, self.__dict__["_shark_type"], pg)
        return CompressedEmbeddingBagKernel(config, shards, ctx.labels, stores)


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


# ---------------------------------------------------------------------------- state layout
class _TableState:
    """How one table's state maps onto global tensors (known on every rank, shard or not): the table
    kind's :meth:`~torchrec_shark.modules.table_kind.TableKind.state_layout` for the plan's row ranges."""

    def __init__(self, name: str, config, optimizer: SparseOptimizerSpec, ps: ParameterSharding) -> None:
        self.name = name
        self.config = config
        self.kind = kind_of(config)
        self.placements = _placements(ps)
        self.sharding_type = ps.sharding_type
        ranges = [(r0, n) for _, r0, n, _ in self.placements]
        self.layout: List[Dict[str, PieceSpec]] = self.kind.state_layout(config, optimizer, ranges)

    def keys(self, optim: bool) -> List[str]:
        return [k for k in self.layout[0] if k.startswith("optim.") == optim]

    def export(self, shard: Optional[TableShard], optim: bool, pg) -> Dict[str, Any]:
        """``{key: ShardedTensor or replicated tensor}`` for the module's (``optim=False``) or the fused
        optimizer's state. Pieces are the shard's live tensors, cut into chunks of at most CHUNK_ROWS
        along the sharded dim so that a checkpoint is written and read a bounded chunk at a time."""
        local = self.kind.local_state(shard.table) if shard is not None else {}
        me = dist.get_rank(pg)
        out: Dict[str, Any] = {}
        for key in self.keys(optim):
            first = self.layout[0][key]
            if first.replicated or first.global_size[first.dim] == 0:  # (an empty tier: nothing to shard)
                if shard is not None:
                    out[key] = local[key].detach()
                continue
            mds, shards = [], []
            for (rank, _, _, placement), specs in zip(self.placements, self.layout):
                spec = specs[key]
                for off in range(spec.offset, spec.offset + spec.length, CHUNK_ROWS):
                    n = min(CHUNK_ROWS, spec.offset + spec.length - off)
                    offsets, sizes = [0] * len(spec.global_size), list(spec.global_size)
                    offsets[spec.dim], sizes[spec.dim] = off, n
                    md = ShardMetadata(shard_offsets=offsets, shard_sizes=sizes, placement=placement)
                    mds.append(md)
                    if rank == me:
                        piece = local[key].narrow(spec.dim, off - spec.offset, n).detach()
                        shards.append(Shard(tensor=piece, metadata=md))
            meta = ShardedTensorMetadata(shards_metadata=mds, size=torch.Size(first.global_size),
                                         tensor_properties=TensorProperties(dtype=first.dtype))
            out[key] = ShardedTensor._init_from_local_shards_and_global_metadata(shards, meta, process_group=pg)
        return out

    def aliases(self, shard: TableShard, values: Dict[str, Any]) -> bool:
        """``values`` are this shard's own live tensors (an in-place load, e.g. DCP into ``state_dict()``): each
        value (or each local piece of a ``ShardedTensor``) lies within the shard's tensor of its key."""
        local = self.kind.local_state(shard.table, sync=False)
        for key, value in values.items():
            if key not in local:
                return False
            own = local[key]
            if isinstance(value, ShardedTensor):
                pieces = [s.tensor for s in value.local_shards()]
            elif isinstance(value, torch.Tensor):
                pieces = [value]
            else:
                return False
            if not all(_within(p, own) for p in pieces):
                return False
        return True


def _within(piece: torch.Tensor, own: torch.Tensor) -> bool:
    """``piece``'s bytes lie inside ``own``'s (a view of it; members of a fused store share one storage, so
    the storage alone does not say whose tensor a piece is)."""
    if piece.untyped_storage().data_ptr() != own.untyped_storage().data_ptr():
        return False
    lo, hi = own.data_ptr(), own.data_ptr() + own.numel() * own.element_size()
    return lo <= piece.data_ptr() and piece.data_ptr() + piece.numel() * piece.element_size() <= hi


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
            name: _TableState(name, ctx.configs[name], ctx.optimizer, table_name_to_parameter_sharding[name])
            for name in self._table_names
        }
        self._shark_optim = ShardedCompressedOptimizer(ctx, self._table_states, self._shark_pg)
        self._label_aware = any(kind_of(c).label_aware for c in ctx.configs.values())
        self._label_gather = LabelGather()
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
                fused_params={SHARK_KIND: table_kind_key(c)},
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

    @property
    def label_aware(self) -> bool:
        """Whether any table reads training labels (only then does :meth:`record_labels` gather them)."""
        return self._label_aware

    def record_labels(self, features: KeyedJaggedTensor, labels: torch.Tensor) -> None:
        """All-gather a batch's labels (rank order = global-batch bag order) for its training lookup.

        Call once per training batch, in batch order, before that batch's forward (under
        ``TrainPipelineSparseDist`` too, ``DLRMTrain.forward`` does it); every rank must call it (a collective).
        Does nothing when no table is label-aware (the same on every rank: the tables are the same).
        """
        if not self._label_aware:
            return
        if isinstance(labels, torch.fx.Proxy):  # TrainPipelineSparseDist traces the model to find module inputs
            return
        self.__dict__["_shark"].labels.push(self._label_gather(labels, self._shark_pg))

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
        module.__dict__["_shark_state_prefix"] = prefix
        for name, st in module._table_states.items():
            for key, value in st.export(module.table_shards.get(name), False, module._shark_pg).items():
                destination[f"{prefix}embedding_bags.{name}.{key}"] = value

    @staticmethod
    def _shark_load_pre_hook(module, state_dict, prefix, *args) -> None:
        for name, st in module._table_states.items():
            keys = {k: f"{prefix}embedding_bags.{name}.{k}" for k in st.keys(False)}
            # a stock table's (or another kind's) state: any key under the table's prefix
            table_prefix = f"{prefix}embedding_bags.{name}."
            keys.update({k[len(table_prefix):]: k for k in list(state_dict) if k.startswith(table_prefix)})
            present = {k: state_dict.pop(full) for k, full in keys.items() if full in state_dict}
            if present:
                module.load_table(name, DictStateReader(present), present)

    @torch.no_grad()
    def load_table(self, name: str, reader: StateReader, values: Optional[Dict[str, Any]] = None,
                   columns: Optional[List[int]] = None) -> None:
        """Fill this rank's shard of table ``name`` from ``reader`` (any sharding, any row-store kind for a
        row store), a chunk at a time; ``values`` that are the shard's own live tensors need no copy;
        ``columns``: the saved columns a narrower table keeps."""
        shard = self.table_shards.get(name)
        if shard is None:
            return
        st = self._table_states[name]
        if values is not None and columns is None and st.aliases(shard, values):
            shard.table.loaded()
            return
        st.kind.load_state(shard.table, reader, shard.row_start, columns)

    def unloadable(self, name: str, reader: StateReader, columns: Optional[List[int]] = None) -> Optional[str]:
        """Why table ``name`` could not load ``reader``'s state (None: it can); the same on every rank."""
        st = self._table_states[name]
        return st.kind.unloadable(st.config, reader, columns)

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):  # type: ignore[override]
        """TorchRec's contract: every state-dict key is a named parameter or buffer. The tables' state tensors
        come under their state-dict keys (as ``ShardedTensor`` s where sharded); they are no module's
        registered buffers, so DDP and dense optimizers still never see them."""
        yield from super().named_buffers(prefix, recurse, remove_duplicate)
        for name, st in self._table_states.items():
            for key, value in st.export(self.table_shards.get(name), False, self._shark_pg).items():
                yield f"{prefix}{'.' if prefix else ''}embedding_bags.{name}.{key}", value

    @property
    def state_prefix(self) -> Optional[str]:
        """The prefix of this module's keys in the model's last ``state_dict()`` (None before one)."""
        return self.__dict__.get("_shark_state_prefix")


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
        super().__init__(params, state, [{"params": list(params.values()), "lr": lr if lr is not None else 0.0}])
        # row-wise shards with replicated state (tensor train): their gradients are summed over the group
        self._replicated = sorted(n for n, s in ctx.shards.items()
                                  if s.replicated_group is not None and kind_of(s.config).replicated_state)

    @staticmethod
    def _state_of(shard: TableShard, st: _TableState, pg) -> Dict[str, Any]:
        return {f"{shard.name}.{k[len('optim.'):]}": v for k, v in st.export(shard, True, pg).items()}

    def _push_lr(self) -> None:
        lr = float(self.param_groups[0]["lr"])  # type: ignore[index]
        for shard in self._ctx.shards.values():
            shard.table.set_learning_rate(lr)

    def sync_replicated(self) -> None:
        """Sum the pending replicated-core gradients of every row-wise TT shard over the group and apply them."""
        if not self._replicated:
            return
        tables = [self._ctx.shards[n].table for n in self._replicated]
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
        for store in self._ctx.stores:
            store.step_end()
        for name in sorted(self._ctx.shards):
            table = self._ctx.shards[name].table
            if getattr(table, "_fused", None) is None:
                table.step_end()

    def zero_grad(self, set_to_none: bool = False) -> None:
        self._push_lr()
