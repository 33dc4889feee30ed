"""One job per run dir: an exclusive lock taken before training, and a check that the dir is writable.

Two jobs writing one run dir overwrite each other's checkpoints and metrics; the second one
is refused at start instead, and writes nothing. The holder names itself in ``.lock`` (pid and
host) for the message of a refused job; a holder that is itself refused later (its checkpoint does
not fit, nothing to do) puts back what ``.lock`` held, so that the run dir is left as it was.

Example::

    with run_dir_lock(run_dir, env) as lock:
        trainer = Trainer(cfg, run_dir, env)
        trainer.on_accepted.append(lock.claim)
        trainer.run()
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch.distributed as dist

from torchrec_shark.training.env import DistEnv

LOCK_NAME = ".lock"


class RunDirError(RuntimeError):
    """The run dir cannot be used by this job (busy or not writable)."""


def _agree(env: DistEnv, error: Optional[str]) -> None:
    """Rank 0's verdict on every rank, so that all of them stop with the same message."""
    obj = [error]
    if dist.is_initialized() and env.world_size > 1:
        dist.broadcast_object_list(obj, src=0)
    if obj[0] is not None:
        raise RunDirError(obj[0])


def _holder(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip() or "unknown"
    except OSError:
        return "unknown"


def unwritable(run_dir: str) -> Optional[str]:
    """Why ``run_dir`` (and its ``checkpoints/`` when present) cannot be written, or ``None``."""
    for d in (run_dir, os.path.join(run_dir, "checkpoints")):
        if d != run_dir and not os.path.isdir(d):
            continue
        try:
            os.makedirs(d, exist_ok=True)
            probe = os.path.join(d, f".write_probe.{os.getpid()}")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            return f"{d!r} is not writable ({e.strerror}): choose another run dir with hydra.run.dir=..."
    return None


def refuse_unwritable_run_dir(argv: Sequence[str]) -> Optional[str]:
    """The error for a ``hydra.run.dir=`` on the command line that exists but cannot be written.

    Checked before Hydra starts: Hydra's own failure there ("Unable to configure handler
    'file'") does not name the dir."""
    for a in argv:
        if a.startswith("hydra.run.dir="):
            path = a.split("=", 1)[1]
            if os.path.isdir(path):
                return unwritable(path)
    return None


class RunDirLock:
    """The held lock of a run dir (main rank): ``claim()`` once the job is accepted keeps its name in
    ``.lock``; a job released without claiming puts back what the file held before."""

    def __init__(self, run_dir: str, handle, previous: bytes) -> None:
        self.run_dir = run_dir
        self._handle = handle
        self._previous = previous
        self._claimed = False

    def claim(self) -> None:
        self._claimed = True

    def release(self) -> None:
        if not self._claimed:  # written in place: the lock is on this file, not on a name
            self._handle.seek(0)
            self._handle.truncate()
            self._handle.write(self._previous.decode(errors="replace"))
            self._handle.flush()
        fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
        self._handle.close()


def _acquire(run_dir: str):
    """(:class:`RunDirLock`, None) or (None, why not). Writes nothing when it fails."""
    why = unwritable(run_dir)
    if why is not None:
        return None, f"run dir {why}"
    path = os.path.join(run_dir, LOCK_NAME)
    try:
        handle = open(path, "a+")
    except OSError as e:
        return None, f"run dir {run_dir!r}: cannot open {LOCK_NAME} ({e.strerror})"
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None, (f"run dir {run_dir!r} is in use by another job ({_holder(path)}); "
                      "wait for it to finish or choose another with hydra.run.dir=...")
    handle.seek(0)
    previous = handle.read().encode()
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    handle.flush()
    return RunDirLock(run_dir, handle, previous), None


@contextmanager
def run_dir_lock(run_dir: str, env: DistEnv) -> Iterator[Optional[RunDirLock]]:
    """Hold ``<run_dir>/.lock`` (rank 0, for the whole job) or raise :class:`RunDirError` on every rank.
    Yields the lock on rank 0 (``None`` on the others)."""
    lock, error = _acquire(run_dir) if env.is_main else (None, None)
    _agree(env, error)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
