"""SHARK's field-pruning loop as one command: evaluate -> prune -> fine-tune -> repeat.

Each round runs the pruning pass on the current model (``torchrun -m
torchrec_shark.passes.prune_fields``), then fine-tunes the pruned config warm-started from
it (the ``torchrun train.py`` command the pass prints, with ``trainer.max_steps=finetune_steps``).
A round is accepted while the fine-tuned model's validation AUC stays within
``auc_tolerance`` of the unpruned model's; the loop stops at the first round that falls
below, when the rule drops nothing, when too few fields would remain, or after
``max_rounds``::

    python -m torchrec_shark.passes.prune_loop run_dir=outputs/base drop_per_round=4 \\
        finetune_steps=500 auc_tolerance=0.002 hydra.run.dir=outputs/prune_loop

Run it from the repository root (where ``train.py`` is). Writes to its Hydra run dir:
``round_NN/prune`` and ``round_NN/train`` (each round's pass and fine-tuned run),
``prune_loop.csv`` and ``prune_loop.md`` (round, fields kept, val AUC, val logloss,
embedding bytes, accepted), ``tables/<name>_final.yaml`` (the last accepted config, without
warm-start column maps) and ``prune_loop.json`` (everything, including the final run dir).
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from hydra.core.config_store import ConfigStore

from torchrec_shark.passes.command_line import hydra_quote

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONF_DIR = os.path.join(ROOT, "conf", "passes")


@dataclass
class PruneLoopConfig:
    """``conf/passes/prune_loop.yaml``."""

    run_dir: str = "???"
    drop_per_round: Optional[int] = 2  # fields dropped per round (least important first)
    tolerance: Optional[float] = None  # instead: per round, drop while the estimated loss increase <= X
    auc_tolerance: float = 0.002  # accept a round while val AUC >= unpruned AUC - auc_tolerance
    max_rounds: int = 10
    min_fields: int = 1  # never go below this many fields
    finetune_steps: int = 500  # trainer.max_steps of each fine-tuning run
    nproc: int = 1  # ranks of the pass and of the fine-tuning runs
    exact: bool = False  # also compute exact permutation importance each round (reported only)
    num_batches: Optional[int] = None  # evaluation batches of the pass (default: the run's eval_batches)
    name: str = "pruned"
    extra: List[str] = field(default_factory=list)  # extra train.py overrides for every fine-tune
    pass_extra: List[str] = field(default_factory=list)  # extra prune_fields overrides
    torchrun: str = ""  # default: the torchrun next to this Python, else the one on PATH


def register_configs() -> None:
    ConfigStore.instance().store(name="prune_loop_schema", node=PruneLoopConfig)


register_configs()

Runner = Callable[[List[str], str, str], int]


def subprocess_runner(argv: List[str], cwd: str, log_path: str) -> int:
    """Run ``argv`` with its output teed to ``log_path``; returns the exit status."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            log.flush()
        return proc.wait()


def _torchrun(cfg: PruneLoopConfig) -> str:
    if cfg.torchrun:
        return cfg.torchrun
    local = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return local if os.path.exists(local) else (shutil.which("torchrun") or "torchrun")


def _read_json(path: str) -> Dict:
    with open(path) as f:
        return json.load(f)


def _tail(path: str, n: int = 40) -> str:
    try:
        with open(path) as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


class LoopError(RuntimeError):
    pass


def _row(rnd: int, metrics: Dict, dropped: List[str], accepted: bool, run_dir: str, base_auc: float) -> Dict:
    return {
        "round": rnd,
        "fields_kept": int(metrics.get("num_fields", len(metrics.get("fields", [])))),
        "dropped": " ".join(dropped),
        "val_auc": float(metrics["val_auc"]),
        "auc_delta": float(metrics["val_auc"]) - base_auc,
        "val_logloss": float(metrics["val_logloss"]),
        "embedding_bytes": int(metrics["embedding_bytes"]),
        "accepted": accepted,
        "run_dir": run_dir,
    }


def write_tables(out_dir: str, rows: List[Dict]) -> None:
    keys = ["round", "fields_kept", "dropped", "val_auc", "auc_delta", "val_logloss", "embedding_bytes", "accepted",
            "run_dir"]
    with open(os.path.join(out_dir, "prune_loop.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in keys})
    lines = ["| round | fields kept | dropped | val AUC | AUC delta | val logloss | embedding bytes | accepted |",
             "|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['round']} | {r['fields_kept']} | {r['dropped'] or '-'} | {r['val_auc']:.4f} | "
                     f"{r['auc_delta']:+.4f} | {r['val_logloss']:.4f} | {r['embedding_bytes']:,} | "
                     f"{'yes' if r['accepted'] else 'no'} |")
    with open(os.path.join(out_dir, "prune_loop.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def run_loop(cfg: PruneLoopConfig, out_dir: str, runner: Runner = subprocess_runner) -> Dict:
    """The loop; ``runner`` executes one command (a subprocess; tests pass a fake)."""
    from omegaconf import OmegaConf

    from torchrec_shark.passes.run_loader import retrain_command
    from torchrec_shark.training.run_ref import resolve_run

    if cfg.drop_per_round is not None and cfg.tolerance is not None:
        raise LoopError("give drop_per_round or tolerance, not both (set drop_per_round=null to use tolerance)")
    if cfg.drop_per_round is None and cfg.tolerance is None:
        raise LoopError("give drop_per_round=K or tolerance=X")
    if cfg.drop_per_round is not None and cfg.drop_per_round < 1:
        raise LoopError(f"drop_per_round={cfg.drop_per_round} must be >= 1")
    if cfg.finetune_steps < 1 or cfg.max_rounds < 1 or cfg.min_fields < 1:
        raise LoopError("finetune_steps, max_rounds and min_fields must be >= 1")
    ref = resolve_run(cfg.run_dir)
    base_dir = ref.spec  # <run_dir>@best stays @best: the first round prunes and warm-starts from that checkpoint
    base = ref.metrics()
    if base is None:
        raise LoopError(f"{ref.run_dir} has no metrics.json: the unpruned run did not finish")
    os.makedirs(out_dir, exist_ok=True)
    base_auc = float(base["val_auc"])
    rows = [_row(0, base, [], True, base_dir, base_auc)]
    write_tables(out_dir, rows)
    torchrun = _torchrun(cfg)
    current, current_fields = base_dir, list(base.get("fields", []))
    final_tables: Optional[str] = None
    stop = "max_rounds reached"
    for rnd in range(1, cfg.max_rounds + 1):
        n = len(current_fields)
        if cfg.drop_per_round is not None and n - cfg.drop_per_round < cfg.min_fields:
            stop = f"dropping {cfg.drop_per_round} of {n} fields would leave fewer than min_fields={cfg.min_fields}"
            break
        rdir = os.path.join(out_dir, f"round_{rnd:02d}")
        prune_dir, train_dir = os.path.join(rdir, "prune"), os.path.join(rdir, "train")
        os.makedirs(rdir, exist_ok=True)
        rule = [f"drop={cfg.drop_per_round}"] if cfg.drop_per_round is not None else [f"tolerance={cfg.tolerance}"]
        argv = [torchrun, "--standalone", f"--nproc_per_node={cfg.nproc}", "-m", "torchrec_shark.passes.prune_fields",
                f"run_dir={hydra_quote(current)}", *rule, f"exact={str(cfg.exact).lower()}", f"name={cfg.name}",
                f"nproc={cfg.nproc}", f"hydra.run.dir={hydra_quote(prune_dir)}"]
        if cfg.num_batches:
            argv.append(f"num_batches={cfg.num_batches}")
        argv += list(cfg.pass_extra)
        _log(f"round {rnd}: pruning {current} ({n} fields)")
        log = os.path.join(rdir, "prune.log")
        if runner(argv, os.getcwd(), log) != 0:
            raise LoopError(f"round {rnd}: the pruning pass failed (log {log}):\n{_tail(log)}")
        report = _read_json(os.path.join(prune_dir, "prune_report.json"))
        dropped = list(report["dropped"])
        kept = list(report["kept"])
        if cfg.tolerance is not None and len(kept) < cfg.min_fields:
            dropped = dropped[: len(current_fields) - cfg.min_fields]
        if not dropped:
            stop = "the rule dropped no field"
            break
        extra = [f"trainer.max_steps={cfg.finetune_steps}", f"hydra.run.dir={hydra_quote(train_dir)}", "trainer.progress=false",
                 *cfg.extra]
        command = retrain_command(current, prune_dir, cfg.name, extra=extra, nproc=cfg.nproc)
        train_argv = shlex.split(command)
        if train_argv and train_argv[0] == "torchrun":
            train_argv[0] = torchrun
        _log(f"round {rnd}: dropped {dropped}; fine-tuning: {command}")
        log = os.path.join(rdir, "train.log")
        if runner(train_argv, os.getcwd(), log) != 0:
            raise LoopError(f"round {rnd}: fine-tuning failed (log {log}):\n{_tail(log)}")
        metrics = _read_json(os.path.join(train_dir, "metrics.json"))
        accepted = float(metrics["val_auc"]) >= base_auc - cfg.auc_tolerance
        row = _row(rnd, metrics, dropped, accepted, train_dir, base_auc)
        row["command"] = command
        row["estimated_loss_increase"] = report.get("estimated_loss_increase")
        rows.append(row)
        write_tables(out_dir, rows)
        _log(f"round {rnd}: {row['fields_kept']} fields, val_auc={row['val_auc']:.4f} "
             f"({row['auc_delta']:+.4f} vs unpruned), embedding_bytes={row['embedding_bytes']:,}: "
             f"{'accepted' if accepted else 'rejected'}")
        if not accepted:
            stop = f"round {rnd} lost more than auc_tolerance={cfg.auc_tolerance} of val AUC"
            break
        current, current_fields, final_tables = train_dir, list(metrics.get("fields", kept)), report["tables_config"]

    final_path = None
    if final_tables:
        doc = OmegaConf.load(final_tables)
        doc.init_columns = {}  # the column map belongs to the warm start of its own round
        folder = os.path.join(out_dir, "tables")
        os.makedirs(folder, exist_ok=True)
        final_path = os.path.join(folder, f"{cfg.name}_final.yaml")
        with open(final_path, "w") as f:
            f.write(f"# Final config of the field-pruning loop from {base_dir}; fields {current_fields}.\n")
            f.write(f"# Trained model: {current}\n")
            f.write(OmegaConf.to_yaml(doc))
    accepted_rows = [r for r in rows if r["accepted"]]
    summary = {
        "base_run": base_dir,
        "base_val_auc": base_auc,
        "auc_tolerance": cfg.auc_tolerance,
        "stopped": stop,
        "final_run": current,
        "final_fields": current_fields,
        "final_tables_config": final_path,
        "final_val_auc": accepted_rows[-1]["val_auc"],
        "final_embedding_bytes": accepted_rows[-1]["embedding_bytes"],
        "rounds": rows,
    }
    with open(os.path.join(out_dir, "prune_loop.json"), "w") as f:
        json.dump(summary, f, indent=2)
    _log(f"stopped: {stop}. Final model: {current} ({len(current_fields)} fields); config: {final_path}")
    with open(os.path.join(out_dir, "prune_loop.md")) as f:
        _log(f.read())
    return summary


def _log(msg: str) -> None:
    print(msg, flush=True)


def _hydra_main():
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig, OmegaConf

    found = os.path.isfile(os.path.join(CONF_DIR, "prune_loop.yaml"))

    from torchrec_shark.cli import job, run_hydra_app

    @hydra.main(version_base="1.3", config_path=CONF_DIR if found else None,
                config_name="prune_loop" if found else "prune_loop_schema")
    @job
    def main(dcfg: DictConfig) -> None:
        from torchrec_shark.training.checkpoint import CheckpointError

        from torchrec_shark.config import ConfigError, check_known_keys
        from torchrec_shark.passes.command_line import dirs_line

        try:
            check_known_keys(dcfg, PruneLoopConfig)
            cfg: PruneLoopConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
            if cfg.run_dir in ("???", "", None):
                raise LoopError("run_dir=<a train.py run dir> is required")
            out_dir = HydraConfig.get().runtime.output_dir
            print(dirs_line("prune_loop", out_dir, cfg.run_dir, "prune_loop.md"), flush=True)
            run_loop(cfg, out_dir)
            print(dirs_line("prune_loop", out_dir, cfg.run_dir, "prune_loop.md"), flush=True)
        except (LoopError, ConfigError, CheckpointError) as e:
            print(f"prune_loop: error: {e}", file=sys.stderr)
            sys.exit(2)

    run_hydra_app(main, PruneLoopConfig, prog="prune_loop")


if __name__ == "__main__":
    _hydra_main()
