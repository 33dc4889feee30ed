"""The pipeline's report: one row per variant from its run's ``metrics.json``, plus plots.

Example::

    rows = [variant_row("baseline", "runs/baseline/metrics.json", ...), ...]
    write_report(out_dir, rows, extras)   # report.json, report.md, *.png
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

from torchrec_shark.modules.kinds import kind_named

REQUIRED = ("name", "val_auc", "val_logloss", "embedding_bytes", "embedding_bytes_fp32", "train_samples_per_s")


def compressed_table_bytes(metrics: Dict) -> Dict[str, int]:
    """Bytes of the tables that are not stock fp32, and what they take as fp32."""
    real = fp32 = 0
    for info in metrics.get("tables", {}).values():
        if info.get("bytes") is None or kind_named(info.get("kind") or "none").stock:
            continue
        real += int(info["bytes"])
        fp32 += int(info["num_embeddings"]) * int(info["embedding_dim"]) * 4
    return {"bytes": real, "fp32": fp32}


def variant_row(name: str, stage: str, metrics: Dict, run_dir: str, seconds: float) -> Dict:
    tables = metrics.get("tables", {})
    widths = [int(t["embedding_dim"]) for t in tables.values() for _ in t.get("features", [None])]
    compressed = compressed_table_bytes(metrics)
    return {
        "name": name,
        "stage": stage,
        "run_dir": run_dir,
        "val_auc": float(metrics["val_auc"]),
        "val_logloss": float(metrics["val_logloss"]),
        "embedding_bytes": int(metrics["embedding_bytes"]),
        "embedding_bytes_fp32": int(metrics["embedding_bytes_fp32"]),
        "train_samples_per_s": float(metrics["train_samples_per_s"]),
        "steps": int(metrics["steps"]),
        "fields_kept": int(metrics.get("num_fields", len(metrics.get("fields", [])))),
        "mean_width": sum(widths) / len(widths) if widths else None,
        "compressed_tables_bytes": compressed["bytes"],
        "compressed_tables_fp32": compressed["fp32"],
        "seconds": seconds,
    }


def add_ratios(rows: List[Dict], baseline: str = "baseline") -> None:
    base = next((r for r in rows if r["name"] == baseline), None)
    for r in rows:
        r["bytes_vs_fp32"] = r["embedding_bytes"] / r["embedding_bytes_fp32"] if r["embedding_bytes_fp32"] else None
        r["compressed_tables_ratio"] = (r["compressed_tables_fp32"] / r["compressed_tables_bytes"]
                                        if r["compressed_tables_bytes"] else None)
        if base is not None:
            r["delta_auc"] = r["val_auc"] - base["val_auc"]
            r["bytes_vs_baseline"] = r["embedding_bytes"] / base["embedding_bytes"]
            r["speed_vs_baseline"] = (r["train_samples_per_s"] / base["train_samples_per_s"]
                                      if base["train_samples_per_s"] else None)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(rows: Sequence[Dict], title: str, notes: Sequence[str], plots: Sequence[str]) -> str:
    lines = [f"# {title}", ""]
    lines += [
        "| variant | val AUC | Δ AUC | val logloss | embedding bytes | × own fp32 | × baseline | "
        "compressed tables ratio | samples/s | × baseline speed | fields | mean width |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['val_auc']:.4f} | {_fmt(r.get('delta_auc'), '+.4f')} | {r['val_logloss']:.4f} | "
            f"{r['embedding_bytes']:,} | {_fmt(r.get('bytes_vs_fp32'), '.3f')} | {_fmt(r.get('bytes_vs_baseline'), '.3f')} | "
            f"{_fmt(r.get('compressed_tables_ratio'), '.1f')}{'×' if r.get('compressed_tables_ratio') else ''} | "
            f"{r['train_samples_per_s']:,.0f} | {_fmt(r.get('speed_vs_baseline'), '.2f')} | {r['fields_kept']} | "
            f"{_fmt(r.get('mean_width'), '.1f')} |"
        )
    lines += ["", "Bytes are what the tables really occupy, summed over ranks, optimizer state excluded. "
              "`× own fp32`: against the same tables in fp32; `compressed tables ratio`: fp32 bytes / real bytes "
              "of the tables stored compressed (stock tables beside them excluded).", ""]
    if notes:
        lines += ["## Checks", ""] + [f"- {n}" for n in notes] + [""]
    for p in plots:
        lines += [f"![{os.path.splitext(p)[0]}]({p})", ""]
    return "\n".join(lines)


def write_report(out_dir: str, rows: List[Dict], extras: Dict, notes: Sequence[str], plots: Sequence[str],
                 title: str = "Compression report") -> str:
    for r in rows:
        missing = [k for k in REQUIRED if r.get(k) is None]
        if missing:
            raise ValueError(f"variant {r.get('name')!r} lacks {missing}")
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump({"variants": rows, **extras, "checks": list(notes)}, f, indent=2)
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write(markdown(rows, title, notes, plots))
    return path


def first_present(*paths: str) -> Optional[str]:
    return next((p for p in paths if p and os.path.isfile(p)), None)
