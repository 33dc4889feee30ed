"""One object per kind of table: what the collection, the sharder, the planner, the trainer and the passes
know about it.

A kind (stock fp32, uniform fp16/int8/..., mixed precision, tensor train) is a :class:`TableKind` defined next
to its table class and listed once in :mod:`~torchrec_shark.modules.kinds`. It declares

* its names in the Hydra config (``tables.compression.kind``), its spec type and config section, and how a
  spec is read from that section (:meth:`TableKind.spec_from_config`);
* its capabilities (:attr:`TableKind.label_aware`, :attr:`TableKind.keeps_columns`,
  :attr:`TableKind.replicated_state`, :meth:`TableKind.tiers`, :attr:`TableKind.state_family`), which
  everything outside ``modules/`` asks instead of naming kinds or probing tables;
* the storage layout of a row range (:meth:`TableKind.state_layout`: which tensors a shard of
  rows ``[row_start, row_start + rows)`` holds, and where each sits in the table's global
  tensors), its bytes (:meth:`TableKind.storage_bytes`, used by the table's own report and by
  the planner's estimator alike) and its row-wise alignment (:meth:`TableKind.row_alignment`);
* building the shard of a row range directly from the config (:meth:`TableKind.build`): no
  rank allocates, initialises or copies a row it does not own;
* exporting the shard's state as pieces of global tensors (the live tensors, never copies) and
  importing it from any :class:`StateReader` (an in-memory state dict, sharded or not, or a
  checkpoint on disk) chunk by chunk.

Initial values are drawn per fixed block of :data:`INIT_BLOCK_ROWS` rows from a generator seeded
by ``(seed, table, block)``, so a table starts from the same values on 1 rank, table-wise or
row-wise on any number of ranks.

Example::

    from torchrec_shark.modules.kinds import kind_of
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

from torchrec_shark.modules.config_schema import section_type, spec_kwargs

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
            # on the CPU whatever the default device (e.g. inside ``with torch.device("meta")``)
            values = torch.empty(hi - lo, dim, device="cpu")
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


@dataclass(frozen=True)
class ServingOptions:
    """How an export may store a table for serving; the values and their precision are never changed.

    ``materialize_max_rows``: a table kept in another form than rows (tensor-train cores) with at most this
    many rows is written as fp32 rows instead (a lookup then reads a row instead of multiplying cores).
    """

    materialize_max_rows: int = 0


class ServingSink(abc.ABC):
    """Where :meth:`TableKind.export_serving` writes the tensors of a table's serving representation.

    An export maps each tensor onto its file, so a kind that fills it a chunk at a time never holds the
    table in memory; :class:`MemorySink` keeps them in memory (tests).
    """

    @abc.abstractmethod
    def tensor(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A zeroed, writable tensor that becomes the representation's tensor ``name``."""


class MemorySink(ServingSink):
    """Serving tensors in memory: ``sink.tensors[name]``.

    Example::

        sink = MemorySink()
        description = kind.export_serving(config, DictStateReader(kind.local_state(table)), sink)
    """

    def __init__(self) -> None:
        self.tensors: Dict[str, torch.Tensor] = {}

    def tensor(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        if name in self.tensors:
            raise ValueError(f"serving tensor {name!r} written twice")
        self.tensors[name] = torch.zeros(tuple(int(n) for n in shape), dtype=dtype)
        return self.tensors[name]


class TableKind(abc.ABC):
    """A kind of table: what it is called, what it can do, and its layout, bytes, alignment, shard
    construction and sharded state (see the module doc).

    Capabilities are declared here and asked by everything outside ``modules/`` (config validation, the
    factory, the sharder, the trainer, the passes, the benches), which never names a kind.
    """

    #: the names ``tables.compression.kind`` accepts for this kind (the first is its own name)
    names: Tuple[str, ...] = ()
    #: the compression spec type of its tables (``type(None)``: stock tables, ``compression=None``)
    spec_type: type = type(None)
    #: the ``tables.compression.<section>`` holding its settings (None: it has none)
    config_section: Optional[str] = None
    #: spec fields its config section does not hold (the kind sets them itself)
    config_excludes: Tuple[str, ...] = ()
    #: the table class (a :class:`~torchrec_shark.modules.base.CompressedTable`)
    table_class: type
    #: its tables read training labels (``record_labels``): only then are labels gathered and recorded
    label_aware: bool = False
    #: a narrower table of this kind can start from the kept columns of a trained one (dimension search)
    keeps_columns: bool = True
    #: row-wise shards hold replicas whose gradients are summed over the sharding group every step
    #: (``pending_flat`` / ``apply_flat`` on the table; ``update_replicas_in_backward`` where the group is
    #: one rank)
    replicated_state: bool = False
    #: the family of saved state it loads: kinds of one family load each other's checkpoints
    state_family: str = ""
    #: a stock TorchRec table (built as ``EmbeddingBagCollection`` when every table is stock)
    stock: bool = False

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def display_name(self) -> str:
        """What reports and benchmarks call it (its config name unless that says little, e.g. ``none``)."""
        return self.name

    def owns(self, spec) -> bool:
        """Whether ``spec`` (a config's ``compression``) is one of this kind's."""
        return type(spec) is self.spec_type

    def tiers(self, config) -> Tuple[str, ...]:
        """The precisions its rows are stored in, most precise first (empty: not a row store)."""
        return ()

    def config_fields(self) -> Dict[str, Tuple[Any, Any]]:
        """Settings of its config section that are not spec fields: ``{name: (type, default)}``."""
        return {}

    def spec_from_config(self, section, num_embeddings: int):
        """The spec of a table of ``num_embeddings`` rows from its config section (an instance of
        :meth:`section_type`, or None for a kind without one); ``None``: the table stays stock. Raises
        ``ValueError`` for values the spec rejects."""
        if self.config_section is None:
            return None
        return self.spec_type(**spec_kwargs(self.spec_type, section, self.config_excludes))

    def section_type(self) -> Optional[type]:
        """The dataclass of its config section, derived from its spec type (None: no section)."""
        if self.config_section is None:
            return None
        extra = tuple((name, typ, default) for name, (typ, default) in self.config_fields().items())
        return section_type(self.spec_type, self.config_excludes, extra)

    def example_spec(self):
        """A spec for the contract test over every kind (small tables, deterministic updates)."""
        return None

    def describe(self, config) -> str:
        """A short description of a table of this kind (error messages, reports)."""
        return f"{self.name}, {config.num_embeddings} x {config.embedding_dim}"

    def shrink_hint(self, config) -> str:
        """What to lower when this kind's tables do not fit in memory."""
        return "lower the tables' num_embeddings or embedding_dim, or choose a smaller table kind (tables=...)"

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
        other kinds of the same :attr:`state_family` are accepted where they carry the rows (e.g. a stock
        ``weight`` into any row store); ``columns``: the saved columns this (narrower) table keeps, in order."""

    @abc.abstractmethod
    def export_serving(self, config, reader: StateReader, sink: ServingSink,
                       options: ServingOptions = ServingOptions()) -> Dict[str, Any]:
        """Write the table's serving representation into ``sink`` from its saved state in ``reader`` (any
        sharding), a chunk at a time: the trained values as they are stored (no re-quantisation) and nothing
        of training (optimizer state, priorities, counters). Returns its description, JSON, in one of the
        formats :mod:`torchrec_shark.serving` reads (``format`` and the names of the tensors written)."""

    def unloadable(self, config, reader: StateReader, columns: Optional[Sequence[int]] = None) -> Optional[str]:
        """Why :meth:`load_state` could not take ``reader``'s state (None: it can). The same answer on every
        rank, shard or not."""
        return None

    def cost_factor(self, config) -> float:
        """Planner perf model: cost of looking up and updating one row relative to an fp32 row fetch."""
        return 1.0
