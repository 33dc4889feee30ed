"""Steady-state speed benchmark: does training keep its speed after checkpoints and evaluations?

For every table kind (``tables=baseline``, ``shark``, ``int8``, ``tt``) and layout (1 rank; 2
ranks table-wise and row-wise through ``torchrun --standalone --nproc_per_node=2``), two
``train.py`` jobs run with identical data and steps:

* ``ckpt``: a checkpoint and an evaluation every ``--every`` steps;
* ``control``: no checkpoint or evaluation before the last step.

From each job's ``metrics.json`` ``speed_history`` (samples/s of each logging interval, step
time only; a segment's speed is the median of its intervals, the first interval, the warm-up, left
out) it prints

* ``after/before``: the ``ckpt`` job's speed after its last mid-run checkpoint over its speed before
  the first one (one process: immune to a process's own luck, not to load that changes over the run);
* ``last3/control``: the ``ckpt`` job's speed over the last third of the run over the ``control``
  job's over the same steps (the target is >= 0.95);
* ``normalised``: ``last3/control`` divided by the same ratio over the steps before the first
  checkpoint, where the two jobs still do the same work: what is left is what the checkpoints
  changed, without the run-to-run difference of two processes that a 2-core machine shows (±15%).

``--repeats N`` runs N pairs in alternating order (ckpt first, then control first, ...) and prints
the median of each ratio over the pairs; ``--json`` keeps every pair's histories.

Run::

    python -m torchrec_shark.bench.steady                       # small: a few minutes on 2 cores
    python -m torchrec_shark.bench.steady --full                # 1,200 steps, a checkpoint every 300, dim 64
    python -m torchrec_shark.bench.steady --full --repeats 3 --kinds int8 --layouts 2rw
    python -m torchrec_shark.bench.steady --kinds baseline --layouts 1 --default-data --json steady.json

Timings on a loaded machine are noise: compare the ratios, on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KINDS = ("baseline", "shark", "int8", "tt")
LAYOUTS = {"1": (1, None), "2tw": (2, "table_wise"), "2rw": (2, "row_wise")}
# Small synthetic data (rows / 100 of the default tables): quick, yet every kind shards and trains.
SMALL_DATA = ["data.synthetic.cardinalities=[10000,3000,1000,1000,300,100,100,30,30,10,10,10,"
              "3000,1000,100,10]", "data.synthetic.num_noise_fields=4", "data.synthetic.multi_hot_fields=[3,7]",
              "tables.compression.tensor_train.min_rows=1000"]


def _job(run_dir: str, kind: str, layout: str, steps: int, every: int, log_every: int, data: List[str],
         extra: List[str], timeout: int) -> Dict:
    nproc, sharding = LAYOUTS[layout]
    launcher = ([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
                 f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable])
    overrides = [f"hydra.run.dir={run_dir}", f"tables={kind}", "tables.embedding_dim=64", "trainer.progress=false",
                 f"trainer.max_steps={steps}", f"trainer.checkpoint_every={every}", f"trainer.eval_every={every}",
                 f"trainer.log_every={log_every}", *data, *extra]
    if sharding:
        overrides.append(f"planner.sharding_types=[{sharding}]")
    proc = subprocess.run([*launcher, "train.py", *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {layout} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.load(f)


def _median(history: List[Dict], lo: int, hi: int, log_every: int) -> Optional[float]:
    """Median samples/s of the logging intervals that lie wholly within steps (lo, hi]."""
    xs = [h["samples_per_s"] for h in history if h["step"] - log_every >= lo and h["step"] <= hi]
    return statistics.median(xs) if xs else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def measure_pair(kind: str, layout: str, steps: int, every: int, log_every: int, data: List[str],
                 extra: List[str], timeout: int, control_first: bool = False) -> Dict:
    """One ``ckpt`` job and one ``control`` job, in the given order, and their ratios."""
    jobs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in (("control", "ckpt") if control_first else ("ckpt", "control")):
            jobs[name] = _job(os.path.join(tmp, name), kind, layout, steps, every if name == "ckpt" else steps,
                              log_every, data, extra, timeout)
    ck, ctl = jobs["ckpt"]["speed_history"], jobs["control"]["speed_history"]
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


def measure(kind: str, layout: str, steps: int, every: int, log_every: int, data: List[str], extra: List[str],
            timeout: int, repeats: int = 1) -> Dict:
    """``repeats`` pairs in alternating order; each ratio is the median over the pairs."""
    pairs = [measure_pair(kind, layout, steps, every, log_every, data, extra, timeout, control_first=i % 2 == 1)
             for i in range(repeats)]
    row = {"kind": kind, "layout": layout, "pairs": pairs}
    for key in ("before_first", "after_last", "last_third", "control_last_third", *RATIOS):
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
    p.add_argument("--repeats", type=int, default=1, help="pairs per kind and layout, in alternating order")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per job")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args(argv)
    if a.full:
        a.steps, a.every, a.log_every, a.batch = 1200, 300, 20, 2048
    data = [] if a.full or a.default_data else list(SMALL_DATA)
    extra = [f"trainer.batch_size={a.batch}", "trainer.eval_batches=4"]
    rows = []
    print(f"{'kind':9} {'layout':6} {'before':>9} {'after':>9} {'after/before':>12} {'last3':>9} "
          f"{'control':>9} {'last3/control':>13} {'normalised':>10}", flush=True)
    for kind in a.kinds.split(","):
        for layout in a.layouts.split(","):
            r = measure(kind, layout, a.steps, a.every, a.log_every, data, extra, a.timeout, a.repeats)
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
