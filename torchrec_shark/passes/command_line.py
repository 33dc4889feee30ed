"""Paths in Hydra overrides and the shell commands the passes print; the dirs a pass names.

Example::

    shlex.join(["train.py", f"trainer.init_from={hydra_quote('/runs/base run')}"])
    # "train.py 'trainer.init_from=\"/runs/base run\"'"
    print(dirs_line("prune_fields", out_dir, "outputs/base", "prune_report.json"))
"""

from __future__ import annotations

import os
import re


def hydra_quote(value: str) -> str:
    """``value`` as one Hydra override value: quoted when it holds more than path characters (a
    space, ``,``, ``=`` or brackets would otherwise split it or read as a sweep or a list)."""
    if re.fullmatch(r"[\w/.:+@%~-]*", value):
        return value
    return '"' + value.replace('"', '\\"') + '"'


def dirs_line(name: str, out_dir: str, run_dir: str, report: str) -> str:
    """What a pass prints at its start and its end: its own run dir and report, and the run it reads
    (with that run's ``metrics.json``)."""
    from torchrec_shark.training.checkpoint import split_run_spec

    metrics = os.path.join(split_run_spec(run_dir)[0], "metrics.json")
    return f"{name}: run dir {out_dir} (report: {os.path.join(out_dir, report)}); reads run {run_dir} (metrics: {metrics})"
