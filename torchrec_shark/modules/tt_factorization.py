"""Shapes of a tensor-train table: row/column factorisations, ranks, and the mixed-radix id split.

A table of ``N`` rows and ``D`` columns becomes ``d`` cores; core ``k`` has shape
``(R_{k-1}, p_k, q_k, R_k)`` with ``R_0 = R_d = 1``, ``prod(p) >= N`` (the padding rows are never
addressed) and ``prod(q) == D``. Row ``i`` is split most-significant-first,
``i = ((i1 * p2) + i2) * p3 + i3``, and column ``j`` likewise over ``q``.

Example::

    layout = resolve_layout("t_user", 1_000_000, 64, TensorTrain(num_cores=3, ranks=(32,)))
    layout.row_factors, layout.col_factors, layout.ranks  # (100, 100, 100), (4, 4, 4), (1, 32, 32, 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import torch

if TYPE_CHECKING:  # the spec lives with its kind, which imports this module
    from torchrec_shark.modules.tensor_train import TensorTrain

MIN_CORES, MAX_CORES = 2, 4


@dataclass(frozen=True)
class TTLayout:
    num_embeddings: int
    embedding_dim: int
    row_factors: Tuple[int, ...]
    col_factors: Tuple[int, ...]
    ranks: Tuple[int, ...]  # R_0 .. R_d, with R_0 = R_d = 1

    @property
    def num_cores(self) -> int:
        return len(self.row_factors)

    @property
    def padded_rows(self) -> int:
        return math.prod(self.row_factors)

    def core_shape(self, k: int) -> Tuple[int, int, int, int]:
        return (self.ranks[k], self.row_factors[k], self.col_factors[k], self.ranks[k + 1])

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(self.core_shape(k)) for k in range(self.num_cores))

    @property
    def first_core_block(self) -> int:
        """Rows per first-core slice (``p2 * ... * pd``): row-wise shard boundaries must be multiples of it."""
        return math.prod(self.row_factors[1:])


def _int_root(n: int, d: int) -> int:
    """Largest ``r`` with ``r ** d <= n``."""
    r = max(1, int(round(n ** (1.0 / d))))
    while r**d > n:
        r -= 1
    while (r + 1) ** d <= n:
        r += 1
    return r


def balanced_row_factors(n: int, d: int) -> Tuple[int, ...]:
    """``d`` factors differing by at most one, the first ones largest, with the smallest product ``>= n``."""
    factors = [_int_root(n, d)] * d
    k = 0
    while math.prod(factors) < n:
        factors[k] += 1
        k = (k + 1) % d
    return tuple(factors)


def balanced_col_factors(dim: int, d: int) -> Tuple[int, ...]:
    """An exact factorisation of ``dim`` into ``d`` factors, the most balanced one (smallest largest factor,
    then smallest sum), in ascending order: a left-to-right chain then costs least (its dominant term
    ``q1 * R1 * q2 * R2`` is smallest when the early factors are small)."""
    best: Optional[Tuple[int, ...]] = None

    def search(rest: int, slots: int, lo: int, acc: List[int]) -> None:
        nonlocal best
        if slots == 1:
            if rest >= lo:
                cand = tuple(acc + [rest])
                if best is None or (max(cand), sum(cand)) < (max(best), sum(best)):
                    best = cand
            return
        f = lo
        while f ** slots <= rest:
            if rest % f == 0:
                search(rest // f, slots - 1, f, acc + [f])
            f += 1

    search(dim, d, 1, [])
    assert best is not None  # (1, ..., 1, dim) always qualifies
    return best


def resolve_layout(name: str, num_embeddings: int, embedding_dim: int, spec: TensorTrain) -> TTLayout:
    """Validate ``spec`` against the table's shape and fill in the default factorisations.

    Raises ``ValueError`` naming the table for shapes that cannot work.
    """
    where = f"table {name!r} (TensorTrain, {num_embeddings} x {embedding_dim})"
    d = spec.num_cores
    if not MIN_CORES <= d <= MAX_CORES:
        raise ValueError(f"{where}: num_cores={d} must be between {MIN_CORES} and {MAX_CORES}")
    if num_embeddings < 1 or embedding_dim < 1:
        raise ValueError(f"{where}: num_embeddings and embedding_dim must be >= 1")

    ranks = tuple(int(r) for r in spec.ranks)
    if len(ranks) == 1:
        ranks = ranks * (d - 1)
    if len(ranks) != d - 1:
        raise ValueError(f"{where}: ranks={spec.ranks} must hold one value or num_cores - 1 = {d - 1} values")
    if any(r < 1 for r in ranks):
        raise ValueError(f"{where}: ranks={spec.ranks} must all be >= 1")

    if spec.row_factors is None:
        rows = balanced_row_factors(num_embeddings, d)
        if min(rows) < 2:
            raise ValueError(
                f"{where}: too few rows for {d} cores (balanced row factors {rows} include a factor < 2; "
                f"need num_embeddings >= {2 ** (d - 1) + 1}); use fewer cores or a stock table"
            )
    else:
        rows = tuple(int(p) for p in spec.row_factors)
        if len(rows) != d:
            raise ValueError(f"{where}: row_factors={rows} must have num_cores={d} entries")
        if min(rows) < 2:
            raise ValueError(f"{where}: row_factors={rows} must all be >= 2")
        if math.prod(rows) < num_embeddings:
            raise ValueError(
                f"{where}: row_factors={rows} multiply to {math.prod(rows)}, fewer than num_embeddings={num_embeddings}"
            )

    if spec.col_factors is None:
        cols = balanced_col_factors(embedding_dim, d)
    else:
        cols = tuple(int(q) for q in spec.col_factors)
        if len(cols) != d:
            raise ValueError(f"{where}: col_factors={cols} must have num_cores={d} entries")
        if min(cols) < 1:
            raise ValueError(f"{where}: col_factors={cols} must all be >= 1")
        if math.prod(cols) != embedding_dim:
            raise ValueError(
                f"{where}: embedding_dim={embedding_dim} is not factorable as col_factors={cols} "
                f"(product {math.prod(cols)}; it must equal embedding_dim)"
            )

    if spec.init not in ("sampled_gaussian", "naive"):
        raise ValueError(f"{where}: init={spec.init!r} must be 'sampled_gaussian' or 'naive'")
    if not 0.0 <= spec.cache_fraction < 1.0:
        raise ValueError(f"{where}: cache_fraction={spec.cache_fraction} must be in [0, 1)")
    if spec.cache_refresh_every < 1:
        raise ValueError(f"{where}: cache_refresh_every={spec.cache_refresh_every} must be >= 1")
    return TTLayout(num_embeddings, embedding_dim, rows, cols, (1, *ranks, 1))


def split_ids(ids: torch.Tensor, row_factors: Sequence[int]) -> List[torch.Tensor]:
    """Mixed-radix digits of ``ids``, most significant (first core) first."""
    digits = []
    rest = ids
    for p in reversed(row_factors[1:]):
        digits.append(torch.remainder(rest, p))
        rest = torch.div(rest, p, rounding_mode="floor")
    digits.append(rest)
    return digits[::-1]
