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
) -> str:
    """Explicit per-table config (features, rows, width, compression) at ``<out_dir>/tables/<name>.yaml``.

    Tables keep the compression they were trained with (an explicit per-table override wins,
    else the collection-wide setting), so the rewritten config trains the same table kinds.
    """
    src = OmegaConf.structured(source)
    keep = set(keep_tables) if keep_tables is not None else None
    tables = {}
    for c in table_configs:
        if keep is not None and c.name not in keep:
            continue
        entry = {
            "features": list(c.feature_names),
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
