"""Stock tables: TorchRec's own, with fp32 weights (``compression=None``) or fp16 weights (``stock_fp16``).

A collection whose tables are all stock is built as TorchRec's own ``EmbeddingBagCollection`` (:attr:`StockKind.stock`)
with the kind's weight type (:attr:`StockKind.data_type`): DMP then trains it on FBGEMM's fused TBE, fp16 rows
with TBE's stochastic rounding (``tables=baseline_fp16``, what a TorchRec user would compare compressed tables
with). Inside a compressed collection a stock table runs on the row store: one pool, the buffer ``weight`` (the
same state-dict key, dtype and shape as ``EmbeddingBagCollection``'s parameter, and the module's only
state-dict entry; the optimizer state is the fused optimizer's, as with TBE).

Example::

    table = build_table(CompressedEmbeddingBagConfig(name="t", num_embeddings=100, embedding_dim=8,
                                                     feature_names=["f"]), SparseOptimizerSpec())
    kind_named("stock_fp16").spec_from_config(None, 100)   # StockWeights(dtype='fp16')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from torchrec.modules.embedding_configs import DataType, PoolingType

from torchrec_shark.modules.base import SparseOptimizerSpec
from torchrec_shark.modules.row_store import RowStoreKind, RowStoreTable, seed_or_default

_DATA_TYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16}


@dataclass(frozen=True)
class StockWeights:
    """A stock table whose weights are ``dtype`` (``fp16``); ``compression=None`` is the fp32 stock table."""

    dtype: str = "fp16"

    def __post_init__(self) -> None:
        if self.dtype not in _DATA_TYPES or self.dtype == "fp32":
            raise ValueError(f"StockWeights.dtype={self.dtype!r} must be fp16 (fp32 stock tables have no spec)")


def _precision(config) -> str:
    spec = getattr(config, "compression", None)
    return spec.dtype if isinstance(spec, StockWeights) else "fp32"


class Fp32Table(RowStoreTable):
    """A stock table on the shared row-store engine, fp32 rows (or fp16 rows, rounded stochastically as TBE does,
    for a ``StockWeights("fp16")`` config), initialised by the config's ``init_fn`` exactly as
    ``torchrec.EmbeddingBagCollection`` does."""

    def __init__(self, config, optimizer: SparseOptimizerSpec = SparseOptimizerSpec(), device=None, *,
                 row_start: int = 0, rows: Optional[int] = None, seed: Optional[int] = None,
                 pooling: Optional[PoolingType] = None) -> None:
        rows = int(config.num_embeddings) if rows is None else int(rows)
        precision = _precision(config)
        super().__init__(config, optimizer, device, [(precision, rows)],
                         "nearest" if precision == "fp32" else "stochastic", row_start,
                         seed_or_default(config, seed), pooling, stock_pool=True)
        self.init_rows(config)


class StockKind(RowStoreKind):
    """TorchRec's own tables, with weights of one precision (``fp32``: ``compression=None``)."""

    table_class = Fp32Table
    stock = True
    stock_pool = True
    scalar_buffers = ()

    def __init__(self, precision: str = "fp32") -> None:
        self.precision = precision
        self.names = ("none",) if precision == "fp32" else (f"stock_{precision}",)
        self.spec_type = type(None) if precision == "fp32" else StockWeights
        #: the weight type of its tables in a stock ``EmbeddingBagCollection`` (FBGEMM's TBE trains them so)
        self.data_type = _DATA_TYPES[precision]

    @property
    def display_name(self) -> str:
        return "fp32" if self.precision == "fp32" else self.name

    def owns(self, spec) -> bool:
        return _precision_of_spec(spec) == self.precision

    def spec_from_config(self, section, num_embeddings: int):
        return None if self.precision == "fp32" else StockWeights(self.precision)

    def example_spec(self):
        return None if self.precision == "fp32" else StockWeights(self.precision)

    def tier_list(self, config, rows: int, row_start: int = 0) -> List[Tuple[str, int]]:
        return [(self.precision, rows)]

    def cost_factor(self, config) -> float:
        return 1.0 if self.precision == "fp32" else super().cost_factor(config)


def _precision_of_spec(spec) -> Optional[str]:
    if spec is None:
        return "fp32"
    return spec.dtype if isinstance(spec, StockWeights) else None
