"""Table benchmark: bytes vs fp32 and training throughput of each table kind vs a reference.

Criteo-like setup: ``--tables`` tables with row counts log-spaced over ``[--min-rows,
--max-rows]`` (times ``--scale``), one single-hot feature each, dim ``--dim``, batch
``--batch``, Zipf(``--zipf``) ids (hot ids scattered over the table by a fixed permutation),
labels Bernoulli(``--ctr``). Every kind trains with row-wise Adagrad; one timed iteration is
forward + backward + fused update (+ ``record_labels``/``step_end`` for kinds that track
labels). The kinds:

* ``stock_fbgemm`` / ``stock_fbgemm_fp16``: TorchRec's ``FusedEmbeddingBagCollection``
  (FBGEMM's fused ``SplitTableBatchedEmbeddingBagsCodegen``) with fp32 / fp16 weights;
* ``torch_embedding_bag``: plain fp32 tables trained with ``F.embedding_bag`` and a row-wise
  Adagrad update written in torch (:class:`TorchEmbeddingBag`); needs torch alone;
* ``fp32``, ``fp16``, ``int8``, ``mixed_precision``, ``tensor_train``, ``tensor_train_cache``:
  this package's :class:`~torchrec_shark.modules.CompressedEmbeddingBagCollection`.

Ratios are against ``stock_fbgemm`` when it runs, else against ``torch_embedding_bag`` (added to
the run if not asked for); the output says which and why. ``--device cuda`` builds every kind
and the batches on the GPU and synchronises around each timed slice. A kind that cannot run
where it is asked to (TorchRec or FBGEMM not installed, FBGEMM built without CUDA) is reported
as unavailable, with the reason, and the others still run; this module itself imports with
torch alone.

All kinds are built first, then timed in interleaved slices (the order rotated each round),
so that on a shared machine load changes hit every kind alike; each kind's ratio to the
reference is also taken in every round alone, and its median and range over the rounds printed,
in wall time and in process CPU time (the work of every thread: on a machine shared with other
jobs the wall time also counts the waiting). Label-aware kinds are
measured in steady state: a warm-up records labels and re-tiers
before timing; the cost of one re-tiering is reported separately and amortised over
``retier_every`` steps.

Run::

    python -m torchrec_shark.bench.tables               # full size (26 tables, up to 1e6 rows)
    python -m torchrec_shark.bench.tables --small       # quick (rows / 100, batch 1024)
    python -m torchrec_shark.bench.tables --kinds stock_fbgemm,mixed_precision,tensor_train
    python -m torchrec_shark.bench.tables --device cuda --json results.json

Adding a kind is one more :class:`Kind` entry in :data:`KINDS`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

# Nothing from torchrec, fbgemm_gpu or torchrec_shark.modules (which imports torchrec) is imported
# at module level: the torch-only kinds must run on a machine that has torch alone.

REFERENCE = "stock_fbgemm"
FALLBACK_REFERENCE = "torch_embedding_bag"


@dataclass
class TableShape:
    """One benchmark table: name, rows, width, and the single feature that feeds it."""

    name: str
    num_embeddings: int
    embedding_dim: int
    feature_names: List[str]


@dataclass
class Batch:
    """One batch of single-feature-per-table bags, usable without TorchRec.

    ``values``/``lengths``/``offsets`` are the feature-major jagged layout of a
    ``KeyedJaggedTensor`` (``offsets`` has ``tables * batch + 1`` entries); ``bags[t]`` is table
    ``t``'s ``(ids, offsets)`` with ``batch + 1`` offsets starting at 0.
    """

    keys: List[str]
    values: torch.Tensor
    lengths: torch.Tensor
    offsets: torch.Tensor
    labels: torch.Tensor
    bags: List[Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    _kjt: object = None

    def __post_init__(self) -> None:
        batch = self.labels.numel()
        starts = self.offsets[:: batch].tolist()
        self.bags = [
            (self.values[a:b], self.offsets[t * batch : (t + 1) * batch + 1] - a)
            for t, (a, b) in enumerate(zip(starts[:-1], starts[1:]))
        ]

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.keys, self.values.to(device), self.lengths.to(device), self.offsets.to(device), self.labels.to(device))

    def kjt(self):
        """The batch as a ``KeyedJaggedTensor`` on the batch's device (built once). Offsets and
        per-key lengths are given up front, so no FBGEMM op is needed to derive them (the CPU-only
        FBGEMM build has none for CUDA tensors)."""
        if self._kjt is None:
            from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

            batch = self.labels.numel()
            per_key = self.offsets[:: batch].tolist()
            self._kjt = KeyedJaggedTensor(
                keys=self.keys, values=self.values, lengths=self.lengths, offsets=self.offsets, stride=batch,
                length_per_key=[b - a for a, b in zip(per_key[:-1], per_key[1:])], offset_per_key=per_key,
            )
        return self._kjt


class TorchEmbeddingBag(torch.nn.Module):
    """Reference tables in plain torch: one fp32 table per shape, sum-pooled with
    ``F.embedding_bag``, trained with row-wise Adagrad on the rows a batch touches.

    The update is FBGEMM's ``rowwise_adagrad``: per touched row ``r`` with gradient ``g_r``
    (summed over the batch), ``m_r += mean(g_r ** 2)`` then ``w_r -= lr * g_r / (sqrt(m_r) + eps)``.
    Initialisation is TorchRec's, uniform in ``+-sqrt(1 / rows)``.

    Example::

        ref = TorchEmbeddingBag([TableShape("t", 100, 8, ["f"])], lr=0.05)
        ids, offsets = torch.tensor([1, 2, 2]), torch.tensor([0, 1, 3])
        pooled = ref([(ids, offsets)])           # [2, 8]
        ref.step([(ids, offsets)], torch.full((1, 1), 0.5))  # forward, backward, update
    """

    def __init__(self, shapes: List[TableShape], lr: float, eps: float = 1e-8, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.lr, self.eps = lr, eps
        self.names = [s.name for s in shapes]
        for s in shapes:
            bound = (1.0 / s.num_embeddings) ** 0.5
            w = torch.empty(s.num_embeddings, s.embedding_dim, device=device).uniform_(-bound, bound)
            self.register_buffer(f"{s.name}_weight", w)
            self.register_buffer(f"{s.name}_momentum", torch.zeros(s.num_embeddings, device=device))

    def weights(self) -> List[torch.Tensor]:
        return [getattr(self, f"{n}_weight") for n in self.names]

    def forward(self, bags: List[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Pooled rows of every table, concatenated: ``[B, sum of dims]`` (no gradient to the tables)."""
        return torch.cat(
            [F.embedding_bag(ids, w, offs, mode="sum", include_last_offset=True) for w, (ids, offs) in zip(self.weights(), bags)],
            dim=1,
        )

    def step(self, bags: List[Tuple[torch.Tensor, torch.Tensor]], grad_scale: torch.Tensor) -> None:
        """Forward, backward of ``sum(pooled * grad_scale)``, and the row-wise Adagrad update."""
        pooled, touched = [], []
        for w, (ids, offs) in zip(self.weights(), bags):
            # gather the touched rows as a small leaf: the gradient is dense over them, one row each
            rows, inverse = torch.unique(ids, return_inverse=True)
            leaf = w.index_select(0, rows).requires_grad_()
            pooled.append(F.embedding_bag(inverse, leaf, offs, mode="sum", include_last_offset=True))
            touched.append((rows, leaf))
        out = torch.cat(pooled, dim=1)
        out.backward(grad_scale.expand_as(out))
        with torch.no_grad():
            for n, (rows, leaf) in zip(self.names, touched):
                g = leaf.grad
                momentum = getattr(self, f"{n}_momentum")
                momentum.index_add_(0, rows, g.square().mean(dim=1))
                scale = momentum.index_select(0, rows).sqrt_().add_(self.eps).reciprocal_().mul_(-self.lr)
                getattr(self, f"{n}_weight").index_add_(0, rows, g * scale.unsqueeze(1))

    def memory_bytes(self) -> int:
        """Bytes of the fp32 rows (no optimizer state, as for every other kind)."""
        return sum(w.numel() * w.element_size() for w in self.weights())


# ---------------------------------------------------------------------------------- kinds


class Model:
    """A built kind: ``step(batch, grad_scale)`` trains one batch; ``memory()`` gives
    ``(bytes, fp32 bytes, bytes by part)``; ``label_aware`` lists tables that re-tier."""

    label_aware: List = []

    def step(self, batch: Batch, grad_scale: torch.Tensor) -> None:
        raise NotImplementedError

    def memory(self, shapes: List[TableShape]) -> Tuple[int, int, Dict[str, int]]:
        raise NotImplementedError


class CollectionModel(Model):
    """A TorchRec-style collection fed ``KeyedJaggedTensor`` batches (ours or FBGEMM's)."""

    def __init__(self, ebc: torch.nn.Module) -> None:
        from torchrec_shark.modules import CompressedEmbeddingBagCollection, kind_of

        self.ebc = ebc
        self.ours = isinstance(ebc, CompressedEmbeddingBagCollection)
        self.label_aware = [ebc.embedding_bags[c.name] for c in ebc.embedding_bag_configs()
                            if kind_of(c).label_aware] if self.ours else []

    def step(self, batch: Batch, grad_scale: torch.Tensor) -> None:
        kjt = batch.kjt()
        if self.ours:
            self.ebc.record_labels(kjt, batch.labels)
        values = self.ebc(kjt).values()
        values.backward(grad_scale.expand_as(values))
        if self.ours:
            self.ebc.step_end()

    def memory(self, shapes: List[TableShape]) -> Tuple[int, int, Dict[str, int]]:
        ebc = self.ebc
        if self.ours:
            mem = ebc.memory_bytes()
            parts: Dict[str, int] = {}
            for p in mem["per_table"].values():
                for k, v in p.items():
                    if k != "total":
                        parts[k] = parts.get(k, 0) + v
            return mem["total"], ebc.fp32_bytes(), parts
        weights = [v for k, v in ebc.state_dict().items() if k.endswith(".weight")]
        total = sum(w.numel() * w.element_size() for w in weights)
        return total, _fp32_bytes(shapes), {f"{str(weights[0].dtype).replace('torch.float', 'fp')}_rows": total}


class TorchModel(Model):
    def __init__(self, module: TorchEmbeddingBag) -> None:
        self.module = module

    def step(self, batch: Batch, grad_scale: torch.Tensor) -> None:
        self.module.step(batch.bags, grad_scale)

    def memory(self, shapes: List[TableShape]) -> Tuple[int, int, Dict[str, int]]:
        total = self.module.memory_bytes()
        return total, _fp32_bytes(shapes), {"fp32_rows": total}


def _fp32_bytes(shapes: List[TableShape]) -> int:
    return sum(s.num_embeddings * s.embedding_dim * 4 for s in shapes)


@dataclass
class Kind:
    """One table kind: how to build it on a device; ``stock`` marks TorchRec/FBGEMM's kinds."""

    name: str
    build: Callable[[List[TableShape], float, torch.device], Model]
    stock: bool = False
    default: bool = True  # in the default selection


def _compressed(spec_for_rows: Callable[[int], Optional[object]]):
    def build(shapes: List[TableShape], lr: float, device: torch.device) -> Model:
        from torchrec_shark.modules.base import SparseOptimizerSpec
        from torchrec_shark.modules.embedding_bag_collection import CompressedEmbeddingBagCollection
        from torchrec_shark.modules import CompressedEmbeddingBagConfig

        tables = [
            CompressedEmbeddingBagConfig(
                name=s.name, num_embeddings=s.num_embeddings, embedding_dim=s.embedding_dim,
                feature_names=list(s.feature_names), compression=spec_for_rows(s.num_embeddings),
            )
            for s in shapes
        ]
        opt = SparseOptimizerSpec("rowwise_adagrad", lr=lr)
        return CollectionModel(CompressedEmbeddingBagCollection(tables, device=device, optimizer=opt))

    return build


def _stock_fbgemm(precision: str):
    def build(shapes: List[TableShape], lr: float, device: torch.device) -> Model:
        from fbgemm_gpu.split_embedding_configs import SparseType
        from torchrec.modules.embedding_configs import EmbeddingBagConfig
        from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
        from torchrec.optim import RowWiseAdagrad

        tables = [
            EmbeddingBagConfig(name=s.name, num_embeddings=s.num_embeddings, embedding_dim=s.embedding_dim,
                               feature_names=list(s.feature_names))
            for s in shapes
        ]
        kwargs = {"lr": lr, "eps": 1e-8, "weights_precision": SparseType.FP16 if precision == "fp16" else SparseType.FP32}
        return CollectionModel(
            FusedEmbeddingBagCollection(tables, optimizer_type=RowWiseAdagrad, optimizer_kwargs=kwargs, device=device)
        )

    return build


def _torch_embedding_bag(shapes: List[TableShape], lr: float, device: torch.device) -> Model:
    return TorchModel(TorchEmbeddingBag(shapes, lr, device=device))


def _kind_spec(kind, section_overrides: Optional[Dict[str, object]] = None):
    """Specs of a registered kind at its config defaults, as ``tables.compression.kind=<name>`` gives them
    (e.g. tensor train only for tables of at least its ``min_rows``)."""
    def spec(n: int):
        section_type = kind.section_type()
        section = section_type(**(section_overrides or {})) if section_type is not None else None
        return kind.spec_from_config(section, n)

    return spec


_REGISTRY_ERROR: List[ImportError] = []  # why the table kinds could not be listed (they need TorchRec)


def _raise(error: ImportError):
    def build(shapes: List[TableShape], lr: float, device: torch.device) -> Model:
        raise error

    return build


def _registered_kinds() -> List[Kind]:
    try:
        from torchrec_shark.modules.kinds import KINDS as TABLE_KINDS
    except ImportError as e:  # the benchmark still runs TorchRec-free kinds; ours are reported unavailable
        _REGISTRY_ERROR.append(e)
        return []

    # the default selection: the row stores (tensor train's factorised tables are benchmarked on request)
    out = [Kind(k.display_name, _compressed(_kind_spec(k)), default=k.state_family == "row_store")
           for k in TABLE_KINDS]
    out += [Kind(f"{k.name}_cache", _compressed(_kind_spec(k, {"cache_fraction": 0.001})), default=False)
            for k in TABLE_KINDS  # kinds with a hot-row cache, with one
            if k.section_type() is not None and "cache_fraction" in k.section_type().__dataclass_fields__]
    return out


KINDS: List[Kind] = [
    Kind("stock_fbgemm", _stock_fbgemm("fp32"), stock=True),
    Kind("stock_fbgemm_fp16", _stock_fbgemm("fp16"), stock=True),
    Kind("torch_embedding_bag", _torch_embedding_bag),
    *_registered_kinds(),
]
DEFAULT_KINDS = [k.name for k in KINDS if k.default]


# ---------------------------------------------------------------------------------- data


def table_configs(num_tables: int, min_rows: float, max_rows: float, scale: float, dim: int) -> List[TableShape]:
    rows = np.geomspace(min_rows, max_rows, num_tables) * scale
    return [TableShape(f"t{i:02d}", max(4, int(r)), dim, [f"f{i:02d}"]) for i, r in enumerate(rows)]


def zipf_ids(rng: np.random.Generator, num_rows: int, size: int, exponent: float, perm: np.ndarray) -> np.ndarray:
    """Zipf(exponent) ranks over ``num_rows`` ids, mapped to ids by ``perm`` (hot ids scattered)."""
    weights = 1.0 / np.arange(1, num_rows + 1) ** exponent
    cdf = np.cumsum(weights)
    ranks = np.searchsorted(cdf, rng.random(size) * cdf[-1])
    return perm[np.minimum(ranks, num_rows - 1)]


def make_batches(shapes: List[TableShape], batch: int, pooling: int, exponent: float, ctr: float, count: int,
                 seed: int, device: torch.device = torch.device("cpu")) -> List[Batch]:
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(s.num_embeddings) for s in shapes]
    keys = [s.feature_names[0] for s in shapes]
    out = []
    for _ in range(count):
        lengths = torch.full((batch * len(shapes),), pooling, dtype=torch.int64)
        offsets = torch.arange(batch * len(shapes) + 1, dtype=torch.int64) * pooling
        values = np.concatenate([zipf_ids(rng, s.num_embeddings, batch * pooling, exponent, p) for s, p in zip(shapes, perms)])
        labels = torch.from_numpy((rng.random(batch) < ctr).astype(np.float32))
        out.append(Batch(keys, torch.from_numpy(values), lengths, offsets, labels).to(device))
    return out


# ---------------------------------------------------------------------------------- timing


class Unavailable(Exception):
    """A kind that cannot be built or run here (a package or its device build is missing)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One kind, built and warmed up, timed in slices so that kinds can be interleaved."""

    def __init__(self, kind: Kind, shapes: List[TableShape], batches: List[Batch], lr: float, warmup: int,
                 device: torch.device) -> None:
        torch.manual_seed(0)
        self.kind, self.batches, self.shapes, self.device = kind, batches, shapes, device
        # CPU: only a missing package makes a kind unavailable (any other error is a bug to see).
        # CUDA: the stock kinds also fail at build or first step when FBGEMM has no CUDA kernels.
        expected = (ImportError,) if device.type != "cuda" or not kind.stock else (Exception,)
        try:
            _sync(device)
            t0 = time.perf_counter()
            self.model = kind.build(shapes, lr, device)
            _sync(device)
            self.build_s = time.perf_counter() - t0
            self.grad = torch.full((1, 1), 1.0 / len(batches[0].labels), device=device)
            for i in range(warmup):
                self.model.step(batches[i % len(batches)], self.grad)
            _sync(device)
        except expected as e:
            raise Unavailable(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")) from e
        self.steps, self.seconds, self.retier_s = 0, 0.0, None
        self.slice_step_s: List[float] = []  # seconds per step of each timed slice (one per round)
        self.slice_cpu_s: List[float] = []  # the same in process CPU time (all threads)
        if self.model.label_aware:  # steady state: tiers reflect the warm-up's hotness
            t0 = time.perf_counter()
            for t in self.model.label_aware:
                t.retier()
            _sync(device)
            self.retier_s = time.perf_counter() - t0

    def run(self, iters: int) -> None:
        _sync(self.device)  # nothing queued by another kind is charged to this one
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(iters):
            self.model.step(self.batches[self.steps % len(self.batches)], self.grad)
            self.steps += 1
        _sync(self.device)
        dt = time.perf_counter() - t0
        self.seconds += dt
        self.slice_step_s.append(dt / max(iters, 1))
        self.slice_cpu_s.append((time.process_time() - c0) / max(iters, 1))

    def result(self) -> Dict:
        step_s = self.seconds / max(self.steps, 1)
        total, fp32, parts = self.model.memory(self.shapes)
        result = {
            "kind": self.kind.name,
            "bytes": total,
            "fp32_bytes": fp32,
            "bytes_vs_fp32": total / fp32,
            "parts": parts,
            "step_ms": step_s * 1e3,
            "samples_per_s": len(self.batches[0].labels) / step_s,
            "build_s": self.build_s,
            "timed_steps": self.steps,
        }
        if self.retier_s is not None:
            every = self.model.label_aware[0].spec.retier_every
            result["retier_ms"] = self.retier_s * 1e3
            result["step_ms_with_retier"] = (step_s + self.retier_s / every) * 1e3
        return result


def bench(kinds: List[Kind], shapes: List[TableShape], batches: List[Batch], lr: float, iters: int, warmup: int,
          rounds: int, device: torch.device = torch.device("cpu")) -> Dict:
    """Build every kind, then time ``rounds`` slices of ``iters / rounds`` steps per kind, the
    kinds interleaved (order rotated each round) so that load changes on a shared machine hit
    every kind alike and the ratios stay comparable.

    Returns ``{"results": [...], "unavailable": {kind: reason}, "reference": {"kind", "why"}}``;
    each result has ``throughput_vs_ref`` (samples/s over the reference's). When
    ``stock_fbgemm`` cannot run, ``torch_embedding_bag`` is timed too and is the reference.
    """
    runners: List[Runner] = []
    unavailable: Dict[str, str] = {}
    for k in kinds:
        try:
            runners.append(Runner(k, shapes, batches, lr, warmup, device))
        except Unavailable as e:
            unavailable[k.name] = str(e)
    names = [r.kind.name for r in runners]
    if REFERENCE in names:
        ref, why = REFERENCE, "TorchRec's FBGEMM fused fp32 tables, run in this process"
    else:
        ref = FALLBACK_REFERENCE
        if REFERENCE in unavailable:
            why = f"{REFERENCE} is unavailable on {device.type} ({unavailable[REFERENCE]})"
        else:
            why = f"{REFERENCE} was not among the kinds run"
        if FALLBACK_REFERENCE not in names:
            runners.append(Runner(next(k for k in KINDS if k.name == FALLBACK_REFERENCE), shapes, batches, lr, warmup, device))
            why += f"; {FALLBACK_REFERENCE} added as the reference"
    per_round = max(1, iters // rounds)
    for r in range(rounds):
        for i in range(len(runners)):
            runners[(i + r) % len(runners)].run(per_round)
    results = [x.result() for x in runners]
    ref_sps = next(r["samples_per_s"] for r in results if r["kind"] == ref)
    ref_runner = next(x for x in runners if x.kind.name == ref)
    for r, x in zip(results, runners):
        r["throughput_vs_ref"] = r["samples_per_s"] / ref_sps
        # the same ratio in every round alone (both kinds timed within the round): its spread
        per_round = [a / b for a, b in zip(ref_runner.slice_step_s, x.slice_step_s)]
        r["vs_ref_rounds"] = per_round
        r["vs_ref_median"] = float(np.median(per_round))
        r["vs_ref_min"], r["vs_ref_max"] = min(per_round), max(per_round)
        # in CPU time: what a machine shared with other jobs distorts least (the work, not the waiting)
        cpu_rounds = [a / b for a, b in zip(ref_runner.slice_cpu_s, x.slice_cpu_s)]
        r["cpu_step_ms"] = float(np.median(x.slice_cpu_s)) * 1e3
        r["cpu_vs_ref_median"] = float(np.median(cpu_rounds))
        r["cpu_vs_ref_min"], r["cpu_vs_ref_max"] = min(cpu_rounds), max(cpu_rounds)
    return {"results": results, "unavailable": unavailable, "reference": {"kind": ref, "why": why}}


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__} (CUDA {torch.version.cuda})"
    return f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main(argv: Optional[List[str]] = None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", type=int, default=26)
    ap.add_argument("--min-rows", type=float, default=1e3)
    ap.add_argument("--max-rows", type=float, default=1e6)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every table's rows (quick runs: 0.1)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--pooling-factor", type=int, default=1, help="ids per bag")
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--ctr", type=float, default=0.25)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing slices per kind (iters split among them)")
    ap.add_argument("--num-batches", type=int, default=8, help="distinct batches cycled through")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where tables and batches live")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--kinds", default=",".join(DEFAULT_KINDS), help="comma-separated subset of " + ",".join(k.name for k in KINDS))
    ap.add_argument("--small", action="store_true", help="a quick run: rows / 100, batch 1024, 10 timed steps")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.small:
        args.scale, args.batch, args.iters, args.warmup, args.rounds = args.scale * 0.01, min(args.batch, 1024), 10, 3, 2
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = args.kinds.split(",")
    unknown = [k for k in wanted if k not in {x.name for x in KINDS}]
    if unknown and _REGISTRY_ERROR:  # this package's kinds could not be listed: report them unavailable
        KINDS.extend(Kind(name, _raise(_REGISTRY_ERROR[0])) for name in unknown)
    elif unknown:
        ap.error(f"unknown kinds {unknown}")
    shapes = table_configs(args.tables, args.min_rows, args.max_rows, args.scale, args.dim)
    batches = make_batches(shapes, args.batch, args.pooling_factor, args.zipf, args.ctr, args.num_batches, seed=0, device=device)
    total_rows = sum(s.num_embeddings for s in shapes)
    print(
        f"{len(shapes)} tables, {total_rows:,} rows ({shapes[0].num_embeddings:,}..{shapes[-1].num_embeddings:,}), "
        f"dim {args.dim}, batch {args.batch}, pooling factor {args.pooling_factor}, zipf {args.zipf}, "
        f"row-wise Adagrad, {_describe(device)}"
    )
    out = bench([k for k in KINDS if k.name in wanted], shapes, batches, args.lr, args.iters, args.warmup, args.rounds, device)
    results, ref = out["results"], out["reference"]
    for name, why in out["unavailable"].items():
        print(f"{name}: unavailable on {args.device}: {why}")
    print(f"reference for the 'vs ref' column: {ref['kind']} ({ref['why']})")
    print(f"\n{'kind':<20}{'MB':>10}{'vs fp32':>9}{'ms/step':>10}{'samples/s':>12}{'vs ref':>9}"
          f"  {'per round: median [min-max]':<28}  {'CPU ms/step':>11}  {'CPU time vs ref':<28}  notes")
    for r in results:
        notes = ""
        if "retier_ms" in r:
            notes = f"re-tier {r['retier_ms']:.0f} ms (every step: {r['step_ms_with_retier']:.1f} ms/step incl. amortised)"
        print(
            f"{r['kind']:<20}{r['bytes'] / 2**20:>10.1f}{r['bytes_vs_fp32']:>8.1%}{r['step_ms']:>10.2f}"
            f"{r['samples_per_s']:>12,.0f}{r['throughput_vs_ref']:>8.2f}x"
            f"  {r['vs_ref_median']:.2f}x [{r['vs_ref_min']:.2f}-{r['vs_ref_max']:.2f}] ({len(r['vs_ref_rounds'])} rounds)"
            f"  {r['cpu_step_ms']:>11.1f}  {r['cpu_vs_ref_median']:.2f}x [{r['cpu_vs_ref_min']:.2f}-{r['cpu_vs_ref_max']:.2f}]"
            f"{'':<13}  {notes}"
        )
    for r in results:
        if len(r["parts"]) > 1:
            fp32 = r["fp32_bytes"]
            print(f"{r['kind']} bytes by part (% of fp32): " + ", ".join(f"{k} {v / fp32:.1%}" for k, v in r["parts"].items()))
    report = {"args": vars(args), "device": _describe(device), **out}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
