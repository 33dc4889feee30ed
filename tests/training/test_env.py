import os
import socket
import subprocess
import sys

from tests.training.small_job import ROOT

SNIPPET = """
import torch.distributed as dist
from torchrec_shark.training.env import init_distributed, shutdown_distributed
env = init_distributed("cpu")
dist.barrier()
print("world", env.world_size, "rank", env.rank)
shutdown_distributed()
"""


def test_a_one_process_job_needs_no_port_even_one_inherited_and_taken():
    # A test or launcher that ran a job in-process leaves RANK/WORLD_SIZE/MASTER_PORT in its environment;
    # jobs it starts inherit them, and (two at once) must not both try to listen on that port.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(os.environ, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        jobs = [subprocess.Popen([sys.executable, "-c", SNIPPET], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        outs = [j.communicate(timeout=120)[0] for j in jobs]
    assert [j.returncode for j in jobs] == [0, 0], outs
    assert all("world 1 rank 0" in o for o in outs), outs
