"""Process-group set-up for ``torchrun`` (or a plain single-process ``python train.py``).

gloo on CPU, NCCL on CUDA, chosen from the device.
"""

from __future__ import annotations

import os
import shutil
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", num_threads: int = 0) -> DistEnv:
    """Join (or create, when not launched by torchrun) the default process group."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
        # Ranks on one host share its cores; oversubscribing them slows every rank down.
        threads = num_threads or max(1, (os.cpu_count() or 1) // local_world_size)
        torch.set_num_threads(threads)
    if not dist.is_initialized():
        if world_size == 1:
            # Nothing to rendezvous with: an in-process store needs no port, so jobs that start together
            # (or inherit a finished job's MASTER_PORT from their parent's environment) cannot collide on one.
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistEnv(rank, world_size, local_rank, local_world_size, dev, backend)


def shutdown_distributed() -> None:
    """Barrier, then destroy the group: avoids 'terminate called without an active exception' at exit.

    Only for a rank that finished normally: a failed rank must not wait here (see :func:`abort_on_error`)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def abort_on_error(error: BaseException) -> None:
    """End a failed rank at once, without waiting for the others.

    The other ranks are waiting in a collective of a step this rank will never reach, and a
    barrier here would wait for them until the backend's timeout (30 minutes). With several
    ranks the error is printed and the process exits non-zero immediately: its peers' next
    collective fails on the closed connection, and ``torchrun``'s agent stops every worker of a
    job whose worker exited non-zero. A single process returns, so the caller re-raises.
    """
    multi_rank = dist.is_initialized() and dist.get_world_size() > 1
    if not multi_rank:
        if dist.is_initialized():
            dist.destroy_process_group()
        return
    code = 1
    if isinstance(error, SystemExit):  # its message is already printed
        code = error.code if isinstance(error.code, int) else 1
    else:
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        sys.stderr.write(f"[rank {dist.get_rank()}] failed:\n{text}")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(code)


@contextmanager
def distributed_job(device: str = "auto", num_threads: int = 0) -> Iterator[DistEnv]:
    """:func:`init_distributed`; at the end, a clean shutdown, or on any error :func:`abort_on_error`.

    Example::

        with distributed_job(cfg.trainer.device) as env:
            Trainer(cfg, run_dir, env).run()
    """
    env = init_distributed(device, num_threads)
    try:
        yield env
    except SystemExit as e:
        if e.code not in (None, 0):
            abort_on_error(e)
        else:
            shutdown_distributed()
        raise
    except BaseException as e:
        abort_on_error(e)
        raise
    shutdown_distributed()


def shared_run_dir(own: str, log_name: str) -> str:
    """Rank 0's Hydra run dir, on every rank (a time-stamped name can differ by a second between ranks).

    A rank whose own dir differs removes it when it holds only what Hydra put there (``.hydra`` and
    the job's log ``log_name``), so a run leaves one output dir.
    """
    obj = [own]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(obj, src=0)
    if obj[0] != own and os.path.isdir(own) and set(os.listdir(own)) <= {".hydra", log_name}:
        shutil.rmtree(own, ignore_errors=True)
    return obj[0]
