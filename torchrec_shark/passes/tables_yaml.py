"""Write a ``tables`` config group file that ``train.py`` loads through ``hydra.searchpath``.

Example::

    path = write_tables_config(out_dir, "pruned", run.cfg.tables, table_configs, keep_tables=["t_f00"])
    # train.py hydra.searchpath=[file://OUT] tables=pruned
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

from omegaconf import OmegaConf

from torchrec_shark.config import TablesConfig


def write_tables_config(
    out_dir: str,
    name: str,
    source: TablesConfig,
    table_configs: Sequence,
    keep_tables: Optional[Sequence[str]] = None,
    widths: Optional[Dict[str, int]] = None,
    init_columns: Optional[Dict[str, List[int]]] = None,
    header: str = "",
    drop_features: Optional[Sequence[str]] = None,
) -> str:
    """Explicit per-table config (features, rows, width, compression) at ``<out_dir>/tables/<name>.yaml``.

    Tables keep the compression they were trained with (an explicit per-table override wins,
    else the collection-wide setting), so the rewritten config trains the same table kinds.
    ``drop_features`` removes features from the tables that read them; a table left without
    features is dropped, one shared with a kept feature stays. ``init_columns`` is keyed by
    table name, or by a full model state-dict key of a 2-D dense weight (see
    :func:`torchrec_shark.training.checkpoint.warm_start`).
    """
    src = OmegaConf.structured(source)
    keep = set(keep_tables) if keep_tables is not None else None
    dropped = set(drop_features or ())
    tables = {}
    for c in table_configs:
        if keep is not None and c.name not in keep:
            continue
        features = [f for f in c.feature_names if f not in dropped]
        if not features:
            continue
        entry = {
            "features": features,
            "num_embeddings": int(c.num_embeddings),
            "embedding_dim": int((widths or {}).get(c.name, c.embedding_dim)),
            "pooling": "mean" if str(c.pooling).endswith("MEAN") else "sum",
        }
        override = src.tables.get(c.name) or src.overrides.get(c.name)
        if override is not None and override.compression is not None:
            entry["compression"] = OmegaConf.to_container(override.compression)
        tables[c.name] = entry
    doc = {
        "name": name,
        "embedding_dim": int(source.embedding_dim),
        "pooling": source.pooling,
        "compression": OmegaConf.to_container(src.compression),
        "tables": tables,
        "init_columns": {k: list(map(int, v)) for k, v in (init_columns or {}).items()},
    }
    folder = os.path.join(out_dir, "tables")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.yaml")
    with open(path, "w") as f:
        if header:
            f.write("".join(f"# {line}\n" for line in header.splitlines()))
        f.write(OmegaConf.to_yaml(OmegaConf.create(doc)))
    return path
