"""Figures of the report (matplotlib, no display needed)."""

from __future__ import annotations

import csv
import math
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from torchrec_shark.modules.row_store import PRECISIONS  # noqa: E402


def pareto_front(rows: Sequence[Dict]) -> List[Dict]:
    """Variants no other variant beats on both fewer bytes and higher AUC."""
    front = [r for r in rows if not any(
        o is not r and o["embedding_bytes"] <= r["embedding_bytes"] and o["val_auc"] >= r["val_auc"]
        and (o["embedding_bytes"], o["val_auc"]) != (r["embedding_bytes"], r["val_auc"]) for o in rows)]
    return sorted(front, key=lambda r: r["embedding_bytes"])


def label_offsets(rows: Sequence[Dict]) -> Dict[str, tuple]:
    """Offset (points) of each variant's label: above right, or below right for a point next to one already
    labelled (e.g. two endings of nearly the same size and AUC), so the two names do not print over each other."""
    aucs = [r["val_auc"] for r in rows]
    span = (max(aucs) - min(aucs)) or 1.0
    placed: List[tuple] = []
    out = {}
    for r in sorted(rows, key=lambda r: -r["val_auc"]):
        x, y = r["embedding_bytes"], r["val_auc"]
        near = any(abs(math.log(x / px)) < 0.25 and abs(y - py) < 0.06 * span for px, py in placed)
        out[r["name"]] = (5, -11) if near else (5, 4)
        placed.append((x, y))
    return out


def auc_vs_bytes(path: str, rows: Sequence[Dict]) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    offsets = label_offsets(rows)
    for r in rows:
        ax.scatter(r["embedding_bytes"], r["val_auc"], s=40, zorder=3)
        ax.annotate(r["name"], (r["embedding_bytes"], r["val_auc"]), textcoords="offset points",
                    xytext=offsets[r["name"]], fontsize=8)
    front = pareto_front(rows)
    ax.plot([r["embedding_bytes"] for r in front], [r["val_auc"] for r in front], "--", color="gray",
            label="Pareto front", zorder=2)
    ax.set_xscale("log")
    ax.set_xlabel("embedding bytes (log scale)")
    ax.set_ylabel("validation AUC")
    ax.set_title("AUC vs embedding memory")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def field_importance(path: str, csv_path: str) -> bool:
    """Bar chart of the F-Permutation importances the pruning pass wrote; False without them."""
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    if not rows or "fperm_importance" not in rows[0]:
        return False
    rows.sort(key=lambda r: float(r["fperm_importance"]), reverse=True)
    dropped = [str(r.get("dropped", "")).lower() in ("true", "1", "yes") for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(rows)), 4))
    ax.bar(range(len(rows)), [float(r["fperm_importance"]) for r in rows],
           color=["tab:red" if d else "tab:blue" for d in dropped])
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["field"] for r in rows], rotation=90, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("F-Permutation importance (log)")
    ax.set_title("Field importance (red: pruned)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def tier_occupancy(path: str, tier_history: Sequence[Dict]) -> bool:
    """Where training lookups land, by tier, over training; and rows moved per interval.

    Reads ``metrics.json``'s ``tier_history`` (entries with ``step``, ``rows``, ``hits`` and
    ``moves`` per tier). The tier sizes are fixed by the spec, so what changes, and what shows
    whether the frequency priority works, is the share of lookups the precise tiers serve.
    """
    points = [h for h in tier_history if h.get("hits") and sum(h["hits"].values()) > 0]
    if not points:
        return False
    tiers = [t for t in PRECISIONS if any(h["rows"].get(t, 0) for h in points)]
    steps = [h["step"] for h in points]
    rows = points[-1]["rows"]
    total_rows = max(sum(rows.values()), 1)
    shares = [[h["hits"].get(t, 0) / sum(h["hits"].values()) for h in points] for t in tiers]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=[3, 1.4])
    labels = [f"{t} ({rows.get(t, 0) / total_rows:.0%} of rows)" for t in tiers]
    top.stackplot(steps, *shares, labels=labels, alpha=0.85)
    top.set_ylim(0, 1)
    top.set_ylabel("share of training lookups")
    top.set_title("Mixed-precision tiers: lookups served per tier (all tables)")
    top.legend(loc="lower right")
    bottom.plot(steps, [h.get("moves", 0) for h in points], marker=".", color="k")
    bottom.set_yscale("symlog")
    bottom.set_ylabel("rows moved")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
