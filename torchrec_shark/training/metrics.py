"""Validation metrics reduced over ranks: AUC (torchmetrics) and log loss.

Example::

    m = EvalMetrics(device)
    m.update(logits, labels)
    m.compute()  # {"auc": ..., "logloss": ..., "samples": ...} identical on every rank

AUC is undefined when the labels seen (on all ranks) are of one class: it is reported as NaN
with a warning, not as torchmetrics' 0.0, which reads as a model that ranks every pair wrong.
"""

from __future__ import annotations

import math
import warnings
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
        self.positives = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.auroc.update(torch.sigmoid(logits.float()), labels.long())
        self.loss_sum += F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="sum").double()
        self.count += labels.numel()
        self.positives += labels.double().sum()

    def compute(self) -> Dict[str, float]:
        auc = float(self.auroc.compute())  # torchmetrics gathers states from every rank
        totals = torch.stack([self.loss_sum, self.count, self.positives])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals, group=self.process_group)
        loss_sum, count, positives = totals.tolist()
        if positives == 0 or positives == count:
            warnings.warn(f"validation AUC is undefined: all {int(count)} validation labels are "
                          f"{int(positives > 0)}; reported as NaN")
            auc = math.nan
        return {"auc": auc, "logloss": loss_sum / max(count, 1.0), "samples": int(count)}
