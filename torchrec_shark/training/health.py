"""Whether a state is worth keeping as a checkpoint: finite is not healthy.

A run whose learning rate is far too high keeps finite values for a few steps before its loss turns
NaN; a checkpoint taken in those steps holds dense weights thousands of times their size, and a
resume from it diverges again at any learning rate. :class:`HealthMonitor` says why the current
state is not one to keep: the loss of the last steps far above its median over the recent window,
or the dense parameters' norm grown by orders of magnitude since the last checkpoint kept or since
the job started (with a checkpoint every step, a blow-up grows the norm 10-20x per checkpoint). The
trainer then skips that save, so ``latest`` stays at the last healthy checkpoint.

Example::

    health = HealthMonitor(lambda: dense_parameters(model))
    health.record_loss(float(loss))          # every step
    problem = health.problem()                # before a save: None, or why not to keep this state
    if problem is None:
        save(...)
        health.kept()
"""

from __future__ import annotations

import math
from collections import deque
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from torch import nn

# Step losses the median is taken over, and the most recent ones compared with it.
LOSS_WINDOW = 200
RECENT_STEPS = 5
MIN_LOSS_HISTORY = 20
# A mean loss of the last steps this many times the window's median: the run is blowing up. A
# click model's log loss moves by tens of percent over a whole run, not by a factor of 4 in 5 steps.
LOSS_FACTOR = 4.0
# Dense parameter norm this many times its value at the last checkpoint kept or at the job's start
# ("orders of magnitude"; a trained DLRM's dense norm stays within a few times its initial one).
NORM_GROWTH = 100.0


def dense_parameters(model: nn.Module) -> Iterable[torch.Tensor]:
    """The parameters of ``model`` outside its embedding tables (identical on every rank)."""
    for name, p in model.named_parameters():
        if "embedding_bag" not in name and isinstance(p, torch.Tensor) and p.is_floating_point():
            yield p


class HealthMonitor:
    """Recent step losses and the dense parameters' norm at the last checkpoint kept."""

    def __init__(self, parameters: Callable[[], Iterable[torch.Tensor]]) -> None:
        self._parameters = parameters
        self.losses: deque = deque(maxlen=LOSS_WINDOW)
        self.start_norm = self.reference_norm = self.dense_norm()

    def dense_norm(self) -> float:
        total = 0.0
        with torch.no_grad():
            for p in self._parameters():
                total += float(p.detach().double().square().sum())
        return math.sqrt(total)

    def record_loss(self, loss: float) -> None:
        self.losses.append(float(loss))

    def problem(self) -> Optional[str]:
        """Why the current state should not become a checkpoint, or ``None``."""
        reasons = []
        if len(self.losses) >= MIN_LOSS_HISTORY:
            recent = float(np.mean(list(self.losses)[-RECENT_STEPS:]))
            median = float(np.median(self.losses))
            if median > 0 and recent > LOSS_FACTOR * median:
                reasons.append(f"the loss of the last {RECENT_STEPS} steps ({recent:.4g}) is {recent / median:.1f}x "
                               f"its median over the last {len(self.losses)} steps ({median:.4g})")
        norm, reference = self.dense_norm(), min(self.start_norm, self.reference_norm)
        if not math.isfinite(norm) or (reference > 0 and norm > NORM_GROWTH * reference):
            since = "the job started" if reference == self.start_norm else "the last checkpoint kept"
            reasons.append(f"the dense parameters' norm grew from {reference:.4g} to {norm:.4g} since {since}")
        return "; ".join(reasons) or None

    def kept(self) -> None:
        """The current state was saved: later norms are compared with it."""
        self.reference_norm = self.dense_norm()
