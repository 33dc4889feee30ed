"""Table benchmark: bytes vs fp32 and training throughput of each table kind vs stock FBGEMM.

Criteo-like setup: ``--tables`` tables with row counts log-spaced over ``[--min-rows,
--max-rows]`` (times ``--scale``), one single-hot feature each, dim ``--dim``, batch
``--batch``, Zipf(``--zipf``) ids (hot ids scattered over the table by a fixed permutation),
labels Bernoulli(``--ctr``). Every kind trains with row-wise Adagrad; one timed iteration is
forward + backward + fused update (+ ``record_labels``/``step_end`` for kinds that track
labels). The stock baselines are TorchRec's ``FusedEmbeddingBagCollection`` (FBGEMM's fused
``SplitTableBatchedEmbeddingBagsCodegen`` on CPU) with fp32 and with fp16 weights, run in the
same process on the same batches; ratios are against the fp32 one.

All kinds are built first, then timed in interleaved slices (the order rotated each round),
so that on a shared machine load changes hit every kind alike. Label-aware kinds are
measured in steady state: a warm-up records labels and re-tiers
before timing; the cost of one re-tiering is reported separately and amortised over
``retier_every`` steps.

Run::

    python -m torchrec_shark.bench.tables               # full size (26 tables, up to 1e6 rows)
    python -m torchrec_shark.bench.tables --small       # quick (rows / 100, batch 1024)
    python -m torchrec_shark.bench.tables --kinds stock_fbgemm,mixed_precision,tensor_train

Adding a kind (e.g. tensor-train) is one more :class:`Kind` entry in :data:`KINDS`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_shark.modules.base import SparseOptimizerSpec
from torchrec_shark.modules.specs import CompressedEmbeddingBagConfig, CompressionSpec, MixedPrecision, TensorTrain, Uniform


@dataclass
class Kind:
    """One table kind: how to build a collection of it, and whether it is the reference."""

    name: str
    build: Callable[[List[CompressedEmbeddingBagConfig], float], torch.nn.Module]
    reference: bool = False


def _compressed(spec_for_rows: Callable[[int], Optional[CompressionSpec]]):
    def build(configs: List[CompressedEmbeddingBagConfig], lr: float) -> torch.nn.Module:
        from torchrec_shark.modules.embedding_bag_collection import CompressedEmbeddingBagCollection

        tables = [
            CompressedEmbeddingBagConfig(
                name=c.name,
                num_embeddings=c.num_embeddings,
                embedding_dim=c.embedding_dim,
                feature_names=list(c.feature_names),
                compression=spec_for_rows(c.num_embeddings),
            )
            for c in configs
        ]
        return CompressedEmbeddingBagCollection(tables, optimizer=SparseOptimizerSpec("rowwise_adagrad", lr=lr))

    return build


def _stock_fbgemm(precision: str):
    def build(configs: List[CompressedEmbeddingBagConfig], lr: float) -> torch.nn.Module:
        from fbgemm_gpu.split_embedding_configs import SparseType
        from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
        from torchrec.optim import RowWiseAdagrad

        tables = [
            EmbeddingBagConfig(
                name=c.name, num_embeddings=c.num_embeddings, embedding_dim=c.embedding_dim, feature_names=list(c.feature_names)
            )
            for c in configs
        ]
        kwargs = {"lr": lr, "eps": 1e-8, "weights_precision": SparseType.FP16 if precision == "fp16" else SparseType.FP32}
        return FusedEmbeddingBagCollection(tables, optimizer_type=RowWiseAdagrad, optimizer_kwargs=kwargs)

    return build


def _tensor_train(n: int) -> Optional[CompressionSpec]:
    # as tables=tt does: only large tables are factorised (small ones save little)
    from torchrec_shark.config import TensorTrainConfig

    return TensorTrain() if n >= TensorTrainConfig().min_rows else None


KINDS: List[Kind] = [
    Kind("stock_fbgemm", _stock_fbgemm("fp32"), reference=True),
    Kind("stock_fbgemm_fp16", _stock_fbgemm("fp16")),
    Kind("fp32", _compressed(lambda n: None)),
    Kind("fp16", _compressed(lambda n: Uniform("fp16"))),
    Kind("int8", _compressed(lambda n: Uniform("int8"))),
    Kind("mixed_precision", _compressed(lambda n: MixedPrecision())),
    Kind("tensor_train", _compressed(_tensor_train)),
]
DEFAULT_KINDS = [k.name for k in KINDS if k.name != "tensor_train"]


def _tensor_train_cache(n: int) -> Optional[CompressionSpec]:
    from torchrec_shark.bench.tensor_train import tt_table_spec

    return tt_table_spec(cache_fraction=0.001)(n)


KINDS.append(Kind("tensor_train_cache", _compressed(_tensor_train_cache)))  # not a default kind either


def table_configs(num_tables: int, min_rows: float, max_rows: float, scale: float, dim: int) -> List[CompressedEmbeddingBagConfig]:
    rows = np.geomspace(min_rows, max_rows, num_tables) * scale
    return [
        CompressedEmbeddingBagConfig(
            name=f"t{i:02d}", num_embeddings=max(4, int(r)), embedding_dim=dim, feature_names=[f"f{i:02d}"]
        )
        for i, r in enumerate(rows)
    ]


def zipf_ids(rng: np.random.Generator, num_rows: int, size: int, exponent: float, perm: np.ndarray) -> np.ndarray:
    """Zipf(exponent) ranks over ``num_rows`` ids, mapped to ids by ``perm`` (hot ids scattered)."""
    weights = 1.0 / np.arange(1, num_rows + 1) ** exponent
    cdf = np.cumsum(weights)
    ranks = np.searchsorted(cdf, rng.random(size) * cdf[-1])
    return perm[np.minimum(ranks, num_rows - 1)]


def make_batches(configs, batch: int, pooling: int, exponent: float, ctr: float, count: int, seed: int):
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(c.num_embeddings) for c in configs]
    keys = [c.feature_names[0] for c in configs]
    out = []
    for _ in range(count):
        lengths = np.full(batch * len(configs), pooling, dtype=np.int64)
        values = np.concatenate(
            [zipf_ids(rng, c.num_embeddings, batch * pooling, exponent, p) for c, p in zip(configs, perms)]
        )
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.from_numpy(values), lengths=torch.from_numpy(lengths))
        labels = torch.from_numpy((rng.random(batch) < ctr).astype(np.float32))
        out.append((kjt, labels))
    return out


def _train_step(ebc: torch.nn.Module, kjt: KeyedJaggedTensor, labels: torch.Tensor, grad_scale: torch.Tensor) -> None:
    if hasattr(ebc, "record_labels"):
        ebc.record_labels(kjt, labels)
    values = ebc(kjt).values()
    values.backward(grad_scale.expand_as(values))
    if hasattr(ebc, "step_end"):
        ebc.step_end()


class Runner:
    """One kind, built and warmed up, timed in slices so that kinds can be interleaved."""

    def __init__(self, kind: Kind, configs, batches, lr: float, warmup: int) -> None:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        self.kind, self.batches, self.configs = kind, batches, configs
        self.ebc = kind.build(configs, lr)
        self.build_s = time.perf_counter() - t0
        self.grad = torch.full((1, 1), 1.0 / len(batches[0][1]))
        self.steps, self.seconds, self.retier_s = 0, 0.0, None
        for i in range(warmup):
            _train_step(self.ebc, *batches[i % len(batches)], self.grad)
        tables = getattr(self.ebc, "embedding_bags", {})
        self.label_aware = [t for t in tables.values() if hasattr(t, "retier")]
        if self.label_aware:  # steady state: tiers reflect the warm-up's hotness
            t0 = time.perf_counter()
            for t in self.label_aware:
                t.retier()
            self.retier_s = time.perf_counter() - t0

    def run(self, iters: int) -> None:
        t0 = time.perf_counter()
        for _ in range(iters):
            _train_step(self.ebc, *self.batches[self.steps % len(self.batches)], self.grad)
            self.steps += 1
        self.seconds += time.perf_counter() - t0

    def result(self) -> Dict:
        ebc, configs = self.ebc, self.configs
        step_s = self.seconds / max(self.steps, 1)
        if hasattr(ebc, "memory_bytes"):
            mem = ebc.memory_bytes()
            total, fp32 = mem["total"], ebc.fp32_bytes()
            parts: Dict[str, int] = {}
            for p in mem["per_table"].values():
                for k, v in p.items():
                    if k != "total":
                        parts[k] = parts.get(k, 0) + v
        else:
            fp32 = sum(c.num_embeddings * c.embedding_dim * 4 for c in configs)
            weights = [v for k, v in ebc.state_dict().items() if k.endswith(".weight")]
            total = sum(w.numel() * w.element_size() for w in weights)
            parts = {f"{str(weights[0].dtype).replace('torch.float', 'fp')}_rows": total}
        result = {
            "kind": self.kind.name,
            "bytes": total,
            "fp32_bytes": fp32,
            "bytes_vs_fp32": total / fp32,
            "parts": parts,
            "step_ms": step_s * 1e3,
            "samples_per_s": len(self.batches[0][1]) / step_s,
            "build_s": self.build_s,
            "timed_steps": self.steps,
        }
        if self.retier_s is not None:
            every = self.label_aware[0].spec.retier_every
            result["retier_ms"] = self.retier_s * 1e3
            result["step_ms_with_retier"] = (step_s + self.retier_s / every) * 1e3
        return result


def bench(kinds: List[Kind], configs, batches, lr: float, iters: int, warmup: int, rounds: int) -> List[Dict]:
    """Build every kind, then time ``rounds`` slices of ``iters / rounds`` steps per kind, the
    kinds interleaved (order rotated each round) so that load changes on a shared machine hit
    every kind alike and the ratios stay comparable."""
    runners = [Runner(k, configs, batches, lr, warmup) for k in kinds]
    per_round = max(1, iters // rounds)
    for r in range(rounds):
        for i in range(len(runners)):
            runners[(i + r) % len(runners)].run(per_round)
    return [x.result() for x in runners]


def main(argv: Optional[List[str]] = None) -> List[Dict]:
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
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--kinds", default=",".join(DEFAULT_KINDS), help="comma-separated subset of " + ",".join(k.name for k in KINDS))
    ap.add_argument("--small", action="store_true", help="a quick run: rows / 100, batch 1024, 10 timed steps")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.small:
        args.scale, args.batch, args.iters, args.warmup, args.rounds = args.scale * 0.01, min(args.batch, 1024), 10, 3, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = args.kinds.split(",")
    unknown = [k for k in wanted if k not in {x.name for x in KINDS}]
    if unknown:
        ap.error(f"unknown kinds {unknown}")
    configs = table_configs(args.tables, args.min_rows, args.max_rows, args.scale, args.dim)
    batches = make_batches(configs, args.batch, args.pooling_factor, args.zipf, args.ctr, args.num_batches, seed=0)
    total_rows = sum(c.num_embeddings for c in configs)
    print(
        f"{len(configs)} tables, {total_rows:,} rows ({configs[0].num_embeddings:,}..{configs[-1].num_embeddings:,}), "
        f"dim {args.dim}, batch {args.batch}, pooling factor {args.pooling_factor}, zipf {args.zipf}, "
        f"row-wise Adagrad, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    results = bench([k for k in KINDS if k.name in wanted], configs, batches, args.lr, args.iters, args.warmup, args.rounds)
    ref = next((r for r in results if r["kind"] == "stock_fbgemm"), None)
    print(f"\n{'kind':<18}{'MB':>10}{'vs fp32':>9}{'ms/step':>10}{'samples/s':>12}{'vs stock':>10}  notes")
    for r in results:
        ratio = r["samples_per_s"] / ref["samples_per_s"] if ref else float("nan")
        r["throughput_vs_stock"] = ratio
        notes = ""
        if "retier_ms" in r:
            notes = f"re-tier {r['retier_ms']:.0f} ms (every step: {r['step_ms_with_retier']:.1f} ms/step incl. amortised)"
        print(
            f"{r['kind']:<18}{r['bytes'] / 2**20:>10.1f}{r['bytes_vs_fp32']:>8.1%}{r['step_ms']:>10.2f}"
            f"{r['samples_per_s']:>12,.0f}{ratio:>9.2f}x  {notes}"
        )
    for r in results:
        if len(r["parts"]) > 1:
            fp32 = r["fp32_bytes"]
            print(f"{r['kind']} bytes by part (% of fp32): " + ", ".join(f"{k} {v / fp32:.1%}" for k, v in r["parts"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
