"""Does a step's cost follow the rows it touches, not the number of tables? Step time at N and k*N tables.

The wide setup splits each of ``bench.tables``' ``--tables`` Criteo-like tables into ``--split`` tables of
a ``1/split`` share of its rows (same total rows), each fed by its own single-hot feature, with the batch
divided by ``--split`` (same number of ids per step). Every kind is built for both setups and all of them
are timed in interleaved slices in one process (:func:`torchrec_shark.bench.tables.bench`'s scheme), so
load changes on a shared machine hit each alike; the output is ms per step in each setup and their ratio
(1.0: flat in the number of tables).

Run::

    python -m torchrec_shark.bench.table_scaling                   # 26 vs 104 tables, rows / 10
    python -m torchrec_shark.bench.table_scaling --scale 1 --kinds stock_fbgemm,int8,mixed_precision
"""

from __future__ import annotations

import argparse
import json
from typing import Dict, List, Optional

import torch

from torchrec_shark.bench import tables as bt


def split_shapes(shapes: List[bt.TableShape], split: int) -> List[bt.TableShape]:
    """Each table as ``split`` tables of a ``1/split`` share of its rows (the same total), one feature each."""
    out = []
    for s in shapes:
        base, extra = divmod(s.num_embeddings, split)
        for j in range(split):
            rows = max(1, base + (1 if j < extra else 0))
            out.append(bt.TableShape(f"{s.name}_{j}", rows, s.embedding_dim, [f"{s.feature_names[0]}_{j}"]))
    return out


def measure(kinds: List[str], shapes: List[bt.TableShape], split: int, batch: int, iters: int, warmup: int,
            rounds: int, lr: float = 0.05, seed: int = 0) -> List[Dict]:
    """Per kind: ms/step with ``shapes`` at ``batch`` and with them split ``split`` ways at ``batch / split``."""
    wide = split_shapes(shapes, split)
    setups = {"narrow": (shapes, bt.make_batches(shapes, batch, 1, 1.1, 0.25, 4, seed)),
              "wide": (wide, bt.make_batches(wide, batch // split, 1, 1.1, 0.25, 4, seed))}
    runners = []
    for name in kinds:
        kind = next(k for k in bt.KINDS if k.name == name)
        for setup, (s, batches) in setups.items():
            runners.append((name, setup, bt.Runner(kind, s, batches, lr, warmup, torch.device("cpu"))))
    per_round = max(1, iters // rounds)
    for r in range(rounds):
        for i in range(len(runners)):
            runners[(i + r) % len(runners)][2].run(per_round)
    out = []
    for name in kinds:
        ms = {setup: 1e3 * x.seconds / max(x.steps, 1) for n, setup, x in runners if n == name}
        out.append({"kind": name, "tables": len(shapes), "wide_tables": len(wide), "ms_per_step": ms["narrow"],
                    "wide_ms_per_step": ms["wide"], "ratio": ms["wide"] / ms["narrow"]})
    return out


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", default="stock_fbgemm,fp16,int8,mixed_precision")
    p.add_argument("--tables", type=int, default=26)
    p.add_argument("--split", type=int, default=4, help="the wide setup has tables * split tables")
    p.add_argument("--scale", type=float, default=0.1, help="rows of bench.tables' tables times this")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=4096, help="the narrow setup's batch (the wide one: / split)")
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    shapes = bt.table_configs(a.tables, 1e3, 1e6, a.scale, a.dim)
    rows = measure(a.kinds.split(","), shapes, a.split, a.batch, a.iters, a.warmup, a.rounds)
    print(f"{sum(s.num_embeddings for s in shapes):,} rows, {a.batch * a.tables:,} ids per step, dim {a.dim}, "
          f"{torch.get_num_threads()} threads; interleaved slices in one process")
    print(f"{'kind':<20}{'tables':>7}{'ms/step':>10}{'tables':>7}{'ms/step':>10}{'ratio':>8}")
    for r in rows:
        print(f"{r['kind']:<20}{r['tables']:>7}{r['ms_per_step']:>10.2f}{r['wide_tables']:>7}"
              f"{r['wide_ms_per_step']:>10.2f}{r['ratio']:>8.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
