"""Checks a training job makes before its first step, so that it fails at start and not hours in.

- :func:`check_table_memory`: tables that would not fit in memory (a tensor-train rank or a row-count
  typo can ask for terabytes), from the resolved table configs and their kinds' exact bytes, before
  anything is allocated;
- :func:`check_splits`: a training or validation split with no batch (evaluation would fail only after
  training, when no checkpoint is written yet), and a warning for a batch larger than the whole
  training split (every batch would repeat rows);
- :func:`resume_data_offset`: where the data stream continues on resume when the global batch
  size changed (exactly, or a refusal: never a silent skip or re-read).

Example::

    check_table_memory(table_configs, optimizer, memory_bytes=host_memory_bytes())
    check_splits(dataset, batch_size=2048, rank=0, world_size=1, where="data.path=day_0.tsv")
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, Optional, Sequence

from torchrec_shark.config import ConfigError
from torchrec_shark.data.types import DataError
from torchrec_shark.modules.kinds import kind_of


def host_memory_bytes() -> Optional[int]:
    """Physical memory of this host, or ``None`` where the OS does not tell."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def memory_budget_bytes(device_type: str, world_size: int, hbm_cap_gb: Optional[float],
                        ddr_cap_gb: Optional[float]) -> Optional[int]:
    """Memory of all ranks together: the planner caps when set, else the devices' (CUDA) or the host's."""
    cap = hbm_cap_gb if device_type == "cuda" else ddr_cap_gb
    if cap is not None:
        return int(cap * (1 << 30) * world_size)
    if device_type == "cuda":
        import torch

        return torch.cuda.get_device_properties(0).total_memory * world_size
    return host_memory_bytes()


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


def check_table_memory(table_configs: Sequence, optimizer, memory_bytes: Optional[int]) -> Dict[str, int]:
    """Bytes of each table with its fused optimizer state (its kind's exact count, as the planner sees it);
    raises :class:`ConfigError` naming the largest tables and what to lower when they sum to more than
    ``memory_bytes``."""
    sizes = {c.name: kind_of(c).storage_bytes(c, optimizer, 0, int(c.num_embeddings))["total"]
             for c in table_configs}
    total = sum(sizes.values())
    if memory_bytes is not None and total > memory_bytes:
        worst = sorted(sizes, key=lambda name: -sizes[name])[:3]
        configs = {c.name: c for c in table_configs}
        detail = "; ".join(f"{name}: {_gb(sizes[name])}, {kind_of(configs[name]).describe(configs[name])}"
                           for name in worst)
        hints = sorted({kind_of(configs[name]).shrink_hint(configs[name]) for name in worst})
        raise ConfigError(
            f"the embedding tables need {_gb(total)} (with their optimizer state), more than the "
            f"{_gb(memory_bytes)} of memory available ({detail}); {'; '.join(hints)}")
    return sizes


def check_splits(dataset, batch_size: int, rank: int, world_size: int, where: str) -> None:
    """Raise :class:`DataError` naming ``where`` (the data) when the training or the validation
    split yields no batch for this world size; warn (rank 0) when one batch is more than the whole
    training split."""
    for split in ("train", "val"):
        try:
            first = next(iter(dataset.batches(split, batch_size, rank, world_size)), None)
        except DataError as e:
            raise DataError(f"{where}: {split} split: {e}") from None
        if first is None:
            raise DataError(f"{where}: the {split} split has no batch for {world_size} rank(s) (no rows, or fewer "
                            f"than the ranks); give more rows or another data.val_fraction")
    rows = training_rows_below(dataset, batch_size)
    if rows is not None and rank == 0:
        warnings.warn(f"{where}: trainer.batch_size={batch_size} is larger than the whole training split ({rows:,} "
                      "rows): every batch holds some rows more than once; lower trainer.batch_size")


def training_rows_below(dataset, n: int) -> Optional[int]:
    """The training split's rows when they are fewer than ``n`` (else ``None``), reading at most ``n`` rows
    of a streamed source."""
    rows = dataset.epoch_rows("train")
    if rows is None and hasattr(dataset, "chunks"):
        rows = 0
        for chunk in dataset.chunks("train"):
            rows += len(chunk)
            if rows >= n:
                return None
    return rows if rows is not None and rows < n else None


def resume_data_offset(meta: Dict, batch_size: int) -> int:
    """``data_offset`` (batches of ``batch_size`` before step 0, may be negative) that continues the
    checkpoint's data stream at its next unread sample.

    The checkpoint counts its position in batches of the global batch size it was trained with;
    under another size the same samples are ``position * old`` rows in. When ``batch_size`` does
    not divide that, no step boundary falls there: refuse rather than skip or re-read samples.
    """
    step = int(meta["step"])
    position = int(meta.get("data_position", step))
    old = int(meta.get("config", {}).get("trainer", {}).get("batch_size", batch_size))
    if old == batch_size:
        return position - step
    samples = position * old
    if samples % batch_size:
        raise ConfigError(
            f"trainer.batch_size={batch_size} cannot resume this checkpoint exactly: it has read {samples:,} "
            f"samples ({position} batches of {old}), not a whole number of batches of {batch_size}; resume with "
            f"trainer.batch_size={old} or a size that divides {samples:,}")
    return samples // batch_size - step
