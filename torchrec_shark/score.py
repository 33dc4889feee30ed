"""Score data with an exported model: ``python -m torchrec_shark.score model=EXPORT [run_dir=RUN]``.

Loads the export with :func:`torchrec_shark.serving.load` (never the run's checkpoints) and scores the
validation samples the run evaluated on: the first ``trainer.eval_batches`` batches of
``trainer.batch_size`` of its data's validation split (``whole_split=true``: all of it). The data config and
those settings come from ``run_dir`` (its ``.hydra/config.yaml``), by default the run the export recorded;
``data.<key>=value`` overrides (keys of ``train.py``'s ``data`` group) score other data instead. Inputs go
through the model's own data transforms (the statistics the export carries).

Writes to its Hydra run dir ``score.json`` (``val_auc``, ``val_logloss``, ``samples``, ``samples_per_s``:
samples over the model's forward time, one process; plus the source run's recorded ``val_auc`` and the
difference) and, with ``predictions=true``, ``predictions.csv`` (label, score per sample).

Example::

    python -m torchrec_shark.score model=outputs/base_export
    python -m torchrec_shark.score model=outputs/base_export whole_split=true predictions=true
    python -m torchrec_shark.score model=outputs/criteo_export data.path=day_1.tsv data.val_fraction=0.5
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from hydra.core.config_store import ConfigStore

from torchrec_shark.config import DataConfig

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "serving")


@dataclass
class ScoreConfig:
    """``conf/score.yaml``: the model, the data and which samples."""

    model: str = "???"  # an export directory (python -m torchrec_shark.export)
    run_dir: Optional[str] = None  # the run whose data and evaluation settings to use; default: the export's
    data: Dict[str, Any] = field(default_factory=dict)  # data.<key>=value over the run's data config
    whole_split: bool = False  # every validation sample instead of the run's evaluation batches
    batch_size: Optional[int] = None  # default: the run's trainer.batch_size
    predictions: bool = False  # also write predictions.csv (label, score)
    num_threads: int = 0  # torch threads (0: torch's default)
    verify: bool = True  # check the export's checksums before loading


def register_configs() -> None:
    from omegaconf import OmegaConf

    from torchrec_shark.conf_store import open_mappings

    ConfigStore.instance().store(name="score_schema", node=open_mappings(OmegaConf.structured(ScoreConfig), ScoreConfig))


def _settings(cfg: ScoreConfig, manifest: Dict):
    """``(data config, batch size, evaluation batches)`` to score."""
    from omegaconf import OmegaConf

    from omegaconf.errors import OmegaConfBaseException

    from torchrec_shark.config import ConfigError, validate

    if cfg.run_dir is not None:
        from torchrec_shark.training.run_ref import resolve_run

        run = resolve_run(cfg.run_dir, checkpoint=False).config()
        data, batch, batches = OmegaConf.structured(run.data), run.trainer.batch_size, run.trainer.eval_batches
    else:
        recorded = manifest["data"]
        data = OmegaConf.merge(OmegaConf.structured(DataConfig), recorded["config"])
        batch, batches = recorded["eval"]["batch_size"], recorded["eval"]["eval_batches"]
    try:
        data = OmegaConf.to_object(OmegaConf.merge(data, dict(cfg.data)))
    except OmegaConfBaseException as e:
        raise ConfigError(f"data overrides {dict(cfg.data)}: {str(e).splitlines()[0]}") from None
    if cfg.data:
        from torchrec_shark.config import TrainConfig

        validate(TrainConfig(data=data))  # the same checks train.py makes of a data config
    return data, cfg.batch_size or batch, batches


def score(cfg: ScoreConfig, out_dir: str, log=print) -> Dict:
    """Score as configured; writes ``score.json`` (and ``predictions.csv``) to ``out_dir`` and returns the former."""
    from torchrec_shark import serving
    from torchrec_shark.data import build_dataset
    from torchrec_shark.data.statistics import load_statistics
    from torchrec_shark.training.metrics import EvalMetrics

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    manifest = serving.read_manifest(cfg.model)
    model = serving.load(cfg.model, verify=cfg.verify)
    data, batch_size, eval_batches = _settings(cfg, manifest)
    dataset = build_dataset(data)
    if getattr(dataset, "uses_statistics", False):
        stats_dir = os.path.join(cfg.model, "data")
        if not os.path.isfile(os.path.join(stats_dir, "data_stats.json")):
            raise serving.ExportError(f"{cfg.model} carries no data transforms (data/data_stats.json), which "
                                      f"data.source={data.source} needs")
        dataset.use_statistics(load_statistics(stats_dir))
    metrics = EvalMetrics(torch.device("cpu"))
    samples, seconds = 0, 0.0
    rows = []
    with torch.no_grad():
        for i, batch in enumerate(dataset.batches("val", batch_size, 0, 1)):
            if not cfg.whole_split and i >= eval_batches:
                break
            t0 = time.perf_counter()
            logits = model.logits(batch.dense_features, batch.sparse_features)
            seconds += time.perf_counter() - t0
            metrics.update(logits, batch.labels)
            samples += batch.labels.numel()
            if cfg.predictions:
                rows.append(torch.stack([batch.labels.float(), torch.sigmoid(logits)], 1))
    if samples == 0:
        raise serving.ExportError("the validation split holds no samples to score")
    m = metrics.compute()
    source = manifest.get("source", {})
    report = {
        "val_auc": m["auc"],
        "val_logloss": m["logloss"],
        "samples": samples,
        "samples_per_s": samples / seconds if seconds > 0 else 0.0,
        "batch_size": batch_size,
        "batches": "all" if cfg.whole_split else eval_batches,
        "model": os.path.abspath(cfg.model),
        "data_source": data.source,
        "run_val_auc": source.get("val_auc"),
        "val_auc_minus_run": (m["auc"] - source["val_auc"]) if source.get("val_auc") is not None else None,
        "threads": torch.get_num_threads(),
    }
    with open(os.path.join(out_dir, "score.json"), "w") as f:
        json.dump(report, f, indent=2)
    if cfg.predictions:
        with open(os.path.join(out_dir, "predictions.csv"), "w") as f:
            f.write("label,score\n")
            for label, p in torch.cat(rows).tolist():
                f.write(f"{int(label)},{p:.8g}\n")
    log(f"scored {samples:,} samples: val_auc={m['auc']:.6f} val_logloss={m['logloss']:.6f} "
        f"({report['samples_per_s']:,.0f} samples/s)"
        + (f"; the run recorded val_auc={source['val_auc']:.6f}" if source.get("val_auc") is not None else ""))
    return report


register_configs()


def _hydra_main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig, OmegaConf

    from torchrec_shark.cli import job, run_hydra_app

    found = os.path.isfile(os.path.join(CONF_DIR, "score.yaml"))

    @hydra.main(version_base="1.3", config_path=CONF_DIR if found else None,
                config_name="score" if found else "score_schema")
    @job
    def main(dcfg: DictConfig) -> None:
        from torchrec_shark.config import ConfigError, check_known_keys
        from torchrec_shark.data.types import DataError
        from torchrec_shark.serving import ExportError
        from torchrec_shark.training import checkpoint as ckpt
        from torchrec_shark.training.job_log import setup_job_logging

        out_dir = HydraConfig.get().runtime.output_dir
        setup_job_logging(out_dir, "score.log")
        try:
            check_known_keys(dcfg, ScoreConfig)
            cfg: ScoreConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
            print(f"score: run dir {out_dir} (report: {os.path.join(out_dir, 'score.json')}); model {cfg.model}",
                  flush=True)
            score(cfg, out_dir, log=lambda m: print(m, flush=True))
        except (ExportError, ConfigError, DataError, ckpt.CheckpointError, FileNotFoundError) as e:
            print(f"score: error: {e}", file=sys.stderr)
            sys.exit(2)

    run_hydra_app(main, ScoreConfig, conf_dir=CONF_DIR, prog="score")


if __name__ == "__main__":
    _hydra_main()
