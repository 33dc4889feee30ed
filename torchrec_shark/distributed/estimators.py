"""Planner estimators for compressed tables (``customized_kernel``).

* :class:`CompressedStorageEstimator`: TorchRec's storage estimate with the dense
  ``rows x dim x 4`` term of every compressed-collection shard replaced by the bytes that shard
  really allocates (:func:`shard_bytes`: its table kind's figure for the shard's rows, optimizer
  state included; the table reports the same). The
  1.8 planner ignores ``sharder.storage_usage()``, so this is the hook that counts.
* :func:`planning_dtype` and :func:`register_customized_kernel_bandwidth`: what lets TorchRec's
  *default* planner (``EmbeddingShardingPlanner()``, or ``DistributedModelParallel`` without a
  plan) plan compressed tables with no estimator of ours: the sharder's planning tensors carry the
  standard dtype (1, 2 or 4 bytes) nearest to each table's real bytes per element, which the
  default ``EmbeddingStorageEstimator`` counts, and the default perf config gets a bandwidth for
  ``customized_kernel`` when the sharder module is imported.
* :class:`CompressedPerfEstimator`: TorchRec's default perf model with a bandwidth for
  ``customized_kernel`` (otherwise planning raises "Unrecognized or unsupported compute
  kernel"), with each shard's compute scaled by its kind's cost per row (:func:`kind_cost_factor`).

Example::

    enumerator = EmbeddingEnumerator(topology, batch_size, constraints,
                                     estimator=[CompressedPerfEstimator(topology, constraints),
                                                CompressedStorageEstimator(topology, constraints)])
    planner = EmbeddingShardingPlanner(topology=topology, enumerator=enumerator, ...)
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Optional

import torch
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner.constants import DDR_MEM_BW, HBM_MEM_BW
from torchrec.distributed.planner.estimator.estimator import EmbeddingPerfEstimatorFactory
from torchrec.distributed.planner.estimator.annotations import device_bw
from torchrec.distributed.planner.estimator.config import EmbeddingPerfEstimatorConfig
from torchrec.distributed.planner.shard_estimators import EmbeddingPerfEstimator, EmbeddingStorageEstimator
from torchrec.distributed.planner.types import ParameterConstraints, ShardingOption, Storage, Topology
from torchrec.distributed.types import ShardingType

from torchrec_shark.modules.base import SparseOptimizerSpec
from torchrec_shark.modules.embedding_bag_collection import CompressedEmbeddingBagCollection
from torchrec_shark.modules.kinds import kind_of

CUSTOM = EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value


def shard_bytes(config, optimizer, row_offset: int, rows: int) -> int:
    """Bytes (table + fused optimizer state) of one shard of table ``config``: its kind's own figure,
    the same one the built table reports."""
    return int(kind_of(config).storage_bytes(config, optimizer, row_offset, rows)["total"])


def kind_cost_factor(config) -> float:
    """Cost of looking up (and updating) one row of this table relative to an fp32 row fetch (its kind's)."""
    return kind_of(config).cost_factor(config)


# Standard dtypes a planning tensor can take, by bytes per element.
_PLANNING_DTYPES = ((1, torch.uint8), (2, torch.float16), (4, torch.float32))


def planning_dtype(table) -> torch.dtype:
    """The dtype whose element size is nearest (by ratio) to the bytes per element ``table`` really
    allocates (rows, scales, slot map, priorities, TT cores; no optimizer state, as TorchRec counts
    a fused table): TorchRec's default storage estimator counts ``numel * element_size`` of the
    planning tensor, and this is the finest it can see. Exact bytes: :class:`CompressedStorageEstimator`."""
    per_element = table.memory_bytes()["total"] / max(1, table.num_embeddings * table.embedding_dim)
    return min(_PLANNING_DTYPES, key=lambda e: abs(math.log2(e[0]) - math.log2(max(per_element, 1e-9))))[1]


def register_customized_kernel_bandwidth(config_cls=EmbeddingPerfEstimatorConfig) -> None:
    """Give ``config_cls`` (TorchRec's default perf config unless told) a ``customized_kernel``
    bandwidth for cpu and cuda, as for TBE's fused kernel; a bandwidth already set is kept. Without
    one, the default perf estimator raises "Unrecognized or unsupported compute kernel".
    Configs derived from it afterwards inherit the entry (``device_bw`` copies the parent's)."""
    have = getattr(config_cls, "kernel_device_bandwidths", None) or {}
    for device, bw in (("cpu", DDR_MEM_BW), ("cuda", HBM_MEM_BW)):
        if (device, CUSTOM) not in have:
            device_bw(bandwidth=bw, device=device, compute_kernel=CUSTOM)(config_cls)


def _compressed_collection(module) -> bool:
    return isinstance(module, CompressedEmbeddingBagCollection)


@contextlib.contextmanager
def _fp32_planning_tensors(sharding_options: List[ShardingOption]):
    """Compressed-collection options seen with fp32 planning tensors (what the tables output, so what
    TorchRec's IO and comms terms must count); their own dtypes (:func:`planning_dtype`) are put back."""
    saved = []
    for so in sharding_options:
        if so.compute_kernel == CUSTOM and _compressed_collection(so.module[1]) and so.tensor.dtype != torch.float32:
            saved.append((so, so.tensor))
            so._tensor = torch.empty(so.tensor.shape, dtype=torch.float32, device="meta")  # read-only property
    try:
        yield
    finally:
        for so, tensor in saved:
            so._tensor = tensor


class CompressedStorageEstimator(EmbeddingStorageEstimator):
    """TorchRec's storage estimator, then the real compressed bytes for ``customized_kernel`` shards."""

    def estimate(self, sharding_options: List[ShardingOption], sharder_data_map=None) -> None:  # type: ignore[override]
        with _fp32_planning_tensors(sharding_options):
            super().estimate(sharding_options, sharder_data_map)
        device = self._topology.compute_device
        for so in sharding_options:
            if so.compute_kernel != CUSTOM:
                continue
            module = so.module[1]
            if not _compressed_collection(module):
                continue
            config = {c.name: c for c in module.embedding_bag_configs()}[so.name]
            optimizer = getattr(module, "_optimizer_spec", SparseOptimizerSpec())
            for shard in so.shards:
                rows, cols = shard.size
                dense = math.ceil(4 * rows * cols)  # the fp32 planning tensor the base estimate saw
                real = shard_bytes(config, optimizer, shard.offset[0], rows)
                st = shard.storage
                if device == "cuda":
                    shard.storage = Storage(hbm=max(0, st.hbm - dense) + real, ddr=st.ddr, ssd=st.ssd)
                else:
                    shard.storage = Storage(hbm=st.hbm, ddr=max(0, st.ddr - dense) + real, ssd=st.ssd)


@device_bw(bandwidth=HBM_MEM_BW, device="cuda", compute_kernel=CUSTOM)
@device_bw(bandwidth=DDR_MEM_BW, device="cpu", compute_kernel=CUSTOM)
class CompressedPerfConfig(EmbeddingPerfEstimatorConfig):
    """TorchRec's default perf coefficients plus a bandwidth for ``customized_kernel``."""

    name = "torchrec_shark"


class CompressedPerfEstimator(EmbeddingPerfEstimator):
    """TorchRec's default perf model accepting ``customized_kernel``, scaled per table kind."""

    def __init__(self, topology: Topology, constraints: Optional[Dict[str, ParameterConstraints]] = None,
                 is_inference: bool = False) -> None:
        super().__init__(topology, constraints, is_inference)
        self._estimator = EmbeddingPerfEstimatorFactory.create_with_config(
            CompressedPerfConfig(), is_inference=is_inference, topology=topology, constraints=constraints
        )

    def estimate(self, sharding_options: List[ShardingOption], sharder_data_map=None) -> None:  # type: ignore[override]
        with _fp32_planning_tensors(sharding_options):
            super().estimate(sharding_options, sharder_data_map)
        for so in sharding_options:
            if so.compute_kernel != CUSTOM or not _compressed_collection(so.module[1]):
                continue
            module = so.module[1]
            config = {c.name: c for c in module.embedding_bag_configs()}[so.name]
            factor = kind_cost_factor(config)
            for shard in so.shards:
                if shard.perf is not None:
                    p = shard.perf
                    p.fwd_compute *= factor
                    p.bwd_compute *= factor
