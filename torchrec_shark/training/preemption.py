"""SIGTERM as a request to stop after the current step, with a checkpoint.

A cluster scheduler (and ``torchrun``'s agent, which forwards it to its workers and kills them 30 s
later) sends SIGTERM before it kills a job. Ending at once would lose up to ``checkpoint_every``
steps; instead the handler only records the signal, every rank finishes its step, and the ranks
agree (one max all-reduce of a flag per step: a rank may get the signal a moment after another) to
stop at the same step, save and exit.

Example::

    with StopRequest() as stop:
        while training:
            step()
            if stop.agreed():
                save(); break
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Optional

import torch
import torch.distributed as dist

# The exit status of a job ended by SIGTERM (128 + 15), also when it stopped cleanly with a checkpoint.
EXIT_CODE = 128 + signal.SIGTERM


class StopRequest:
    """Catches SIGTERM while active (main thread only) and tells, in agreement over the ranks, whether
    any rank has received it."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        self.signum = signum
        self.received = False
        self._previous = None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self.received = True

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def agreed(self, device: Optional[torch.device] = None) -> bool:
        """True on every rank when any rank has received the signal (a collective: call it on every
        rank at the same step; ``device``: where the default group's backend reduces, e.g. CUDA for NCCL)."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([1 if self.received else 0], dtype=torch.int32, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item())
        return self.received
