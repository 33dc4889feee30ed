"""Field pruning by F-Permutation importance (SHARK), between two ``train.py`` runs.

Loads a finished run (its config and latest checkpoint, same tables and sharding), measures
each field's importance at the pooled embeddings, drops the least important fields and
writes a ``tables`` config without them, plus the ``torchrun train.py`` command that
fine-tunes it warm-started from the run::

    torchrun --standalone --nproc_per_node=2 -m torchrec_shark.passes.prune_fields \\
        run_dir=outputs/base drop=4 exact=true hydra.run.dir=outputs/prune
    python -m torchrec_shark.passes.prune_fields run_dir=outputs/base tolerance=0.002
    python -m torchrec_shark.passes.prune_fields run_dir=outputs/base 'fields=[f03,f11]'

Rules (at most one; none: importances only): ``drop=K`` the K least important fields;
``tolerance=X`` drop least-important-first while the summed importance of the dropped
fields (the estimated loss increase) stays <= X; ``fields=[...]`` the named fields.
``by=exact`` ranks by exact permutation importance instead (needs ``exact=true``).

Writes to its Hydra run dir: ``field_importance.csv`` (field, table, fperm_importance,
exact_importance, rank, exact_rank, dropped), ``field_importance.png``,
``importance_timing.json``, ``prune_report.json``, ``tables/<name>.yaml`` and
``retrain_command.txt`` (also printed).

Importances are in units of the per-sample log loss. Wall times: ``lookup_s`` is the
shared part (data + embedding lookups of the evaluation batches, done once for both
methods); ``fperm_s`` and ``exact_s`` are each method's own work at the pooled embeddings.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from hydra.core.config_store import ConfigStore

from torchrec_shark.passes.importance import (
    EvalCache,
    FPermAccumulator,
    exact_importance,
    mean_pooled,
    rank_of,
    spearman,
)

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "conf", "passes")


@dataclass
class PruneFieldsConfig:
    """``conf/passes/prune_fields.yaml``: what to measure and which fields to drop."""

    run_dir: str = "???"
    # Rules: at most one of drop / tolerance / fields.
    drop: Optional[int] = None
    tolerance: Optional[float] = None
    fields: List[str] = field(default_factory=list)
    by: str = "fperm"  # fperm | exact: the importance that ranks fields for the rule
    exact: bool = False  # also compute exact permutation importance
    repeats: int = 1  # T permutations per field for the exact importance
    num_batches: Optional[int] = None  # evaluation batches; default: the run's trainer.eval_batches
    split: str = "val"
    seed: int = 0
    chunk: int = 8192  # samples per predict call
    name: str = "pruned"  # tables config name: <out>/tables/<name>.yaml
    nproc: int = 0  # --nproc_per_node of the printed command; 0: this pass's world size
    extra: List[str] = field(default_factory=list)  # appended to the printed train.py command
    plot: bool = True


def register_configs() -> None:
    ConfigStore.instance().store(name="prune_fields_schema", node=PruneFieldsConfig)


class PruneError(ValueError):
    """A request the pass cannot satisfy, with what to change."""


# ------------------------------------------------------------------ rules
def choose_fields_to_drop(
    fields: Sequence[str],
    importance: Dict[str, float],
    drop: Optional[int] = None,
    tolerance: Optional[float] = None,
    names: Sequence[str] = (),
) -> List[str]:
    """The fields a rule drops, least important first (``names``: in the given order)."""
    rules = [r for r, v in (("drop", drop), ("tolerance", tolerance), ("fields", list(names) or None)) if v is not None]
    if len(rules) > 1:
        raise PruneError(f"give one rule, not {rules}: drop=K, tolerance=X or fields=[...]")
    n = len(fields)
    ascending = sorted(fields, key=lambda f: (importance[f], fields.index(f)))
    if names:
        unknown = [f for f in names if f not in fields]
        if unknown:
            raise PruneError(f"fields {unknown} are not in the model; its fields are {list(fields)}")
        chosen = list(dict.fromkeys(names))
        if len(chosen) >= n:
            raise PruneError(f"fields={list(names)} would drop all {n} fields of the model; at least one must stay")
        return chosen
    if drop is not None:
        if drop < 0:
            raise PruneError(f"drop={drop} must be >= 0")
        if drop >= n:
            raise PruneError(f"drop={drop} but the model has {n} fields; at most {n - 1} can be dropped")
        return ascending[:drop]
    if tolerance is not None:
        if tolerance < 0:
            raise PruneError(f"tolerance={tolerance} must be >= 0")
        chosen, total = [], 0.0
        for f in ascending[: n - 1]:
            if total + importance[f] > tolerance:
                break
            total += importance[f]
            chosen.append(f)
        return chosen
    return []


def check_rule(cfg: PruneFieldsConfig, fields: Sequence[str]) -> None:
    """Errors that need no importances (raised before the evaluation runs)."""
    if cfg.by not in ("fperm", "exact"):
        raise PruneError(f"by={cfg.by!r} must be 'fperm' or 'exact'")
    if cfg.by == "exact" and not cfg.exact:
        raise PruneError("by=exact ranks by exact permutation importance: also set exact=true")
    if cfg.repeats < 1:
        raise PruneError(f"repeats={cfg.repeats} must be >= 1")
    if cfg.num_batches is not None and cfg.num_batches < 1:
        raise PruneError(f"num_batches={cfg.num_batches} must be >= 1")
    zero = {f: 0.0 for f in fields}
    choose_fields_to_drop(fields, zero, cfg.drop, cfg.tolerance, cfg.fields)


def recorded_fields(run) -> Optional[List[str]]:
    """The fields a finished run (a :class:`~torchrec_shark.training.run_ref.RunRef`) recorded in its
    ``metrics.json`` (``None`` when it has none)."""
    fields = (run.metrics() or {}).get("fields")
    return list(fields) if fields else None


def check_request(cfg: PruneFieldsConfig) -> None:
    """Fail fast, before the model is built: no run dir or checkpoint, or a rule the run's fields cannot meet.

    The fields come from the run's ``metrics.json``; a run without it is checked again once
    its model is loaded (:func:`check_rule` in :func:`run_pass`).
    """
    from torchrec_shark.training.run_ref import resolve_run

    if cfg.run_dir in ("???", "", None):
        raise PruneError("run_dir=<a train.py run dir> is required")
    fields = recorded_fields(resolve_run(cfg.run_dir))
    if fields is not None:
        check_rule(cfg, fields)


# ------------------------------------------------------------------ model rewrite
def prune_tables(table_configs: Sequence, dropped: Sequence[str]) -> Dict[str, List[str]]:
    """Which tables go, which stay, and which shared tables stay with fewer features."""
    gone = set(dropped)
    keep, removed, shared = [], [], []
    for c in table_configs:
        left = [f for f in c.feature_names if f not in gone]
        if not left:
            removed.append(c.name)
        else:
            keep.append(c.name)
            if len(left) < len(c.feature_names):
                shared.append(c.name)
    return {"keep_tables": keep, "dropped_tables": removed, "shared_tables_kept": shared}


def interaction_columns(source_fields: Sequence[str], kept_fields: Sequence[str], dense_dim: int) -> List[int]:
    """Columns of the source over arch's input that the pruned model's input keeps, in its order.

    DLRM's over arch reads ``[dense (dense_dim), triu(<x_a, x_b>, offset=1)]`` over
    ``x = [dense, field_1, ..., field_F]`` (torchrec ``InteractionArch``).
    """
    pos = {f: i + 1 for i, f in enumerate(source_fields)}
    missing = [f for f in kept_fields if f not in pos]
    if missing:
        raise PruneError(f"fields {missing} are not in the source model")
    n_src = len(source_fields) + 1
    rows, cols = torch.triu_indices(n_src, n_src, offset=1)
    pair_col = {(int(a), int(b)): dense_dim + k for k, (a, b) in enumerate(zip(rows.tolist(), cols.tolist()))}
    items = [0] + [pos[f] for f in kept_fields]
    n_new = len(items)
    r2, c2 = torch.triu_indices(n_new, n_new, offset=1)
    out = list(range(dense_dim))
    for a, b in zip(r2.tolist(), c2.tolist()):
        i, j = sorted((items[a], items[b]))
        out.append(pair_col[(i, j)])
    return out


def over_arch_input_key(model: torch.nn.Module, in_features: int) -> str:
    """State-dict key of the over arch's first weight (``[hidden, in_features]``)."""
    keys = [k for k, v in model.state_dict().items()
            if "over_arch" in k and k.endswith("weight") and isinstance(v, torch.Tensor)
            and v.dim() == 2 and v.shape[1] == in_features]
    if len(keys) != 1:
        raise RuntimeError(f"cannot find the over arch's input layer of width {in_features}: {keys}")
    return keys[0]


# ------------------------------------------------------------------ measurement
def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def compute_importance(run, num_batches: int, exact: bool, repeats: int = 1, seed: int = 0, chunk: int = 8192,
                       split: str = "val") -> Dict:
    """F-Permutation (and optionally exact) importance of every field of a loaded run, with wall times."""
    from torchrec_shark.passes.run_loader import loss_gradients, pooled_batches, predict_with

    fields = list(run.dlrm.feature_names)
    # Warm-up (not timed): the first lookup of a sharded model builds its input dists.
    for b in pooled_batches(run, 1, split):
        loss_gradients(run, b.dense[:8], b.labels[:8], {f: e[:8] for f, e in b.pooled.items()})
    _barrier()
    t0 = time.perf_counter()
    cache = EvalCache.collect(pooled_batches(run, num_batches, split))  # data + lookups, shared by both
    _barrier()
    lookup_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    # The evaluation embeddings are all in memory: take the global mean first, then reduce each
    # chunk's |g . (ebar - e)| as soon as its gradients exist (one forward/backward in all).
    acc = FPermAccumulator(ebar=mean_pooled(cache.pooled))
    n = len(cache)
    for s in range(0, n, chunk):
        sl = slice(s, min(n, s + chunk))
        pooled = {f: e[sl] for f, e in cache.pooled.items()}
        grads, _ = loss_gradients(run, cache.dense[sl], cache.labels[sl], pooled)
        acc.update(pooled, grads)
    fperm = acc.finalize()
    _barrier()
    fperm_s = time.perf_counter() - t0

    out = {"fields": fields, "fperm": {f: fperm[f] for f in fields}, "exact": None, "baseline_loss": None}
    timing = {"lookup_s": lookup_s, "fperm_s": fperm_s, "fperm_total_s": lookup_s + fperm_s,
              "num_fields": len(fields), "num_batches": num_batches, "local_samples": n,
              "world_size": dist.get_world_size() if dist.is_initialized() else 1, "chunk": chunk}
    if exact:
        t0 = time.perf_counter()
        res = exact_importance(cache, lambda d, p: predict_with(run, d, p), repeats=repeats, seed=seed, chunk=chunk)
        _barrier()
        exact_s = time.perf_counter() - t0
        out.update(exact={f: res.importance[f] for f in fields}, baseline_loss=res.baseline_loss,
                   exact_per_repeat=res.per_repeat)
        timing.update(exact_s=exact_s, exact_total_s=lookup_s + exact_s, exact_repeats=repeats,
                      fperm_over_exact=fperm_s / exact_s if exact_s > 0 else None,
                      fperm_total_over_exact_total=(lookup_s + fperm_s) / (lookup_s + exact_s),
                      target_ratio=4.0 / len(fields))
        timing["num_samples"] = res.num_samples
    out["timing"] = timing
    return out


# ------------------------------------------------------------------ outputs
def write_importance_csv(path: str, result: Dict, table_of: Dict[str, str], dropped: Sequence[str]) -> None:
    fields, fperm, exact = result["fields"], result["fperm"], result.get("exact")
    r = rank_of(fperm)
    re = rank_of(exact) if exact else {}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["field", "table", "fperm_importance", "exact_importance", "rank", "exact_rank", "dropped"])
        for name in sorted(fields, key=lambda x: r[x]):
            w.writerow([name, table_of.get(name, ""), f"{fperm[name]:.8g}",
                        f"{exact[name]:.8g}" if exact else "", r[name], re.get(name, ""), int(name in dropped)])


def plot_importance(path: str, result: Dict, dropped: Sequence[str] = (), noise: Sequence[str] = (),
                    title: str = "") -> None:
    """Horizontal bars per field (most important on top): F-Permutation, and exact when computed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields, fperm, exact = result["fields"], result["fperm"], result.get("exact")
    order = sorted(fields, key=lambda f: fperm[f])
    panels = [("F-Permutation", fperm)] + ([("exact permutation", exact)] if exact else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) + 1, 0.28 * len(fields) + 1.6),
                             sharey=True, squeeze=False)
    colors = ["tab:red" if f in dropped else "tab:blue" for f in order]
    for ax, (label, vals) in zip(axes[0], panels):
        bars = ax.barh(range(len(order)), [vals[f] for f in order], color=colors)
        for bar, f in zip(bars, order):
            if f in noise:
                bar.set_hatch("///")
        ax.set_xlabel(f"{label} importance (loss increase)")
        ax.set_yticks(range(len(order)))
        ax.set_yticklabels(order, fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    legend = "red: dropped" + ("; hatched: planted noise" if noise else "")
    fig.suptitle((title + "\n" if title else "") + legend, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def truth_checks(truth: Optional[Dict], result: Dict) -> Optional[Dict]:
    """Against synthetic data's planted truth: is every noise field ranked below every informative one?"""
    if not truth:
        return None
    fields = result["fields"]
    noise = [f for f in truth.get("noise_fields", []) if f in fields]
    informative = [f for f in fields if f not in noise]
    out = {"noise_fields": noise}
    for key in ("fperm", "exact"):
        vals = result.get(key)
        if not vals or not noise or not informative:
            continue
        out[f"{key}_max_noise"] = max(vals[f] for f in noise)
        out[f"{key}_min_informative"] = min(vals[f] for f in informative)
        out[f"{key}_noise_below_informative"] = out[f"{key}_max_noise"] < out[f"{key}_min_informative"]
        planted = {f: truth["fields"][f]["importance"] for f in fields if f in truth.get("fields", {})}
        if len(planted) == len(fields):
            out[f"{key}_spearman_vs_planted"] = spearman([vals[f] for f in fields], [planted[f] for f in fields])
    return out


# ------------------------------------------------------------------ the pass
def run_pass(cfg: PruneFieldsConfig, out_dir: str, env) -> Dict:
    """Measure, choose, rewrite. Returns the report written to ``prune_report.json``."""
    from torchrec_shark.passes.run_loader import load_run, retrain_command
    from torchrec_shark.passes.tables_yaml import write_tables_config
    from torchrec_shark.training.run_ref import resolve_run

    ref = resolve_run(cfg.run_dir)
    run = load_run(ref, out_dir, env)
    fields = list(run.dlrm.feature_names)
    check_rule(cfg, fields)
    num_batches = cfg.num_batches or run.cfg.trainer.eval_batches
    result = compute_importance(run, num_batches, cfg.exact, cfg.repeats, cfg.seed, cfg.chunk, cfg.split)
    by = result["exact"] if cfg.by == "exact" else result["fperm"]
    dropped = choose_fields_to_drop(fields, by, cfg.drop, cfg.tolerance, cfg.fields)
    kept = [f for f in fields if f not in dropped]
    table_configs = run.trainer.table_configs
    table_of = {f: c.name for c in table_configs for f in c.feature_names}
    plan = prune_tables(table_configs, dropped)

    report: Dict = {
        "run_dir": os.path.abspath(ref.run_dir),
        "run": ref.spec,
        "checkpoint": run.checkpoint,
        "rule": {"drop": cfg.drop, "tolerance": cfg.tolerance, "fields": list(cfg.fields), "by": cfg.by},
        "fields": fields,
        "dropped": dropped,
        "kept": kept,
        **plan,
        "estimated_loss_increase": sum(by[f] for f in dropped),
        "fperm": result["fperm"],
        "exact": result["exact"],
        "baseline_loss": result["baseline_loss"],
        "timing": result["timing"],
    }
    if result["exact"]:
        report["spearman_fperm_exact"] = spearman([result["fperm"][f] for f in fields],
                                                  [result["exact"][f] for f in fields])
    truth = ref.data_truth()
    report["truth"] = truth_checks(truth, result)

    if dropped:
        dlrm = run.dlrm
        dense_dim = dlrm.projection.interaction_dim
        over_in = dense_dim + len(fields) * (len(fields) + 1) // 2
        key = over_arch_input_key(run.trainer.model, over_in)
        init_columns = {key: interaction_columns(fields, kept, dense_dim)}
        header = (f"Field pruning of {ref.spec} ({run.checkpoint}):\n"
                  f"dropped fields {dropped} (tables {plan['dropped_tables']}); rule {report['rule']}.\n"
                  f"init_columns keeps the over arch's input columns of the remaining interactions.")
        path = write_tables_config(out_dir, cfg.name, run.cfg.tables, table_configs, keep_tables=plan["keep_tables"],
                                   init_columns=init_columns, header=header, drop_features=dropped)
        nproc = cfg.nproc or env.world_size
        command = retrain_command(ref, out_dir, cfg.name, extra=list(cfg.extra), nproc=nproc)
        report.update(tables_config=path, command=command)
    else:
        report.update(tables_config=None, command=None)

    if env.is_main:
        os.makedirs(out_dir, exist_ok=True)
        write_importance_csv(os.path.join(out_dir, "field_importance.csv"), result, table_of, dropped)
        with open(os.path.join(out_dir, "importance_timing.json"), "w") as f:
            json.dump(result["timing"], f, indent=2)
        with open(os.path.join(out_dir, "prune_report.json"), "w") as f:
            json.dump(report, f, indent=2, default=str)
        if cfg.plot:
            noise = (truth or {}).get("noise_fields", [])
            plot_importance(os.path.join(out_dir, "field_importance.png"), result, dropped, noise,
                            title=f"field importance: {os.path.basename(os.path.abspath(ref.run_dir))}")
        if report["command"]:
            with open(os.path.join(out_dir, "retrain_command.txt"), "w") as f:
                f.write(report["command"] + "\n")
        _print_summary(report)
    return report


def _print_summary(report: Dict) -> None:
    t = report["timing"]
    fperm, exact = report["fperm"], report["exact"]
    r = rank_of(fperm)
    print(f"field importance ({t['num_fields']} fields, {t['local_samples']} samples per rank):")
    for f in sorted(fperm, key=lambda x: r[x]):
        ex = f"  exact={exact[f]:.6f}" if exact else ""
        mark = "  [dropped]" if f in report["dropped"] else ""
        print(f"  {r[f]:3d} {f:>12s}  fperm={fperm[f]:.6f}{ex}{mark}")
    line = f"wall time: lookups {t['lookup_s']:.3f}s (shared), F-Permutation {t['fperm_s']:.3f}s"
    if exact:
        line += (f", exact (T={t['exact_repeats']}) {t['exact_s']:.3f}s; ratio {t['fperm_over_exact']:.3f} "
                 f"(with lookups {t['fperm_total_over_exact_total']:.3f}); spearman {report['spearman_fperm_exact']:.3f}")
    print(line)
    if report.get("truth"):
        print(f"planted truth: {json.dumps(report['truth'])}")
    if report["dropped"]:
        print(f"dropping {report['dropped']} (estimated loss increase {report['estimated_loss_increase']:.6f}); "
              f"tables removed {report['dropped_tables']}, shared tables kept {report['shared_tables_kept']}")
        print(f"tables config: {report['tables_config']}")
        print("fine-tune it warm-started from the run with:")
        print(report["command"], flush=True)
    else:
        print("no field dropped", flush=True)


register_configs()


def _hydra_main():
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig, OmegaConf

    # conf/passes/prune_fields.yaml in a source checkout; the bare schema otherwise.
    found = os.path.isfile(os.path.join(CONF_DIR, "prune_fields.yaml"))

    from torchrec_shark.cli import job, run_hydra_app

    @hydra.main(version_base="1.3", config_path=CONF_DIR if found else None,
                config_name="prune_fields" if found else "prune_fields_schema")
    @job
    def main(dcfg: DictConfig) -> None:
        import warnings

        from torchrec_shark.config import ConfigError, check_known_keys
        from torchrec_shark.passes.command_line import dirs_line
        from torchrec_shark.training import checkpoint as ckpt
        from torchrec_shark.training.env import distributed_job, shared_run_dir
        from torchrec_shark.training.job_log import setup_job_logging

        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*is deprecated")
        try:
            check_known_keys(dcfg, PruneFieldsConfig)
            cfg: PruneFieldsConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
            check_request(cfg)
            from torchrec_shark.passes.run_loader import run_config

            run_cfg = run_config(cfg.run_dir)
        except (PruneError, ConfigError, ckpt.CheckpointError, FileNotFoundError) as e:
            print(f"prune_fields: error: {e}", file=sys.stderr)
            sys.exit(2)
        with distributed_job(run_cfg.trainer.device, run_cfg.trainer.num_threads) as env:
            out_dir = shared_run_dir(HydraConfig.get().runtime.output_dir, "prune_fields.log")
            setup_job_logging(out_dir, "prune_fields.log", env.rank, env.world_size)
            where = dirs_line("prune_fields", out_dir, cfg.run_dir, "prune_report.json")
            if env.is_main:
                print(where, flush=True)
            try:
                run_pass(cfg, out_dir, env)
            except (PruneError, ConfigError, ckpt.CheckpointError) as e:
                print(f"prune_fields: error: {e}", file=sys.stderr)
                sys.exit(2)
            if env.is_main:
                print(where, flush=True)

    run_hydra_app(main, PruneFieldsConfig, prog="prune_fields")


if __name__ == "__main__":
    _hydra_main()
