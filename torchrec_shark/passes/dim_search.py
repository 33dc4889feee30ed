"""SSEDS pass: single-shot embedding dimension search between two ``train.py`` runs.

Loads a finished run (config + latest checkpoint, any sharding, any world size), takes the
saliency of every (field, dim) at the pooled embeddings over evaluation batches, keeps the
most salient table dims within ``budget`` x the current embedding parameters and writes a
``tables`` config with the new per-table widths and the columns each table inherits. See
:mod:`torchrec_shark.passes.saliency` for the math and the selection rule.

Usage::

    python -m torchrec_shark.passes.dim_search run_dir=outputs/2026-01-01/12-00-00 budget=0.2
    torchrun --standalone --nproc_per_node=2 -m torchrec_shark.passes.dim_search run_dir=RUN budget=0.2 \\
        hydra.run.dir=outputs/sseds

Writes to its own Hydra run dir (``hydra.run.dir=OUT`` to choose it):

==========================  ===========================================================
``dim_saliency.csv``        one row per (field, dim): normalised saliency, signed sum, rank, kept
``dim_saliency.png``        heatmap fields x dims, kept columns marked
``widths.json``             per-table and per-field widths, kept columns, parameter counts
``tables/<name>.yaml``      the ``tables`` config (per-table widths + ``init_columns``)
``retrain_command.txt``     the ``torchrun train.py`` command that trains it (also printed)
``truth_check.json``        synthetic data: searched widths vs. the planted intrinsic dims
==========================  ===========================================================

Tensor-train tables re-initialise when their width changes (their cores factorise the
width) and get no ``init_columns``; stock and quantised tables inherit their kept columns.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

import hydra
import torch
import torch.distributed as dist
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf

from torchrec_shark.cli import job, run_hydra_app
from torchrec_shark.config import check_known_keys
from torchrec_shark.passes import saliency as sal
from torchrec_shark.passes.command_line import dirs_line
from torchrec_shark.passes.run_loader import load_run, pooled_gradients, retrain_command
from torchrec_shark.passes.tables_yaml import write_tables_config
from torchrec_shark.training.checkpoint import CheckpointError
from torchrec_shark.training.env import DistEnv, distributed_job, shared_run_dir
from torchrec_shark.training.job_log import setup_job_logging
from torchrec_shark.training.run_ref import resolve_run

logger = logging.getLogger(__name__)


@dataclass
class DimSearchConfig:
    """Config of the SSEDS pass (``conf/passes/dim_search.yaml``)."""

    run_dir: str = MISSING  # a finished train.py run (its .hydra/config.yaml and checkpoints/)
    budget: float = 0.2  # fraction of the current embedding parameters (rows x width, summed over tables)
    # selected: budget charged on rows x kept dims before rounding (the final model may exceed it);
    # final: charged on rows x rounded width (the final model stays within it).
    budget_on: str = "selected"
    num_batches: int = 0  # evaluation batches (global batches of trainer.batch_size); 0: the whole split
    split: str = "val"
    # batch: saliency = sum over batches of |dL_batch/dalpha| (mini-batch saliency);
    # total: |dL/dalpha| of the whole evaluation set at once (on a trained model mostly noise).
    aggregate: str = "batch"
    center: bool = True  # mask each dimension's deviation from its batch mean (no bias channels)
    multiple: int = 4  # widths are rounded up to a multiple of this
    min_width: int = 4
    tables_name: str = "sseds"  # written to <out>/tables/<tables_name>.yaml
    nproc: int = 0  # --nproc_per_node of the printed retrain command; 0: this pass's world size
    heatmap: bool = True


def register_configs() -> None:
    ConfigStore.instance().store(name="dim_search_schema", node=DimSearchConfig)


def check_config(cfg: DimSearchConfig) -> None:
    if not 0.0 < cfg.budget <= 1.0:
        raise ValueError(f"budget={cfg.budget} must be in (0, 1]")
    if cfg.budget_on not in sal.BUDGET_ON:
        raise ValueError(f"budget_on={cfg.budget_on!r} must be one of {list(sal.BUDGET_ON)}")
    for key in ("multiple", "min_width"):
        v = getattr(cfg, key)
        if v <= 0 or v % 4:
            raise ValueError(f"{key}={v} must be a positive multiple of 4 (train.py's table widths are)")
    if cfg.num_batches < 0:
        raise ValueError(f"num_batches={cfg.num_batches} must be >= 0 (0: the whole split)")
    if cfg.aggregate not in ("batch", "total"):
        raise ValueError(f"aggregate={cfg.aggregate!r} must be 'batch' or 'total'")
    if cfg.split not in ("train", "val"):
        raise ValueError(f"split={cfg.split!r} must be 'train' or 'val'")


class BudgetError(ValueError):
    """The parameter budget cannot be met under ``budget_on=final``."""


# ---------------------------------------------------------------------------- the pass
def search(cfg: DimSearchConfig, out_dir: str, env: DistEnv) -> Dict:
    """Run SSEDS on ``cfg.run_dir``; rank 0 writes the outputs to ``out_dir``. Returns the summary."""
    check_config(cfg)
    os.makedirs(out_dir, exist_ok=True)
    run = load_run(resolve_run(cfg.run_dir), out_dir, env)
    tables = sal.table_infos(run.trainer.table_configs)
    fields = [f for t in tables for f in t.features]
    num_batches = cfg.num_batches or sys.maxsize
    # reduced batch by batch (every rank holds the same fields): world-size-independent results
    sums = sal.signed_sums(pooled_gradients(run, num_batches, split=cfg.split),
                           per_batch_abs=cfg.aggregate == "batch", center=cfg.center, reduce=sal.all_reduce_sums)
    missing = [f for f in fields if f not in sums]
    if missing:
        raise RuntimeError(f"no evaluation batch reached features {missing} (split {cfg.split!r} empty?)")
    sums = {f: sums[f] for f in fields}
    saliency = sal.normalise(sums)
    selection = sal.select_dims(saliency, tables, cfg.budget, cfg.multiple, cfg.min_width, cfg.budget_on)
    if selection.infeasible and cfg.budget_on == "final":
        # "final" promises the written config's size: a config over the budget must not pass for one.
        raise BudgetError(
            f"budget={cfg.budget} (budget_on=final) cannot be met: min_width={cfg.min_width} for every table "
            f"already takes {sum(t.rows * sal.round_width(0, t.width, cfg.multiple, cfg.min_width) for t in tables):,} of the {selection.target_params:,.0f} "
            f"parameters allowed ({selection.current_params:,} now); raise budget or lower min_width")
    summary = _summary(cfg, run, tables, selection)
    if env.is_main:
        _write_outputs(cfg, out_dir, run, tables, sums, saliency, selection, summary)
    if dist.is_initialized():
        dist.barrier()
    return summary


def _summary(cfg: DimSearchConfig, run, tables: List[sal.TableInfo], sel: sal.Selection) -> Dict:
    reinit = [t.name for t in tables if not t.inherits_columns and sel.table_widths[t.name] != t.width]
    return {
        "run_dir": os.path.abspath(run.run_dir),
        "run": run.ref.spec,
        "checkpoint": run.checkpoint,
        "budget": cfg.budget,
        "budget_on": cfg.budget_on,
        "params": {
            "current": sel.current_params,
            "target": sel.target_params,
            "selected": sel.selected_params,
            "final": sel.final_params,
            "selected_fraction": sel.selected_fraction,
            "final_fraction": sel.final_fraction,
        },
        "infeasible": sel.infeasible,
        "table_widths": sel.table_widths,
        "field_widths": sel.field_widths,
        "kept_dims": sel.kept_dims,
        "current_widths": {t.name: t.width for t in tables},
        "init_columns": {t.name: sel.columns[t.name] for t in tables if t.inherits_columns},
        "reinitialised_tables": reinit,
        "field_saliency": {},  # filled by _write_outputs
    }


def _write_outputs(cfg, out_dir, run, tables, sums, saliency, sel: sal.Selection, summary: Dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    rank_of = {(n, d): i + 1 for i, (n, d, _, _) in enumerate(sel.ranking)}
    selected = {(n, d) for n, d, _, ok in sel.ranking if ok}
    with open(os.path.join(out_dir, "dim_saliency.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["field", "table", "dim", "saliency", "signed_sum", "table_saliency", "rank", "selected", "kept"])
        for t in tables:
            cols = set(sel.columns[t.name])
            for feat in t.features:
                for d in range(t.width):
                    w.writerow([feat, t.name, d, f"{float(saliency[feat][d]):.6e}", f"{float(sums[feat][d]):.6e}",
                                f"{float(sel.table_saliency[t.name][d]):.6e}", rank_of[(t.name, d)],
                                int((t.name, d) in selected), int(d in cols)])
    summary["field_saliency"] = {f: float(v.sum()) for f, v in saliency.items()}
    if cfg.heatmap:
        plot_heatmap(os.path.join(out_dir, "dim_saliency.png"), tables, saliency, sel)

    header = (f"SSEDS widths for {summary['run_dir']} (budget={cfg.budget}, budget_on={cfg.budget_on}):\n"
              f"{sel.final_params:,} of {sel.current_params:,} embedding parameters "
              f"({sel.final_fraction:.3f}); written by torchrec_shark.passes.dim_search")
    if summary["reinitialised_tables"]:
        header += f"\ntensor-train tables re-initialised at their new width: {summary['reinitialised_tables']}"
    path = write_tables_config(out_dir, cfg.tables_name, run.cfg.tables, run.trainer.table_configs,
                               widths=sel.table_widths, init_columns=summary["init_columns"], header=header)
    command = retrain_command(run.ref, out_dir, cfg.tables_name, nproc=cfg.nproc)
    summary["tables_config"] = path
    summary["retrain_command"] = command
    truth = truth_check(run.ref.data_truth(), tables, sel, summary["field_saliency"])
    if truth is not None:
        summary["truth_check"] = truth
        _dump(os.path.join(out_dir, "truth_check.json"), truth)
    _dump(os.path.join(out_dir, "widths.json"), summary)
    with open(os.path.join(out_dir, "retrain_command.txt"), "w") as f:
        f.write(command + " hydra.run.dir=<NEW_RUN_DIR>\n")

    p = summary["params"]
    print(f"SSEDS budget={cfg.budget} ({cfg.budget_on}): kept {p['selected']:,} params before rounding "
          f"({p['selected_fraction']:.3f}), {p['final']:,} of {p['current']:,} after ({p['final_fraction']:.3f})",
          flush=True)
    if sel.infeasible:
        print(f"warning: the minimum width {cfg.min_width} for every table already exceeds budget={cfg.budget}; "
              f"every table gets width {cfg.min_width} (fraction {p['final_fraction']:.3f})", flush=True)
    for name in summary["reinitialised_tables"]:
        print(f"note: {name} is a tensor-train table: its cores are re-initialised at width "
              f"{sel.table_widths[name]} (no column warm start)", flush=True)
    print("widths: " + " ".join(f"{t.name}={sel.table_widths[t.name]}" for t in tables), flush=True)
    if truth is not None:
        print(f"truth check: spearman(width, intrinsic_dim | informative)={truth['spearman_width']:.3f}, "
              f"noise fields at min width: {truth['noise_at_min_width']}", flush=True)
    print(f"wrote {path}\nretrain with:\n{command} hydra.run.dir=<NEW_RUN_DIR>", flush=True)


def _dump(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)


def plot_heatmap(path: str, tables: List[sal.TableInfo], saliency: Dict[str, torch.Tensor], sel: sal.Selection) -> None:
    """Fields x dims heatmap of the normalised saliency; kept columns dotted, new width in the label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [(f, t) for t in tables for f in t.features]
    width = max(t.width for t in tables)
    grid = np.full((len(rows), width), np.nan)
    for i, (f, t) in enumerate(rows):
        grid[i, : t.width] = saliency[f].numpy()
    fig, ax = plt.subplots(figsize=(2 + 0.28 * width, 1 + 0.3 * len(rows)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ys, xs = [], []
    for i, (f, t) in enumerate(rows):
        for d in sel.columns[t.name]:
            ys.append(i)
            xs.append(d)
    ax.scatter(xs, ys, s=6, c="white", marker="o", linewidths=0)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{f} -> {sel.table_widths[t.name]}" for f, t in rows], fontsize=7)
    ax.set_xlabel("dimension")
    ax.set_title(f"SSEDS saliency (budget {sel.budget}, {sel.final_fraction:.3f} of params kept; dots: kept)",
                 fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- synthetic truth
def spearman(a: List[float], b: List[float]) -> float:
    """Spearman rank correlation with average ranks for ties (nan when either side is constant)."""
    import numpy as np

    def ranks(x):
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        i = 0
        while i < len(x):
            j = i
            while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
                j += 1
            r[order[i:j + 1]] = (i + j) / 2.0
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def truth_check(truth: Optional[Dict], tables, sel: sal.Selection, field_saliency: Dict[str, float]) -> Optional[Dict]:
    """Searched widths vs. the run's ``data_truth.json`` (synthetic data), or ``None`` without it."""
    if truth is None:
        return None
    dims, informative, noise = _truth_fields(truth)
    if dims is None:
        return None
    inf = [f for f in sel.field_widths if f in informative and f in dims]
    noise = [f for f in sel.field_widths if f in noise]
    min_width = min(sel.field_widths.values()) if sel.field_widths else 0
    return {
        "informative": inf,
        "noise_fields": noise,
        "intrinsic_dim": {f: dims.get(f) for f in sel.field_widths},
        "width": dict(sel.field_widths),
        "spearman_width": spearman([sel.field_widths[f] for f in inf], [dims[f] for f in inf]) if inf else None,
        "spearman_saliency": spearman([field_saliency[f] for f in inf], [dims[f] for f in inf]) if inf else None,
        "noise_widths": {f: sel.field_widths[f] for f in noise},
        "noise_at_min_width": all(sel.field_widths[f] == min_width for f in noise),
        "min_width": min_width,
    }


def _truth_fields(truth: Dict):
    """(intrinsic dim per field, informative fields, noise fields) from data_truth.json, tolerant of layout."""
    fields = truth.get("fields")
    dims: Dict[str, float] = {}
    informative, noise = set(), set(truth.get("noise_fields", []) or [])
    if isinstance(fields, dict):
        items = fields.items()
    elif isinstance(fields, list):
        items = [(x.get("name") or x.get("feature"), x) for x in fields if isinstance(x, dict)]
    else:
        items = []
    for name, info in items:
        if not isinstance(info, dict) or name is None:
            continue
        if "intrinsic_dim" in info:
            dims[name] = float(info["intrinsic_dim"])
        if info.get("informative"):
            informative.add(name)
        elif "informative" in info:
            noise.add(name)
    if not dims and isinstance(truth.get("intrinsic_dim"), dict):
        dims = {k: float(v) for k, v in truth["intrinsic_dim"].items()}
    if not informative and isinstance(truth.get("informative"), list):
        informative = set(truth["informative"])
    if not informative:
        informative = set(dims) - noise
    return (dims or None), informative, noise


# ---------------------------------------------------------------------------- Hydra app
register_configs()

# conf/passes/dim_search.yaml in a source checkout; the bare schema otherwise.
CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "conf", "passes")
_FOUND = os.path.isfile(os.path.join(CONF_DIR, "dim_search.yaml"))


@hydra.main(version_base="1.3", config_path=CONF_DIR if _FOUND else None,
            config_name="dim_search" if _FOUND else "dim_search_schema")
@job
def main(dcfg: DictConfig) -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*is deprecated")
    if OmegaConf.is_missing(dcfg, "run_dir"):
        print("dim_search: error: run_dir=<a train.py run dir> is required", file=sys.stderr)
        sys.exit(2)
    try:
        check_known_keys(dcfg, DimSearchConfig)
        cfg: DimSearchConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
        check_config(cfg)
        train_cfg = resolve_run(cfg.run_dir).config()
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"dim_search: error: {e}", file=sys.stderr)
        sys.exit(2)
    with distributed_job(train_cfg.trainer.device, train_cfg.trainer.num_threads) as env:
        out_dir = shared_run_dir(HydraConfig.get().runtime.output_dir, "dim_search.log")
        setup_job_logging(out_dir, "dim_search.log", env.rank, env.world_size)
        where = dirs_line("dim_search", out_dir, cfg.run_dir, "widths.json")
        if env.is_main:
            print(where, flush=True)
        try:
            search(cfg, out_dir, env)
        except BudgetError as e:
            print(f"dim_search: error: {e}", file=sys.stderr)
            sys.exit(3)
        if env.is_main:
            print(where, flush=True)


if __name__ == "__main__":
    run_hydra_app(main, DimSearchConfig, prog="dim_search")
