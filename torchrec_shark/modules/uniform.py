"""Uniform tables: every row in one precision (fp16, int8 with a row-wise scale and bias, ...).

One kind per precision (:class:`UniformKind`), all on the row store with a single tier; updates are
rounded stochastically by default, so the expected stored value is the exact update.

Example::

    cfg = CompressedEmbeddingBagConfig(name="t", num_embeddings=1000, embedding_dim=64,
                                       feature_names=["f"], compression=Uniform("int8"))
    table = build_table(cfg, SparseOptimizerSpec("rowwise_adagrad", lr=0.05))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from torchrec.modules.embedding_configs import PoolingType

from torchrec_shark.modules.base import SparseOptimizerSpec
from torchrec_shark.modules.config_schema import spec_kwargs
from torchrec_shark.modules.quantization import ROUNDING_MODES
from torchrec_shark.modules.row_store import PRECISIONS, RowStoreKind, RowStoreTable, seed_or_default


@dataclass(frozen=True)
class Uniform:
    """Every row stored in one precision (``dtype``: a row codec's name other than fp32, e.g. ``fp16`` or
    ``int8``). ``rounding`` applies to optimizer updates, as in mixed precision."""

    dtype: str = "fp16"
    rounding: str = "stochastic"  # stochastic | nearest

    def __post_init__(self) -> None:
        if self.dtype not in PRECISIONS[1:]:
            raise ValueError(f"Uniform.dtype={self.dtype!r} must be one of {list(PRECISIONS[1:])}")
        if self.rounding not in ROUNDING_MODES:
            raise ValueError(f"Uniform.rounding={self.rounding!r} must be one of {list(ROUNDING_MODES)}")


class UniformTable(RowStoreTable):
    """Every row in ``config.compression.dtype``: one pool, ``<dtype>_rows``."""

    def __init__(self, config, optimizer: SparseOptimizerSpec = SparseOptimizerSpec(), device=None, *,
                 row_start: int = 0, rows: Optional[int] = None, seed: Optional[int] = None,
                 pooling: Optional[PoolingType] = None) -> None:
        spec: Uniform = config.compression
        rows = int(config.num_embeddings) if rows is None else int(rows)
        super().__init__(config, optimizer, device, [(spec.dtype, rows)], spec.rounding, row_start,
                         seed_or_default(config, seed), pooling)
        self.init_rows(config)


class UniformKind(RowStoreKind):
    """Uniform tables of one precision; ``tables.compression.kind=<precision>``, settings in
    ``tables.compression.uniform`` (shared by every uniform kind)."""

    spec_type = Uniform
    config_section = "uniform"
    config_excludes = ("dtype",)  # the kind's name sets it
    table_class = UniformTable

    def __init__(self, precision: str) -> None:
        self.precision = precision
        self.names = (precision,)

    def owns(self, spec) -> bool:
        return isinstance(spec, Uniform) and spec.dtype == self.precision

    def tier_list(self, config, rows: int, row_start: int = 0) -> List[Tuple[str, int]]:
        return [(self.precision, rows)]

    def spec_from_config(self, section, num_embeddings: int):
        return Uniform(self.precision, **spec_kwargs(Uniform, section, self.config_excludes))

    def example_spec(self):
        return Uniform(self.precision)
