"""``python -m torchrec_shark.pipeline``: the SHARK compression pipeline with comparisons, and its report.

Stages (each a subprocess; every warm-started stage starts from the previous stage's checkpoint):

1. ``baseline``: ``train.py tables=baseline`` (stock fp32 tables);
2. ``pruned``: the field pruning pass (F-Permutation) on the baseline, then fine-tuning its config;
3. ``pruned_dims``: the dimension search pass (SSEDS, ``budget``) on the pruned run, then retraining
   its per-table widths from the kept columns;
4. ``shark``: the pruned, narrowed tables stored in mixed precision (``shark_tables``), warm-started
   from ``pruned_dims`` (its stock rows re-encoded into the tiers) and fine-tuned;
5. ``baseline_continued``: the baseline trained on as many more samples as the warm-started stages
   read (``finetune_steps`` each), so compression effects can be told from extra data;
6. ``comparisons``: ``tables=tt`` / ``fp16`` / ``int8`` trained from scratch like the baseline.

Writes ``report.md``, ``report.json`` (``variants``: one object per run) and plots to its Hydra
run dir; ``runs/<variant>`` and ``passes/<pass>`` hold every run and pass. Re-running with the
same ``hydra.run.dir`` skips the stages that finished. Example::

    python -m torchrec_shark.pipeline hydra.run.dir=outputs/pipeline_synthetic
    python -m torchrec_shark.pipeline nproc=2 "train=['data=criteo_tsv','data.path=/data/day_0.tsv']"
"""

from __future__ import annotations

import os
import sys
import time

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from torchrec_shark.cli import job, run_hydra_app
from torchrec_shark.config import check_known_keys
from torchrec_shark.pipeline.config import PipelineConfig, check, register_configs
from torchrec_shark.pipeline.run import run_pipeline

register_configs()
CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "conf")


@hydra.main(version_base="1.3", config_path=CONF, config_name="pipeline")
@job
def main(dcfg: DictConfig) -> None:
    try:
        check_known_keys(dcfg, PipelineConfig)
        cfg: PipelineConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
        check(cfg)
    except ValueError as e:
        print(f"pipeline: config error: {e}", file=sys.stderr)
        sys.exit(2)
    out = HydraConfig.get().runtime.output_dir
    print(f"[pipeline] run dir: {out} (report: {os.path.join(out, 'report.md')}; each run's metrics.json "
          f"under {os.path.join(out, 'runs')})", flush=True)
    t0 = time.perf_counter()
    path = run_pipeline(cfg, out)
    print(f"[pipeline] run dir: {out} (report: {path}, {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    run_hydra_app(main, PipelineConfig, prog="pipeline")
