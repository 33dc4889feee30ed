"""Dense-column transforms on a file with a timestamp column: val AUC / log loss per setting.

:func:`write_timestamp_table` writes a CSV like a real click log: a balanced 0/1 ``click``, a
Unix ``ts`` (seconds, ~9e8, spread over a year), a log-normal ``price``, a ``ratio`` in [0, 1]
and three categorical columns ``user``, ``item``, ``site``. The click logit adds a per-user and a
per-item effect, a drift over time (``ts``) and a price effect, so a model that reads ``ts``
well beats one that does not see it.

The benchmark trains ``train.py data=tabular`` on it (one process) with the dense transforms
``none`` (the old behaviour: raw values), the default ``auto``, and ``auto`` with ``ts`` dropped,
and prints val AUC and log loss of each.

Run::

    python -m torchrec_shark.bench.tabular_transforms --rows 60000 --steps 200 --out /tmp/ts_bench
    python -m torchrec_shark.bench.tabular_transforms --out /tmp/ts_bench_shark --extra tables=shark
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List

import numpy as np

TS_START = 9.0e8  # 1998-07-09
TS_SPAN = 365 * 86400.0


def write_timestamp_table(path: str, rows: int, seed: int = 0, users: int = 2000, items: int = 500) -> None:
    """A click CSV with a timestamp-scale dense column (see the module docstring)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    user = rng.zipf(1.3, rows) % users
    item = rng.zipf(1.2, rows) % items
    site = rng.integers(0, 20, rows)
    ts = np.sort(TS_START + rng.random(rows) * TS_SPAN).round()
    price = np.exp(rng.normal(3.0, 1.5, rows)).round(2)
    ratio = rng.beta(0.5, 5.0, rows).round(4)
    user_effect = np.random.default_rng(seed + 1).normal(0, 1.0, users)
    item_effect = np.random.default_rng(seed + 2).normal(0, 0.7, items)
    drift = 2.5 * ((ts - TS_START) / TS_SPAN - 0.5)  # the click rate moves over the year
    logit = user_effect[user] + item_effect[item] + drift - 0.3 * (np.log(price) - 3.0)
    logit -= np.median(logit)  # balanced label
    click = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(int)
    pd.DataFrame({
        "click": click, "ts": ts.astype(np.int64), "price": price, "ratio": ratio,
        "user": [f"u{u}" for u in user], "item": [f"i{i}" for i in item], "site": [f"s{s}" for s in site],
    }).to_csv(path, index=False)


SPARSE = "[user,item,site]"


def train_command(data: str, run_dir: str, steps: int, batch: int, *extra: str) -> List[str]:
    return [sys.executable, "train.py", "data=tabular", f"data.path={data}", "data.label=click",
            f"data.sparse={SPARSE}", "data.num_embeddings_per_feature=[4096]", f"trainer.max_steps={steps}",
            f"trainer.batch_size={batch}", f"trainer.eval_every={steps}", f"trainer.checkpoint_every={steps}",
            "trainer.eval_batches=64", "trainer.progress=false", f"hydra.run.dir={run_dir}", *extra]


def main(argv=None) -> Dict[str, Dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=60000)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--out", default="/tmp/tabular_transforms_bench")
    p.add_argument("--extra", nargs="*", default=[], help="more train.py overrides, e.g. tables=shark")
    args = p.parse_args(argv)
    args.out = os.path.abspath(args.out)  # the runs start in the checkout, not where this was started
    os.makedirs(args.out, exist_ok=True)
    data = os.path.join(args.out, "clicks_ts.csv")
    write_timestamp_table(data, args.rows)
    settings = {
        "none": ["data.dense=[ts,price,ratio]", "data.dense_transform=none"],
        "auto": ["data.dense=[ts,price,ratio]"],
        "auto, ts dropped": ["data.dense=[price,ratio]"],
    }
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    results = {}
    for name, extra in settings.items():
        run_dir = os.path.join(args.out, name.replace(", ", "_").replace(" ", "_"))
        cmd = train_command(data, run_dir, args.steps, args.batch, *extra, *args.extra)
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=root))
        if proc.returncode != 0:
            print(proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{name}: train.py failed")
        with open(os.path.join(run_dir, "metrics.json")) as f:
            m = json.load(f)
        results[name] = {"val_auc": m["val_auc"], "val_logloss": m["val_logloss"],
                         "command": " ".join(cmd[1:])}
        print(f"{name:18s} val_auc={m['val_auc']:.4f} val_logloss={m['val_logloss']:.4f}", flush=True)
    return results


if __name__ == "__main__":
    main()
