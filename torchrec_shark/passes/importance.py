"""Field importance at the pooled embeddings: exact permutation importance and SHARK's F-Permutation.

Everything here works on pooled field embeddings ``e_j(x)`` (what :meth:`DLRM.embed` returns),
so it applies to every table kind and every sharding. Under ``torchrun`` each rank passes
its slice of each evaluation batch; sums and counts are all-reduced, so every rank gets the
same importances, equal (up to float rounding) to a single process over the whole batches.

- **Exact permutation importance** of field ``j``: the mean loss increase when ``e_j(x)`` is
  replaced by the field's value in another sample (a permutation of the evaluation samples),
  all other fields fixed, averaged over ``T`` permutations; only ``predict`` is re-run.
- **F-Permutation** (SHARK): the first-order estimate of the same quantity with one
  forward/backward: with ``g_j(x) = dL(x)/de_j(x)`` and ``ebar_j`` the mean of ``e_j`` over
  the evaluation data, ``importance_j = mean_x |g_j(x) . (ebar_j - e_j(x))|``.

Example::

    acc = FPermAccumulator()
    for b in batches:                                  # this rank's slices
        grads, _ = loss_gradients(run, b.dense, b.labels, b.pooled)
        acc.update(b.pooled, grads)
    fperm = acc.finalize()                             # {field: importance}, same on every rank

    cache = EvalCache.collect(batches)                 # all in memory: the mean first, then one pass
    acc = FPermAccumulator(ebar=mean_pooled(cache.pooled))
    exact = exact_importance(cache, predict, repeats=1, seed=0).importance
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.nn import functional as F

Predict = Callable[[torch.Tensor, Dict[str, torch.Tensor]], torch.Tensor]


# ------------------------------------------------------------------ distributed helpers
def _world(group=None) -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _all_reduce(t: torch.Tensor, group=None) -> torch.Tensor:
    if _world(group)[1] > 1:
        dist.all_reduce(t, group=group)
    return t


# ------------------------------------------------------------------ F-Permutation
class FPermAccumulator:
    """Streams batches of ``(pooled, grads)`` and returns SHARK's F-Permutation importance per field.

    With ``ebar`` (the global mean embedding of every field, e.g. from :func:`mean_pooled`)
    each batch is reduced at once to ``sum_x |g_j(x) . (ebar_j - e_j(x))|``. Without it,
    ``g . (ebar - e) = g . ebar - g . e``: per sample it keeps ``g_j(x)`` and the scalar
    ``g_j(x) . e_j(x)`` (float64) and sums ``e_j`` for the mean, so ``ebar_j`` can be the
    *global* mean (all-reduced in :meth:`finalize`) without a second pass over the data.
    """

    def __init__(self, ebar: Optional[Dict[str, torch.Tensor]] = None) -> None:
        self.fields: Optional[List[str]] = None
        self._ebar = ebar
        self._abs: Dict[str, torch.Tensor] = {}
        self._sum: Dict[str, torch.Tensor] = {}
        self._count = 0
        self._g: Dict[str, List[torch.Tensor]] = {}
        self._ge: Dict[str, List[torch.Tensor]] = {}

    def update(self, pooled: Dict[str, torch.Tensor], grads: Dict[str, torch.Tensor]) -> None:
        if self.fields is None:
            self.fields = list(pooled)
            self._g = {f: [] for f in self.fields}
            self._ge = {f: [] for f in self.fields}
        missing = [f for f in self.fields if f not in pooled or f not in grads]
        if missing:
            raise KeyError(f"batch lacks pooled embeddings or gradients of fields {missing}")
        n = None
        for f in self.fields:
            e, g = pooled[f].detach(), grads[f].detach()
            if e.shape != g.shape:
                raise ValueError(f"field {f!r}: pooled {tuple(e.shape)} and gradient {tuple(g.shape)} differ")
            n = e.shape[0]
            if self._ebar is not None:
                if f not in self._ebar:
                    raise KeyError(f"no mean embedding given for field {f!r}")
                d = (g * (self._ebar[f].to(e.dtype) - e)).sum(1).abs().sum().double()
                self._abs[f] = d if f not in self._abs else self._abs[f] + d
                continue
            e64 = e.double()
            s = e64.sum(0)
            self._sum[f] = s if f not in self._sum else self._sum[f] + s
            self._g[f].append(g)
            self._ge[f].append((g.double() * e64).sum(1))
        self._count += int(n or 0)

    def finalize(self, group=None) -> Dict[str, float]:
        """Importance per field (identical on every rank of ``group``)."""
        if self.fields is None:
            raise ValueError("no batches: F-Permutation needs at least one evaluation batch")
        fields = self.fields
        device = (self._abs if self._ebar is not None else self._sum)[fields[0]].device
        count = _all_reduce(torch.tensor([float(self._count)], dtype=torch.float64, device=device), group)
        n_global = float(count.item())
        if n_global == 0:
            raise ValueError("no evaluation samples on any rank")
        if self._ebar is not None:
            total = _all_reduce(torch.stack([self._abs[f] for f in fields]), group) / n_global
            return {f: float(v) for f, v in zip(fields, total.tolist())}
        # One all-reduce of every field's sum (fields may have different widths).
        sums = _all_reduce(torch.cat([self._sum[f] for f in fields]), group)
        ebar = dict(zip(fields, torch.split(sums / n_global, [self._sum[f].numel() for f in fields])))
        local = torch.zeros(len(fields), dtype=torch.float64, device=device)
        for i, f in enumerate(fields):
            tot = torch.zeros((), dtype=torch.float64, device=device)
            for g, ge in zip(self._g[f], self._ge[f]):
                tot = tot + (g.double() @ ebar[f] - ge).abs().sum()
            local[i] = tot
        total = _all_reduce(local, group) / n_global
        return {f: float(v) for f, v in zip(fields, total.tolist())}


def mean_pooled(pooled: Dict[str, torch.Tensor], group=None) -> Dict[str, torch.Tensor]:
    """``ebar_j``: every field's mean pooled embedding over the samples of all ranks (float64 sums)."""
    fields = list(pooled)
    if not fields:
        raise ValueError("no fields")
    device = pooled[fields[0]].device
    n = _all_reduce(torch.tensor([float(pooled[fields[0]].shape[0])], dtype=torch.float64, device=device), group)
    if float(n.item()) == 0:
        raise ValueError("no evaluation samples on any rank")
    sums = _all_reduce(torch.cat([pooled[f].double().sum(0) for f in fields]), group)
    return dict(zip(fields, torch.split(sums / n, [pooled[f].shape[1] for f in fields])))


def fperm_importance(
    pooled: Dict[str, torch.Tensor], grads: Dict[str, torch.Tensor], group=None
) -> Dict[str, float]:
    """F-Permutation importance from one rank's concatenated ``pooled`` and ``grads`` ([n, D_j] per field)."""
    acc = FPermAccumulator()
    acc.update(pooled, grads)
    return acc.finalize(group)


# ------------------------------------------------------------------ exact permutation importance
@dataclass
class EvalCache:
    """This rank's evaluation samples at the pooled embeddings.

    ``batch_sizes`` are this rank's rows of each global batch (the same on every rank, as the
    data sources guarantee), which places every local row in the global sample order.
    """

    dense: torch.Tensor
    labels: torch.Tensor
    pooled: Dict[str, torch.Tensor]
    batch_sizes: List[int] = field(default_factory=list)

    @property
    def fields(self) -> List[str]:
        return list(self.pooled)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @staticmethod
    def collect(batches: Iterable) -> "EvalCache":
        """Concatenate batches with ``dense``, ``labels`` and ``pooled`` attributes."""
        dense, labels, sizes = [], [], []
        pooled: Dict[str, List[torch.Tensor]] = {}
        for b in batches:
            dense.append(b.dense)
            labels.append(b.labels)
            sizes.append(int(b.labels.shape[0]))
            for f, e in b.pooled.items():
                pooled.setdefault(f, []).append(e.detach())
        if not sizes:
            raise ValueError("no evaluation batches")
        return EvalCache(torch.cat(dense), torch.cat(labels), {f: torch.cat(v) for f, v in pooled.items()}, sizes)

    def global_index(self, group=None) -> Tuple[torch.Tensor, int]:
        """Global sample index of every local row, and the global number of samples."""
        rank, world = _world(group)
        sizes = self.batch_sizes or [len(self)]
        return _global_index_of(sizes, rank, world), sum(sizes) * world

    def gather_field(self, f: str, group=None) -> torch.Tensor:
        """Field ``f``'s pooled embeddings of every evaluation sample, in global order ([N, D])."""
        e = self.pooled[f]
        rank, world = _world(group)
        if world == 1:
            return e
        parts = [torch.empty_like(e) for _ in range(world)]
        dist.all_gather(parts, e.contiguous(), group=group)
        out = torch.empty((e.shape[0] * world,) + tuple(e.shape[1:]), dtype=e.dtype, device=e.device)
        for r, part in enumerate(parts):
            out[_global_index_of(self.batch_sizes or [len(self)], r, world).to(e.device)] = part
        return out


def _global_index_of(batch_sizes: Sequence[int], rank: int, world: int) -> torch.Tensor:
    idx, global_off = [], 0
    for b in batch_sizes:
        idx.append(torch.arange(b) + global_off + rank * b)
        global_off += b * world
    return torch.cat(idx)


def permutation(n: int, seed: int, field_index: int, repeat: int) -> torch.Tensor:
    """The permutation of ``n`` global samples used for field ``field_index``, repeat ``repeat``.

    Deterministic in ``(seed, field_index, repeat)`` and independent of the world size.
    """
    rng = np.random.default_rng([int(seed), int(field_index), int(repeat)])
    return torch.from_numpy(rng.permutation(n))


@dataclass
class ExactImportance:
    importance: Dict[str, float]
    baseline_loss: float
    per_repeat: Dict[str, List[float]]
    num_samples: int


def _loss_sum(predict: Predict, dense, labels, pooled, chunk: int) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64, device=labels.device)
    n = labels.shape[0]
    with torch.no_grad():
        for s in range(0, n, chunk):
            sl = slice(s, min(n, s + chunk))
            logits = predict(dense[sl], {f: e[sl] for f, e in pooled.items()})
            total += F.binary_cross_entropy_with_logits(logits, labels[sl], reduction="sum").double()
    return total


def exact_importance(
    cache: EvalCache,
    predict: Predict,
    repeats: int = 1,
    seed: int = 0,
    fields: Optional[Sequence[str]] = None,
    chunk: int = 8192,
    group=None,
) -> ExactImportance:
    """Permutation importance: mean loss increase when one field's pooled embeddings are shuffled.

    For field ``j`` and repeat ``t`` the global samples are permuted by
    :func:`permutation` ``(N, seed, j, t)``; sample ``x`` then sees ``e_j`` of sample
    ``perm[x]``. Loss sums are all-reduced, so the result does not depend on the world size.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    all_fields = cache.fields
    fields = list(fields) if fields is not None else all_fields
    gidx, n_global = cache.global_index(group)
    device = cache.labels.device
    gidx = gidx.to(device)
    base = _all_reduce(_loss_sum(predict, cache.dense, cache.labels, cache.pooled, chunk), group)
    baseline = float(base.item()) / n_global
    per_repeat: Dict[str, List[float]] = {}
    for f in fields:
        j = all_fields.index(f)
        full = cache.gather_field(f, group)
        sums = torch.zeros(repeats, dtype=torch.float64, device=device)
        for t in range(repeats):
            perm = permutation(n_global, seed, j, t).to(device)
            pooled = dict(cache.pooled)
            pooled[f] = full[perm[gidx]]
            sums[t] = _loss_sum(predict, cache.dense, cache.labels, pooled, chunk)
        sums = _all_reduce(sums, group)
        per_repeat[f] = [float(s) / n_global - baseline for s in sums.tolist()]
    importance = {f: float(np.mean(v)) for f, v in per_repeat.items()}
    return ExactImportance(importance, baseline, per_repeat, n_global)


# ------------------------------------------------------------------ ranking helpers
def rank_of(values: Dict[str, float]) -> Dict[str, int]:
    """1 = most important; ties broken by field order."""
    order = sorted(values, key=lambda f: -values[f])
    return {f: i + 1 for i, f in enumerate(order)}


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    ra, rb = _average_ranks(np.asarray(a, dtype=float)), _average_ranks(np.asarray(b, dtype=float))
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):
        m = x == v
        if m.sum() > 1:
            ranks[m] = ranks[m].mean()
    return ranks
