"""From the ``tables`` config and the data source to table configs and a collection.

Example::

    configs = build_table_configs(cfg.tables, dataset.feature_names, dataset.num_embeddings_per_feature)
    ebc = build_collection(configs, device=torch.device("meta"))
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from omegaconf import OmegaConf
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_shark.config import ConfigError, TableConfig, TablesConfig
from torchrec_shark.modules.kinds import kind_of, spec_from_config
from torchrec_shark.modules.specs import CompressedEmbeddingBagConfig

POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def compression_spec(cfg, num_embeddings: int):
    """The module-level spec for one table from its ``tables.compression`` config (``None``: stock fp32)."""
    try:
        return spec_from_config(cfg, num_embeddings)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _plain(cfg):
    return OmegaConf.to_object(cfg) if OmegaConf.is_config(cfg) else cfg


def build_table_configs(
    tables: TablesConfig,
    feature_names: Sequence[str],
    num_embeddings_per_feature: Sequence[int],
) -> List[CompressedEmbeddingBagConfig]:
    """One config per table, in a stable order.

    With ``tables.tables`` empty, each data feature gets its own table ``t_<feature>``;
    otherwise the explicit mapping is used and must only name features the data has.
    """
    tables = _plain(tables)
    rows_of = dict(zip(feature_names, num_embeddings_per_feature))
    explicit: Dict[str, TableConfig] = dict(tables.tables)
    if not explicit:
        explicit = {f"t_{f}": TableConfig(features=[f]) for f in feature_names}
        unknown = sorted(set(tables.overrides) - set(explicit))
        if unknown:
            raise ConfigError(f"tables.overrides names unknown tables {unknown}; tables are {sorted(explicit)}")
        for name, ov in tables.overrides.items():
            base = explicit[name]
            explicit[name] = TableConfig(
                features=ov.features or base.features,
                num_embeddings=ov.num_embeddings,
                embedding_dim=ov.embedding_dim,
                pooling=ov.pooling or base.pooling,
                compression=ov.compression,
            )
    configs = []
    for name, t in explicit.items():
        if not t.features:
            raise ConfigError(f"tables.tables.{name}.features is empty")
        missing = [f for f in t.features if f not in rows_of]
        if missing:
            raise ConfigError(f"tables.tables.{name} reads features {missing} that the data does not have; "
                              f"data features: {list(feature_names)}")
        rows = t.num_embeddings or max(rows_of[f] for f in t.features)
        too_small = [f for f in t.features if rows_of[f] > rows]
        if too_small:
            raise ConfigError(f"tables.tables.{name}.num_embeddings={rows} is smaller than the id range of {too_small}")
        dim = t.embedding_dim or tables.embedding_dim
        pooling = t.pooling or tables.pooling
        comp = t.compression if t.compression is not None else tables.compression
        configs.append(
            CompressedEmbeddingBagConfig(
                name=name,
                num_embeddings=rows,
                embedding_dim=dim,
                feature_names=list(t.features),
                pooling=POOLING[pooling],
                compression=compression_spec(comp, rows),
            )
        )
    return configs


def is_compressed(configs: Sequence[CompressedEmbeddingBagConfig]) -> bool:
    """Whether any table is of a kind other than stock (then the compressed collection holds them all)."""
    return not all(kind_of(c).stock for c in configs)


def stock_configs(configs: Sequence[CompressedEmbeddingBagConfig]) -> List[EmbeddingBagConfig]:
    """The same tables as plain ``EmbeddingBagConfig`` (for a stock ``EmbeddingBagCollection``)."""
    return [
        EmbeddingBagConfig(
            name=c.name,
            num_embeddings=c.num_embeddings,
            embedding_dim=c.embedding_dim,
            feature_names=list(c.feature_names),
            pooling=c.pooling,
            data_type=_stock_data_type(c),
        )
        for c in configs
    ]


def _stock_data_type(config: CompressedEmbeddingBagConfig) -> DataType:
    """The weight type FBGEMM's TBE trains: a stock kind's own (fp32, fp16), fp32 for a compressed table."""
    kind = kind_of(config)
    return kind.data_type if kind.stock else DataType.FP32


def build_collection(
    configs: Sequence[CompressedEmbeddingBagConfig],
    device: torch.device,
    optimizer=None,
):
    """A stock ``EmbeddingBagCollection`` when nothing is compressed, else the compressed collection."""
    if not is_compressed(configs):
        return EmbeddingBagCollection(tables=stock_configs(configs), device=device)
    from torchrec_shark.modules.embedding_bag_collection import CompressedEmbeddingBagCollection

    # On "meta" nothing is allocated: the sharder builds each rank's shards for the rows it owns.
    kwargs = {"optimizer": optimizer} if optimizer is not None else {}
    return CompressedEmbeddingBagCollection(tables=list(configs), device=device, **kwargs)
