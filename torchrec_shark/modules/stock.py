"""Stock fp32 tables (``compression=None``) on the row store.

The pool is the buffer ``weight``: the same state-dict key and shape as ``EmbeddingBagCollection``'s
parameter, and the module's only state-dict entry (the optimizer state is the fused optimizer's, as
with TBE). A collection whose tables are all stock is built as TorchRec's own ``EmbeddingBagCollection``
(:attr:`StockKind.stock`); this table serves stock tables inside a compressed collection.

Example::

    table = build_table(CompressedEmbeddingBagConfig(name="t", num_embeddings=100, embedding_dim=8,
                                                     feature_names=["f"]), SparseOptimizerSpec())
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from torchrec.modules.embedding_configs import PoolingType

from torchrec_shark.modules.base import SparseOptimizerSpec
from torchrec_shark.modules.row_store import RowStoreKind, RowStoreTable, seed_or_default


class Fp32Table(RowStoreTable):
    """A stock fp32 table on the shared row-store engine (initialised by the config's ``init_fn`` exactly
    as ``torchrec.EmbeddingBagCollection`` does)."""

    def __init__(self, config, optimizer: SparseOptimizerSpec = SparseOptimizerSpec(), device=None, *,
                 row_start: int = 0, rows: Optional[int] = None, seed: Optional[int] = None,
                 pooling: Optional[PoolingType] = None) -> None:
        rows = int(config.num_embeddings) if rows is None else int(rows)
        super().__init__(config, optimizer, device, [("fp32", rows)], "nearest", row_start,
                         seed_or_default(config, seed), pooling, stock_pool=True)
        self.init_rows(config)


class StockKind(RowStoreKind):
    """Plain fp32 rows: TorchRec's own tables."""

    names = ("none",)
    table_class = Fp32Table
    stock = True
    stock_pool = True
    scalar_buffers = ()

    def tier_list(self, config, rows: int) -> List[Tuple[str, int]]:
        return [("fp32", rows)]

    def cost_factor(self, config) -> float:
        return 1.0
