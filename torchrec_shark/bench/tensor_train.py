"""TT-Rec tables against an uncompressed stock table: bytes, and forward+backward+update time per sample.

Run ``python -m torchrec_shark.bench.tensor_train`` (defaults: a 1e6 x 64 and a 1e7 x 128 table, 3 cores,
rank 32, batch 4096 single-id bags of Zipf(1.05) ids scattered over the id range by a fixed bijection,
row-wise Adagrad). Per table it builds, side by side, each as a one-table collection fed the same
``KeyedJaggedTensor`` batches:

* ``stock``: TorchRec's ``FusedEmbeddingBagCollection`` (FBGEMM's fused TBE, fp32, CPU), the reference;
* ``tt``: :class:`~torchrec_shark.modules.tensor_train.TensorTrainTable` in a
  :class:`~torchrec_shark.modules.embedding_bag_collection.CompressedEmbeddingBagCollection`, no cache;
* ``tt+cache``: the same with an LFU cache of ``--cache-fraction`` of the rows (warm-up steps populate it;
  the refreshes inside the timed steps are included).

A step is ``kt = ebc(kjt); kt.values().backward(g); ebc.step_end()``. The kinds' steps are interleaved
(one step of each in turn), so a machine shared with other work slows them alike; the median over steps
is reported, as wall time and as process CPU time (the latter is what a loaded machine distorts least),
with the range of each ratio over ``--blocks`` consecutive blocks of the steps.

:func:`tt_table_spec` gives :mod:`torchrec_shark.bench.tables` its TT-with-cache kind.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_shark.modules.base import SparseOptimizerSpec
from torchrec_shark.modules import CompressedEmbeddingBagConfig, TensorTrain, kind_of

Batch = KeyedJaggedTensor


def tt_table_spec(cache_fraction: float = 0.0) -> Callable[[int], Optional[TensorTrain]]:
    """Spec per table size: as ``train.py tables=tt`` with its defaults (tables of at least ``min_rows`` rows
    become TT cores, smaller ones stay fp32), with an LFU cache of ``cache_fraction`` of the rows."""
    kind = kind_of(CompressedEmbeddingBagConfig(name="t", num_embeddings=1, embedding_dim=4,
                                                compression=TensorTrain()))
    section = kind.section_type()(cache_fraction=cache_fraction)

    def spec(n: int) -> Optional[TensorTrain]:
        return kind.spec_from_config(section, n)

    return spec


def zipf_batches(n: int, batch: int, pooling: int, alpha: float, count: int, seed: int = 0) -> List[Batch]:
    """Zipf(alpha) ranks mapped to ids by the bijection ``(a * rank + b) mod n`` (hot ids spread out)."""
    rng = np.random.default_rng(seed)
    a = 2_654_435_761
    while math.gcd(a, n) != 1:
        a += 2
    b = int(rng.integers(n))
    lengths = torch.full((batch,), pooling, dtype=torch.int64)
    out = []
    for _ in range(count):
        ranks = (rng.zipf(alpha, size=batch * pooling) - 1) % n
        ids = torch.from_numpy((ranks * a + b) % n)
        out.append(KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=ids, lengths=lengths))
    return out


def stock_collection(n: int, dim: int, opt: SparseOptimizerSpec) -> torch.nn.Module:
    from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
    from torchrec.optim import SGD, Adagrad, RowWiseAdagrad

    kind = {"sgd": SGD, "adagrad": Adagrad, "rowwise_adagrad": RowWiseAdagrad}[opt.name]
    kwargs = {"lr": opt.lr} if opt.name == "sgd" else {"lr": opt.lr, "eps": opt.eps}
    cfg = EmbeddingBagConfig(name="t", num_embeddings=n, embedding_dim=dim, feature_names=["f"])
    return FusedEmbeddingBagCollection([cfg], optimizer_type=kind, optimizer_kwargs=kwargs)


def tt_collection(n: int, dim: int, spec: TensorTrain, opt: SparseOptimizerSpec) -> torch.nn.Module:
    from torchrec_shark.modules.embedding_bag_collection import CompressedEmbeddingBagCollection

    cfg = CompressedEmbeddingBagConfig(name="t", num_embeddings=n, embedding_dim=dim, feature_names=["f"], compression=spec)
    return CompressedEmbeddingBagCollection([cfg], optimizer=opt)


def step_fn(ebc: torch.nn.Module, grad: torch.Tensor) -> Callable[[Batch], None]:
    end = getattr(ebc, "step_end", None)

    def step(kjt: Batch) -> None:
        ebc(kjt).values().backward(grad)
        if end is not None:
            end()

    return step


def interleaved(steps: Dict[str, Callable[[Batch], None]], batches: List[Batch], warmup: Dict[str, int], n: int,
                blocks: int = 1) -> Dict[str, Dict[str, object]]:
    """Median wall and process-CPU seconds per step of each kind, steps interleaved kind by kind; also
    the medians of ``blocks`` consecutive blocks of steps (``wall_blocks``, ``cpu_blocks``), whose
    ratios between kinds give the spread of a ratio over repeats."""
    for name, fn in steps.items():
        for i in range(warmup[name]):
            fn(batches[i % len(batches)])
    wall: Dict[str, List[float]] = {k: [] for k in steps}
    cpu: Dict[str, List[float]] = {k: [] for k in steps}
    for i in range(n):
        b = batches[i % len(batches)]
        for name, fn in steps.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn(b)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    size = max(1, n // blocks)
    out: Dict[str, Dict[str, object]] = {}
    for k in steps:
        out[k] = {"wall": statistics.median(wall[k]), "cpu": statistics.median(cpu[k]),
                  "wall_blocks": [statistics.median(wall[k][i:i + size]) for i in range(0, size * blocks, size)],
                  "cpu_blocks": [statistics.median(cpu[k][i:i + size]) for i in range(0, size * blocks, size)]}
    return out


def bench_table(n: int, dim: int, args, opt: SparseOptimizerSpec) -> Dict[str, Dict[str, float]]:
    batches = zipf_batches(n, args.batch, args.pooling, args.alpha, args.distinct_batches)
    grad = torch.randn(args.batch, dim)
    distinct = np.mean([torch.unique(b.values()).numel() for b in batches])
    print(f"\n== {n:.0e} x {dim}, {args.cores} cores, rank {args.rank}, batch {args.batch} x {args.pooling} ids, "
          f"Zipf({args.alpha}), {distinct:.0f} distinct ids per batch, {opt.name}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    mods = {"stock": stock_collection(n, dim, opt)}
    for label, cache in (("tt", 0.0), ("tt+cache", args.cache_fraction)):
        spec = TensorTrain(num_cores=args.cores, ranks=(args.rank,), cache_fraction=cache, cache_refresh_every=args.refresh_every)
        mods[label] = tt_collection(n, dim, spec, opt)
    warm = {"stock": args.warmup, "tt": args.warmup, "tt+cache": max(args.warmup, args.refresh_every + 1)}
    res = interleaved({k: step_fn(m, grad) for k, m in mods.items()}, batches, warm, args.steps, args.blocks)
    fp32 = n * dim * 4
    for label, ebc in mods.items():
        r = res[label]
        if label == "stock":
            r["bytes"] = fp32
            extra = "FBGEMM TBE (torchrec FusedEmbeddingBagCollection), fp32"
        else:
            table = ebc.embedding_bags["t"]
            mem = table.memory_bytes()
            r["bytes"] = mem["total"]
            parts = ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in mem.items() if k != "total")
            extra = f"{fp32 / mem['total']:7.1f}x fewer bytes than fp32 ({parts})"
            if table.cache_rows:
                cached = table.cache_ids[: table._cached_count()]
                hits = np.mean([torch.isin(torch.unique(b.values()), cached).float().mean().item() for b in batches])
                extra += f"; {table.cache_rows} cached rows serve {hits * 100:.1f}% of distinct ids"
            else:
                lay = table.layout
                extra += f"; p={lay.row_factors} q={lay.col_factors}"
        print(f"  {label:<9} wall {r['wall'] / args.batch * 1e6:7.3f} us/sample  cpu {r['cpu'] / args.batch * 1e6:7.3f} us/sample"
              f"  {r['bytes'] / 2**20:9.2f} MiB  {extra}")
    for label in ("tt", "tt+cache"):
        line = f"  {label} / stock: wall {res[label]['wall'] / res['stock']['wall']:.2f}x, cpu {res[label]['cpu'] / res['stock']['cpu']:.2f}x"
        for clock in ("wall", "cpu"):
            ratios = [a / b for a, b in zip(res[label][f"{clock}_blocks"], res["stock"][f"{clock}_blocks"])]
            res[label][f"{clock}_ratio_blocks"] = ratios
            line += f"; {clock} over {len(ratios)} blocks {min(ratios):.2f}-{max(ratios):.2f}x"
        print(line)
    del mods
    gc.collect()
    return res


def main(argv=None) -> Dict[str, Dict[str, Dict[str, float]]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tables", default="1000000x64,10000000x128", help="comma-separated ROWSxDIM")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--cores", type=int, default=3)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--pooling", type=int, default=1, help="ids per sample (bag size)")
    p.add_argument("--alpha", type=float, default=1.05, help="Zipf exponent")
    p.add_argument("--optimizer", default="rowwise_adagrad", choices=["sgd", "adagrad", "rowwise_adagrad"])
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--cache-fraction", type=float, default=0.001)
    p.add_argument("--refresh-every", type=int, default=50)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--blocks", type=int, default=3, help="consecutive blocks of steps whose ratios give the spread")
    p.add_argument("--distinct-batches", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    opt = SparseOptimizerSpec(args.optimizer, lr=args.lr)
    out = {}
    for spec in args.tables.split(","):
        n, dim = (int(float(x)) for x in spec.lower().split("x"))
        out[spec] = bench_table(n, dim, args, opt)
    return out


if __name__ == "__main__":
    main()
