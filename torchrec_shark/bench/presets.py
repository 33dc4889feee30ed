"""Bytes against AUC for ``tables=`` presets, over seeds and embedding widths.

Run ``python -m torchrec_shark.bench.presets`` (defaults: the row-store presets, dims 32 and 64, seeds 0 1 2,
1,500 steps, the whole validation split of the default data); ``--train data=criteo_tsv data.path=...`` for
other data. Each (preset, dim, seed) is one ``train.py`` run on one rank with the same data and steps; a run
whose ``metrics.json`` exists (with the same command) is not run again, so an interrupted benchmark continues.

Reported per (preset, dim): ``embedding_bytes`` from ``metrics.json`` (rows, scales, slot map, priorities;
no optimizer state) and its ratio to fp32 rows, ``embedding_bytes_allocated`` (what the tables' tensors
occupy), val AUC and log loss as mean and sample standard deviation over seeds; and for every per-row preset
(a label-aware kind) each kind that stores all its rows in one precision with no more bytes, the AUC margin
against the noise of the two means (``sqrt(sd_a**2 / n + sd_b**2 / n)``). Writes ``presets.json``,
``presets.md`` and ``bytes_vs_auc_d<dim>.png`` under ``--out``.

Example::

    python -m torchrec_shark.bench.presets --presets baseline,int8,int4,shark_int4 --dims 32 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from typing import Dict, List, Optional, Sequence

from torchrec_shark.passes.command_line import hydra_quote
from torchrec_shark.pipeline.config import preset_compression, table_presets
from torchrec_shark.pipeline.stages import StageRunner, read_json


def preset_role(preset: str) -> str:
    """``per_row`` (a label-aware kind: precision by priority), ``uniform`` (a row store with every row in one
    precision) or ``other`` (e.g. tensor train), from the preset's kind."""
    from torchrec_shark.modules import kind_named

    kind = kind_named(preset_compression(preset).kind)
    if kind.label_aware:
        return "per_row"
    return "uniform" if kind.state_family == "row_store" else "other"


def default_presets() -> List[str]:
    return [p for p in table_presets() if preset_role(p) != "other"]


def run_name(preset: str, dim: int, seed: int) -> str:
    return f"{preset}_d{dim}_s{seed}"


def finished_runs(presets: Sequence[str], dims: Sequence[int], seeds: Sequence[int], out: str) -> Dict[str, dict]:
    """``{run name: metrics.json}`` of the runs under ``out`` that finished (``--report-only``)."""
    metrics = {}
    for dim in dims:
        for preset in presets:
            for seed in seeds:
                path = os.path.join(out, "runs", run_name(preset, dim, seed), "metrics.json")
                if os.path.isfile(path):
                    metrics[run_name(preset, dim, seed)] = read_json(path)
    return metrics


def run_all(presets: Sequence[str], dims: Sequence[int], seeds: Sequence[int], steps: int, eval_batches: int,
            train: Sequence[str], out: str) -> Dict[str, dict]:
    """Train every (preset, dim, seed) not yet done; ``{run name: metrics.json}``."""
    runner = StageRunner(out, resume=True)
    metrics = {}
    for dim in dims:
        for preset in presets:
            for seed in seeds:
                name = run_name(preset, dim, seed)
                res = runner.train(name, 1, [f"tables={preset}", f"tables.embedding_dim={dim}", f"trainer.seed={seed}",
                                             f"trainer.max_steps={steps}", f"trainer.eval_batches={eval_batches}",
                                             f"trainer.eval_every={steps}", f"trainer.checkpoint_every={steps}",
                                             *train])
                metrics[name] = read_json(os.path.join(res.out_dir, "metrics.json"))
    return metrics


def _mean_sd(values: Sequence[float]):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(metrics: Dict[str, dict], presets: Sequence[str], dims: Sequence[int], seeds: Sequence[int]) -> List[Dict]:
    """One row per (preset, dim) with at least one run: bytes and the seeds' AUC / log loss."""
    rows = []
    for dim in dims:
        for preset in presets:
            done = [s for s in seeds if run_name(preset, dim, s) in metrics]
            if not done:
                continue
            runs = [metrics[run_name(preset, dim, s)] for s in done]
            auc, auc_sd = _mean_sd([m["val_auc"] for m in runs])
            loss, loss_sd = _mean_sd([m["val_logloss"] for m in runs])
            m0 = runs[0]
            rows.append({
                "preset": preset, "dim": dim, "role": preset_role(preset), "seeds": done,
                "embedding_bytes": m0["embedding_bytes"], "embedding_bytes_fp32": m0["embedding_bytes_fp32"],
                "embedding_bytes_allocated": m0.get("embedding_bytes_allocated"),
                "bytes_vs_fp32": m0["embedding_bytes"] / m0["embedding_bytes_fp32"],
                "val_auc": auc, "val_auc_sd": auc_sd, "val_auc_runs": [m["val_auc"] for m in runs],
                "val_logloss": loss, "val_logloss_sd": loss_sd,
                "train_samples_per_s": statistics.median(m["train_samples_per_s"] for m in runs),
            })
    return rows


def dominance(rows: Sequence[Dict]) -> List[Dict]:
    """For every per-row preset and every uniform preset of no more bytes at the same dim: the AUC margin of
    the per-row preset and the noise of that margin (standard error of the difference of two means)."""
    out = []
    for a in rows:
        if a["role"] != "per_row":
            continue
        n = len(a["seeds"])
        for b in rows:
            if b["role"] != "uniform" or b["dim"] != a["dim"] or b["embedding_bytes"] > a["embedding_bytes"]:
                continue
            margin = a["val_auc"] - b["val_auc"]
            noise = math.sqrt(a["val_auc_sd"] ** 2 / n + b["val_auc_sd"] ** 2 / len(b["seeds"]))
            out.append({"per_row": a["preset"], "uniform": b["preset"], "dim": a["dim"], "margin": margin,
                        "noise": noise, "per_row_better": margin > noise})
    return out


def write_report(out: str, rows: Sequence[Dict], checks: Sequence[Dict], command: str) -> str:
    with open(os.path.join(out, "presets.json"), "w") as f:
        json.dump({"command": command, "rows": list(rows), "dominance": list(checks)}, f, indent=2)
    lines = [f"Command: `{command}`", "",
             "| preset | dim | bytes (vs fp32) | seeds | val AUC (mean ± sd over seeds) | log loss | samples/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['dim']} | {r['embedding_bytes']:,} ({r['bytes_vs_fp32']:.3f}) | "
                     f"{','.join(map(str, r['seeds']))} | {r['val_auc']:.4f} ± {r['val_auc_sd']:.4f} | {r['val_logloss']:.4f} | "
                     f"{r['train_samples_per_s']:,.0f} |")
    if checks:
        lines += ["", "Per-row presets against uniform kinds of no more bytes (margin: AUC difference of the means; "
                  "noise: its standard error):", "", "| per-row | uniform | dim | margin | noise | better |",
                  "|---|---|---:|---:|---:|---|"]
        for c in checks:
            lines.append(f"| {c['per_row']} | {c['uniform']} | {c['dim']} | {c['margin']:+.4f} | {c['noise']:.4f} | "
                         f"{'yes' if c['per_row_better'] else 'no'} |")
    path = os.path.join(out, "presets.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def plot(out: str, rows: Sequence[Dict], title: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    colours = {"per_row": "tab:red", "uniform": "tab:blue", "other": "tab:green"}
    for dim in sorted({r["dim"] for r in rows}):
        sel = [r for r in rows if r["dim"] == dim]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in sel:
            ax.errorbar(r["bytes_vs_fp32"], r["val_auc"], yerr=r["val_auc_sd"], fmt="o", capsize=3,
                        color=colours[r["role"]])
            ax.annotate(r["preset"], (r["bytes_vs_fp32"], r["val_auc"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("embedding bytes / fp32 bytes (log)")
        ax.set_ylabel("val AUC (mean ± sd over the seeds run)")
        ax.set_title(f"{title}, dim {dim} (red: per-row precision, blue: one precision)", fontsize=9)
        ax.grid(alpha=0.3)
        name = f"bytes_vs_auc_d{dim}.png"
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=120)
        plt.close(fig)
        files.append(name)
    return files


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default=None, help="comma-separated tables= presets (default: every row-store preset)")
    ap.add_argument("--dims", default="32,64")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--eval-batches", type=int, default=32, help="validation batches (32: the default data's whole split)")
    ap.add_argument("--train", nargs="*", default=[], help="train.py overrides for every run (data, model...)")
    ap.add_argument("--title", default="default synthetic data")
    ap.add_argument("--out", default="outputs/presets")
    ap.add_argument("--report-only", action="store_true", help="train nothing: report the runs under --out that finished")
    args = ap.parse_args(argv)
    presets = args.presets.split(",") if args.presets else default_presets()
    unknown = sorted(set(presets) - set(table_presets()))
    if unknown:
        ap.error(f"unknown presets {unknown}; presets: {table_presets()}")
    dims = [int(d) for d in args.dims.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    os.makedirs(args.out, exist_ok=True)
    if args.report_only:
        metrics = finished_runs(presets, dims, seeds, args.out)
    else:
        metrics = run_all(presets, dims, seeds, args.steps, args.eval_batches, args.train, args.out)
    rows = summarise(metrics, presets, dims, seeds)
    checks = dominance(rows)
    command = "python -m torchrec_shark.bench.presets " + " ".join(
        [f"--presets {','.join(presets)}", f"--dims {args.dims}", f"--seeds {args.seeds}", f"--steps {args.steps}",
         f"--eval-batches {args.eval_batches}"] + ([f"--train {' '.join(hydra_quote(t) for t in args.train)}"]
                                                   if args.train else []))
    path = write_report(args.out, rows, checks, command)
    plot(args.out, rows, args.title)
    print(open(path).read())
    return rows


if __name__ == "__main__":
    main()
