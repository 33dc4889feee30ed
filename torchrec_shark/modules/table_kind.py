"""One object per kind of table: what the collection, the sharder and the planner know about it.

A kind (stock fp32, uniform fp16/int8, mixed precision, tensor train) is a :class:`TableKind`
registered next to its table class with :func:`register_table_kind`. It owns

* the storage layout of a row range (:meth:`TableKind.state_layout`: which tensors a shard of
  rows ``[row_start, row_start + rows)`` holds, and where each sits in the table's global
  tensors), its bytes (:meth:`TableKind.storage_bytes`, used by the table's own report and by
  the planner's estimator alike) and its row-wise alignment (:meth:`TableKind.row_alignment`);
* building the shard of a row range directly from the config (:meth:`TableKind.build`): no
  rank allocates, initialises or copies a row it does not own;
* exporting the shard's state as pieces of global tensors (the live tensors, never copies) and
  importing it from any :class:`StateReader` (an in-memory state dict, sharded or not, or a
  checkpoint on disk) chunk by chunk.

``torchrec_shark.distributed`` only calls these; adding a kind touches one file in ``modules/``.

Initial values are drawn per fixed block of :data:`INIT_BLOCK_ROWS` rows from a generator seeded
by ``(seed, table, block)``, so a table starts from the same values on 1 rank, table-wise or
row-wise on any number of ranks.

Example::

    kind = kind_of(config)                                   # from config.compression
    kind.storage_bytes(config, optimizer, row_start=0, rows=config.num_embeddings)["total"]
    shard = kind.build(config, optimizer, row_start=0, rows=1000, device=torch.device("cpu"), seed=7)
"""

from __future__ import annotations

import abc
import contextlib
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

# No step materialises more than this many rows of fp32 values (initialisation, import, export).
CHUNK_ROWS = 1 << 16
# Initial values come in fixed blocks of rows, each from its own generator (sharding-independent).
INIT_BLOCK_ROWS = 1 << 16

_MASK64 = (1 << 64) - 1


def mix64(x: int) -> int:
    """SplitMix64's finaliser: a well-spread 64-bit hash of a 64-bit integer."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def table_seed(base_seed: int, name: str) -> int:
    """The seed of table ``name`` in a collection built under ``base_seed`` (``torch.initial_seed()``)."""
    return (int(base_seed) + zlib.crc32(name.encode())) % 2**63


def block_seed(seed: int, block: int, salt: int = 0) -> int:
    """Seed of row block ``block`` (``salt`` separates independent streams of one table, e.g. TT cores)."""
    return mix64(mix64(seed ^ (salt * 0x9E3779B97F4A7C15)) + block) % 2**63


def init_blocks(init_fn: Callable[[torch.Tensor], object], seed: int, row_start: int, rows: int, dim: int,
                table_rows: int, device: Optional[torch.device] = None,
                salt: int = 0) -> Iterator[Tuple[int, torch.Tensor]]:
    """Initial values of rows ``[row_start, row_start + rows)`` of a table of ``table_rows`` rows, as
    ``(first row, fp32 chunk)`` pairs.

    Block ``b`` (rows ``[b * INIT_BLOCK_ROWS, (b + 1) * INIT_BLOCK_ROWS)``, cut at ``table_rows``) is
    filled by ``init_fn`` with torch's generator seeded from ``(seed, b)``, then cut to the requested
    rows, so any range gets the same values whatever else is built. The global RNG is left as it was.
    """
    end = row_start + rows
    block = row_start // INIT_BLOCK_ROWS
    while block * INIT_BLOCK_ROWS < end:
        lo = block * INIT_BLOCK_ROWS
        hi = min(lo + INIT_BLOCK_ROWS, table_rows)
        a, b = max(lo, row_start), min(hi, end)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(block_seed(seed, block, salt))
            values = torch.empty(hi - lo, dim)
            init_fn(values)
        yield a, values[a - lo : b - lo].to(device) if device is not None else values[a - lo : b - lo]
        block += 1


_draw_initial_values = True


@contextlib.contextmanager
def without_initial_values() -> Iterator[None]:
    """Row-store tables built inside this block start zeroed instead of drawing their initial values.

    For a resume, which loads every row over them: drawing the values of a 10M-row shard costs
    about 5 s per rank (``bench.scale --build``) and is thrown away by the load. A resume whose
    load fails stops with an error, so the zeros are never trained.

    Example::

        with without_initial_values():
            model = shard_model(...)        # then load the checkpoint over every table
    """
    global _draw_initial_values
    before, _draw_initial_values = _draw_initial_values, False
    try:
        yield
    finally:
        _draw_initial_values = before


def draws_initial_values() -> bool:
    """False inside :func:`without_initial_values`."""
    return _draw_initial_values


@dataclass(frozen=True)
class PieceSpec:
    """Where one tensor of a shard sits in the table's global tensor of the same name.

    The shard holds ``[offset, offset + length)`` along ``dim`` of a tensor of ``global_size``;
    ``replicated``: every shard holds the whole tensor (``offset``/``length`` unused).
    """

    global_size: Tuple[int, ...]
    dtype: torch.dtype
    offset: int = 0
    length: int = 0
    dim: int = 0
    replicated: bool = False


class StateReader(abc.ABC):
    """Reads ranges of a table's saved tensors (``key`` without the table prefix)."""

    @abc.abstractmethod
    def keys(self) -> Sequence[str]: ...

    @abc.abstractmethod
    def size(self, key: str) -> Tuple[int, ...]: ...

    @abc.abstractmethod
    def read(self, key: str, offset: int = 0, length: Optional[int] = None, dim: int = 0) -> torch.Tensor:
        """``[offset, offset + length)`` along ``dim`` (default: the whole tensor), as a tensor this rank owns."""

    def chunks(self, key: str, offset: int, length: int, chunk: int = CHUNK_ROWS) -> Iterator[Tuple[int, torch.Tensor]]:
        """``(offset, values)`` of ``[offset, offset + length)`` along dim 0, ``chunk`` rows at a time."""
        for a in range(offset, offset + length, chunk):
            n = min(chunk, offset + length - a)
            yield a, self.read(key, a, n)


class DictStateReader(StateReader):
    """Ranges of in-memory tensors: full tensors, a ``ShardedTensor``'s local shards, or a ``DTensor``."""

    def __init__(self, values: Dict[str, Any]) -> None:
        self._values = values

    def keys(self) -> Sequence[str]:
        return list(self._values)

    def size(self, key: str) -> Tuple[int, ...]:
        return tuple(self._values[key].size())

    def read(self, key: str, offset: int = 0, length: Optional[int] = None, dim: int = 0) -> torch.Tensor:
        value = self._values[key]
        if value.dim() == 0:
            return value.detach() if not hasattr(value, "full_tensor") else value.full_tensor()
        length = value.size(dim) - offset if length is None else length
        if hasattr(value, "local_shards"):
            parts = []
            for s in sorted(value.local_shards(), key=lambda s: s.metadata.shard_offsets[dim]):
                o, n = s.metadata.shard_offsets[dim], s.metadata.shard_sizes[dim]
                lo, hi = max(o, offset), min(o + n, offset + length)
                if hi > lo:
                    parts.append(s.tensor.detach().narrow(dim, lo - o, hi - lo))
            covered = sum(p.shape[dim] for p in parts)
            if length == 0:
                return torch.empty(*[0 if d == dim else n for d, n in enumerate(value.size())], dtype=value.dtype)
            if covered != length:
                raise ValueError(f"{key}: this rank's shards of the given ShardedTensor do not cover "
                                 f"[{offset}, {offset + length}) along dim {dim}")
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim)
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        return value.detach().narrow(dim, offset, length)


class TableKind(abc.ABC):
    """A kind of table: layout, bytes, alignment, shard construction and sharded state (see the module doc)."""

    #: the table class (a :class:`~torchrec_shark.modules.base.CompressedTable`)
    table_class: type

    @abc.abstractmethod
    def build(self, config, optimizer, row_start: int, rows: int, device: Optional[torch.device], seed: int,
              row_wise: bool = False):
        """The table of rows ``[row_start, row_start + rows)`` (all rows: the unsharded table), initialised
        from ``seed`` (see :func:`init_blocks`). ``row_wise``: a shard whose pooled partial sums another
        rank adds to (MEAN is applied after that sum, so the shard pools with SUM)."""

    @abc.abstractmethod
    def storage_bytes(self, config, optimizer, row_start: int, rows: int) -> Dict[str, int]:
        """Bytes of the shard of ``rows`` rows at ``row_start``, by part: its table storage and, under
        ``optimizer``, its fused optimizer state (key ``optimizer``). ``total``: all of it."""

    def row_alignment(self, config) -> int:
        """Row-wise shard boundaries must be multiples of this (1: any boundary)."""
        return 1

    @abc.abstractmethod
    def state_layout(self, config, optimizer, ranges: Sequence[Tuple[int, int]]) -> List[Dict[str, PieceSpec]]:
        """For each shard ``(row_start, rows)`` of a sharding (ordered by rows), its state tensors as
        pieces of global tensors; ``optimizer`` state under the prefix ``optim.``."""

    @abc.abstractmethod
    def local_state(self, table, sync: bool = True) -> Dict[str, torch.Tensor]:
        """The shard's state tensors named as in :meth:`state_layout` (the live tensors themselves);
        ``sync``: first bring them up to date with the table (an export; not before a load)."""

    @abc.abstractmethod
    def load_state(self, table, reader: StateReader, row_start: int, columns: Optional[Sequence[int]] = None) -> None:
        """Fill ``table`` (the shard at ``row_start``) from ``reader``, a chunk at a time. Tensors of
        other kinds are accepted where they carry the rows (e.g. a stock ``weight`` into any row store);
        ``columns``: the saved columns this (narrower) table keeps, in order."""

    def unloadable(self, config, reader: StateReader, columns: Optional[Sequence[int]] = None) -> Optional[str]:
        """Why :meth:`load_state` could not take ``reader``'s state (None: it can). The same answer on every
        rank, shard or not."""
        return None

    def cost_factor(self, config) -> float:
        """Planner perf model: cost of looking up and updating one row relative to an fp32 row fetch."""
        return 1.0


_KINDS: Dict[type, TableKind] = {}


def register_table_kind(spec_type: type, kind: TableKind) -> None:
    """Make ``kind`` the kind of every table whose ``compression`` is a ``spec_type`` (``type(None)``: stock)."""
    _KINDS[spec_type] = kind


def kind_of(config) -> TableKind:
    """The registered kind of ``config.compression``."""
    _ensure_registered()
    spec = getattr(config, "compression", None)
    kind = _KINDS.get(type(spec))
    if kind is None:
        raise ValueError(
            f"table {config.name!r}: no table kind registered for compression {type(spec).__name__}; "
            f"known: {[t.__name__ for t in _KINDS]}"
        )
    return kind


def _ensure_registered() -> None:
    # The kinds register themselves when their modules are imported.
    import torchrec_shark.modules.mixed_precision  # noqa: F401
    import torchrec_shark.modules.tensor_train  # noqa: F401
