"""Planner at real scale, on paper: where the MLPerf DLRM-DCNv2 Criteo 1TB tables fit, per table kind.

The 26 tables of the MLPerf DLRM-DCNv2 reference (Criteo 1TB, dim 128, :data:`CRITEO_1TB_ROWS`:
104.5 GB in fp32) are planned by TorchRec's ``EmbeddingShardingPlanner`` (through
:func:`~torchrec_shark.distributed.compressed_sharder.build_compressed_planner`, whose estimators
count stock tables as TorchRec does and compressed ones by their kind's bytes) over simulated
topologies (:data:`TOPOLOGIES`), with the tables stored as

* ``fp32`` / ``fp16``: a stock ``EmbeddingBagCollection`` on ``meta`` (``data_type`` FP32 / FP16),
  fused row-wise Adagrad set with ``apply_optimizer_in_backward`` so TorchRec's estimator counts
  its state; the ``fused`` kernel only (all storage on the rank's device, as the compressed kernel
  keeps it: no UVM offload to host memory), sharded ``table_wise``, ``column_wise`` or ``row_wise``;
* ``shark``, ``int8``, ``tt``: a :class:`CompressedEmbeddingBagCollection` on ``meta`` with
  ``SparseOptimizerSpec("rowwise_adagrad")``, each table's compression what ``tables=shark`` /
  ``int8`` / ``tt`` give it (``training.table_factory`` from the config defaults: ``tt`` factorises
  tables of at least ``tensor_train.min_rows`` rows and leaves the others stock), sharded
  ``table_wise`` or ``row_wise`` (TT tables whose row-wise shards would split first-core slices are
  held to ``table_wise``, see ``compressed_constraints``).

``--sharding-types`` restricts every table of every kind to ``table_wise`` and/or ``row_wise``.

Nothing is trained and no table storage is allocated (everything is on ``meta``; the peak RSS is
printed at the end). Per kind and topology the output gives whether a plan was found (a
``PlannerError`` otherwise), the number of ranks holding a shard, the plan's storage estimate per
rank (max, and min over the ranks holding a shard: table, optimizer state and the lookup's
input/output buffers), the table bytes of the shards the plan put on the ranks (max per rank, and
summed over ranks to check against the kind's total), and the sharding types the plan chose; then,
per kind, the smallest GPU and CPU topology it fits on. The planner keeps 15% of every rank's memory
in reserve. Bytes are printed in GB (1e9); the capacities are GiB, as the planner takes them.

``fp16`` is FBGEMM's fp16 table (not ``tables=fp16``, whose bytes are the same plus an 8-byte
counter per table). TorchRec's estimator counts row-wise Adagrad's state at the weights' element
size, so its plan figure for ``fp16`` is 2 bytes per row below the table bytes (FBGEMM keeps that
state in fp32).

Run::

    python -m torchrec_shark.bench.plan
    python -m torchrec_shark.bench.plan --kinds fp32,tt --topologies gpu8,cpu1 --batch-size 4096
    python -m torchrec_shark.bench.plan --sharding-types row_wise      # every table row-wise
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torchrec.distributed.planner import ParameterConstraints
from torchrec.distributed.planner.types import PlannerError
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from torchrec_shark.config import CompressionConfig, TablesConfig
from torchrec_shark.distributed.compressed_sharder import (
    CompressedEmbeddingBagCollectionSharder,
    build_compressed_planner,
    compressed_constraints,
)
from torchrec_shark.distributed.sharders import CpuRowWiseEmbeddingBagCollectionSharder
from torchrec_shark.modules import (
    CompressedEmbeddingBagCollection,
    CompressedEmbeddingBagConfig,
    SparseOptimizerSpec,
    Uniform,
    kind_named,
    kind_of,
)
from torchrec_shark.pipeline.config import preset_compression, table_presets
from torchrec_shark.training.table_factory import build_table_configs

GB = 1e9
GIB = 1024**3

#: Rows of the 26 categorical features of Criteo 1TB in MLPerf's DLRM-DCNv2 (capped at 40M).
CRITEO_1TB_ROWS = (
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10,
    2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36,
)
CRITEO_1TB_DIM = 128

#: TorchRec's own tables (FBGEMM TBE) by their row precision; every other kind planned is a ``tables=`` preset.
STOCK: Dict[str, DataType] = {"fp32": DataType.FP32, "fp16": DataType.FP16}


def plan_kinds() -> List[str]:
    """What is planned: TorchRec's fp32 and fp16 tables, then every ``tables=`` preset of a compressed kind
    (a preset named like a stock entry is represented by it: same bytes per row)."""
    presets = [p for p in table_presets() if p not in STOCK and not kind_named(preset_compression(p).kind).stock]
    return [*STOCK, *presets]


KINDS: List[str] = plan_kinds()
# Offered by both collections' sharders: what --sharding-types may restrict every table to.
COMMON_SHARDING_TYPES = [ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value]
STOCK_SHARDING_TYPES = [ShardingType.TABLE_WISE.value, ShardingType.COLUMN_WISE.value, ShardingType.ROW_WISE.value]
# Row-wise Adagrad keeps one fp32 per row of every shard (FBGEMM's and the compressed tables' alike).
MOMENTUM_BYTES_PER_ROW = 4


@dataclass(frozen=True)
class SimTopology:
    """A simulated cluster: ``world_size`` ranks of ``device`` (``cuda``: a GPU; ``cpu``: a host)
    with ``memory_gib`` of HBM (GPU) or DDR (CPU host) each.

    Example: ``SimTopology("gpu8", "cuda", 8, 80.0)``.
    """

    name: str
    device: str
    world_size: int
    memory_gib: float

    def describe(self) -> str:
        what = "GPU" if self.device == "cuda" else "host"
        mem = "HBM" if self.device == "cuda" else "DDR"
        return f"{self.world_size} {what}{'s' if self.world_size > 1 else ''} of {self.memory_gib:g} GiB {mem}"


TOPOLOGIES: Dict[str, SimTopology] = {
    t.name: t
    for t in (
        SimTopology("gpu1", "cuda", 1, 80.0),
        SimTopology("gpu8", "cuda", 8, 80.0),
        SimTopology("gpu64", "cuda", 64, 80.0),
        SimTopology("cpu1", "cpu", 1, 512.0),
        SimTopology("cpu8", "cpu", 8, 512.0),
    )
}


@dataclass
class PlanResult:
    """One kind planned on one topology.

    ``plan_bytes``: the plan's storage estimate of every rank (all ranks, empty ones 0);
    ``table_bytes``: per rank, the table + optimizer bytes of the shards placed on it;
    ``sharding_types``: tables per sharding type; ``error``: why no plan was found (``fits`` False).
    """

    kind: str
    topology: SimTopology
    fits: bool
    plan_bytes: List[int] = field(default_factory=list)
    table_bytes: List[int] = field(default_factory=list)
    sharding_types: Dict[str, int] = field(default_factory=dict)
    table_wise_only: int = 0
    error: str = ""
    seconds: float = 0.0


def table_configs(kind: str, rows: Sequence[int] = CRITEO_1TB_ROWS, dim: int = CRITEO_1TB_DIM,
                  tt_min_rows: Optional[int] = None) -> List[CompressedEmbeddingBagConfig]:
    """One config per table (``t_cat_<i>``, feature ``cat_<i>``) as the ``tables=<kind>`` group builds
    them from its defaults. Stock ``fp16`` gets ``Uniform("fp16")``: its bytes are FBGEMM's fp16 rows with an
    fp32 row-wise momentum, which is what its totals are counted with. ``tt_min_rows``: override every
    section's ``min_rows`` (scaled-down runs)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; kinds are {list(KINDS)}")
    features = [f"cat_{i}" for i in range(len(rows))]
    comp = CompressionConfig(kind="none") if kind in STOCK else preset_compression(kind)
    if tt_min_rows is not None:
        for section in vars(comp).values():
            if hasattr(section, "min_rows"):
                section.min_rows = tt_min_rows
    configs = build_table_configs(TablesConfig(name=kind, embedding_dim=dim, compression=comp), features, list(rows))
    if kind == "fp16":
        for c in configs:
            c.compression = Uniform(dtype="fp16")
    return configs


def optimizer_spec() -> SparseOptimizerSpec:
    return SparseOptimizerSpec("rowwise_adagrad")


def kind_total_bytes(configs: Sequence[CompressedEmbeddingBagConfig]) -> int:
    """Table + fused optimizer bytes of the whole (unsharded) tables, from each table's kind."""
    opt = optimizer_spec()
    return sum(int(kind_of(c).storage_bytes(c, opt, 0, c.num_embeddings)["total"]) for c in configs)


def build_model(kind: str, configs: Sequence[CompressedEmbeddingBagConfig]) -> torch.nn.Module:
    """The collection on ``meta`` (no table storage), with its fused optimizer."""
    if kind in STOCK:
        data_type = STOCK[kind]
        stock = [
            EmbeddingBagConfig(name=c.name, num_embeddings=c.num_embeddings, embedding_dim=c.embedding_dim,
                               feature_names=list(c.feature_names), pooling=c.pooling, data_type=data_type)
            for c in configs
        ]
        ebc = EmbeddingBagCollection(tables=stock, device=torch.device("meta"))
        apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": 0.01})
    else:
        ebc = CompressedEmbeddingBagCollection(tables=list(configs), device=torch.device("meta"),
                                               optimizer=optimizer_spec())
    return torch.nn.Sequential(ebc)


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    # The planner and the TT alignment check warn per table; the report says the same once.
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _constraints(kind: str, configs, world_size: int,
                 sharding_types: Optional[Sequence[str]] = None) -> Dict[str, ParameterConstraints]:
    if kind in STOCK:
        types = list(sharding_types or STOCK_SHARDING_TYPES)
        return {c.name: ParameterConstraints(sharding_types=types, compute_kernels=["fused"]) for c in configs}
    base = {}
    if sharding_types:
        base = {c.name: ParameterConstraints(sharding_types=list(sharding_types)) for c in configs}
    return compressed_constraints(configs, world_size, base)


def _shard_table_bytes(kind: str, config, element_size: int, offset: Sequence[int], size: Sequence[int]) -> int:
    rows, cols = int(size[0]), int(size[1])
    if kind in STOCK:  # FBGEMM: the shard's weights and one momentum per row of every shard
        return rows * cols * element_size + rows * MOMENTUM_BYTES_PER_ROW
    return int(kind_of(config).storage_bytes(config, optimizer_spec(), int(offset[0]), rows)["total"])


def plan_kind(kind: str, topology: SimTopology, batch_size: int, rows: Sequence[int] = CRITEO_1TB_ROWS,
              dim: int = CRITEO_1TB_DIM, tt_min_rows: Optional[int] = None,
              sharding_types: Optional[Sequence[str]] = None) -> PlanResult:
    """Plan ``kind``'s tables on ``topology`` (``batch_size`` per rank), each table restricted to
    ``sharding_types`` when given (from :data:`COMMON_SHARDING_TYPES`)."""
    start = time.perf_counter()
    configs = table_configs(kind, rows, dim, tt_min_rows)
    model = build_model(kind, configs)
    with _quiet("torchrec.distributed.planner", "torchrec_shark.distributed.compressed_sharder"):
        constraints = _constraints(kind, configs, topology.world_size, sharding_types)
        cap = {"hbm_cap_gb": topology.memory_gib} if topology.device == "cuda" else {"ddr_cap_gb": topology.memory_gib}
        planner = build_compressed_planner(topology.world_size, topology.device, batch_size, constraints, **cap)
        sharders = [CpuRowWiseEmbeddingBagCollectionSharder(), CompressedEmbeddingBagCollectionSharder()]
        result = PlanResult(kind, topology, fits=False)
        if kind not in STOCK and list(sharding_types or []) != [ShardingType.TABLE_WISE.value]:
            result.table_wise_only = sum(
                1 for c in configs
                if c.compression is not None and constraints.get(c.name) is not None
                and list(constraints[c.name].sharding_types or []) == [ShardingType.TABLE_WISE.value]
            )
        try:
            planner.plan(model, sharders)
        except PlannerError as e:
            result.error = e.error_type.value
            result.seconds = time.perf_counter() - start
            return result
    by_name = {c.name: c for c in configs}
    plan_bytes = [0] * topology.world_size
    table_bytes = [0] * topology.world_size
    for so in planner._best_plan or []:  # the chosen sharding options, with their storage estimates
        for shard in so.shards:
            st = shard.storage
            plan_bytes[shard.rank] += st.hbm if topology.device == "cuda" else st.ddr
            table_bytes[shard.rank] += _shard_table_bytes(kind, by_name[so.name], so.tensor.element_size(),
                                                          shard.offset, shard.size)
    result.fits = True
    result.plan_bytes, result.table_bytes = plan_bytes, table_bytes
    result.sharding_types = dict(Counter(so.sharding_type for so in planner._best_plan or []))
    result.seconds = time.perf_counter() - start
    return result


def smallest_fit(results: Sequence[PlanResult], kind: str, device: str) -> Optional[SimTopology]:
    """The topology with the fewest ranks of ``device`` that ``kind`` fits on (None: none of those planned)."""
    fits = [r.topology for r in results if r.kind == kind and r.fits and r.topology.device == device]
    return min(fits, key=lambda t: (t.world_size * t.memory_gib, t.world_size)) if fits else None


def _gb(b: float) -> str:
    return f"{b / GB:.2f}"


def _types(counts: Dict[str, int]) -> str:
    return ", ".join(f"{t} {n}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _kind_width() -> int:
    return max(6, *(len(k) for k in KINDS))


def _plan_row(r: PlanResult) -> str:
    head = f"  {r.kind:<{_kind_width()}} {r.topology.name:<8}"
    if not r.fits:
        return f"{head} {'no':<4} {'':>5} {'':>9} {'':>9} {'':>10} {'':>8}  PlannerError: {r.error}"
    used = [p for p, t in zip(r.plan_bytes, r.table_bytes) if t > 0]
    note = f"  ({r.table_wise_only} TT tables table_wise only: row alignment)" if r.table_wise_only else ""
    return (f"{head} {'yes':<4} {len(used):>5} {_gb(max(r.plan_bytes)):>9} {_gb(min(used)):>9} "
            f"{_gb(max(r.table_bytes)):>10} {_gb(sum(r.table_bytes)):>8}  {_types(r.sharding_types)}{note}")


def _parse_list(value: str, known: Sequence[str], what: str) -> List[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in known]
    if unknown or not items:
        raise argparse.ArgumentTypeError(f"unknown {what} {unknown or value!r}; choose from {', '.join(known)}")
    return items


def main(argv: Optional[Sequence[str]] = None) -> List[PlanResult]:
    parser = argparse.ArgumentParser(prog="python -m torchrec_shark.bench.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default=",".join(KINDS), type=lambda v: _parse_list(v, list(KINDS), "kinds"),
                        help=f"comma-separated, from {', '.join(KINDS)} (default: all)")
    parser.add_argument("--topologies", default=",".join(TOPOLOGIES),
                        type=lambda v: _parse_list(v, list(TOPOLOGIES), "topologies"),
                        help=f"comma-separated, from {', '.join(TOPOLOGIES)} (default: all)")
    parser.add_argument("--batch-size", type=int, default=2048, help="per-rank batch the planner assumes")
    parser.add_argument("--sharding-types", default=None,
                        type=lambda v: _parse_list(v, COMMON_SHARDING_TYPES, "sharding types"),
                        help="restrict every table to these (comma-separated, from table_wise, row_wise; "
                             "default: every type the collection's sharder offers)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")

    rows = CRITEO_1TB_ROWS
    fp32_tables = sum(rows) * CRITEO_1TB_DIM * 4
    print(f"MLPerf DLRM-DCNv2 Criteo 1TB tables: {len(rows)} tables, {sum(rows):,} rows, dim {CRITEO_1TB_DIM}; "
          f"stock fp32 tables {_gb(fp32_tables)} GB ({fp32_tables / GIB:.2f} GiB)")
    print("Every kind carries fused row-wise Adagrad state (one fp32 per row of every shard).")
    allowed = ", ".join(args.sharding_types) if args.sharding_types else (
        "stock: table_wise, column_wise, row_wise; compressed: table_wise, row_wise")
    print(f"Sharding types offered ({allowed}); stock tables on the fused kernel only (no UVM offload).")
    print(f"Per-rank batch {args.batch_size}. Topologies: "
          + "; ".join(f"{t} = {TOPOLOGIES[t].describe()}" for t in args.topologies))
    print()
    print("Total bytes per kind (tables + optimizer state, unsharded, from each table kind's storage_bytes):")
    totals = {}
    for kind in args.kinds:
        totals[kind] = kind_total_bytes(table_configs(kind))
    ref = totals.get("fp32") or kind_total_bytes(table_configs("fp32"))
    w = _kind_width()
    print(f"  {'kind':<{w}} {'total GB':>9} {'vs fp32':>8}")
    for kind in args.kinds:
        print(f"  {kind:<{w}} {_gb(totals[kind]):>9} {totals[kind] / ref:>7.3f}x")
    print()
    print("Plans (GB per rank; plan = the planner's estimate: tables, optimizer state, lookup I/O buffers;")
    print("min over the ranks holding a shard; tables = table + optimizer bytes of the shards on the rank;")
    print("sum = tables over all ranks, to check against the totals above):")
    header = (f"  {'kind':<{w}} {'topology':<8} {'fits':<4} {'ranks':>5} {'plan max':>9} {'plan min':>9} "
              f"{'tables max':>10} {'sum':>8}  sharding types")
    print(header)
    results: List[PlanResult] = []
    for kind in args.kinds:
        for name in args.topologies:
            r = plan_kind(kind, TOPOLOGIES[name], args.batch_size, sharding_types=args.sharding_types)
            results.append(r)
            print(_plan_row(r))
            sys.stdout.flush()
    print()
    print("Smallest topology each kind fits on:")
    for kind in args.kinds:
        parts = []
        for device, label in (("cuda", "GPU"), ("cpu", "CPU")):
            if not any(TOPOLOGIES[t].device == device for t in args.topologies):
                continue
            t = smallest_fit(results, kind, device)
            parts.append(f"{label}: {t.name} ({t.describe()})" if t else f"{label}: none of those planned")
        print(f"  {kind:<{w}} " + "; ".join(parts))
    print()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"planning time {sum(r.seconds for r in results):.1f} s; peak RSS {peak:.0f} MiB "
          "(no table storage allocated)")
    return results


if __name__ == "__main__":
    main()
