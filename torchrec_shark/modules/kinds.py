"""The one list of table kinds, and the questions asked of it.

Everything that depends on which kinds exist (config validation and the Hydra schema, the table
factory, the sharder, the trainer, the passes, the benches) asks here; nothing outside ``modules/``
names a kind. Adding a kind is its file in ``modules/`` plus one entry in :data:`KINDS`.

Example::

    kind_of(config).label_aware            # does this table read labels?
    kind_named("int8").spec_from_config(section, num_embeddings=1000)
    build_table(config, SparseOptimizerSpec())
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from torchrec_shark.modules.base import CompressedTable, SparseOptimizerSpec
from torchrec_shark.modules.mixed_precision import MixedPrecisionKind
from torchrec_shark.modules.stock import StockKind
from torchrec_shark.modules.table_kind import TableKind, table_seed
from torchrec_shark.modules.tensor_train import TensorTrainKind
from torchrec_shark.modules.uniform import UniformKind

KINDS: List[TableKind] = [
    StockKind(),
    StockKind("fp16"),
    UniformKind("fp16"),
    UniformKind("int8"),
    UniformKind("int4"),
    UniformKind("int2"),
    MixedPrecisionKind(),
    TensorTrainKind(),
]


def register_kind(kind: TableKind) -> None:
    """Add ``kind`` to :data:`KINDS` (a kind defined outside this package, or in a test)."""
    taken = [n for n in kind.names if n in kind_names()]
    if taken:
        raise ValueError(f"kind names {taken} are taken")
    KINDS.append(kind)


def kind_names() -> List[str]:
    """Every name ``tables.compression.kind`` accepts."""
    return [n for k in KINDS for n in k.names]


def kind_named(name: str) -> TableKind:
    """The kind called ``name`` in the config."""
    for k in KINDS:
        if name in k.names:
            return k
    raise ValueError(f"no table kind named {name!r}; known: {kind_names()}")


def kind_of(config) -> TableKind:
    """The kind of a table config (by its ``compression`` spec; none: stock)."""
    spec = getattr(config, "compression", None)
    for k in KINDS:
        if k.owns(spec):
            return k
    raise ValueError(f"table {config.name!r}: no table kind for compression {spec!r}; known kinds: {kind_names()}")


def kinds_of(configs: Sequence) -> List[TableKind]:
    return [kind_of(c) for c in configs]


def label_aware(configs: Sequence) -> bool:
    """Whether any of these tables reads training labels."""
    return any(kind_of(c).label_aware for c in configs)


def config_sections() -> Dict[str, type]:
    """``{section: dataclass}`` of every kind's settings in ``tables.compression`` (shared by kinds that
    declare the same section)."""
    out: Dict[str, type] = {}
    for k in KINDS:
        if k.config_section is not None and k.config_section not in out:
            out[k.config_section] = k.section_type()
    return out


def spec_from_config(compression, num_embeddings: int):
    """The spec of a table from its ``tables.compression`` config (``None``: stock)."""
    if compression is None:
        return None
    kind = kind_named(compression.kind)
    section = getattr(compression, kind.config_section) if kind.config_section else None
    return kind.spec_from_config(section, num_embeddings)


def build_table(config, optimizer: SparseOptimizerSpec, device: Optional[torch.device] = None,
                seed: Optional[int] = None) -> CompressedTable:
    """The whole (unsharded) table of ``config``, of its kind; ``device="meta"`` allocates nothing.

    ``seed`` defaults to the table's seed under ``torch.initial_seed()``.
    """
    if seed is None:
        seed = table_seed(torch.initial_seed(), config.name)
    return kind_of(config).build(config, optimizer, 0, int(config.num_embeddings), device, seed)
