"""``CompressedEmbeddingBagCollection``: TorchRec's ``EmbeddingBagCollection`` contract over
compressed tables (fp32, uniform fp16/int8, per-row mixed precision, tensor-train, ...).

Every table is built by :func:`~torchrec_shark.modules.base.build_table` from its config's
``compression`` (``None``: a stock fp32 table) and updates itself in backward with the fused
sparse optimizer, like FBGEMM's TBE; :attr:`fused_optimizer` exposes that optimizer's state
as a TorchRec ``KeyedOptimizer`` for ``CombinedOptimizer`` and checkpoints.

Training-loop protocol (per step)::

    ebc.record_labels(batch.sparse_features, batch.labels)   # before forward (label-aware kinds)
    loss = model(batch); loss.backward()                      # tables update in backward
    optimizer.step()                                          # CombinedOptimizer([ebc.fused_optimizer, dense])
    ebc.step_end()                                            # priorities, re-tiering, caches

Example::

    ebc = CompressedEmbeddingBagCollection(
        tables=[CompressedEmbeddingBagConfig(name="t", num_embeddings=1000, embedding_dim=64,
                                             feature_names=["f"], compression=MixedPrecision())],
        optimizer=SparseOptimizerSpec("rowwise_adagrad", lr=0.05),
    )
    kt = ebc(kjt)            # KeyedTensor, keys ["f"], values [B, 64]
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface, get_embedding_names_by_table
from torchrec.optim.fused import FusedOptimizer, FusedOptimizerModule
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_shark.modules.base import CompressedTable, SparseOptimizerSpec, TableInputError, all_finite
from torchrec_shark.modules.fused_store import FusedRowStore, build_fused
from torchrec_shark.modules.kernels.lookup import bag_of_ids
from torchrec_shark.modules.kinds import build_table, kind_of
from torchrec_shark.modules.specs import CompressedEmbeddingBagConfig
from torchrec_shark.modules.table_kind import DictStateReader, table_seed


class CompressedTablesOptimizer(FusedOptimizer):
    """The tables' fused optimizers as one ``KeyedOptimizer``.

    ``params`` maps ``embedding_bags.<table>.weight`` to a zero-size handle tensor per table
    (there is no fp32 weight to point at); ``state[handle]`` holds the table's live optimizer
    state tensors as ``<table>.<name>`` (TBE's naming), so ``state_dict``/``load_state_dict``
    read and write the tables' own state in place. ``step()`` applies nothing (updates happen
    in backward) but pushes the param group's ``lr`` to the tables, so LR schedulers work.
    """

    def __init__(self, tables: Dict[str, CompressedTable], lr: float) -> None:
        self._tables = tables
        params: Dict[str, torch.Tensor] = {}
        state: Dict[Any, Any] = {}
        for name, table in tables.items():
            handle = torch.empty(0)
            params[f"embedding_bags.{name}.weight"] = handle
            state[handle] = {f"{name}.{k}": v for k, v in table.optimizer_state().items()}
        super().__init__(params, state, [{"params": list(params.values()), "lr": lr}])

    def _push_lr(self) -> None:
        lr = self.param_groups[0]["lr"]  # type: ignore[index]
        for table in self._tables.values():
            table.set_learning_rate(lr)

    def step(self, closure: Any = None) -> None:
        self._push_lr()

    def zero_grad(self, set_to_none: bool = False) -> None:
        self._push_lr()


class CompressedEmbeddingBagCollection(EmbeddingBagCollectionInterface, FusedOptimizerModule):
    """Pooled embeddings of compressed tables: KJT in, ``KeyedTensor`` out.

    Same contract as ``torchrec.EmbeddingBagCollection``: output keys are the features in
    config order (``feature@table`` when a feature feeds several tables), each of width its
    table's ``embedding_dim``; SUM or MEAN pooling; per-id weights when ``is_weighted``;
    multi-hot and empty bags; several features may share a table.

    Tables live in ``embedding_bags`` (``nn.ModuleDict``); their storage and optimizer state
    are buffers (never parameters), so ``state_dict()`` holds everything and DDP/dense
    optimizers see nothing.

    Args:
        tables: one config per table (``compression=None``: stock fp32).
        is_weighted: read per-id weights from ``KeyedJaggedTensor.weights()``.
        device: where the tables live (default: torch's default device, so ``with torch.device("meta")``
            builds on ``meta``); ``meta`` allocates no table storage at all (the sharder then builds each
            rank's shards directly, as TorchRec does for ``EmbeddingBagCollection``).
        optimizer: the fused sparse optimizer every table applies in backward.
        fused: row-store tables of one layout share one fused store (:mod:`~torchrec_shark.modules.fused_store`):
            one batched lookup and update for all of them per step. ``False``: one lookup per table (the
            same results, slower with many tables).
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        is_weighted: bool = False,
        device: Optional[torch.device] = None,
        optimizer: SparseOptimizerSpec = SparseOptimizerSpec(),
        fused: bool = True,
    ) -> None:
        super().__init__()
        torch._C._log_api_usage_once(f"torchrec_shark.modules.{self.__class__.__name__}")
        device = torch.device(device) if device is not None else torch.empty(0).device
        self._device = device
        self._is_weighted = is_weighted
        self._optimizer_spec = optimizer
        self.fused = fused  # the sharded collection fuses its shards likewise
        self._embedding_bag_configs = list(tables)
        self.embedding_bags = nn.ModuleDict()
        self._feature_order: List[str] = []
        self._table_features: List[Tuple[int, int]] = []  # [first, last) into _feature_order
        # Each table's initial values are a function of this seed, its name and the row (see
        # table_kind.init_blocks), drawn from private generators: the global RNG is left as it was, so a
        # model built around this collection gets the same dense initialisation as with stock tables, and
        # a sharder building the shards later (from ``meta``) produces the same values on any sharding.
        self.init_seed = torch.initial_seed()
        for i, cfg in enumerate(self._embedding_bag_configs):
            if not cfg.feature_names:
                cfg.feature_names = [cfg.name]
            if not hasattr(cfg, "compression"):
                cfg = self._embedding_bag_configs[i] = _with_compression(cfg)
        names = [cfg.name for cfg in self._embedding_bag_configs]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate is not None:
            raise ValueError(f"Duplicate table name {duplicate}")
        # Row stores of one layout share a fused store (one batched lookup and update for all of them).
        builders = [functools.partial(_build, cfg, optimizer, table_seed(self.init_seed, cfg.name))
                    for cfg in self._embedding_bag_configs]
        tables, self._stores = build_fused(builders, device) if fused else ([b(device) for b in builders], [])
        for cfg, table in zip(self._embedding_bag_configs, tables):
            self.embedding_bags[cfg.name] = table
            first = len(self._feature_order)
            self._feature_order.extend(cfg.feature_names)
            self._table_features.append((first, len(self._feature_order)))
        self._label_aware = [kind_of(cfg).label_aware for cfg in self._embedding_bag_configs]
        self._embedding_names: List[str] = list(
            itertools.chain.from_iterable(get_embedding_names_by_table(self._embedding_bag_configs))
        )
        self._length_per_key: List[int] = [
            cfg.embedding_dim for cfg in self._embedding_bag_configs for _ in cfg.feature_names
        ]
        self._slice_cache: Dict[Tuple[str, ...], List[List[Tuple[int, int]]]] = {}
        self._plan_cache: Dict[Tuple[str, ...], _LookupPlan] = {}
        self._fused_optimizer: Optional[CompressedTablesOptimizer] = None
        # labels recorded for a batch whose lookup (one store, sample-major) counts them itself: (features, labels)
        self._labels_for_lookup: Optional[Tuple[KeyedJaggedTensor, torch.Tensor]] = None
        self._register_load_state_dict_pre_hook(self._load_other_layouts, with_module=True)

    @staticmethod
    def _load_other_layouts(module, state_dict, prefix, *args) -> None:
        """A table's state in another layout (a stock ``weight`` for a mixed-precision table, a sharded
        layout's extra keys, another row-store kind) loads through the table's kind, a chunk at a time;
        a table's own layout loads as usual."""
        for cfg in module._embedding_bag_configs:
            table = module.embedding_bags[cfg.name]
            table_prefix = f"{prefix}embedding_bags.{cfg.name}."
            keys = [k for k in state_dict if k.startswith(table_prefix)]
            own = {table_prefix + k for k in table.state_dict()}
            if not keys or set(keys) == own:
                continue
            present = {k[len(table_prefix):]: state_dict.pop(k) for k in keys}
            kind_of(cfg).load_state(table, DictStateReader(present), 0)
            # the table's own tensors take the popped keys' place: a strict load finds every key it expects
            state_dict.update({table_prefix + k: v for k, v in table.state_dict().items()})

    # ------------------------------------------------------------------ contract
    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def fused_optimizer(self) -> CompressedTablesOptimizer:
        if self._fused_optimizer is None:
            self._fused_optimizer = CompressedTablesOptimizer(
                dict(self.embedding_bags.items()), self._optimizer_spec.lr
            )
        return self._fused_optimizer

    def _apply(self, fn, *args, **kwargs):
        self._fused_optimizer = None  # buffers may have been replaced (.to(), .cuda())
        for store in self._stores:  # first the fused tensors: the members' buffers stay views of them
            store.apply(fn)
        return super()._apply(fn, *args, **kwargs)

    # ------------------------------------------------------------------ input slicing
    def _key_runs(self, keys: Tuple[str, ...]) -> List[List[Tuple[int, int]]]:
        """Per table: its features as runs ``[first, last)`` of consecutive positions in ``keys``.

        Features are sliced per key (as stock ``EmbeddingBagCollection`` does with ``to_dict``),
        never permuted: a feature that feeds two tables is read twice from the same values, so
        gradients into its per-id weights add up through plain slicing.
        """
        runs = self._slice_cache.get(keys)
        if runs is None:
            missing = [f for f in self._feature_order if f not in keys]
            if missing:
                raise ValueError(f"features {missing} are missing from the KeyedJaggedTensor (keys {list(keys)})")
            position = {k: i for i, k in enumerate(keys)}
            runs = []
            for f0, f1 in self._table_features:
                table_runs: List[Tuple[int, int]] = []
                for f in self._feature_order[f0:f1]:
                    p = position[f]
                    if table_runs and table_runs[-1][1] == p:
                        table_runs[-1] = (table_runs[-1][0], p + 1)
                    else:
                        table_runs.append((p, p + 1))
                runs.append(table_runs)
            self._slice_cache[keys] = runs
        return runs

    def _plan(self, keys: Tuple[str, ...]) -> "_LookupPlan":
        """How a KJT with ``keys`` is looked up: one segment per fused store (its members' features) and one
        per table outside any store, each with its features' runs of key positions (cached per keys)."""
        plan = self._plan_cache.get(keys)
        if plan is None:
            runs = self._key_runs(keys)
            position = {name: i for i, name in enumerate(self.embedding_bags)}
            fused = set()
            segments = []
            for store in self._stores:
                tables = [position[t.name] for t in store.members]
                fused.update(tables)
                members = [j for j, i in enumerate(tables) for _ in range(*self._table_features[i])]
                segments.append(_Segment(store, _merge_runs([r for i in tables for r in runs[i]]), members,
                                         [f for i in tables for f in range(*self._table_features[i])], None))
            for i, table in enumerate(self.embedding_bags.values()):
                if i not in fused:
                    segments.append(_Segment(table, runs[i], [0] * (self._table_features[i][1] -
                                                                   self._table_features[i][0]),
                                             list(range(*self._table_features[i])), i))
            whole = (len(segments) == 1 and isinstance(segments[0].source, FusedRowStore)
                     and segments[0].runs == [(0, len(keys))]
                     and segments[0].features == list(range(len(self._feature_order))))
            plan = self._plan_cache[keys] = _LookupPlan(segments, whole)
        return plan

    def _inputs(self, kjt: KeyedJaggedTensor, runs: List[Tuple[int, int]]):
        """``(ids, offsets, weights or None, bags per feature, ids per feature)`` of the features in ``runs``
        (positions in the KJT's keys), their bags concatenated feature after feature.

        Bags per feature is the batch size of each feature (they differ only for a variable-batch KJT)."""
        strides = kjt.stride_per_key()
        starts = kjt.offset_per_key()
        values, offsets = kjt.values(), kjt.offsets()
        weights = kjt.weights() if self._is_weighted else None
        bag_start = [0]
        for st in strides:
            bag_start.append(bag_start[-1] + st)
        pieces = []
        for k0, k1 in runs:
            b0, b1 = bag_start[k0], bag_start[k1]
            offs = offsets[b0 : b1 + 1]
            a, b = starts[k0], starts[k1]
            pieces.append((values[a:b], offs - a if a else offs, None if weights is None else weights[a:b]))
        bags = [strides[k] for k0, k1 in runs for k in range(k0, k1)]
        counts = [starts[k + 1] - starts[k] for k0, k1 in runs for k in range(k0, k1)]
        if len(pieces) == 1:
            ids, offs, w = pieces[0]
        else:
            ids = torch.cat([p[0] for p in pieces])
            shift, parts = 0, [pieces[0][1][:1]]
            for p in pieces:
                parts.append(p[1][1:] + shift)
                shift += p[0].numel()
            offs = torch.cat(parts)
            w = None if weights is None else torch.cat([p[2] for p in pieces])
        return ids, offs, w, bags, counts

    # ------------------------------------------------------------------ forward
    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if isinstance(features, torch.fx.Proxy):
            tracer = features.tracer
            path = tracer.path_of_module(self)
            if path:
                # Inside a traced model: a leaf, as TorchRec's tracer treats its own embedding modules (one
                # call_module node; the tables' input checks and fused updates cannot be traced).
                return tracer.create_proxy("call_module", path, (features,), {})
            return self._traced_forward(features, tracer)  # the root of the trace
        plan = self._plan(tuple(features.keys()))
        labels = self._take_labels(features)
        pooled: List[Optional[torch.Tensor]] = [None] * len(self._feature_order)
        for seg in plan.segments:
            ids, offs, weights, bags, counts = self._inputs(features, seg.runs)
            if plan.whole and not features.variable_stride_per_key():  # every feature from one store, in order
                out = seg.source.lookup(ids, offs, seg.members, counts, bags, weights, labels, sample_major=True)
                return KeyedTensor(keys=self._embedding_names, length_per_key=self._length_per_key, values=out,
                                   key_dim=1)
            if isinstance(seg.source, FusedRowStore):
                out = seg.source.lookup(ids, offs, seg.members, counts, bags, weights)
            else:
                out = seg.source(ids, offs, weights)
            for f, part in zip(seg.features, out.split(bags) if len(bags) > 1 else [out]):
                pooled[f] = part
        if features.variable_stride_per_key():
            pooled = self._expand_variable_batch(features, pooled)
        return KeyedTensor(
            keys=self._embedding_names,
            length_per_key=self._length_per_key,
            values=torch.cat(pooled, dim=1) if len(pooled) > 1 else pooled[0],
            key_dim=1,
        )

    def _traced_forward(self, features: torch.fx.Proxy, tracer) -> KeyedTensor:
        """The forward as a graph when the collection itself is traced (as ``torch.fx.symbolic_trace`` traces
        a stock ``EmbeddingBagCollection``): per feature its jagged values from ``to_dict()``, one
        ``call_module`` per table (its features' bags concatenated, as :meth:`_table_inputs` does), the
        pooled outputs cut back per feature. Variable-batch inputs are not traced."""
        jagged = features.to_dict()
        pooled = []
        for cfg in self._embedding_bag_configs:
            parts = [jagged[f] for f in cfg.feature_names]
            ids = torch.cat([p.values() for p in parts]) if len(parts) > 1 else parts[0].values()
            offsets = [p.offsets() for p in parts]
            weights = None
            if self._is_weighted:
                weights = torch.cat([p.weights() for p in parts]) if len(parts) > 1 else parts[0].weights()
            if len(parts) > 1:  # one offsets tensor for the concatenated bags
                shifted, shift = [offsets[0]], offsets[0][-1:]
                for o in offsets[1:]:
                    shifted.append(o[1:] + shift)
                    shift = shift + o[-1:]
                offsets_all = torch.cat(shifted)
            else:
                offsets_all = offsets[0]
            out = tracer.create_proxy("call_module", f"embedding_bags.{cfg.name}", (ids, offsets_all, weights), {})
            start = 0
            for o in offsets:
                end = o.numel() - 1 + start
                pooled.append(out[start:end] if len(parts) > 1 else out)
                start = end
        return _keyed_tensor(self._embedding_names, self._length_per_key, torch.cat(pooled, dim=1))

    def _expand_variable_batch(self, features: KeyedJaggedTensor, pooled: List[torch.Tensor]) -> List[torch.Tensor]:
        """Variable batch per feature: each feature's pooled rows mapped back onto the full batch
        through the KJT's inverse indices, as stock ``EmbeddingBagCollection`` does."""
        inverse = features.inverse_indices_or_none()
        if inverse is None:
            raise ValueError(
                "a KeyedJaggedTensor with variable batch per feature needs inverse_indices to pool into one batch"
            )
        names, index = inverse
        row = {name: i for i, name in enumerate(names)}
        return [p.index_select(0, index[row[f]].long()) for p, f in zip(pooled, self._feature_order)]

    # ------------------------------------------------------------------ training hooks
    def record_labels(self, features: KeyedJaggedTensor, labels: torch.Tensor) -> None:
        """Give the label-aware tables (mixed precision) this step's labels; call before forward.

        ``labels[b]`` is sample ``b``'s label. For each table the bags of all its features are
        merged per sample, so a row counts once per sample that touched it through any of the
        table's features. See :meth:`MixedPrecisionTable.record_labels
        <torchrec_shark.modules.mixed_precision.MixedPrecisionTable.record_labels>` for how the
        counts stay exact under row-wise sharding.
        """
        if not self.label_aware:
            return
        if features.variable_stride_per_key():
            raise TableInputError("record_labels: a variable-batch KeyedJaggedTensor has no single batch to label")
        batch = features.stride()
        labels = labels.reshape(-1)
        if labels.numel() != batch:
            raise TableInputError(f"record_labels: {labels.numel()} labels for a batch of {batch}")
        self._flush_labels()
        plan = self._plan(tuple(features.keys()))
        if plan.whole and plan.segments[0].source.label_aware:
            if not all_finite(labels):
                raise TableInputError("record_labels: labels contain NaN or inf")
            # one store reads every feature: its lookup of this batch counts the labels from the distinct rows
            # it finds anyway (FusedRowStore.lookup), so they wait for it (or for step_end, if no lookup comes)
            self._labels_for_lookup = (features, labels)
            return
        self._record_now(features, labels, plan)

    def _take_labels(self, features: KeyedJaggedTensor) -> Optional[torch.Tensor]:
        """The labels recorded for ``features`` (this very batch), for its lookup to count; labels recorded
        for another batch are counted now, as they were recorded."""
        pending = self._labels_for_lookup
        if pending is None or pending[0] is features:
            self._labels_for_lookup = None
            return None if pending is None else pending[1]
        self._flush_labels()
        return None

    def _flush_labels(self) -> None:
        pending, self._labels_for_lookup = self._labels_for_lookup, None
        if pending is not None:
            self._record_now(pending[0], pending[1], self._plan(tuple(pending[0].keys())))

    def _record_now(self, features: KeyedJaggedTensor, labels: torch.Tensor, plan: "_LookupPlan") -> None:
        batch = features.stride()
        for seg in plan.segments:
            if isinstance(seg.source, FusedRowStore):
                if seg.source.label_aware:
                    ids, offs, _, bags, counts = self._inputs(features, seg.runs)
                    seg.source.record_labels(ids, offs, seg.members, counts, bags, labels)
                continue
            if not self._label_aware[seg.table]:
                continue
            table = seg.source
            ids, offs, _, bags, _ = self._inputs(features, seg.runs)
            if len(bags) > 1:  # one bag per sample: the sample's ids from every feature of the table
                sample = bag_of_ids(offs.long(), ids.numel()) % batch
                order = torch.sort(sample, stable=True).indices
                ids = ids.index_select(0, order)
                counts = torch.bincount(sample, minlength=batch)
                offs = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
            table.record_labels(ids, offs, labels)

    @property
    def label_aware(self) -> bool:
        """Whether any table reads training labels (:meth:`record_labels` does nothing otherwise)."""
        return any(self._label_aware)

    def step_end(self) -> None:
        """Close a training step (after ``optimizer.step()``): every fused store's and every other table's
        :meth:`step_end`."""
        self._flush_labels()
        for store in self._stores:
            store.step_end()
        for table in self.embedding_bags.values():
            if getattr(table, "_fused", None) is None:
                table.step_end()

    # ------------------------------------------------------------------ accounting
    def table_memory_bytes(self, name: str) -> Dict[str, int]:
        return self.embedding_bags[name].memory_bytes()

    def memory_bytes(self) -> Dict[str, Any]:
        """``{"total": bytes, "per_table": {name: {part: bytes, ..., "total": bytes}}}`` (no optimizer state)."""
        per_table = {name: t.memory_bytes() for name, t in self.embedding_bags.items()}
        return {"total": sum(p["total"] for p in per_table.values()), "per_table": per_table}

    def fp32_bytes(self) -> int:
        """Bytes of the same tables as plain fp32 rows."""
        return sum(t.fp32_bytes() for t in self.embedding_bags.values())


class _Segment(NamedTuple):
    """What one call looks up: a fused store (``members``: the member each feature reads) or one table
    (``table``: its position), the features' runs of KJT key positions, and their positions in the output."""

    source: Any
    runs: List[Tuple[int, int]]
    members: List[int]
    features: List[int]
    table: Optional[int]


class _LookupPlan(NamedTuple):
    segments: List[_Segment]
    whole: bool  # one segment reads every feature in output order: its pooled rows are the output


def _merge_runs(runs: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    out: List[Tuple[int, int]] = []
    for a, b in runs:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


@torch.fx.wrap
def _keyed_tensor(keys: List[str], length_per_key: List[int], values: torch.Tensor) -> KeyedTensor:
    return KeyedTensor(keys=keys, length_per_key=length_per_key, values=values, key_dim=1)


def _build(cfg, optimizer: SparseOptimizerSpec, seed: int, device: Optional[torch.device]) -> CompressedTable:
    return build_table(cfg, optimizer, device, seed)


def _with_compression(cfg: EmbeddingBagConfig):
    """A plain ``EmbeddingBagConfig`` seen as an uncompressed one."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}
    return CompressedEmbeddingBagConfig(**fields, compression=None)
