"""Training speed of each table kind against stock tables: ``train.py`` jobs taking turns step by step.

For every kind (a ``tables=`` preset) and layout (1 rank; 2 ranks table-wise and row-wise through
``torchrun --standalone --nproc_per_node=2``), one ``train.py`` job with ``tables=<kind>`` and one with
``tables=<reference>`` (default ``baseline``: TorchRec's stock tables on FBGEMM's fused TBE) run with the same
data, batch and steps, taking turns step by step (:mod:`torchrec_shark.bench.lockstep`), so that whatever
else loads the machine slows both alike. Samples/s counts the whole training step as the trainer times it
(lookup, backward, optimizer, label bookkeeping, re-tiering, ``step_end``); there is no evaluation or
checkpoint before the last step.

Each job's ``speed_history`` gives samples/s per logging interval; a job's speed is the median of its
intervals (the first, the warm-up, left out) and the pair's ratio is the kind's over the reference's.
``--repeats N`` runs N pairs (the reference first in every other one) and prints the median ratio over the
pairs with its spread (lowest and highest pair).

Run::

    python -m torchrec_shark.bench.train                                  # 1 rank, fp16,int8,int4,shark,tt
    python -m torchrec_shark.bench.train --layouts 1,2tw,2rw --repeats 3 --json train_speed.json
    python -m torchrec_shark.bench.train --kinds shark --layouts 2rw --steps 400
    python -m torchrec_shark.bench.train --small --steps 60 --log-every 10   # small tables, a quick look
    python -m torchrec_shark.bench.train --kinds int8 --reference int8 --reference-env TORCHREC_SHARK_HUGE_PAGES=0
    python -m torchrec_shark.bench.train --kinds shark --reference shark --reference-checkout ../before

``--reference-checkout DIR`` runs the reference jobs from another checkout of this project (e.g. a ``git
worktree`` of an earlier commit): a change against the code before it, taking turns.

Ratios are only comparable within one run: the machine's load changes over minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

from torchrec_shark.bench import lockstep, steady

LAYOUTS = steady.LAYOUTS
KINDS = ("fp16", "int8", "int4", "shark", "tt")
ROLES = ("kind", "ref")


def command(run_dir: str, tables: str, layout: str, role: str, gate: Optional[str], first: bool, steps: int,
            log_every: int, extra: List[str], env: Sequence[str] = ()) -> List[str]:
    """The ``train.py`` command of one job (through the lockstep runner when ``gate`` is given), with the
    environment variables ``env`` (``NAME=VALUE``) set for it alone."""
    nproc, sharding = LAYOUTS[layout]
    overrides = [f"hydra.run.dir={run_dir}", f"tables={tables}", "trainer.progress=false",
                 f"trainer.max_steps={steps}", f"trainer.eval_every={steps}", f"trainer.checkpoint_every={steps}",
                 f"trainer.log_every={log_every}", "trainer.eval_batches=1", *extra]
    if sharding:
        overrides.append(f"planner.sharding_types=[{sharding}]")
    script = ["train.py"]
    if gate is not None:
        other = ROLES[1] if role == ROLES[0] else ROLES[0]
        script = ["-m", "torchrec_shark.bench.lockstep", "--gate", gate, "--role", role, "--other", other,
                  *(["--first"] if first else []), "--"]
    launcher = ([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
                 f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable])
    return [*(["env", *env] if env else []), *launcher, *script, *overrides]


def interval_speed(history: List[Dict], log_every: int) -> Optional[float]:
    """Median samples/s of the logging intervals after the first (the warm-up)."""
    xs = [h["samples_per_s"] for h in history if h["step"] > log_every]
    return statistics.median(xs) if xs else None


def measure_pair(kind: str, reference: str, layout: str, steps: int, log_every: int, extra: List[str],
                 reference_first: bool, timeout: int, reference_env: Sequence[str] = ()) -> Dict:
    """One ``kind`` job and one ``reference`` job (with ``reference_env`` set) taking turns; their speeds and
    the ratio."""
    order = ("ref", "kind") if reference_first else ("kind", "ref")
    tables = {"kind": kind, "ref": reference}
    with tempfile.TemporaryDirectory() as tmp:
        gate = os.path.join(tmp, "gate")
        os.mkdir(gate)
        lockstep.make_gate(gate, list(ROLES), LAYOUTS[layout][0])
        commands = {role: command(os.path.join(tmp, role), tables[role], layout, role, gate, role == order[0],
                                  steps, log_every, extra, reference_env if role == "ref" else ())
                    for role in order}
        steady._run(commands, True, timeout, f"{kind} vs {reference} ({layout})")
        histories = {}
        for role in ROLES:
            with open(os.path.join(tmp, role, "metrics.json")) as f:
                histories[role] = json.load(f)["speed_history"]
    speeds = {role: interval_speed(histories[role], log_every) for role in ROLES}
    ratio = speeds["kind"] / speeds["ref"] if speeds["kind"] and speeds["ref"] else None
    return {"kind": kind, "reference": reference, "layout": layout, "reference_first": reference_first,
            "samples_per_s": speeds["kind"], "reference_samples_per_s": speeds["ref"], "ratio": ratio,
            "speed_history": histories["kind"], "reference_speed_history": histories["ref"]}


def measure(kind: str, reference: str, layout: str, steps: int, log_every: int, extra: List[str], repeats: int,
            timeout: int, reference_env: Sequence[str] = ()) -> Dict:
    """``repeats`` pairs, the reference first in every other one: the median ratio and its spread."""
    pairs = [measure_pair(kind, reference, layout, steps, log_every, extra, i % 2 == 1, timeout, reference_env)
             for i in range(repeats)]
    ratios = [p["ratio"] for p in pairs if p["ratio"] is not None]
    return {"kind": kind, "reference": reference, "layout": layout, "pairs": pairs,
            "ratio": statistics.median(ratios) if ratios else None,
            "ratio_min": min(ratios) if ratios else None, "ratio_max": max(ratios) if ratios else None,
            "samples_per_s": statistics.median(p["samples_per_s"] for p in pairs),
            "reference_samples_per_s": statistics.median(p["reference_samples_per_s"] for p in pairs)}


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", default=",".join(KINDS), help="tables= presets to measure")
    p.add_argument("--reference", default="baseline", help="the tables= preset they are measured against")
    p.add_argument("--layouts", default="1", help="1 (one rank), 2tw, 2rw (two ranks), comma-separated")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--log-every", type=int, default=20, help="steps per measured interval")
    p.add_argument("--repeats", type=int, default=1, help="pairs per kind and layout")
    p.add_argument("--small", action="store_true", help="small synthetic tables (rows / 100 of the default data)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per pair")
    p.add_argument("--json", help="write every row (with each pair's histories) here")
    p.add_argument("--reference-env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for the reference jobs only (repeatable): e.g. the same preset "
                        "with a switch off, against itself with it on")
    p.add_argument("--reference-checkout", metavar="DIR",
                   help="run the reference jobs from this checkout of the project (its train.py and package)")
    p.add_argument("overrides", nargs="*", help="more train.py overrides for both jobs (after --)")
    a = p.parse_args(argv)
    layouts = a.layouts.split(",")
    bad_env = [e for e in a.reference_env if "=" not in e or e.startswith("=")]
    if bad_env:
        p.error(f"--reference-env: expected NAME=VALUE, got {bad_env}")
    reference_env = list(a.reference_env)
    if a.reference_checkout:
        checkout = os.path.abspath(a.reference_checkout)
        if not os.path.isfile(os.path.join(checkout, "train.py")):
            p.error(f"--reference-checkout: no train.py in {checkout}")
        # env's --chdir: the job starts there, and its package comes first on the path
        reference_env = ["-C", checkout, f"PYTHONPATH={checkout}", *reference_env]
    unknown = [x for x in layouts if x not in LAYOUTS]
    if unknown:
        p.error(f"--layouts: unknown {unknown}; choose from {list(LAYOUTS)}")
    extra = (list(steady.SMALL_DATA) if a.small else []) + list(a.overrides)
    rows = []
    with_env = f" ({' '.join(reference_env)})" if reference_env else ""
    print(f"samples/s against tables={a.reference}{with_env}, jobs taking turns step by step; {a.steps} steps, median of "
          f"{a.log_every}-step intervals; ratio: median over {a.repeats} pair(s) [lowest, highest]", flush=True)
    print(f"{'kind':12} {'layout':6} {'samples/s':>10} {'reference':>10} {'ratio':>7}  spread", flush=True)
    for kind in a.kinds.split(","):
        for layout in layouts:
            r = measure(kind, a.reference, layout, a.steps, a.log_every, extra, a.repeats, a.timeout, reference_env)
            rows.append(r)
            f = lambda x, spec: format(x, spec) if x is not None else "-"
            print(f"{kind:12} {layout:6} {f(r['samples_per_s'], '>10,.0f')} {f(r['reference_samples_per_s'], '>10,.0f')} "
                  f"{f(r['ratio'], '>7.3f')}  [{f(r['ratio_min'], '.3f')}, {f(r['ratio_max'], '.3f')}]", flush=True)
            if a.json:  # after every row: a long run that is stopped keeps what it measured
                with open(a.json, "w") as fh:
                    json.dump(rows, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
