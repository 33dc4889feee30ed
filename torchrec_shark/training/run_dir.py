"""One job per run dir: an exclusive lock taken before training, and a check that the dir is writable.

Two jobs writing one run dir overwrite each other's checkpoints and metrics; the second one
is refused at start instead. Hydra writes ``.hydra/`` before the job starts, so the job that
holds the lock keeps a copy of it (``.lock.hydra/``) and a refused job puts it back.

Example::

    with run_dir_lock(run_dir, env):
        Trainer(cfg, run_dir, env).run()
"""

from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch.distributed as dist

from torchrec_shark.training.env import DistEnv

LOCK_NAME = ".lock"
HYDRA_COPY = ".lock.hydra"


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


def _acquire(run_dir: str):
    """(open lock file, None) or (None, why not)."""
    why = unwritable(run_dir)
    if why is not None:
        return None, f"run dir {why}"
    try:
        handle = open(os.path.join(run_dir, LOCK_NAME), "a+")
    except OSError as e:
        return None, f"run dir {run_dir!r}: cannot open {LOCK_NAME} ({e.strerror})"
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        _restore_hydra(run_dir)
        return None, (f"run dir {run_dir!r} is in use by another job ({_holder(os.path.join(run_dir, LOCK_NAME))}); "
                      "wait for it to finish or choose another with hydra.run.dir=...")
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    handle.flush()
    hydra_dir = os.path.join(run_dir, ".hydra")
    if os.path.isdir(hydra_dir):
        shutil.rmtree(os.path.join(run_dir, HYDRA_COPY), ignore_errors=True)
        shutil.copytree(hydra_dir, os.path.join(run_dir, HYDRA_COPY))
    return handle, None


def _restore_hydra(run_dir: str) -> None:
    """A refused job has already overwritten ``.hydra/`` (Hydra writes it first): put the holder's back."""
    copy = os.path.join(run_dir, HYDRA_COPY)
    if os.path.isdir(copy):
        shutil.rmtree(os.path.join(run_dir, ".hydra"), ignore_errors=True)
        shutil.copytree(copy, os.path.join(run_dir, ".hydra"))


@contextmanager
def run_dir_lock(run_dir: str, env: DistEnv) -> Iterator[None]:
    """Hold ``<run_dir>/.lock`` (rank 0, for the whole job) or raise :class:`RunDirError` on every rank."""
    handle, error = _acquire(run_dir) if env.is_main else (None, None)
    _agree(env, error)
    try:
        yield
    finally:
        if handle is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()
