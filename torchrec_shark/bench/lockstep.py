"""Run ``train.py`` taking turns with another run, one training step each.

Two jobs that run one after the other on a small shared machine differ by ±15% or more in
samples/s for reasons of their own (the host's other load changes over minutes). Two jobs that
alternate step by step see the same machine: whatever slows one step slows the other's next
step too, so the ratio of their speeds shows only what differs between the runs. The steady-state
benchmark (:mod:`torchrec_shark.bench.steady`) uses this to compare a run that checkpoints with
one that does not.

Rank ``r`` of a job reads the named pipe ``<role>.<r>`` in ``--gate`` and writes to every
``<other>.<s>``: before each step it hands the turn to the other job (after its first step) and
waits for every rank of it to hand the turn back. The wait is outside the step timer. A job that
fails lets the other go on alone.

Run (the bench does this; both commands at once, the gate's pipes made first)::

    python -m torchrec_shark.bench.lockstep --gate G --role ckpt --other control --first -- tables=shark ...
    python -m torchrec_shark.bench.lockstep --gate G --role control --other ckpt -- tables=shark ...

``--default-group`` runs saves, loads and the metric gather on the default process group instead
of a short-lived one: the behaviour before that fix, for checking that the benchmark sees it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import runpy
import sys
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_READY, _TURN, _GONE = b"r", b"t", b"q"


class StepGate:
    """Alternate steps with the ranks of another job, through named pipes.

    A turn passes when every rank of the job holding it has finished its step: each rank hands
    the turn to every rank of the other job, and each waits for all of them to hand it back. (A
    rank that started as soon as its own peer finished would overlap the other job's slower rank.)
    The job that steps first waits for the other to be ready (its start-up done); at the end, each
    waits for the other to finish too, so that neither's start-up or exit runs during the other's
    steps. A job that fails leaves at once and the other goes on alone.

    Example::

        gate = StepGate("/tmp/g/ckpt.0", ["/tmp/g/control.0"], first=True)
        for step in range(n):
            gate.turn()      # returns when it is this process's turn
            train_one_step()
        gate.leave()
    """

    def __init__(self, own: str, others: List[str], first: bool = False) -> None:
        # O_RDWR: neither open blocks waiting for the other end, and a write never meets a closed pipe.
        self._own = os.open(own, os.O_RDWR)
        self._others = [os.open(p, os.O_RDWR) for p in others]
        self._first = first
        self._started = self._left = False
        self._gone = 0  # ranks of the other job that have left

    @property
    def _other_gone(self) -> bool:
        return self._gone == len(self._others)

    def _send(self, token: bytes) -> None:
        for fd in self._others:
            os.write(fd, token)

    def _wait(self) -> None:
        """A token from each rank of the other job; a rank that leaves meanwhile stops being waited for."""
        received = 0
        while received + self._gone < len(self._others):
            if os.read(self._own, 1) == _GONE:
                self._gone += 1
            else:
                received += 1

    def turn(self) -> None:
        if self._other_gone:
            return
        if self._started:
            self._send(_TURN)
        elif not self._first:
            self._send(_READY)
        self._started = True
        self._wait()

    def leave(self, wait: bool = True) -> None:
        """Take no more turns (the other goes on alone); with ``wait``, return when the other leaves too."""
        if self._left:
            return
        self._left = True
        self._send(_GONE)
        while wait and not self._other_gone:
            self._wait()


def make_gate(directory: str, roles: List[str], ranks: int) -> None:
    """The named pipes for ``roles`` taking turns, ``ranks`` ranks each."""
    for role in roles:
        for rank in range(ranks):
            os.mkfifo(os.path.join(directory, f"{role}.{rank}"))


@contextlib.contextmanager
def _default_group():
    yield None


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gate", help="directory with the named pipes (see make_gate); none: train alone")
    p.add_argument("--role", default="ckpt")
    p.add_argument("--other", default="control")
    p.add_argument("--first", action="store_true", help="take the first step")
    p.add_argument("--default-group", action="store_true",
                   help="saves and metric gathers on the default process group (the behaviour before the fix)")
    p.add_argument("overrides", nargs="*", help="train.py's Hydra overrides (after --)")
    a = p.parse_args(argv)

    from torchrec_shark.training import checkpoint, trainer

    if a.default_group:
        trainer.transient_group = checkpoint.transient_group = _default_group
    sys.argv = [os.path.join(ROOT, "train.py"), *a.overrides]
    if a.gate is None:
        runpy.run_path(sys.argv[0], run_name="__main__")
        return
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    gate = StepGate(os.path.join(a.gate, f"{a.role}.{rank}"),
                    [os.path.join(a.gate, f"{a.other}.{r}") for r in range(world)], a.first)

    class LockstepTrainer(trainer.Trainer):
        def before_step(self, step: int) -> None:
            gate.turn()

        def run(self):
            try:
                out = super().run()
            except BaseException:
                gate.leave(wait=False)
                raise
            gate.leave()  # before the exit: the other's last steps do not share the machine with it
            return out

    # train.py runs as itself (Hydra finds its config next to it) and imports this trainer.
    trainer.Trainer = LockstepTrainer
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        gate.leave(wait=False)  # a job that failed before its first step: the other goes on alone


if __name__ == "__main__":
    main()
