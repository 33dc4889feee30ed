"""Planner estimators for compressed tables (``customized_kernel``).

* :class:`CompressedStorageEstimator`: TorchRec's storage estimate with the dense
  ``rows x dim x 4`` term of every compressed-collection shard replaced by the bytes that shard
  really allocates (:func:`shard_bytes`: tier pools, int8 scale/bias, row->slot map,
  priorities, TT cores, LFU cache, pending replica gradients, fused optimizer state). The
  1.8 planner ignores ``sharder.storage_usage()``, so this is the hook that counts.
* :func:`planning_dtype` and :func:`register_customized_kernel_bandwidth`: what lets TorchRec's
  *default* planner (``EmbeddingShardingPlanner()``, or ``DistributedModelParallel`` without a
  plan) plan compressed tables with no estimator of ours: the sharder's planning tensors carry the
  standard dtype (1, 2 or 4 bytes) nearest to each table's real bytes per element, which the
  default ``EmbeddingStorageEstimator`` counts, and the default perf config gets a bandwidth for
  ``customized_kernel`` when the sharder module is imported.
* :class:`CompressedPerfEstimator`: TorchRec's default perf model with a bandwidth for
  ``customized_kernel`` (otherwise planning raises "Unrecognized or unsupported compute
  kernel"), with each shard's compute scaled by its kind's cost per row (:func:`kind_cost_factor`:
  bytes read, decode flops, the TT chain's GEMMs).

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

from torchrec_shark.modules.specs import MixedPrecision, TensorTrain, Uniform

CUSTOM = EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value

# Machine balance assumed by the perf model: floating-point operations a core completes in the time
# it streams one byte from memory (a few flops/byte on current CPUs and GPUs alike).
FLOPS_PER_BYTE = 4.0
# Decoding a quantised element (scale, bias, convert) and re-encoding it after the update.
DECODE_FLOPS_PER_ELEMENT = 2.0


def kind_cost_factor(config, layout=None) -> float:
    """Cost of looking up (and updating) one row of this table relative to an fp32 row fetch.

    The fp32 row costs its ``4 D`` bytes of memory traffic. A row-store kind costs the bytes it
    reads (per tier, weighted by the tier's share of rows; plus the row -> slot map for mixed
    precision) and the decode/encode flops of its quantised rows. A TT row costs the chain of small
    GEMMs that rebuilds it (``2 * MACs`` flops; the cores themselves stay in cache) and its output. Flops are converted
    to byte-equivalents with :data:`FLOPS_PER_BYTE`.
    """
    spec = getattr(config, "compression", None)
    d = config.embedding_dim
    fp32 = 4.0 * d
    if spec is None:
        return 1.0
    if isinstance(spec, Uniform):
        row = 2 * d if spec.dtype == "fp16" else d + 4
        return (row + DECODE_FLOPS_PER_ELEMENT * d / FLOPS_PER_BYTE) / fp32
    if isinstance(spec, MixedPrecision):
        f32, f16 = spec.fp32_fraction, spec.fp16_fraction
        f8 = max(0.0, 1.0 - f32 - f16)
        row = f32 * 4 * d + f16 * 2 * d + f8 * (d + 4) + 4  # + the slot map entry
        decode = (f16 + f8) * DECODE_FLOPS_PER_ELEMENT * d / FLOPS_PER_BYTE
        return (row + decode) / fp32
    if isinstance(spec, TensorTrain):
        if layout is None:
            from torchrec_shark.modules.tt_factorization import resolve_layout

            layout = resolve_layout(config.name, config.num_embeddings, d, spec)
        q, r = layout.col_factors, layout.ranks
        macs, width = 0, q[0] * r[1]  # prefix product: (q1 ... qk) x R_k
        for k in range(1, len(q)):
            macs += width * q[k] * r[k + 1]
            width = width // r[k] * q[k] * r[k + 1]
        # the cores are small enough to stay in cache: the row costs its GEMMs and writing it out
        return (fp32 + 2 * macs / FLOPS_PER_BYTE) / fp32
    return 1.0


def _optimizer_bytes(name: str, rows: int, width: int) -> int:
    """Fused optimizer state of ``rows`` optimizer rows of ``width`` elements (RowOptimizer's buffers)."""
    if name == "sgd":
        return 0
    if name == "rowwise_adagrad":
        return rows * 4
    if name == "adagrad":
        return rows * width * 4
    if name == "adam":
        return 2 * rows * width * 4 + 8
    raise ValueError(f"unknown sparse optimizer {name!r}")


def row_store_bytes(spec, rows: int, dim: int, optimizer: str) -> Dict[str, int]:
    """Bytes of a row-store table (fp32 / Uniform / MixedPrecision) of ``rows`` rows, by part."""
    out: Dict[str, int] = {}
    if spec is None:
        out["rows"] = rows * dim * 4
    elif isinstance(spec, Uniform):
        out["rows"] = rows * (dim * 2 if spec.dtype == "fp16" else dim + 4)
    elif isinstance(spec, MixedPrecision):
        n32 = int(round(spec.fp32_fraction * rows))
        n16 = int(round((spec.fp32_fraction + spec.fp16_fraction) * rows)) - n32
        n16 = max(0, min(n16, rows - n32))
        n8 = rows - n32 - n16
        out["rows"] = n32 * dim * 4 + n16 * dim * 2 + n8 * (dim + 4)
        out["row_slot"] = rows * (4 if rows < 2**31 else 8)
        out["priority"] = rows * 4 + 16  # + priority_age, step
    else:
        raise ValueError(f"not a row-store spec: {spec!r}")
    out["optimizer"] = _optimizer_bytes(optimizer, rows, dim)
    out["total"] = sum(out.values())
    return out


def tt_shard_bytes(layout, spec: TensorTrain, rows: int, slices: Optional[int], optimizer: str,
                   row_wise: bool) -> Dict[str, int]:
    """Bytes of a TT table (``slices=None``) or of its row-wise shard owning ``slices`` first-core slices."""
    out: Dict[str, int] = {"cores": 0, "optimizer": 0, "pending_grads": 0}
    for k in range(layout.num_cores):
        shape = list(layout.core_shape(k))
        if k == 0 and slices is not None:
            shape[1] = max(2, slices)
        p = shape[1]
        numel = math.prod(shape)
        out["cores"] += numel * 4
        out["optimizer"] += _optimizer_bytes(optimizer, p, numel // p)
        if row_wise and k > 0:
            out["pending_grads"] += numel * 4 + p * 4
    if spec.cache_fraction > 0:
        c = max(1, int(spec.cache_fraction * rows))
        out["cache"] = c * layout.embedding_dim * 4 + c * 8 + rows * 4 + 8
        out["optimizer"] += _optimizer_bytes(optimizer, c, layout.embedding_dim)
    out["total"] = sum(out.values())
    return out


def shard_bytes(config, source, sharding_type: str, row_offset: int, rows: int) -> int:
    """Bytes (table + fused optimizer state) of one shard of table ``config`` built from ``source``."""
    from torchrec_shark.distributed.compressed_kernels import optimizer_spec_of

    spec = getattr(config, "compression", None)
    opt = optimizer_spec_of(source).name
    if isinstance(spec, TensorTrain):
        lay = source.layout
        if sharding_type == ShardingType.ROW_WISE.value:
            block = lay.first_core_block
            s0 = row_offset // block
            last = row_offset + rows >= config.num_embeddings
            ns = (lay.row_factors[0] - s0) if last else -(-rows // block)
            return tt_shard_bytes(lay, spec, rows, ns, opt, True)["total"]
        return tt_shard_bytes(lay, spec, config.num_embeddings, None, opt, False)["total"]
    return row_store_bytes(spec, rows, config.embedding_dim, opt)["total"]


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
    return hasattr(module, "embedding_bags") and hasattr(module, "record_labels") and hasattr(
        module, "embedding_bag_configs"
    )


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
            source = module.embedding_bags[so.name]
            for shard in so.shards:
                rows, cols = shard.size
                dense = math.ceil(4 * rows * cols)  # the fp32 planning tensor the base estimate saw
                real = shard_bytes(config, source, so.sharding_type, shard.offset[0], rows)
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
            factor = kind_cost_factor(config, getattr(module.embedding_bags[so.name], "layout", None))
            for shard in so.shards:
                if shard.perf is not None:
                    p = shard.perf
                    p.fwd_compute *= factor
                    p.bwd_compute *= factor
