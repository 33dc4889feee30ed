"""Check that every collective's tensors sit on its process group's device (gloo: CPU, NCCL: CUDA).

A CPU tensor handed to NCCL, or a CUDA tensor to a gloo group that cannot take it, fails only on a GPU
machine, often as a hang or an obscure backend error. Inside :func:`checked_collectives` every
``torch.distributed`` collective (TorchRec's input and output dists, the label gather, the replica and
metric reductions, the object collectives of checkpoints and plans) first checks its tensors against
its group's backend and raises :class:`CollectiveDeviceError` naming the collective, the backend and
the tensor's device; each call is recorded (name, backend, device types), so a CPU run shows which
collectives a job makes and where their tensors live.

Run ``train.py`` under the check (``--record`` writes each rank's collectives as JSON lines)::

    torchrun --standalone --nproc_per_node=2 -m torchrec_shark.distributed.device_check --record /tmp/coll -- tables=shark

Example::

    with checked_collectives() as seen:
        dist.all_reduce(torch.ones(1))            # gloo: fine
    seen[0]  # {"collective": "all_reduce", "backend": "gloo", "devices": ["cpu"]}
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import runpy
import sys
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: the device type each backend's collectives take
BACKEND_DEVICE = {"gloo": "cpu", "nccl": "cuda"}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter", "send", "recv",
               "isend", "irecv")


class CollectiveDeviceError(RuntimeError):
    """A collective was given a tensor on a device its process group's backend does not use."""


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _group_of(args, kwargs):
    group = kwargs.get("group")
    if group is None:
        group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
    return group


def collective_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """Where tensors for ``group``'s (default: the default group's) collectives go: the current CUDA device
    under NCCL, the CPU otherwise (gloo, or no process group)."""
    if dist.is_initialized() and BACKEND_DEVICE.get(str(dist.get_backend(group))) == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def checked_collectives() -> Iterator[List[Dict]]:
    """Within the block every collective checks its tensors' device (see the module doc); yields the record."""
    seen: List[Dict] = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def wrap(name, fn):
        def checked(*args, **kwargs):
            group = _group_of(args, kwargs)
            backend = str(dist.get_backend(group))
            want = BACKEND_DEVICE.get(backend)
            tensors = [t for v in (*args, *kwargs.values()) for t in _tensors(v)]
            devices = sorted({t.device.type for t in tensors})
            seen.append({"collective": name, "backend": backend, "devices": devices})
            bad = [t for t in tensors if want is not None and t.device.type != want]
            if bad:
                raise CollectiveDeviceError(
                    f"{name} on a {backend} group was given a tensor on {bad[0].device} (shape "
                    f"{tuple(bad[0].shape)}, {bad[0].dtype}); {backend} collectives take {want} tensors")
            return fn(*args, **kwargs)

        checked.__wrapped__ = fn
        return checked

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield seen
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--record", help="write each rank's collectives to <record>.<rank>.jsonl")
    p.add_argument("overrides", nargs="*", help="train.py's Hydra overrides (after --)")
    a = p.parse_args(argv)
    sys.argv = [os.path.join(ROOT, "train.py"), *a.overrides]
    with checked_collectives() as seen:
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
        finally:
            if a.record:
                rank = int(os.environ.get("RANK", "0"))
                with open(f"{a.record}.{rank}.jsonl", "w") as f:
                    for entry in seen:
                        f.write(json.dumps(entry) + "\n")


if __name__ == "__main__":
    main()
