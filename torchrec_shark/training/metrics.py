"""Validation metrics reduced over ranks: AUC (torchmetrics) and log loss.

Example::

    m = EvalMetrics(device)
    m.update(logits, labels)
    m.compute()  # {"auc": ..., "logloss": ..., "samples": ...} identical on every rank
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torchmetrics.classification import BinaryAUROC


class EvalMetrics:
    """Accumulates logits and labels over batches; ``compute`` syncs over ``process_group`` (default: the default group)."""

    def __init__(self, device: torch.device, process_group: Optional[dist.ProcessGroup] = None) -> None:
        self.device = device
        self.process_group = process_group
        self.auroc = BinaryAUROC(process_group=process_group).to(device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.auroc.update(torch.sigmoid(logits.float()), labels.long())
        self.loss_sum += F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="sum").double()
        self.count += labels.numel()

    def compute(self) -> Dict[str, float]:
        auc = float(self.auroc.compute())  # torchmetrics gathers states from every rank
        totals = torch.stack([self.loss_sum, self.count])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals, group=self.process_group)
        loss_sum, count = totals.tolist()
        return {"auc": auc, "logloss": loss_sum / max(count, 1.0), "samples": int(count)}
