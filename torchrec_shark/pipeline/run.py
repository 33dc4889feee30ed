"""Runs the pipeline's stages in order and writes the report (see ``python -m torchrec_shark.pipeline``)."""

from __future__ import annotations

import os
from typing import Dict, List

from omegaconf import OmegaConf

from torchrec_shark.passes.command_line import hydra_quote
from torchrec_shark.pipeline import plots
from torchrec_shark.pipeline.config import TABLES_DIR, PipelineConfig
from torchrec_shark.pipeline.report import add_ratios, variant_row, write_report
from torchrec_shark.pipeline.stages import StageRunner, read_json

PRUNE_MODULE = "torchrec_shark.passes.prune_fields"
DIMS_MODULE = "torchrec_shark.passes.dim_search"
# Not a name in conf/tables: the repository's own group files take precedence over a search path.
SHARK_TABLES = "searched_compressed"


def run_pipeline(cfg: PipelineConfig, out_dir: str) -> str:
    """Every stage, then ``report.md``; returns its path."""
    runner = StageRunner(out_dir, resume=cfg.resume)
    common = list(cfg.train) + ([f"trainer.max_steps={cfg.steps}"] if cfg.steps else [])
    finetune = [f"trainer.max_steps={cfg.finetune_steps}"]
    variants: List[tuple] = []  # (name, stage label)

    runner.train("baseline", cfg.nproc, ["tables=baseline", *common])
    variants.append(("baseline", "stock fp32 tables"))

    prune = runner.run_pass("prune_fields", PRUNE_MODULE, cfg.nproc,
                            [f"run_dir={hydra_quote(runner.path('runs', 'baseline'))}", *cfg.prune], "prune_report.json",
                            after=["baseline"])
    prune_report = read_json(os.path.join(prune.out_dir, "prune_report.json"))
    source = "baseline"
    if prune_report.get("command"):
        runner.train_from_pass("pruned", prune_report["command"], [*cfg.train, *finetune], after=["prune_fields"])
        variants.append(("pruned", "field pruning, fine-tuned"))
        source = "pruned"

    dims = runner.run_pass("dim_search", DIMS_MODULE, cfg.nproc,
                           [f"run_dir={hydra_quote(runner.path('runs', source))}", f"budget={cfg.budget}"], "widths.json",
                           after=[source])
    widths = read_json(os.path.join(dims.out_dir, "widths.json"))
    command = widths["retrain_command"]
    runner.train_from_pass("pruned_dims", command, [*cfg.train, *finetune], after=["dim_search"])
    variants.append(("pruned_dims", f"+ dimension search (budget {cfg.budget}), fine-tuned"))

    # The searched tables, now stored compressed, warm-started from the narrowed run (its tables already have
    # the new widths: no column selection any more). Every tensor carries over: the stock rows are re-encoded
    # into the preset's precisions (tiers re-form from the priorities counted from here on), optimizer state
    # included; so it fine-tunes. ``endings``: the same stage with other presets, to compare with.
    endings = [("shark", cfg.shark_tables)] if cfg.shark_tables != "none" else []
    endings += [(f"ending_{preset}", preset) for preset in cfg.endings]
    for name, preset in endings:
        narrow = cfg.narrow_tables if name == "shark" and cfg.narrow_tables != "none" else preset
        # the folder names the narrow-table preset too: it is on the command line, so a stage built with
        # another one is not taken for this one
        folder = f"{name}_tables" if narrow == preset else f"{name}_tables_narrow_{narrow}"
        search_dir = compressed_tables_config(widths["tables_config"], runner.path("passes", folder),
                                              SHARK_TABLES, preset, narrow)
        runner.train_from_pass(name, command, [
            *cfg.train, *finetune, f"hydra.searchpath=[{hydra_quote('file://' + search_dir)}]",
            f"tables={SHARK_TABLES}",
            f"trainer.init_from={hydra_quote(runner.path('runs', 'pruned_dims'))}",
        ], after=["dim_search", "pruned_dims"])
        what = "the SHARK stage" if name == "shark" else "instead of the SHARK stage"
        variants.append((name, f"+ tables={preset}, fine-tuned ({what})"))

    # The warm-started stages have read more samples than the baseline: a control that continues the
    # baseline for as many steps tells gains of extra data from effects of compression.
    chain = [n for n, _ in variants if n != "baseline" and not n.startswith("ending_")]
    warm_steps = cfg.finetune_steps * len(chain)
    runner.train("baseline_continued", cfg.nproc, [
        "tables=baseline", *cfg.train, f"trainer.max_steps={warm_steps}",
        f"trainer.init_from={hydra_quote(runner.path('runs', 'baseline'))}",
    ], after=["baseline"])
    variants.append(("baseline_continued", f"baseline + {warm_steps} more steps (the samples the last stage has read)"))

    for group in cfg.comparisons:
        name = f"{group}_only"
        runner.train(name, cfg.nproc, [f"tables={group}", *common])
        variants.append((name, f"tables={group} from scratch"))

    rows = []
    for name, stage in variants:
        res = runner.results[name]
        metrics = read_json(os.path.join(res.out_dir, "metrics.json"))
        rows.append(variant_row(name, stage, metrics, res.out_dir, res.seconds))
    add_ratios(rows)
    plot_files = _plots(runner, rows, prune.out_dir)
    notes = _checks(rows, prune_report, widths)
    extras = {
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "stages": {n: {"kind": r.kind, "dir": r.out_dir, "seconds": r.seconds, "skipped": r.skipped,
                       "command": r.command} for n, r in runner.results.items()},
        "pruned_fields": prune_report.get("dropped", []),
        "widths": widths.get("table_widths") or widths.get("widths"),
    }
    return write_report(out_dir, rows, extras, notes, plot_files)


def compressed_tables_config(source_yaml: str, out_dir: str, name: str, preset: str, narrow: str = "int8") -> str:
    """A copy of a written tables config with every table stored as the ``tables=<preset>`` preset stores
    its tables (its whole ``compression`` block) and no column selection; a table that the ``narrow`` preset
    stores in fewer bytes (a narrow one, where per-row scales and metadata outweigh the codes) is stored as
    that instead. Returns the folder to put on ``hydra.searchpath``."""
    doc = OmegaConf.load(source_yaml)
    compression = OmegaConf.load(os.path.join(TABLES_DIR, f"{preset}.yaml")).get("compression", {"kind": "none"})
    fallback = OmegaConf.load(os.path.join(TABLES_DIR, f"{narrow}.yaml")).get("compression", {"kind": "none"})
    doc.name = name
    doc.compression = compression
    doc.init_columns = {}
    for table in doc.tables.values():
        rows, dim = int(table.num_embeddings), int(table.get("embedding_dim") or doc.embedding_dim)
        narrower = preset != narrow and _table_bytes(narrow, rows, dim) < _table_bytes(preset, rows, dim)
        if table.get("compression") is not None or narrower:
            table.compression = fallback if narrower else compression
    os.makedirs(os.path.join(out_dir, "tables"), exist_ok=True)
    OmegaConf.save(doc, os.path.join(out_dir, "tables", f"{name}.yaml"))
    return out_dir


def _table_bytes(preset: str, rows: int, dim: int) -> int:
    """Bytes of one ``rows`` x ``dim`` table stored as ``tables=<preset>`` stores its tables (no optimizer state)."""
    from torchrec_shark.modules import CompressedEmbeddingBagConfig, SparseOptimizerSpec, kind_of
    from torchrec_shark.modules.kinds import spec_from_config
    from torchrec_shark.pipeline.config import preset_compression

    config = CompressedEmbeddingBagConfig(name="t", num_embeddings=rows, embedding_dim=dim, feature_names=["f"],
                                          compression=spec_from_config(preset_compression(preset), rows))
    parts = kind_of(config).storage_bytes(config, SparseOptimizerSpec(), 0, rows)
    return int(parts["total"] - parts.get("optimizer", 0))


def _plots(runner: StageRunner, rows: List[Dict], prune_dir: str) -> List[str]:
    files = []
    plots.auc_vs_bytes(runner.path("auc_vs_bytes.png"), rows)
    files.append("auc_vs_bytes.png")
    csv_path = os.path.join(prune_dir, "field_importance.csv")
    if os.path.isfile(csv_path) and plots.field_importance(runner.path("field_importance.png"), csv_path):
        files.append("field_importance.png")
    shark = next((r for r in rows if r["name"] == "shark"), None)
    if shark is not None:
        tier_history = read_json(os.path.join(shark["run_dir"], "metrics.json")).get("tier_history", [])
        if plots.tier_occupancy(runner.path("tier_occupancy.png"), tier_history):
            files.append("tier_occupancy.png")
    return files


def _checks(rows: List[Dict], prune_report: Dict, widths: Dict) -> List[str]:
    """The targets, stated with the measured numbers, whether met or not."""
    by = {r["name"]: r for r in rows}
    notes = []
    if "shark" in by and "baseline" in by:
        s = by["shark"]
        ok = s["bytes_vs_baseline"] <= 0.05
        notes.append(f"SHARK pipeline: {s['bytes_vs_baseline']:.1%} of baseline embedding bytes (target <= 5%): "
                     f"{'met' if ok else 'NOT met'}; Δ AUC against the baseline {s['delta_auc']:+.4f}")
        if "baseline_continued" in by:
            c = by["baseline_continued"]
            d = s["val_auc"] - c["val_auc"]
            notes.append(f"SHARK pipeline against the baseline trained on as many samples ({c['val_auc']:.4f}): "
                         f"Δ AUC {d:+.4f} (target >= -0.002): {'met' if d >= -0.002 else 'NOT met'}")
        for name, e in by.items():
            if name.startswith("ending_"):
                smaller = s["embedding_bytes"] < e["embedding_bytes"]
                d = s["val_auc"] - e["val_auc"]
                notes.append(f"SHARK stage against {name} ({e['bytes_vs_baseline']:.1%} of baseline bytes, AUC "
                             f"{e['val_auc']:.4f}): {'fewer' if smaller else 'NOT fewer'} bytes, Δ AUC {d:+.4f} "
                             f"(target: fewer bytes at Δ AUC >= 0): {'met' if smaller and d >= 0 else 'NOT met'}")
    if "tt_only" in by and "baseline" in by:
        t = by["tt_only"]
        ratio = t.get("compressed_tables_ratio")
        ok = ratio is not None and ratio >= 10 and t["delta_auc"] >= -0.003
        notes.append(f"TT: compressed tables {_x(ratio)} smaller (target >= 10×), Δ AUC {t['delta_auc']:+.4f} "
                     f"(target >= -0.003): {'met' if ok else 'NOT met'}")
    if prune_report.get("dropped") is not None:
        notes.append(f"pruned fields: {', '.join(prune_report['dropped']) or 'none'}")
    return notes


def _x(v) -> str:
    return "-" if v is None else f"{v:.1f}×"
