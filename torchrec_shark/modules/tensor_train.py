"""TT-Rec: an embedding table stored as tensor-train cores, with a fused sparse optimizer and an LFU cache.

Example::

    cfg = CompressedEmbeddingBagConfig(
        name="t_user", num_embeddings=1_000_000, embedding_dim=64, feature_names=["user"],
        compression=TensorTrain(num_cores=3, ranks=(32,)),
    )
    table = build_table(cfg, SparseOptimizerSpec("rowwise_adagrad", lr=0.05))
    pooled = table(ids, offsets)          # [B, 64]; backward updates the touched core slices
    table.memory_bytes()["total"], table.fp32_bytes()
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import PoolingType

from torchrec_shark.modules.base import CompressedTable, SparseOptimizerSpec, TableInputError, all_finite
from torchrec_shark.modules.kernels.lookup import bag_of_ids
from torchrec_shark.modules.kernels.sparse_optimizer import RowOptimizer
from torchrec_shark.modules.kernels.tt_chain import chain_backward, chain_forward, materialize
from torchrec_shark.modules.table_kind import (
    PieceSpec,
    ServingOptions,
    StateReader,
    TableKind,
    block_seed,
    table_seed,
)
from torchrec_shark.modules.tt_factorization import TTLayout, resolve_layout, split_ids

TT_INITS = ("sampled_gaussian", "naive")


@dataclass(frozen=True)
class TensorTrain:
    """TT-Rec: the table is a chain of 3-D cores ``(R_{k-1}, p_k, q_k, R_k)``.

    ``ranks`` holds one value (used between every pair of cores) or ``num_cores - 1``
    values. ``row_factors``/``col_factors`` default to balanced factorisations of
    ``num_embeddings`` (rounded up) and ``embedding_dim``. ``cache_fraction`` of the rows are kept
    uncompressed in an LFU cache refreshed every ``cache_refresh_every`` steps.
    """

    num_cores: int = 3
    ranks: Tuple[int, ...] = (32,)
    row_factors: Optional[Tuple[int, ...]] = None
    col_factors: Optional[Tuple[int, ...]] = None
    init: str = "sampled_gaussian"  # sampled_gaussian | naive
    cache_fraction: float = 0.0
    cache_refresh_every: int = 500

    def __post_init__(self) -> None:
        for name in ("ranks", "row_factors", "col_factors"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(int(v) for v in value))
        if not 2 <= self.num_cores <= 4:
            raise ValueError(f"TensorTrain.num_cores={self.num_cores} must be 2, 3 or 4")
        if not self.ranks or any(r < 1 for r in self.ranks):
            raise ValueError(f"TensorTrain.ranks={list(self.ranks)} must all be >= 1")
        if self.init not in TT_INITS:
            raise ValueError(f"TensorTrain.init={self.init!r} must be one of {list(TT_INITS)}")
        if not 0.0 <= self.cache_fraction < 1.0:
            raise ValueError(f"TensorTrain.cache_fraction={self.cache_fraction} must be in [0, 1)")
        if self.cache_refresh_every < 1:
            raise ValueError(f"TensorTrain.cache_refresh_every={self.cache_refresh_every} must be >= 1")


# First-core slices drawn per generator at initialisation (a fixed block: the same values under any sharding).
_INIT_SLICES = 1024

# Rows materialised at a time by full_weight() (bounds its temporary memory to about this many rows).
_MATERIALIZE_ROWS = 1 << 20


class _TTBags(torch.autograd.Function):
    """Pooled bags over the rows of a lookup's distinct ids; backward hands the rows' summed gradients to
    the table.

    Pooling and its backward live here rather than in ``F.embedding_bag``'s autograd: that backward
    sorts the ids again to sum each row's gradient (a dense ``[U, D]`` result through a sort of all ids),
    while the inverse indices from the forward's ``unique`` already say where each id's gradient goes, so
    one ``index_add_`` sums them. ``anchor`` is a zero-size leaf with ``requires_grad=True`` that puts the
    lookup in the autograd graph; its gradient is never computed (the table updates itself, or fills the
    cores' ``.grad``).
    """

    @staticmethod
    def forward(ctx, anchor, per_sample_weights, table, rows, inverse, offsets, mean):  # type: ignore[override]
        values, located = table.gather(rows)
        psw = None if per_sample_weights is None else per_sample_weights.to(values.dtype)
        single = inverse.numel() == offsets.numel() - 1 and bool((offsets[1:] - offsets[:-1]).eq(1).all())
        if single:  # one id per bag (single-hot features): each bag is its row (times its weight), sum or mean alike
            out = values.index_select(0, inverse)
            if psw is not None:
                out = out * psw.unsqueeze(1)
        elif psw is None:
            out = F.embedding_bag(inverse, values, offsets, mode="mean" if mean else "sum", include_last_offset=True)
        else:
            out = F.embedding_bag(inverse, values, offsets, mode="sum", per_sample_weights=psw, include_last_offset=True)
            if mean:  # weighted mean as TBE: weighted sum / bag length
                out = out / (offsets[1:] - offsets[:-1]).clamp(min=1).unsqueeze(1).to(out.dtype)
        ctx.table, ctx.located, ctx.version, ctx.mean, ctx.single = table, located, table.version, mean, single
        ctx.save_for_backward(rows, inverse, offsets, psw, values if ctx.needs_input_grad[1] else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        rows, inverse, offsets, psw, values = ctx.saved_tensors
        table = ctx.table
        if ctx.single:  # one id per bag: id b is bag b, a mean is / 1
            per_id, bag_scale = grad_out, None
        else:
            n, lengths = inverse.numel(), offsets[1:] - offsets[:-1]
            bag = bag_of_ids(offsets, n)
            per_id = grad_out.index_select(0, bag)  # (n, D): the gradient reaching each id of each bag
            bag_scale = (1.0 / lengths.clamp(min=1).to(grad_out.dtype)).index_select(0, bag) if ctx.mean else None
        grad_psw = None
        if ctx.needs_input_grad[1]:
            grad_psw = (per_id * values.index_select(0, inverse)).sum(1)
            if bag_scale is not None:
                grad_psw = grad_psw * bag_scale
        scale = bag_scale if psw is None else (psw if bag_scale is None else psw * bag_scale)
        if scale is not None:
            per_id = per_id * scale.unsqueeze(1)
        grad_rows = per_id.new_zeros(rows.numel(), per_id.shape[1]).index_add_(0, inverse, per_id)
        table.apply_gradients(rows, grad_rows, ctx.located if table.version == ctx.version else None)
        ctx.located = None
        return None, grad_psw, None, None, None, None, None


def _unique(ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Distinct ``ids`` (ascending) and the index of each id among them, as ``torch.unique``.

    On CPU through NumPy, whose sort of 64-bit integers is vectorised: it takes about half the time of
    ``torch.unique`` for a batch of a few thousand ids, a visible share of a lookup."""
    if ids.device.type != "cpu":
        return torch.unique(ids, return_inverse=True)
    uniq, inverse = np.unique(ids.numpy(), return_inverse=True)
    return torch.from_numpy(uniq), torch.from_numpy(inverse.reshape(-1).astype(np.int64, copy=False))


def _update_every_slice(core: torch.Tensor, opt: RowOptimizer, grad: torch.Tensor) -> bool:
    """``opt``'s update of every slice of ``core`` (R, p, q, R') given their gradients ``grad`` (p, R, q, R'),
    written into the core in place; ``False`` (nothing done) for rules not written here.

    Why: a batch of a few thousand ids usually touches every slice of every core, and the general path
    (:meth:`RowOptimizer.update` on the slices copied out, then copied back) moves the strided core out and
    in again, which costs more than the update itself. These are that method's operations on the core's
    own layout (the same values, up to rounding in row-wise Adagrad's mean of squares).
    """
    spec, lr, p = opt.spec, opt.lr, core.shape[1]
    if spec.name not in ("sgd", "adagrad", "rowwise_adagrad"):
        return False
    if type(opt).update is not RowOptimizer.update:
        # a subclass that changes what applying means (e.g. a row-wise shard's replicated cores defer the
        # update until the gradients are summed over ranks) must see every update
        return False
    g = grad.transpose(0, 1)  # the gradient in the core's layout (a view)
    if spec.weight_decay:
        g = g + spec.weight_decay * core
    if spec.name == "sgd":
        core.sub_(lr * g)
    elif spec.name == "rowwise_adagrad":
        rows = g.transpose(0, 1).reshape(p, -1)  # one row per slice, as the general path sees them
        # mean of squares as a squared norm: one pass, no temporary the size of the core (the general
        # path's square().mean(); equal up to rounding)
        opt.momentum1.add_(torch.linalg.vector_norm(rows, dim=1).square_().div_(rows.shape[1]))
        core.addcmul_(g, (-lr / (opt.momentum1.sqrt() + spec.eps)).view(1, p, 1, 1))
    else:  # adagrad: one accumulator per element, stored flattened per slice
        m = opt.momentum1.view(p, *grad.shape[1:]).transpose(0, 1)
        m.addcmul_(g, g)
        core.addcdiv_(g, m.sqrt().add_(spec.eps), value=-lr)
    return True


class TensorTrainTable(CompressedTable):
    """A ``num_embeddings x embedding_dim`` table as ``d`` tensor-train cores (TT-Rec).

    **Layout.** Core ``k`` is the tensor ``core_k`` of shape ``(R_{k-1}, p_k, q_k, R_k)``, ``R_0 = R_d = 1``.
    Row ``i`` uses slice ``p``-index ``i_k`` of every core, ``i = ((i1*p2)+i2)*p3+i3`` (first core most
    significant, so a contiguous block of ``p2*...*pd`` rows owns one first-core slice: row-wise shards
    aligned to that block own a slice range of ``core_0`` and replicate the others). Default factors:
    :func:`~torchrec_shark.modules.tt_factorization.resolve_layout` (balanced; ``prod(p) >= N``, padding
    rows never addressed; ``prod(q) == D`` in ascending order, the cheapest chain).

    **Lookup.** Only the distinct ids of a batch are reconstructed (chain of per-slice GEMMs, see
    :mod:`~torchrec_shark.modules.kernels.tt_chain`); bags are pooled with ``embedding_bag`` over those
    rows through the inverse indices (sum, mean, per-sample weights; ``offsets`` has ``B + 1`` entries).

    **Optimizer.** ``fused=True`` (default): the :class:`SparseOptimizerSpec` is applied in backward to
    the touched core slices only (each core slice ``core_k[:, i]`` is one optimizer "row": row-wise
    Adagrad keeps one accumulator per core slice, Adagrad/Adam one per element, flattened per slice);
    cores are buffers and hold no ``.grad``. ``fused=False``: cores are ``nn.Parameter`` s that receive
    dense gradients for a torch optimizer (no cache allowed then: a dense optimizer's state could not
    follow cache repopulation).

    **Init.** ``sampled_gaussian``: every core entry ~ N(0, s^2) with
    ``s^(2d) * prod(R_1..R_{d-1}) = 1 / (3 N)``, so every reconstructed entry (a sum of ``prod R`` products
    of ``d`` independent entries) has mean 0 and variance ``1/(3N)``, DLRM's ``U(-1/sqrt(N), 1/sqrt(N))``.
    ``naive``: every core entry i.i.d. ``U(-1/sqrt(N), 1/sqrt(N))`` (reconstructed variance
    ``prod(R) / (3N)^d``: vanishing; an ablation).

    **LFU cache** (``cache_fraction > 0``): ``C = max(1, floor(cache_fraction * N))`` rows are kept
    uncompressed (``cache_weight``, ids in the sorted ``cache_ids``, looked up by binary search, so the
    index costs ``8 C`` bytes and no per-row map). Training forwards count id frequencies (``frequency``,
    int32 per row); every ``cache_refresh_every`` :meth:`step_end` calls the cache is repopulated with the
    ``C`` most frequent rows seen, then the counts are halved (LFU with ageing). Newly cached rows are
    materialised from the cores; cached rows are trained directly (the cores get no gradient from them),
    with their own optimizer state.

    *Eviction folds the row back into the cores*: the first-core slices of the evicted rows get the
    minimum-norm correction ``Delta`` that makes ``(G1[i1] + Delta) @ S_r`` best match the cached value
    (``S_r``: the product of the other cores' slices; exact when ``p1``-groups of evicted rows are small,
    least squares otherwise). Why: dropping the row would throw away everything it learned while cached
    (the hottest rows train most), and a plain write-back has nowhere to go; the correction touches only
    ``core_0``, which under row-wise sharding lives on the rank that owns the row, so no replicated core
    changes and nothing must be all-reduced. Its cost: the other uncached rows sharing that first-core
    slice move too, as they do under any update of the slice. Rows that stay cached keep their value and
    state; newly cached rows start with zero optimizer state. Lookups through the cache equal lookups of
    :meth:`full_weight` (the cores' rows with the cached rows overlaid).
    """

    def __init__(
        self,
        config,
        optimizer: Optional[SparseOptimizerSpec] = None,
        device: Optional[torch.device] = None,
        *,
        fused: bool = True,
        dtype: torch.dtype = torch.float32,
        row_start: int = 0,
        rows: Optional[int] = None,
        seed: Optional[int] = None,
        pooling: Optional[PoolingType] = None,
    ) -> None:
        super().__init__()
        spec = config.compression
        if not isinstance(spec, TensorTrain):
            raise ValueError(f"table {config.name!r}: TensorTrainTable needs a TensorTrain spec, got {spec!r}")
        pooling = config.pooling if pooling is None else pooling
        if pooling not in (PoolingType.SUM, PoolingType.MEAN):
            raise ValueError(f"table {config.name!r}: pooling {pooling} is not supported (SUM or MEAN)")
        self.name = config.name
        self.table_rows = int(config.num_embeddings)
        self.row_start = int(row_start)
        self.num_embeddings = self.table_rows if rows is None else int(rows)
        self.embedding_dim = config.embedding_dim
        self.pooling = pooling
        self.global_layout: TTLayout = resolve_layout(config.name, self.table_rows, config.embedding_dim, spec)
        # A row-wise shard owns first-core slices [slice_start, slice_start + slices) and replicas of the
        # other cores; its own layout is the table's with the first factor cut to its slices.
        self.slice_start, self.slices = tt_slice_range(self.global_layout, self.row_start, self.num_embeddings)
        if self.num_embeddings != self.table_rows:
            lay = self.global_layout
            spec = dataclasses.replace(spec, row_factors=(max(2, self.slices), *lay.row_factors[1:]),
                                       col_factors=tuple(lay.col_factors), ranks=tuple(lay.ranks[1:-1]))
        self.spec = spec
        self.layout: TTLayout = resolve_layout(config.name, self.num_embeddings, config.embedding_dim, spec)
        self.seed = table_seed(torch.initial_seed(), config.name) if seed is None else int(seed)
        self.fused = fused
        self.version = 0  # bumped on every write: a lookup's saved products are reused only if unchanged
        self._anchor = torch.empty(0, requires_grad=True)  # puts lookups in the autograd graph (no gradient)
        self._scratch = torch.empty(0, device=device, dtype=dtype)  # backward's temporary storage (not state)
        self.optimizer_spec = optimizer if optimizer is not None else SparseOptimizerSpec()
        cache_rows = max(1, int(spec.cache_fraction * self.num_embeddings)) if spec.cache_fraction > 0 else 0
        if cache_rows and not fused:
            raise ValueError(f"table {self.name!r}: cache_fraction > 0 needs fused=True (a dense optimizer's "
                             "state cannot follow cache repopulation)")
        self.cache_rows = cache_rows

        lay = self.layout
        for k in range(lay.num_cores):
            t = torch.empty(lay.core_shape(k), device=device, dtype=dtype)
            if fused:
                self.register_buffer(f"core_{k}", t)
            else:
                self.register_parameter(f"core_{k}", nn.Parameter(t))
        self.reset_parameters()

        if fused:
            self.core_optimizers = nn.ModuleList(
                RowOptimizer(self.optimizer_spec, num_rows=p, dim=math.prod(lay.core_shape(k)) // p, device=device)
                for k, p in enumerate(lay.row_factors)
            )
        if cache_rows:
            n = self.num_embeddings
            self.register_buffer("cache_ids", torch.full((cache_rows,), n, dtype=torch.int64, device=device))
            self.register_buffer("cache_weight", torch.zeros(cache_rows, self.embedding_dim, device=device, dtype=dtype))
            self.register_buffer("frequency", torch.zeros(n, dtype=torch.int32, device=device))
            self.register_buffer("steps", torch.zeros((), dtype=torch.int64, device=device))
            self.cache_optimizer = RowOptimizer(self.optimizer_spec, num_rows=cache_rows, dim=self.embedding_dim, device=device)

    # ------------------------------------------------------------------ state
    @property
    def cores(self) -> List[torch.Tensor]:
        return [getattr(self, f"core_{k}") for k in range(self.layout.num_cores)]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initial cores from the table's seed: the replicated cores whole, the first core per fixed block
        of slices, so every shard holds exactly the slices the unsharded table would."""
        if self.cores[0].device.type == "meta":
            return
        n = self.table_rows
        if self.spec.init == "sampled_gaussian":
            d = self.layout.num_cores
            std = (3.0 * n * math.prod(self.layout.ranks)) ** (-1.0 / (2 * d))

            def fill(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
                return t.normal_(0.0, std, generator=g)
        else:
            def fill(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
                return t.uniform_(-1.0 / math.sqrt(n), 1.0 / math.sqrt(n), generator=g)

        def gen(block: int, salt: int) -> torch.Generator:
            return torch.Generator().manual_seed(block_seed(self.seed, block, salt))

        for k in range(1, self.layout.num_cores):
            core = self.cores[k]
            core.copy_(fill(torch.empty(core.shape, dtype=core.dtype), gen(0, k + 1)))
        core0, p1 = self.cores[0], self.global_layout.row_factors[0]
        end = self.slice_start + self.slices
        for b in range(self.slice_start // _INIT_SLICES, -(-end // _INIT_SLICES)):
            lo, hi = b * _INIT_SLICES, min((b + 1) * _INIT_SLICES, p1)
            block = fill(torch.empty(1, hi - lo, *core0.shape[2:], dtype=core0.dtype), gen(b, 1))
            a, z = max(lo, self.slice_start), min(hi, end)
            core0[:, a - self.slice_start : z - self.slice_start].copy_(block[:, a - lo : z - lo])

    def _cached_count(self) -> int:
        return int(torch.searchsorted(self.cache_ids, self.num_embeddings))

    def memory_bytes(self) -> Dict[str, int]:
        out = {"cores": sum(c.numel() * c.element_size() for c in self.cores)}
        if self.cache_rows:
            for key, buf in (("cache_rows", self.cache_weight), ("cache_index", self.cache_ids), ("frequency", self.frequency)):
                out[key] = buf.numel() * buf.element_size()
        out["total"] = sum(out.values())
        return out

    def optimizer_state(self) -> Dict[str, torch.Tensor]:
        if not self.fused:
            return {}
        out = {f"core_{k}.{name}": t for k, opt in enumerate(self.core_optimizers) for name, t in opt.state().items()}
        if self.cache_rows:
            out.update({f"cache.{name}": t for name, t in self.cache_optimizer.state().items()})
        return out

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """The table ``[num_embeddings, embedding_dim]`` in the cores' dtype (cached rows overlaid)."""
        n, block = self.num_embeddings, self.layout.first_core_block
        out = self.cores[0].new_empty(n, self.embedding_dim)
        step = max(1, _MATERIALIZE_ROWS // block)
        for s in range(0, self.layout.row_factors[0], step):
            lo = s * block
            if lo >= n:
                break
            part = materialize(self.cores, slice(s, s + step))
            out[lo : lo + part.shape[0]] = part[: n - lo]
        if self.cache_rows:
            k = self._cached_count()
            out[self.cache_ids[:k]] = self.cache_weight[:k]
        return out

    # ------------------------------------------------------------------ lookup
    def forward(
        self,
        ids: torch.Tensor,
        offsets: torch.Tensor,
        per_sample_weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if ids.device.type == "meta" or self.core_0.device.type == "meta":  # shape propagation, as stock tables
            return torch.empty(offsets.numel() - 1, self.embedding_dim, device="meta")
        self.check_lookup(ids, offsets, per_sample_weights)
        ids, offsets = ids.reshape(-1).long(), offsets.long()
        if self.cache_rows and self.training:
            self.frequency.index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
        uniq, inverse = _unique(ids)
        anchor = self._anchor if torch.is_grad_enabled() else self._anchor.detach()
        return _TTBags.apply(anchor, per_sample_weights, self, uniq, inverse, offsets, self.pooling == PoolingType.MEAN)

    def gather(self, rows: torch.Tensor) -> Tuple[torch.Tensor, Tuple]:
        """Values of ``rows`` (unique, ascending) and what their update reuses: the cache plan and the
        chain's saved prefix products."""
        plan = self._plan(rows)
        tt_ids, miss, hit, slots = plan
        tt_rows, saved = chain_forward(self.cores, split_ids(tt_ids, self.layout.row_factors), save=True)
        if hit is None:
            return tt_rows, (plan, saved)
        values = tt_rows.new_empty(rows.numel(), self.embedding_dim)
        values.index_copy_(0, miss, tt_rows)
        values.index_copy_(0, hit, self.cache_weight.index_select(0, slots))
        return values, (plan, saved)

    def _plan(self, rows: torch.Tensor) -> Tuple:
        """``(ids for the cores, their positions, positions of cache hits, their cache slots)``; no hit: ``(rows, None, None, None)``."""
        if self.cache_rows:
            slot = torch.searchsorted(self.cache_ids, rows).clamp_(max=self.cache_rows - 1)
            hit = self.cache_ids.index_select(0, slot) == rows
            if bool(hit.any()):
                hit_pos = hit.nonzero().squeeze(1)
                miss_pos = (~hit).nonzero().squeeze(1)
                return rows.index_select(0, miss_pos), miss_pos, hit_pos, slot.index_select(0, hit_pos)
        return rows, None, None, None

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def apply_gradients(self, rows: torch.Tensor, grad: torch.Tensor, cached: Optional[Tuple] = None) -> None:
        """Backward of a lookup: ``grad`` is the summed gradient of each of ``rows`` (unique); ``cached`` what
        :meth:`gather` returned if the table is unchanged since. Fused: update the touched core slices and
        cache rows; not fused: accumulate the cores' dense ``.grad``. Non-finite gradients change nothing."""
        if not all_finite(grad):
            bad = rows[~torch.isfinite(grad).all(dim=1)]
            raise TableInputError(
                f"table {self.name!r}: non-finite gradient for {bad.numel()} row(s) (first: {bad[:5].tolist()}); "
                "the table was not updated"
            )
        plan, saved = cached if cached is not None else self.gather(rows)[1]
        _, miss, hit, slots = plan
        grad = grad.to(self.cores[0].dtype)
        if self._scratch.device != grad.device or self._scratch.dtype != grad.dtype:  # the table was moved
            self._scratch = grad.new_empty(0)
        core_grads = chain_backward(self.cores, saved, grad if hit is None else grad.index_select(0, miss), self._scratch)
        if not self.fused:
            for core, (ids, g) in zip(self.cores, core_grads):
                dense = torch.zeros_like(core)
                dense.transpose(0, 1).index_copy_(0, ids, g)
                core.grad = dense if core.grad is None else core.grad + dense
            return
        for core, opt, (ids, g) in zip(self.cores, self.core_optimizers, core_grads):
            if ids.numel() == core.shape[1] and _update_every_slice(core, opt, g):
                continue
            slices = core.transpose(0, 1)  # (p, R, q, R'): one optimizer row per core slice
            shape = (ids.numel(), slices[0].numel())
            w = slices.index_select(0, ids).reshape(shape)
            slices.index_copy_(0, ids, opt.update(ids, w, g.reshape(shape)).view(-1, *slices.shape[1:]))
        if hit is not None:
            w = self.cache_weight.index_select(0, slots)
            self.cache_weight.index_copy_(0, slots, self.cache_optimizer.update(slots, w, grad.index_select(0, hit)))
        self.version += 1

    def set_learning_rate(self, lr: float) -> None:
        if self.fused:
            for opt in self.core_optimizers:
                opt.lr = float(lr)
            if self.cache_rows:
                self.cache_optimizer.lr = float(lr)

    def step_end(self) -> None:
        if not self.cache_rows:
            return
        self.steps += 1
        if int(self.steps) % self.spec.cache_refresh_every == 0:
            self.refresh_cache()

    @torch.no_grad()
    def refresh_cache(self) -> None:
        """Repopulate the cache with the most frequent rows (see the class docstring), then age the counts."""
        n, C = self.num_embeddings, self.cache_rows
        k_old = self._cached_count()
        old_ids = self.cache_ids[:k_old]
        k_new = min(C, int((self.frequency > 0).sum()))
        new_ids = torch.sort(torch.topk(self.frequency, k_new).indices.long()).values
        kept_old = torch.isin(old_ids, new_ids)
        kept_new = torch.isin(new_ids, old_ids)
        old_slots = kept_old.nonzero().squeeze(1)
        new_slots = kept_new.nonzero().squeeze(1)
        added = new_ids[~kept_new]
        added_rows, _ = chain_forward(self.cores, split_ids(added, self.layout.row_factors))  # before any fold
        evicted = ~kept_old
        self._fold_into_first_core(old_ids[evicted], self.cache_weight[:k_old][evicted])

        weight = self.cache_weight.new_zeros(self.cache_weight.shape)
        weight[new_slots] = self.cache_weight[old_slots]
        weight[(~kept_new).nonzero().squeeze(1)] = added_rows
        self.cache_weight.copy_(weight)
        for buf in self.cache_optimizer.state().values():
            if buf.dim() > 0:
                moved = torch.zeros_like(buf)
                moved[new_slots] = buf[old_slots]
                buf.copy_(moved)
        self.cache_ids.fill_(n)
        self.cache_ids[:k_new] = new_ids
        self.frequency.bitwise_right_shift_(1)
        self.version += 1

    def _fold_into_first_core(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        """Minimum-norm change of the first-core slices so that rows ``ids`` best equal ``values``."""
        if ids.numel() == 0:
            return
        cores, lay = self.cores, self.layout
        digits = split_ids(ids, lay.row_factors)
        e = ids.numel()
        s = cores[-1][:, digits[-1], :, 0].permute(1, 0, 2).double()  # (E, R_{d-1}, q_d)
        for k in range(lay.num_cores - 2, 0, -1):
            r_in, _, q, r_out = cores[k].shape
            g = cores[k][:, digits[k]].permute(1, 0, 2, 3).reshape(e, r_in * q, r_out).double()
            s = torch.bmm(g, s).view(e, r_in, -1)  # (E, R_{k-1}, q_k * rest)
        first = cores[0][0]  # (p1, q1, R1)
        q1, r1 = first.shape[1:]
        g1 = first.index_select(0, digits[0]).double()
        err = values.double().view(e, q1, -1) - torch.bmm(g1, s)
        st = s.transpose(1, 2)
        slices, inverse = torch.unique(digits[0], return_inverse=True)
        gram = s.new_zeros(slices.numel(), r1, r1).index_add_(0, inverse, torch.bmm(s, st))
        rhs = s.new_zeros(slices.numel(), q1, r1).index_add_(0, inverse, torch.bmm(err, st))
        delta = torch.bmm(rhs, torch.linalg.pinv(gram, hermitian=True, rtol=1e-10))
        first.index_add_(0, slices, delta.to(first.dtype))


def tt_slice_range(layout: TTLayout, row_start: int, rows: int) -> Tuple[int, int]:
    """``(first slice, slices)`` of the first core that rows ``[row_start, row_start + rows)`` use.

    Raises ``ValueError`` when the range would split a first-core slice (``row_start`` not a multiple of
    ``p2 * ... * pd``, or a range that ends inside a slice before the table's last row)."""
    block = layout.first_core_block
    last = row_start + rows >= layout.num_embeddings
    if row_start % block or (not last and rows % block):
        raise ValueError(
            f"rows [{row_start}, {row_start + rows}) are not aligned to the TT first-core block p2*...*pd = {block} "
            f"(row factors {layout.row_factors}); shard the table table_wise"
        )
    s0 = row_start // block
    return s0, (layout.row_factors[0] - s0) if last else rows // block


# ---------------------------------------------------------------------------- row-wise shard
class DeferredRowOptimizer(RowOptimizer):
    """A :class:`RowOptimizer` whose ``update`` only records the gradient (dense per optimizer row) and
    returns the rows unchanged; :meth:`update_now` applies the (group-summed) gradients later."""

    def __init__(self, spec, num_rows: int, dim: int, device=None) -> None:
        super().__init__(spec, num_rows, dim, device)
        self.__dict__["pending_grad"] = torch.zeros(num_rows, dim, device=device)
        self.__dict__["pending_touched"] = torch.zeros(num_rows, device=device)

    @torch.no_grad()
    def update(self, rows: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        self.pending_grad.index_add_(0, rows, g.to(self.pending_grad.dtype))
        self.pending_touched.index_fill_(0, rows, 1.0)
        return w

    def update_now(self, rows, w, g):
        return RowOptimizer.update(self, rows, w, g)


class ShardTensorTrainTable(TensorTrainTable):
    """A row-wise shard of a TT table: first-core slices ``[s0, s0 + p1')`` and replicas of the other cores.

    The fused backward updates the first core (and cache) at once, as the unsharded table does; the
    replicated cores' optimizers are :class:`DeferredRowOptimizer` s, so their gradients wait in
    :meth:`pending_flat` until the sharded optimizer sums them over the sharding group and hands them to
    :meth:`apply_flat`. Every rank of the group must take part once per step, in the same table order,
    whether or not it saw ids (zeros are sent).
    """

    allreduce = True  # negative control: False applies local gradients only (replicas drift apart)

    def __init__(self, config, optimizer=None, device=None, **kw) -> None:
        super().__init__(config, optimizer, device, **kw)
        for k in range(1, self.layout.num_cores):
            old = self.core_optimizers[k]
            p = self.layout.row_factors[k]
            new = DeferredRowOptimizer(old.spec, p, math.prod(self.layout.core_shape(k)) // p, device)
            new.lr = old.lr
            self.core_optimizers[k] = new

    def update_replicas_in_backward(self) -> None:
        """For a shard alone in its sharding group (one rank): there is nothing to sum, so the replicated
        cores update in the backward as an unsharded table's do, and the pending buffers go. Deferring
        there cost about a tenth of a ``tt`` step (a dense gradient buffer per core filled, scanned and
        cleared every step, and the in-place update of fully touched cores ruled out). Call it before
        the first step; the shard then takes no part in :meth:`pending_flat` / :meth:`apply_flat`."""
        for k in range(1, self.layout.num_cores):
            old = self.core_optimizers[k]
            if isinstance(old, DeferredRowOptimizer):
                self.core_optimizers[k] = RowOptimizer.over(old.spec, old.lr, dict(old.named_buffers()))

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
                new = opt.update_now(ids, w, g.index_select(0, ids))
                slices.index_copy_(0, ids, new.view(n, *slices.shape[1:]))
            g_buf.zero_()
            t_buf.zero_()
        self.version += 1


# ---------------------------------------------------------------------------- kind
# State laid out per shard (the LFU cache: its slots are the shard's own); distributed.resharding has the
# table re-slice it itself under any sharding, the same one included.
PER_SHARD = "per_shard."


class TensorTrainKind(TableKind):
    """Tensor-train tables: a shard owns first-core slices (row-wise boundaries on ``p2 * ... * pd`` rows)
    and replicas of the other cores.

    The LFU cache is per shard and part of the state, so a checkpoint is the model that trained: its
    slots (``per_shard.cache_ids``, shard-local row ids; ``per_shard.cache_weight``; the cache's own
    optimizer state ``per_shard.cache_optim.*``) are laid out shard after shard, ``per_shard.layout``
    holds each shard's ``(row_start, rows, slots)``, and ``steps`` (the repopulation clock) is
    replicated. A load takes the saved cached rows of its own row range, under any sharding; where
    more rows come than its cache holds, the most frequent stay cached and the others are folded
    into the first core as an eviction does.

    ``tables.compression.kind=tensor_train``, settings in ``tables.compression.tensor_train``; tables with
    fewer than its ``min_rows`` rows stay stock (factorising them saves little and costs AUC)."""

    names = ("tensor_train",)
    spec_type = TensorTrain
    config_section = "tensor_train"
    table_class = TensorTrainTable
    keeps_columns = False  # the cores factorise the width: a new width means new cores
    replicated_state = True
    state_family = "tensor_train"

    def config_fields(self):
        return {"min_rows": (int, 100_000)}

    def spec_from_config(self, section, num_embeddings: int):
        if num_embeddings < section.min_rows:
            return None
        return super().spec_from_config(section, num_embeddings)

    def example_spec(self):
        return TensorTrain(num_cores=2, ranks=(4,))

    def describe(self, config) -> str:
        lay = self.layout(config)
        return (f"tensor_train ranks {list(lay.ranks[1:-1])}, cores "
                f"{' '.join(str(lay.core_shape(k)) for k in range(lay.num_cores))}")

    def shrink_hint(self, config) -> str:
        return ("lower tables.compression.tensor_train.ranks "
                "(or tables.overrides.<table>.compression.tensor_train.ranks)")

    @staticmethod
    def layout(config) -> TTLayout:
        return resolve_layout(config.name, config.num_embeddings, config.embedding_dim, config.compression)

    def build(self, config, optimizer, row_start, rows, device, seed, row_wise=False):
        cls = ShardTensorTrainTable if row_wise else TensorTrainTable
        return cls(config, optimizer, device, row_start=row_start, rows=rows, seed=seed,
                   pooling=PoolingType.SUM if row_wise else None)

    def row_alignment(self, config) -> int:
        return self.layout(config).first_core_block

    def storage_bytes(self, config, optimizer, row_start, rows) -> Dict[str, int]:
        lay = self.layout(config)
        slices = -(-rows // lay.first_core_block)  # an unaligned range (never built) is costed as if rounded up
        sharded = rows < lay.num_embeddings
        out: Dict[str, int] = {"cores": 0, "optimizer": 0}
        if sharded:
            out["pending_grads"] = 0
        for k in range(lay.num_cores):
            shape = list(lay.core_shape(k))
            if k == 0:
                shape[1] = max(2, slices) if sharded else shape[1]
            p, numel = shape[1], math.prod(shape)
            out["cores"] += numel * 4
            out["optimizer"] += RowOptimizer.state_bytes(optimizer, p, numel // p)
            if sharded and k > 0:
                out["pending_grads"] += numel * 4 + p * 4
        spec = config.compression
        if spec.cache_fraction > 0:
            c = max(1, int(spec.cache_fraction * rows))
            out["cache_rows"] = c * lay.embedding_dim * 4
            out["cache_index"] = c * 8
            out["frequency"] = rows * 4
            out["optimizer"] += RowOptimizer.state_bytes(optimizer, c, lay.embedding_dim)
        out["total"] = sum(out.values())
        return out

    def state_layout(self, config, optimizer, ranges):
        lay = self.layout(config)
        n_rows = lay.num_embeddings
        out = []
        for r0, n in ranges:
            s0, ns = tt_slice_range(lay, r0, n)
            spec: Dict[str, PieceSpec] = {"core_0": PieceSpec(lay.core_shape(0), torch.float32, s0, ns, dim=1)}
            for k in range(1, lay.num_cores):
                spec[f"core_{k}"] = PieceSpec(lay.core_shape(k), torch.float32, replicated=True)
            if config.compression.cache_fraction > 0:
                spec["frequency"] = PieceSpec((n_rows,), torch.int32, r0, n)
                spec.update(self._cache_layout(config, optimizer, ranges, len(out)))
            for k, p in enumerate(lay.row_factors):
                width = math.prod(lay.core_shape(k)) // p
                for name, (shape, dtype) in RowOptimizer.state_shapes(optimizer, p, width).items():
                    key = f"optim.core_{k}.{name}"
                    spec[key] = (PieceSpec(shape, dtype, s0, ns) if k == 0 and shape
                                 else PieceSpec(shape, dtype, replicated=True))
            out.append(spec)
        return out

    @staticmethod
    def _cache_slots(config, rows: int) -> int:
        return max(1, int(config.compression.cache_fraction * rows))

    def _cache_layout(self, config, optimizer, ranges, index: int) -> Dict[str, PieceSpec]:
        """Shard ``index``'s pieces of the cache state: its slots after those of the shards before it."""
        slots = [self._cache_slots(config, n) for _, n in ranges]
        total, offset, mine = sum(slots), sum(slots[:index]), slots[index]
        dim = config.embedding_dim
        spec = {
            "steps": PieceSpec((), torch.int64, replicated=True),
            f"{PER_SHARD}layout": PieceSpec((len(ranges), 3), torch.int64, index, 1),
            f"{PER_SHARD}cache_ids": PieceSpec((total,), torch.int64, offset, mine),
            f"{PER_SHARD}cache_weight": PieceSpec((total, dim), torch.float32, offset, mine),
        }
        for name, (shape, dtype) in RowOptimizer.state_shapes(optimizer, mine, dim).items():
            key = f"{PER_SHARD}cache_optim.{name}"
            spec[key] = (PieceSpec((total, *shape[1:]), dtype, offset, mine) if shape
                         else PieceSpec((len(ranges),), dtype, index, 1))  # a count of the shard's own updates
        return spec

    def local_state(self, table, sync: bool = True) -> Dict[str, torch.Tensor]:
        ns = table.slices
        out = {"core_0": table.core_0[:, :ns]}
        out.update({f"core_{k}": table.cores[k] for k in range(1, table.layout.num_cores)})
        if table.cache_rows:
            out["frequency"] = table.frequency
            out["steps"] = table.steps
            out[f"{PER_SHARD}layout"] = torch.tensor([[table.row_start, table.num_embeddings, table.cache_rows]])
            out[f"{PER_SHARD}cache_ids"] = table.cache_ids
            out[f"{PER_SHARD}cache_weight"] = table.cache_weight
            for name, t in table.cache_optimizer.state().items():
                out[f"{PER_SHARD}cache_optim.{name}"] = t if t.dim() else t.view(1)
        if table.fused:
            for k, opt in enumerate(table.core_optimizers):
                for name, t in opt.state().items():
                    out[f"optim.core_{k}.{name}"] = t[:ns] if k == 0 and t.dim() else t
        return out

    def unloadable(self, config, reader: StateReader, columns=None) -> Optional[str]:
        return self._unloadable(self.layout(config), reader, columns)

    def export_serving(self, config, reader: StateReader, sink, options=None) -> Dict:
        """Its cores and cached rows, or its rows when small (see
        :mod:`~torchrec_shark.modules.tensor_train_export`)."""
        from torchrec_shark.modules.tensor_train_export import export_tensor_train

        return export_tensor_train(config, self.layout(config), reader, sink, options or ServingOptions())

    @staticmethod
    def _unloadable(lay: TTLayout, reader: StateReader, columns) -> Optional[str]:
        if columns is not None:
            return "a tensor-train table has no columns to keep"
        if "core_0" not in set(reader.keys()):
            return "a tensor-train table loads only tensor-train state (cores)"
        for k in range(lay.num_cores):
            key = f"core_{k}"
            if key not in set(reader.keys()) or tuple(reader.size(key)) != tuple(lay.core_shape(k)):
                return f"saved {key} does not fit this factorisation {lay.core_shape(k)}"
        return None

    @torch.no_grad()
    def load_state(self, table, reader: StateReader, row_start: int, columns=None) -> None:
        problem = self._unloadable(table.global_layout, reader, columns)
        if problem is not None:
            raise ValueError(f"table {table.name!r}: {problem}")
        keys = set(reader.keys())
        s0, ns = table.slice_start, table.slices
        table.core_0[:, :ns].copy_(reader.read("core_0", s0, ns, dim=1))
        for k in range(1, table.layout.num_cores):
            table.cores[k].copy_(reader.read(f"core_{k}"))
        if table.fused:
            for k, opt in enumerate(table.core_optimizers):
                for name, t in opt.state().items():
                    key = f"optim.core_{k}.{name}"
                    if key not in keys or tuple(reader.size(key)[1:]) != tuple(t.shape[1:]):
                        continue
                    if k == 0 and t.dim():
                        t[:ns].copy_(reader.read(key, s0, ns))
                    else:
                        t.copy_(reader.read(key))
        if table.cache_rows:  # after the cores: rows that do not fit the cache are folded into them
            if "frequency" in keys:
                for a, v in reader.chunks("frequency", row_start, table.num_embeddings):
                    table.frequency[a - row_start : a - row_start + v.numel()].copy_(v)
            if "steps" in keys:
                table.steps.copy_(reader.read("steps"))
            self._load_cache(table, reader, keys)
        table.version += 1

    @staticmethod
    def _saved_cache(table, reader: StateReader, keys) -> Optional[Tuple[torch.Tensor, torch.Tensor, Dict, Dict]]:
        """``(global row ids, values, per-row optimizer state, per-shard optimizer counts)`` of the saved
        cached rows in ``table``'s row range; ``None`` when the reader holds no cache it can read whole."""
        lo, hi = table.row_start, table.row_start + table.num_embeddings
        if f"{PER_SHARD}layout" in keys:  # a sharded layout (any sharding)
            try:
                layout = reader.read(f"{PER_SHARD}layout").tolist()
            except ValueError:  # in-memory shards of another rank: not at hand here
                return None
            ids, values, rows, counts = [], [], {}, {}
            offset = 0
            names = [k[len(f"{PER_SHARD}cache_optim."):] for k in keys if k.startswith(f"{PER_SHARD}cache_optim.")]
            for i, (r0, n, slots) in enumerate(layout):
                if r0 < hi and r0 + n > lo:
                    local = reader.read(f"{PER_SHARD}cache_ids", offset, slots)
                    g = local + r0
                    take = ((local < n) & (g >= lo) & (g < hi)).nonzero().squeeze(1)
                    ids.append(g.index_select(0, take))
                    values.append(reader.read(f"{PER_SHARD}cache_weight", offset, slots).index_select(0, take))
                    for name in names:
                        key = f"{PER_SHARD}cache_optim.{name}"
                        own = table.cache_optimizer.state().get(name)
                        if own is None:
                            continue
                        if own.dim():
                            rows.setdefault(name, []).append(reader.read(key, offset, slots).index_select(0, take))
                        else:  # a per-shard count (Adam's steps)
                            counts.setdefault(name, []).append(reader.read(key, i, 1).clone())
                offset += slots
            if not ids:
                return torch.zeros(0, dtype=torch.int64), table.cache_weight[:0], {}, {}
            return (torch.cat(ids), torch.cat(values), {k: torch.cat(v) for k, v in rows.items()},
                    {k: torch.cat(v) for k, v in counts.items()})
        if "cache_ids" in keys and "cache_weight" in keys:  # an unsharded table's own buffers
            g = reader.read("cache_ids")  # row ids of the whole table; empty slots hold its row count
            take = ((g < table.table_rows) & (g >= lo) & (g < hi)).nonzero().squeeze(1)
            return g.index_select(0, take), reader.read("cache_weight").index_select(0, take), {}, {}
        return None

    def _load_cache(self, table, reader: StateReader, keys) -> None:
        """Fill the cache with the saved cached rows of the table's range (exactly as saved under the same
        sharding); restarts it empty, with a warning, when the reader holds cache state it cannot read."""
        import warnings

        saved = self._saved_cache(table, reader, keys)
        table.cache_ids.fill_(table.num_embeddings)
        table.cache_weight.zero_()
        for buf in table.cache_optimizer.state().values():
            buf.zero_()
        if saved is None:
            if any(k.startswith(PER_SHARD) or k == "cache_ids" for k in keys):
                warnings.warn(f"table {table.name!r}: the saved LFU cache is not readable from here (shards of "
                              "another rank in memory); the cache restarts empty and its rows come from the cores")
            return
        ids, values, rows, counts = saved
        order = torch.argsort(ids)
        ids, values = ids.index_select(0, order) - table.row_start, values.index_select(0, order)
        rows = {k: v.index_select(0, order) for k, v in rows.items()}
        if ids.numel() > table.cache_rows:  # a smaller cache: keep the most frequent, fold the others back
            freq = table.frequency.index_select(0, ids).long()
            keep = torch.sort(torch.argsort(-freq, stable=True)[: table.cache_rows]).values
            rest = torch.ones(ids.numel(), dtype=torch.bool)
            rest[keep] = False
            table._fold_into_first_core(ids[rest], values[rest])
            ids, values = ids.index_select(0, keep), values.index_select(0, keep)
            rows = {k: v.index_select(0, keep) for k, v in rows.items()}
        k = ids.numel()
        table.cache_ids[:k] = ids
        table.cache_weight[:k] = values.to(table.cache_weight.dtype)
        for name, buf in table.cache_optimizer.state().items():
            if buf.dim() and name in rows and tuple(rows[name].shape[1:]) == tuple(buf.shape[1:]):
                buf[:k] = rows[name].to(buf.dtype)
            elif not buf.dim() and name in counts:
                buf.copy_(counts[name].max())

    def cost_factor(self, config) -> float:
        # FLOPS_PER_BYTE as for the row stores: the cores stay in cache, a row costs its GEMMs and its output
        lay = self.layout(config)
        q, r = lay.col_factors, lay.ranks
        macs, width = 0, q[0] * r[1]  # prefix product: (q1 ... qk) x R_k
        for k in range(1, len(q)):
            macs += width * q[k] * r[k + 1]
            width = width // r[k] * q[k] * r[k + 1]
        fp32 = 4.0 * lay.embedding_dim
        return (fp32 + 2 * macs / 4.0) / fp32

