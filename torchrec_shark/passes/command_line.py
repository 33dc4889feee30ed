"""Paths in Hydra overrides and the shell commands the passes print.

Example::

    shlex.join(["train.py", f"trainer.init_from={hydra_quote('/runs/base run')}"])
    # "train.py 'trainer.init_from=\"/runs/base run\"'"
"""

from __future__ import annotations

import re


def hydra_quote(value: str) -> str:
    """``value`` as one Hydra override value: quoted when it holds more than path characters (a
    space, ``,``, ``=`` or brackets would otherwise split it or read as a sweep or a list)."""
    if re.fullmatch(r"[\w/.:+@%~-]*", value):
        return value
    return '"' + value.replace('"', '\\"') + '"'
