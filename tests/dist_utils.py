"""Run a function on N gloo CPU ranks (torch.multiprocessing spawn) and collect results."""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from typing import Any, Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, out_dir: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        # no barrier: the other ranks may wait in a collective this rank never reaches; exiting lets the
        # parent see the failure and stop them
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 900) -> List[Any]:
    """``fn(rank, world_size, *args)`` on every rank; returns the per-rank results (torch.save-able).
    Fails (stopping every rank) when a rank raises or the ranks run past ``timeout`` seconds."""
    with tempfile.TemporaryDirectory() as out:
        try:
            ctx = mp.start_processes(_worker, args=(world_size, _free_port(), fn, out, args), nprocs=world_size,
                                     start_method="spawn", join=False)
            deadline = time.monotonic() + timeout
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    raise AssertionError(f"ranks ran past {timeout} s")
        except Exception as e:
            errs = [open(os.path.join(out, f)).read() for f in sorted(os.listdir(out)) if f.endswith(".err")]
            raise AssertionError("rank failed:\n" + "\n".join(errs)) from e
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
