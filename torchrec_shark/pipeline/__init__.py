"""The compression pipeline (baseline -> pruning -> dimension search -> mixed precision, with TT,
fp16 and int8 comparisons) and its report. Run it with ``python -m torchrec_shark.pipeline``."""

from torchrec_shark.pipeline.config import PipelineConfig
from torchrec_shark.pipeline.run import run_pipeline

__all__ = ["PipelineConfig", "run_pipeline"]
