"""Steady-state speed benchmark: does training keep its speed after checkpoints and evaluations?

For every table kind (``tables=baseline``, ``shark``, ``int8``, ``tt``) and layout (1 rank; 2
ranks table-wise and row-wise through ``torchrun --standalone --nproc_per_node=2``), two
``train.py`` jobs run with identical data and steps:

* ``ckpt``: a checkpoint and an evaluation every ``--every`` steps (``--events`` picks one of them);
* ``control``: no checkpoint or evaluation before the last step.

The two jobs take turns step by step (:mod:`torchrec_shark.bench.lockstep`): on a small machine
whose other load changes over minutes, two jobs run one after the other differ by ±15% or more
before either has checkpointed, while jobs taking turns see the same machine. Each job's step time
excludes the other's steps; a process's slowdown of its own (the thread-pool state a checkpoint
used to leave behind) stays its own. ``--sequential`` runs them one after the other instead.

From each job's ``metrics.json`` ``speed_history`` (samples/s of each logging interval, step
time only; a segment's speed is the median of its intervals, the first interval, the warm-up, left
out) it prints

* ``after/before``: the ``ckpt`` job's speed after its last mid-run checkpoint over its speed before
  the first one (one process: immune to a process's own luck, not to load that changes over the run);
* ``last3/control``: the ``ckpt`` job's speed over the last third of the run over the ``control``
  job's over the same steps (the target is >= 0.95);
* ``normalised``: ``last3/control`` divided by the same ratio over the steps before the first
  checkpoint, where the two jobs still do the same work: what is left is what the checkpoints
  changed, without the difference two processes show before either has checkpointed.

``--repeats N`` runs N pairs, the control first in every other one, and prints the median of each
ratio over the pairs; ``--json`` keeps every pair's histories. ``--default-group`` saves and gathers
on the default process group, as the trainer did before its fix: the ratios should then fall.

Run::

    python -m torchrec_shark.bench.steady                       # small: a few minutes on 2 cores
    python -m torchrec_shark.bench.steady --full                # 1,200 steps, a checkpoint every 300, dim 64
    python -m torchrec_shark.bench.steady --full --repeats 3 --kinds int8 --layouts 2rw
    python -m torchrec_shark.bench.steady --kinds baseline --layouts 1 --default-data --json steady.json

Timings on a loaded machine are noise: compare the ratios, on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from torchrec_shark.bench import lockstep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KINDS = ("baseline", "shark", "int8", "tt")
EVENTS = ("checkpoint", "eval")
LAYOUTS = {"1": (1, None), "2tw": (2, "table_wise"), "2rw": (2, "row_wise")}
# Small synthetic data (rows / 100 of the default tables): quick, yet every kind shards and trains.
SMALL_DATA = ["data.synthetic.cardinalities=[10000,3000,1000,1000,300,100,100,30,30,10,10,10,"
              "3000,1000,100,10]", "data.synthetic.num_noise_fields=4", "data.synthetic.multi_hot_fields=[3,7]",
              "tables.compression.tensor_train.min_rows=1000"]


@dataclass
class Setup:
    """What every job of one benchmark run shares."""

    steps: int
    every: int
    log_every: int
    data: List[str]
    extra: List[str]
    timeout: int
    lockstep: bool = True
    default_group: bool = False
    events: Tuple[str, ...] = EVENTS  # what the ckpt job does every ``every`` steps


def _command(setup: Setup, run_dir: str, kind: str, layout: str, role: str, gate: Optional[str],
             first: bool) -> List[str]:
    nproc, sharding = LAYOUTS[layout]
    every = {e: setup.every if role == "ckpt" and e in setup.events else setup.steps for e in EVENTS}
    overrides = [f"hydra.run.dir={run_dir}", f"tables={kind}", "tables.embedding_dim=64", "trainer.progress=false",
                 f"trainer.max_steps={setup.steps}", f"trainer.checkpoint_every={every['checkpoint']}",
                 f"trainer.eval_every={every['eval']}", f"trainer.log_every={setup.log_every}", *setup.data,
                 *setup.extra]
    if sharding:
        overrides.append(f"planner.sharding_types=[{sharding}]")
    if gate is None and not setup.default_group:
        script = ["train.py"]
    else:
        other = "control" if role == "ckpt" else "ckpt"
        script = ["-m", "torchrec_shark.bench.lockstep", "--role", role, "--other", other]
        if gate is not None:
            script += ["--gate", gate] + (["--first"] if first else [])
        if setup.default_group:
            script.append("--default-group")
        script.append("--")
    launcher = ([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
                 f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable])
    return [*launcher, *script, *overrides]


def _run(commands: Dict[str, List[str]], concurrent: bool, timeout: int, what: str) -> None:
    """Run the commands (all at once, or one after another); the first failure stops the others."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    logs = {name: tempfile.TemporaryFile("w+") for name in commands}
    procs: Dict[str, subprocess.Popen] = {}
    try:
        for group in ([list(commands)] if concurrent else [[name] for name in commands]):
            for name in group:
                procs[name] = subprocess.Popen(commands[name], cwd=ROOT, stdout=logs[name], stderr=subprocess.STDOUT,
                                               text=True, env=env, start_new_session=True)
            deadline = time.monotonic() + timeout
            while any(procs[n].poll() is None for n in group):
                if any(procs[n].returncode for n in group):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{what}: still running after {timeout} s")
                time.sleep(0.5)
            failed = [n for n in group if procs[n].returncode]
            if failed:
                out = ""
                for n in failed:
                    logs[n].seek(0)
                    out += f"--- {n}:\n{logs[n].read()[-4000:]}\n"
                raise RuntimeError(f"{what} failed:\n{out}")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for f in logs.values():
            f.close()


def _median(history: List[Dict], lo: int, hi: int, log_every: int) -> Optional[float]:
    """Median samples/s of the logging intervals that lie wholly within steps (lo, hi]."""
    xs = [h["samples_per_s"] for h in history if h["step"] - log_every >= lo and h["step"] <= hi]
    return statistics.median(xs) if xs else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def _histories(setup: Setup, kind: str, layout: str, control_first: bool) -> Dict[str, List[Dict]]:
    """Each job's ``speed_history``: ``ckpt`` and ``control``, taking turns step by step (``lockstep``)
    or one after the other."""
    roles = ("control", "ckpt") if control_first else ("ckpt", "control")
    with tempfile.TemporaryDirectory() as tmp:
        gate = None
        if setup.lockstep:
            gate = os.path.join(tmp, "gate")
            os.mkdir(gate)
            lockstep.make_gate(gate, list(roles), LAYOUTS[layout][0])
        commands = {role: _command(setup, os.path.join(tmp, role), kind, layout, role, gate, role == roles[0])
                    for role in roles}
        _run(commands, setup.lockstep, setup.timeout, f"{kind} {layout}")
        out = {}
        for role in roles:
            with open(os.path.join(tmp, role, "metrics.json")) as f:
                out[role] = json.load(f)["speed_history"]
    return out


def measure_pair(setup: Setup, kind: str, layout: str, control_first: bool = False) -> Dict:
    """One ``ckpt`` job and one ``control`` job and their ratios."""
    jobs = _histories(setup, kind, layout, control_first)
    ck, ctl = jobs["ckpt"], jobs["control"]
    steps, every, log_every = setup.steps, setup.every, setup.log_every
    last_ckpt = (steps - 1) // every * every
    third = steps - steps // 3
    before, ctl_before = (_median(h, log_every, every, log_every) for h in (ck, ctl))
    after = _median(ck, last_ckpt, steps, log_every)
    ck3, ctl3 = (_median(h, third, steps, log_every) for h in (ck, ctl))
    last3_over_control = _ratio(ck3, ctl3)
    return {"kind": kind, "layout": layout, "control_first": control_first,
            "before_first": before, "after_last": after, "after_over_before": _ratio(after, before),
            "last_third": ck3, "control_last_third": ctl3, "last_third_over_control": last3_over_control,
            "before_over_control": _ratio(before, ctl_before),
            "normalised": _ratio(last3_over_control, _ratio(before, ctl_before)),
            "ckpt_speed_history": ck, "control_speed_history": ctl}


RATIOS = ("after_over_before", "last_third_over_control", "normalised")


def measure(setup: Setup, kind: str, layout: str, repeats: int = 1) -> Dict:
    """``repeats`` pairs, the control first in every other one; each ratio is the median over the pairs."""
    pairs = [measure_pair(setup, kind, layout, control_first=i % 2 == 1) for i in range(repeats)]
    row = {"kind": kind, "layout": layout, "pairs": pairs}
    for key in ("before_first", "after_last", "last_third", "control_last_third", "before_over_control", *RATIOS):
        xs = [p[key] for p in pairs if p[key] is not None]
        row[key] = statistics.median(xs) if xs else None
    return row


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="1 (one rank), 2tw, 2rw (two ranks)")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--every", type=int, default=30, help="checkpoint and evaluation interval of the ckpt job")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--full", action="store_true",
                   help="the default data, batch 2048, 1,200 steps, a checkpoint every 300 (overrides the sizes)")
    p.add_argument("--default-data", action="store_true", help="the default synthetic data (as --full) at these sizes")
    p.add_argument("--events", default=",".join(EVENTS),
                   help="what the ckpt job does every --every steps: checkpoint, eval or both")
    p.add_argument("--repeats", type=int, default=1, help="pairs per kind and layout")
    p.add_argument("--sequential", action="store_true",
                   help="run the two jobs one after the other instead of taking turns step by step")
    p.add_argument("--default-group", action="store_true",
                   help="save and gather on the default process group, as before the fix: the benchmark should "
                        "then show the slowdown")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per job")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args(argv)
    if a.full:
        a.steps, a.every, a.log_every, a.batch = 1200, 300, 20, 2048
    data = [] if a.full or a.default_data else list(SMALL_DATA)
    extra = [f"trainer.batch_size={a.batch}", "trainer.eval_batches=4"]
    events = tuple(a.events.split(","))
    if not events or set(events) - set(EVENTS):
        p.error(f"--events: a comma-separated subset of {','.join(EVENTS)}")
    setup = Setup(a.steps, a.every, a.log_every, data, extra, a.timeout, not a.sequential, a.default_group, events)
    rows = []
    print(f"{'kind':9} {'layout':6} {'before':>9} {'after':>9} {'after/before':>12} {'last3':>9} "
          f"{'control':>9} {'last3/control':>13} {'normalised':>10}", flush=True)
    for kind in a.kinds.split(","):
        for layout in a.layouts.split(","):
            r = measure(setup, kind, layout, a.repeats)
            rows.append(r)
            f = lambda x, w=9, d=0: f"{x:>{w},.{d}f}" if x is not None else f"{'-':>{w}}"
            print(f"{kind:9} {layout:6} {f(r['before_first'])} {f(r['after_last'])} "
                  f"{f(r['after_over_before'], 12, 3)} {f(r['last_third'])} {f(r['control_last_third'])} "
                  f"{f(r['last_third_over_control'], 13, 3)} {f(r['normalised'], 10, 3)}", flush=True)
            if a.json:  # after every row, so a long run that is stopped keeps what it measured
                with open(a.json, "w") as fh:
                    json.dump(rows, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
