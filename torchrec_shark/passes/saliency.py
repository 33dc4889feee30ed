"""Single-shot embedding dimension search (SSEDS): per-dimension saliency and the budgeted width choice.

Saliency. Put a mask ``alpha_{j,d}`` on dimension ``d`` of field ``j``'s pooled embedding
(``e_{j,d} -> alpha_{j,d} * e_{j,d}``). Its loss gradient at ``alpha = 1`` is::

    dL/dalpha_{j,d} = sum_x g_{j,d}(x) * e_{j,d}(x),   g = dL(x)/de_j(x)

so no mask tensor is needed in the model: the signed sums are accumulated over the
evaluation batches (:func:`signed_sums`), summed over ranks (:func:`all_reduce_sums`),
and the saliency is ``|sum|`` normalised by the total over all fields and dims
(:func:`normalise`). The pass's default takes ``|.|`` per mini-batch and masks each
dimension's deviation from its batch mean (see :func:`signed_sums` for why: on a trained
model the plain whole-set gradient is noise). Taken at pooled embeddings, it applies to every table kind and
every sharding.

Selection (:func:`select_dims`). A table's columns are shared by every feature that reads
it, so the unit of choice is a *table dimension* ``(t, d)``: its saliency is the sum of
``s_{j,d}`` over the features ``j`` of ``t`` (for the usual one-feature tables that is
the field's saliency) and it costs ``rows(t)`` parameters. All table dimensions are ranked
globally by saliency (ties: table order, then dim) and taken from the top while the kept
parameters ``sum_t rows(t) * kept_dims(t)`` stay within ``budget * current parameters``;
a dimension that does not fit is refused and *closes its table* (a table keeps a prefix
of its own ranking, so its columns are always its most salient ones), and the walk goes
on with the other tables. Each table's new width is its number of kept dims rounded up
to a multiple of ``multiple``, at least ``minimum``, at most its current width; the
columns it keeps (``init_columns``) are its top-``width`` dims by saliency, sorted. Every
feature of a table gets the table's width.

``budget_on="selected"`` (the default) charges the budget before rounding, so the final
model can be somewhat larger than the budget (rounding, the minimum width);
``budget_on="final"`` charges each table its rounded width instead, so the final model
never exceeds the budget (unless even the minimum widths do).

Example::

    sums = signed_sums(pooled_gradients(run, num_batches=16), per_batch_abs=True, center=True,
                       reduce=all_reduce_sums)                 # every rank: the global sums
    sal = normalise(sums)                               # {field: [width]} summing to 1
    sel = select_dims(sal, table_infos(run.trainer.table_configs), budget=0.2)
    sel.table_widths, sel.columns                       # {table: width}, {table: sorted kept columns}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from torchrec_shark.modules.kinds import kind_of

BUDGET_ON = ("selected", "final")


# ---------------------------------------------------------------------------- saliency
_COUNT = "__samples__"  # the batch size, reduced with the per-field sums


def signed_sums(
    samples: Iterable,
    per_batch_abs: bool = False,
    center: bool = False,
    reduce: Optional[Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]] = None,
) -> Dict[str, torch.Tensor]:
    """``sum_x g_{j,d}(x) * e_{j,d}(x)`` per field (float64 ``[width]``) over the batches.

    ``samples`` yields objects with ``pooled`` and ``grads`` dicts (``{field: [b, width]}``),
    e.g. :func:`torchrec_shark.passes.run_loader.pooled_gradients`. ``reduce`` turns one
    batch's per-rank sums into the global batch's (e.g. ``lambda d: all_reduce_sums(d)``), so
    that the per-batch options below see whole batches whatever the world size; without it
    the result is this rank's (sum it over ranks with :func:`all_reduce_sums`).

    ``per_batch_abs``: add up ``|dL_batch/dalpha|`` instead, one batch at a time. On a
    trained model the whole-set gradient of every mask is ~0 (scaling a trained table is a
    direction the optimiser has already settled), so its remainder is noise; the size of the
    per-batch gradient still says how much the loss leans on the dimension.
    ``center``: mask the dimension's deviation from its batch mean,
    ``e -> mean_b(e) + alpha * (e - mean_b(e))``, whose gradient is
    ``sum g*e - mean_b(e) * sum g``. A dimension (nearly) constant over samples carries no
    information about the sample but acts as a bias channel with a large per-batch gradient;
    a noise field of a few rows is exactly that.
    """
    sums: Dict[str, torch.Tensor] = {}
    for s in samples:
        parts: Dict[str, torch.Tensor] = {}
        for f, e in s.pooled.items():
            g, e = s.grads[f].double(), e.double()
            parts[f] = torch.stack([(g * e).sum(0), g.sum(0), e.sum(0)]).cpu()  # [3, width]
            parts[_COUNT] = torch.tensor([float(e.shape[0])], dtype=torch.float64)
        if not parts:
            continue
        if reduce is not None:
            parts = reduce(parts)
        count = float(parts.pop(_COUNT))
        for f, (ge, g, e) in parts.items():
            contrib = ge - (e / count) * g if center and count > 0 else ge
            if per_batch_abs:
                contrib = contrib.abs()
            sums[f] = sums[f] + contrib if f in sums else contrib
    return sums


def all_reduce_sums(sums: Dict[str, torch.Tensor], fields: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
    """Sum the per-field signed sums over ranks (a no-op without a process group).

    ``fields`` (with their widths taken from ``sums``) fixes the order every rank packs in;
    by default the sorted field names. Every rank must hold the same fields and widths.
    """
    names = list(fields) if fields is not None else sorted(sums)
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return {f: sums[f].clone() for f in names}
    flat = torch.cat([sums[f].double().reshape(-1) for f in names])
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    flat = flat.to(device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.cpu()
    out, i = {}, 0
    for f in names:
        n = sums[f].numel()
        out[f] = flat[i:i + n].view_as(sums[f]).clone()
        i += n
    return out


def normalise(sums: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``|sum|`` divided by its total over all fields and dims (all zeros stay zeros)."""
    total = sum(float(v.abs().sum()) for v in sums.values())
    scale = 1.0 / total if total > 0 else 0.0
    return {f: v.abs().double() * scale for f, v in sums.items()}


# ---------------------------------------------------------------------------- selection
@dataclass(frozen=True)
class TableInfo:
    """What the selection needs of one table."""

    name: str
    rows: int
    width: int
    features: Tuple[str, ...]
    kind: str = "none"  # the table kind's name
    #: a narrower table can start from the kept columns of the trained one (the kind's ``keeps_columns``:
    #: row stores keep rows of columns; tensor-train cores factorise the width, so a new width means new cores)
    inherits_columns: bool = True

    @property
    def params(self) -> int:
        return self.rows * self.width


def table_infos(table_configs: Sequence) -> List[TableInfo]:
    """:class:`TableInfo` for each ``EmbeddingBagConfig`` / ``CompressedEmbeddingBagConfig``."""
    out = []
    for c in table_configs:
        kind = kind_of(c)
        out.append(TableInfo(c.name, int(c.num_embeddings), int(c.embedding_dim), tuple(c.feature_names),
                             kind.name, kind.keeps_columns))
    return out


def round_width(kept: int, current: int, multiple: int = 4, minimum: int = 4) -> int:
    """``kept`` rounded up to a multiple of ``multiple``, at least ``minimum``, at most ``current``."""
    w = max(minimum, multiple * math.ceil(kept / multiple))
    return int(min(current, w))


@dataclass
class Selection:
    """The outcome of :func:`select_dims`."""

    budget: float
    budget_on: str
    current_params: int
    target_params: float
    #: rows x kept dims before rounding (what ``budget_on="selected"`` charges)
    selected_params: int
    #: rows x new width, summed over tables (the retrained model's embedding parameters)
    final_params: int
    kept_dims: Dict[str, int]
    table_widths: Dict[str, int]
    field_widths: Dict[str, int]
    #: per table, its top-``width`` columns by saliency, sorted
    columns: Dict[str, List[int]]
    table_saliency: Dict[str, torch.Tensor]
    #: table dims in rank order: (table, dim, saliency, kept)
    ranking: List[Tuple[str, int, float, bool]] = field(default_factory=list)
    #: the minimum widths alone exceed the budget
    infeasible: bool = False

    @property
    def final_fraction(self) -> float:
        return self.final_params / self.current_params if self.current_params else 0.0

    @property
    def selected_fraction(self) -> float:
        return self.selected_params / self.current_params if self.current_params else 0.0


def table_saliency(field_saliency: Dict[str, torch.Tensor], tables: Sequence[TableInfo]) -> Dict[str, torch.Tensor]:
    """Saliency of each table dim: the sum over the features that read the table."""
    out = {}
    for t in tables:
        acc = torch.zeros(t.width, dtype=torch.float64)
        for f in t.features:
            if f not in field_saliency:
                raise KeyError(f"no saliency for feature {f!r} of table {t.name!r}")
            v = field_saliency[f].double()
            if v.numel() != t.width:
                raise ValueError(f"feature {f!r}: saliency has {v.numel()} dims, table {t.name!r} is {t.width} wide")
            acc += v
        out[t.name] = acc
    return out


def select_dims(
    field_saliency: Dict[str, torch.Tensor],
    tables: Sequence[TableInfo],
    budget: float,
    multiple: int = 4,
    minimum: int = 4,
    budget_on: str = "selected",
) -> Selection:
    """Keep the most salient table dims within ``budget`` x the current parameters (see module doc)."""
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget={budget} must be in (0, 1]")
    if budget_on not in BUDGET_ON:
        raise ValueError(f"budget_on={budget_on!r} must be one of {list(BUDGET_ON)}")
    if multiple < 1 or minimum < 1:
        raise ValueError(f"multiple={multiple} and minimum={minimum} must be >= 1")
    tsal = table_saliency(field_saliency, tables)
    info = {t.name: t for t in tables}
    current = sum(t.params for t in tables)
    target = budget * current

    order = [(t.name, d) for t in tables for d in range(t.width)]  # tie-break: table order, dim
    pos = {p: i for i, p in enumerate(order)}
    order.sort(key=lambda p: (-float(tsal[p[0]][p[1]]), pos[p]))

    def charge(name: str, k: int) -> int:
        t = info[name]
        return t.rows * (k if budget_on == "selected" else round_width(k, t.width, multiple, minimum))

    kept = {t.name: 0 for t in tables}
    closed = set()
    used = sum(charge(n, 0) for n in kept)
    infeasible = used > target
    ranking = []
    for name, d in order:
        ok = False
        if name not in closed:
            extra = charge(name, kept[name] + 1) - charge(name, kept[name])
            if used + extra <= target:
                kept[name] += 1
                used += extra
                ok = True
            else:
                closed.add(name)
        ranking.append((name, d, float(tsal[name][d]), ok))

    widths = {t.name: round_width(kept[t.name], t.width, multiple, minimum) for t in tables}
    columns = {}
    for t in tables:
        top = sorted(range(t.width), key=lambda d: (-float(tsal[t.name][d]), d))[: widths[t.name]]
        columns[t.name] = sorted(top)
    return Selection(
        budget=budget,
        budget_on=budget_on,
        current_params=current,
        target_params=target,
        selected_params=sum(info[n].rows * k for n, k in kept.items()),
        final_params=sum(info[n].rows * w for n, w in widths.items()),
        kept_dims=kept,
        table_widths=widths,
        field_widths={f: widths[t.name] for t in tables for f in t.features},
        columns=columns,
        table_saliency=tsal,
        ranking=ranking,
        infeasible=infeasible,
    )
