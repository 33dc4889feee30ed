"""Click-through data sources (``data=`` config group).

Example::

    from torchrec_shark.config import DataConfig
    from torchrec_shark.data import build_dataset

    ds = build_dataset(DataConfig())  # synthetic
    batch = next(ds.batches("train", batch_size=2048, rank=0, world_size=1))
"""

from __future__ import annotations

from typing import Any

from torchrec_shark.config import DataConfig
from torchrec_shark.data.criteo_npy import CriteoNpy
from torchrec_shark.data.criteo_tsv import CriteoTsv
from torchrec_shark.data.synthetic import SyntheticClicks
from torchrec_shark.data.tabular import Tabular
from torchrec_shark.data.types import ClickDataset, DataError
from torchrec_shark.data.validate import validate_batch

SOURCES = {
    "synthetic": lambda cfg: SyntheticClicks(cfg.synthetic),
    "criteo_tsv": CriteoTsv,
    "criteo_npy": CriteoNpy,
    "tabular": Tabular,
}


def build_dataset(cfg: Any) -> ClickDataset:
    """The source ``cfg.source`` names. ``cfg`` is a :class:`DataConfig`, or an omegaconf
    config or dict of one (checked against the dataclass)."""
    if not isinstance(cfg, DataConfig):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), cfg))
    if cfg.source not in SOURCES:
        raise DataError(f"data.source={cfg.source!r} is not one of {list(SOURCES)}")
    return SOURCES[cfg.source](cfg)


__all__ = [
    "ClickDataset",
    "CriteoNpy",
    "CriteoTsv",
    "DataError",
    "SyntheticClicks",
    "Tabular",
    "build_dataset",
    "validate_batch",
]
