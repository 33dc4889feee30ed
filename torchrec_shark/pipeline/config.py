"""Structured config of the compression pipeline (``conf/pipeline.yaml``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore

#: the ``tables=`` presets (``conf/tables/*.yaml``)
TABLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "conf", "tables")


def table_presets() -> List[str]:
    """Names of the ``tables=`` presets."""
    return sorted(f[: -len(".yaml")] for f in os.listdir(TABLES_DIR) if f.endswith(".yaml"))


def preset_compression(preset: str):
    """The ``tables.compression`` block of the ``tables=<preset>`` group, validated against the schema."""
    from omegaconf import OmegaConf

    from torchrec_shark.config import CompressionConfig

    doc = OmegaConf.load(os.path.join(TABLES_DIR, f"{preset}.yaml"))
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(CompressionConfig), doc.get("compression", {})))


@dataclass
class PipelineConfig:
    nproc: int = 1
    train: List[str] = field(default_factory=list)
    steps: Optional[int] = None
    finetune_steps: int = 500
    prune: List[str] = field(default_factory=lambda: ["tolerance=0.03"])
    budget: float = 0.5
    shark_tables: str = "shark"
    # in the SHARK stage, a table this preset stores in fewer bytes (a narrow or small one) takes it ("none": never)
    narrow_tables: str = "int8"
    # the same pruned, narrowed tables stored as these presets instead (each warm-started like the shark stage)
    endings: List[str] = field(default_factory=lambda: ["int8"])
    comparisons: List[str] = field(default_factory=lambda: ["tt", "fp16", "int8"])
    resume: bool = True


def check(cfg: PipelineConfig) -> None:
    """Reject values that would only fail minutes into the pipeline."""
    if cfg.nproc < 1:
        raise ValueError(f"nproc={cfg.nproc} must be >= 1")
    if cfg.steps is not None and cfg.steps < 1 or cfg.finetune_steps < 1:
        raise ValueError("steps and finetune_steps must be >= 1")
    if not 0.0 < cfg.budget <= 1.0:
        raise ValueError(f"budget={cfg.budget} must be in (0, 1]")
    presets = table_presets()
    for key in ("comparisons", "endings"):
        unknown = [c for c in getattr(cfg, key) if c not in presets]
        if unknown:
            raise ValueError(f"{key} {unknown} are not tables= presets; choose from {presets}")
    if cfg.narrow_tables != "none" and cfg.narrow_tables not in presets:
        raise ValueError(f"narrow_tables={cfg.narrow_tables!r} is not a tables= preset ({presets}) or none")
    if cfg.shark_tables != "none" and cfg.shark_tables not in presets:
        raise ValueError(f"shark_tables={cfg.shark_tables!r} is not a tables= preset ({presets}) or none")
    for o in cfg.train:
        if "=" not in o:
            raise ValueError(f"train override {o!r} is not key=value")


def register_configs() -> None:
    ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)
