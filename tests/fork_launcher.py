"""Runs ``python train.py ...``, ``python -m <module> ...`` and their ``torchrun`` forms in forked copies
of one process that has imported torch, TorchRec and this package once.

Each command still runs its entry point's ``__main__`` code with its own ``sys.argv`` (``runpy``),
in its own process per rank; ``torchrun`` is stood in for by forking one process per rank with the
environment torchrun gives its workers (``RANK``, ``WORLD_SIZE``, ``MASTER_PORT``, ...), and, as
torchrun does, a failed rank stops the others and the command exits 1. What it saves is the
import of torch and TorchRec per command (seconds of CPU each). The server itself runs no torch
operation, so its children start from a process without OpenMP threads.

Protocol (``serve``): one JSON request per stdin line ``{"argv", "cwd", "env", "timeout", "log"}``,
one JSON answer per stdout line ``{"code"}``; the command's output goes to ``log``.

Example::

    launcher = ForkLauncher()
    code = launcher.run(["python", "train.py", "trainer.max_steps=2"], cwd, env, log_path)
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
import traceback
from typing import Dict, List, Optional, Tuple

PRELOAD = ("torch", "torchrec", "hydra", "omegaconf", "pandas", "torchrec_shark.training.trainer",
           "torchrec_shark.passes.run_loader", "torchrec_shark.cli")


def parse(argv: List[str]) -> Optional[Tuple[int, str, str, List[str]]]:
    """``(nproc, "module" | "path", target, args)`` of a command this launcher can run, else ``None``."""
    nproc = 1
    if argv[0] == "torchrun":
        i = 1
        while i < len(argv) and argv[i].startswith("--"):
            if argv[i].startswith("--nproc_per_node="):
                nproc = int(argv[i].split("=", 1)[1])
            i += 1
        argv = ["python", *argv[i:]]
    if argv[0] not in ("python", "python3") or len(argv) < 2:
        return None
    if argv[1] == "-m":
        return nproc, "module", argv[2], argv[3:]
    return nproc, "path", argv[1], argv[2:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(kind: str, target: str, args: List[str], cwd: str, env: Dict[str, str], log: str) -> None:
    code = 1
    try:
        os.setpgid(0, 0)
        os.chdir(cwd)
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.environ.clear()
        os.environ.update(env)
        sys.path[0] = cwd if kind == "module" else os.path.dirname(os.path.abspath(target))
        try:
            if kind == "module":
                sys.argv = [target, *args]
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                sys.argv = [target, *args]
                runpy.run_path(target, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def launch(argv: List[str], cwd: str, env: Dict[str, str], timeout: float, log: str) -> int:
    """Run one command (see the module docstring); its exit code, as ``python`` or ``torchrun`` would give."""
    nproc, kind, target, args = parse(argv)
    port = _free_port()
    pids = []
    for rank in range(nproc):
        child_env = dict(env)
        if argv[0] == "torchrun":
            child_env.update(RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", ROLE_RANK=str(rank),
                             WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), ROLE_WORLD_SIZE=str(nproc),
                             MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            if nproc > 1:
                child_env.setdefault("OMP_NUM_THREADS", "1")
        pid = os.fork()
        if pid == 0:
            _child(kind, target, args, cwd, child_env, log)
        pids.append(pid)
    codes: Dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while len(codes) < len(pids):
        for pid in pids:
            if pid in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
        failed = any(c != 0 for c in codes.values())
        if (failed or time.monotonic() > deadline) and len(codes) < len(pids):
            for pid in pids:  # as torchrun: one failed worker stops the others
                if pid not in codes:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            for pid in pids:
                if pid not in codes:
                    codes[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            if not failed:
                return 124  # timed out
        time.sleep(0.05)
    values = [codes[p] for p in pids]
    if argv[0] == "torchrun":
        return 0 if all(c == 0 for c in values) else 1
    return values[0]


def serve() -> None:
    for name in PRELOAD:
        __import__(name)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        code = launch(req["argv"], req["cwd"], req["env"], req["timeout"], req["log"])
        print(json.dumps({"code": code}), flush=True)


class ForkLauncher:
    """The client: a ``serve()`` process started with ``env``, fed one command at a time."""

    def __init__(self, env: Dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", "from tests.fork_launcher import serve; serve()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def run(self, argv: List[str], cwd: str, env: Dict[str, str], log: str, timeout: float = 600) -> int:
        self.proc.stdin.write(json.dumps({"argv": argv, "cwd": cwd, "env": env, "timeout": timeout, "log": log}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["code"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


if __name__ == "__main__":
    serve()
