"""Figures of the report (matplotlib, no display needed)."""

from __future__ import annotations

import csv
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def pareto_front(rows: Sequence[Dict]) -> List[Dict]:
    """Variants no other variant beats on both fewer bytes and higher AUC."""
    front = [r for r in rows if not any(
        o is not r and o["embedding_bytes"] <= r["embedding_bytes"] and o["val_auc"] >= r["val_auc"]
        and (o["embedding_bytes"], o["val_auc"]) != (r["embedding_bytes"], r["val_auc"]) for o in rows)]
    return sorted(front, key=lambda r: r["embedding_bytes"])


def auc_vs_bytes(path: str, rows: Sequence[Dict]) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["embedding_bytes"], r["val_auc"], s=40, zorder=3)
        ax.annotate(r["name"], (r["embedding_bytes"], r["val_auc"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    front = pareto_front(rows)
    ax.plot([r["embedding_bytes"] for r in front], [r["val_auc"] for r in front], "--", color="gray",
            label="Pareto front", zorder=2)
    ax.set_xscale("log")
    ax.set_xlabel("embedding bytes (log scale)")
    ax.set_ylabel("validation AUC")
    ax.set_title("AUC vs embedding memory")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
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


def tier_occupancy(path: str, history: Sequence[Dict]) -> bool:
    """Rows per tier over training, from ``metrics.json`` history entries with ``tiers``."""
    points = [(h["step"], h["tiers"]) for h in history if h.get("tiers")]
    if not points:
        return False
    tiers = sorted({t for _, c in points for t in c}, key=["fp32", "fp16", "int8"].index)
    steps = [s for s, _ in points]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.stackplot(steps, *[[c.get(t, 0) for _, c in points] for t in tiers], labels=tiers, alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("rows")
    ax.set_title("Mixed-precision tier occupancy (all tables)")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def tier_moves(history: Sequence[Dict]) -> Optional[int]:
    moves = [h.get("tier_moves") for h in history if h.get("tier_moves") is not None]
    return sum(moves) if moves else None
