"""Train a model whose fp32 tables are larger than the machine's memory: compressed, sharded, checkpointed,
killed and resumed.

``python -m torchrec_shark.bench.scale`` sizes ``--tables`` synthetic tables of ``--dim`` columns so that
their fp32 bytes are ``--fp32-ram-ratio`` times this machine's RAM (stock fp32 could not even hold them, so
it is not started), then for each kind (``shark``, ``int8``, ``tt``) runs ``train.py`` on ``--nproc`` ranks,
every table row-wise: the first run is killed (SIGKILL, the whole job) right after its first checkpoint, the
second resumes it to ``--steps``. It prints per rank: the shard bytes (tables, without optimizer state), the
peak RSS of each run (each worker's ``VmHWM``), the checkpoint bytes that rank wrote, and samples/s of the
resumed run; then the targets (peak RSS <= shard bytes + optimizer state + 2 GiB; checkpoint <= 1.15x the
tables' bytes). A kind whose shards (plus 2 GiB a rank) would not fit in the memory available now is
scaled down, and the output says so and to what.

``--build`` instead times building one table's shards: all rows on one process, against half the rows on
each of two processes at once (rows built per second per thread, and wall time).

Example::

    python -m torchrec_shark.bench.scale --kinds shark int8 tt --steps 200
    python -m torchrec_shark.bench.scale --build --build-rows 20000000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

GIB = 1024**3
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OVERHEAD = 2 * GIB  # per rank: the interpreter, TorchRec, the data batch (the target's fixed allowance)


def meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def table_rows(target_rows: int, nproc: int, q: int = 256) -> Tuple[int, Tuple[int, int, int]]:
    """Rows of one table near ``target_rows`` that split into ``nproc`` row-wise shards on whole tensor-train
    first-core slices: ``p1 * q * q`` rows with ``p1`` a multiple of ``nproc`` (row factors ``(p1, q, q)``)."""
    p1 = max(nproc, nproc * round(target_rows / (nproc * q * q)))
    return p1 * q * q, (p1, q, q)


def table_configs(kind: str, rows: int, factors, tables: int, dim: int):
    """The configs ``train.py tables=<kind>`` builds for these tables (its group's defaults)."""
    from hydra import compose, initialize_config_dir

    from torchrec_shark.config import TrainConfig  # noqa: F401  (registers the schema)
    from torchrec_shark.conf_store import register_configs
    from torchrec_shark.training.table_factory import build_table_configs

    register_configs()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base=None):
        cfg = compose("config", overrides=[f"tables={kind}", f"tables.embedding_dim={dim}"] + tt_overrides(kind, factors))
    names = [f"f{i:02d}" for i in range(tables)]
    return build_table_configs(cfg.tables, names, [rows] * tables)


def tt_overrides(kind: str, factors) -> List[str]:
    return [f"tables.compression.tensor_train.row_factors=[{','.join(map(str, factors))}]"] if kind == "tt" else []


def shard_bytes(configs, nproc: int) -> Tuple[int, int]:
    """``(tables, optimizer state)`` bytes of one rank's row-wise shards (the largest rank)."""
    from torchrec_shark.modules.base import SparseOptimizerSpec
    from torchrec_shark.modules.kinds import kind_of

    opt = SparseOptimizerSpec("rowwise_adagrad")
    tables = optim = 0
    for c in configs:
        rows = math.ceil(c.num_embeddings / nproc)
        b = kind_of(c).storage_bytes(c, opt, 0, rows)
        tables += b["total"] - b["optimizer"]
        optim += b["optimizer"]
    return tables, optim


# ---------------------------------------------------------------------------- running a job
def _workers(root_pid: int) -> Dict[int, int]:
    """``{pid: rank}`` of the training processes under ``root_pid``."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            if env.get(b"TORCHELASTIC_RUN_ID") and b"RANK" in env and _descends(int(pid), root_pid):
                out[int(pid)] = int(env[b"RANK"])
        except (OSError, ValueError):
            continue
    return out


def _descends(pid: int, root: int) -> bool:
    while pid > 1:
        if pid == root:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
    return False


def _hwm(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_job(cmd: List[str], log: str, nproc: int, kill_when: Optional[str] = None, timeout: float = 3600) -> Dict:
    """Run ``cmd`` in its own process group, sampling each worker's peak RSS; with ``kill_when`` (a path),
    SIGKILL the whole job as soon as that path exists. Returns ``{"rc", "peak_rss": {rank: bytes}, "seconds"}``."""
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        peak: Dict[int, int] = {}
        workers: Dict[int, int] = {}
        killed, last_scan = False, 0.0
        while proc.poll() is None:
            if kill_when is not None and os.path.exists(kill_when):
                # the workers run in process groups of their own: kill them as well as the launcher
                for pid in set(workers) | set(_workers(proc.pid)):
                    _kill(pid)
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                break
            if len(workers) < nproc and time.time() - last_scan > 1.0:  # scanning /proc is slow: until all found
                workers, last_scan = _workers(proc.pid), time.time()
            for pid, rank in workers.items():
                h = _hwm(pid)
                if h is not None:
                    peak[rank] = max(peak.get(rank, 0), h)
            if time.time() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                raise TimeoutError(f"{cmd} ran past {timeout} s (log: {log})")
            time.sleep(0.05)
        proc.wait()
    return {"rc": proc.returncode, "killed": killed, "peak_rss": peak, "seconds": time.time() - t0}


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def checkpoint_bytes(checkpoint: str, nproc: int) -> List[int]:
    """Bytes each rank wrote into a DCP checkpoint directory (its ``__<rank>_*.distcp`` files)."""
    out = [0] * nproc
    for name in os.listdir(checkpoint):
        if name.startswith("__") and name.endswith(".distcp"):
            out[int(name[2:].split("_")[0])] += os.path.getsize(os.path.join(checkpoint, name))
    return out


def bench_kind(kind: str, rows: int, factors, args, out_dir: str) -> Dict:
    run_dir = os.path.join(out_dir, kind)
    shutil.rmtree(run_dir, ignore_errors=True)
    half = max(1, args.steps // 2)
    cards = ",".join([str(rows)] * args.tables + ["1000", "100"])
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", f"--nproc_per_node={args.nproc}",
        "train.py", f"tables={kind}", f"tables.embedding_dim={args.dim}", f"data.synthetic.cardinalities=[{cards}]",
        "data.synthetic.num_noise_fields=1", "data.synthetic.multi_hot_fields=[1]", "data.synthetic.pair_dims=[4]",
        "planner.sharding_types=[row_wise]", f"trainer.max_steps={args.steps}", f"trainer.batch_size={args.batch_size}",
        f"trainer.checkpoint_every={half}", f"trainer.eval_every={args.steps}", "trainer.eval_batches=2",
        "trainer.progress=false", f"hydra.run.dir={run_dir}", *tt_overrides(kind, factors),
    ]
    first_ckpt = os.path.join(run_dir, "checkpoints", f"step_{half:08d}", "meta.json")
    killed = run_job(cmd, os.path.join(out_dir, f"{kind}.killed.log"), args.nproc, kill_when=first_ckpt)
    resumed = run_job(cmd + ["trainer.resume=true"], os.path.join(out_dir, f"{kind}.resumed.log"), args.nproc)
    result = {"killed": killed, "resumed": resumed}
    metrics_path = os.path.join(run_dir, "metrics.json")
    if resumed["rc"] != 0 or not os.path.isfile(metrics_path):
        result["error"] = f"resumed run failed (rc {resumed['rc']}); see {kind}.resumed.log"
        return result
    with open(metrics_path) as f:
        result["metrics"] = json.load(f)
    latest = os.path.join(run_dir, "checkpoints", f"step_{args.steps:08d}")
    result["checkpoint_bytes"] = checkpoint_bytes(latest, args.nproc)
    return result


def report(kind: str, res: Dict, tables: int, optim: int, nproc: int, scale_note: str) -> None:
    print(f"\n== {kind} {scale_note}")
    if "error" in res:
        print(f"   {res['error']}")
        return
    m = res["metrics"]
    k, r = res["killed"], res["resumed"]
    print(f"   first run killed after its first checkpoint: {k['killed']} ({k['seconds']:.0f} s); resumed to step "
          f"{m['steps']} ({r['seconds']:.0f} s); val AUC {m['val_auc']:.4f}; "
          f"{m.get('job_samples_per_s', m['train_samples_per_s']):,.0f} samples/s "
          f"(resumed run); embedding bytes {m['embedding_bytes'] / GIB:.2f} GiB over {m['world_size']} ranks "
          f"(fp32 {m['embedding_bytes_fp32'] / GIB:.2f} GiB)")
    print(f"   {'rank':>4} {'shard GiB':>10} {'optim GiB':>10} {'peak RSS GiB (killed / resumed)':>32} "
          f"{'target GiB':>10} {'ckpt GiB':>9} {'ckpt / shard':>12}")
    for rank in range(nproc):
        peaks = (k["peak_rss"].get(rank, 0), r["peak_rss"].get(rank, 0))
        ck = res["checkpoint_bytes"][rank]
        target = tables + optim + OVERHEAD
        print(f"   {rank:>4} {tables / GIB:>10.2f} {optim / GIB:>10.2f} {peaks[0] / GIB:>15.2f} / {peaks[1] / GIB:<14.2f} "
              f"{target / GIB:>10.2f} {ck / GIB:>9.2f} {ck / max(tables, 1):>12.2f}")
    worst = max(max(k["peak_rss"].values(), default=0), max(r["peak_rss"].values(), default=0))
    ck_total = sum(res["checkpoint_bytes"])
    print(f"   targets: peak RSS {worst / GIB:.2f} GiB <= {(tables + optim + OVERHEAD) / GIB:.2f}: "
          f"{'met' if worst <= tables + optim + OVERHEAD else 'NOT met'}; checkpoint {ck_total / GIB:.2f} GiB "
          f"(tables and their optimizer state) <= 1.15 x tables {1.15 * m['embedding_bytes'] / GIB:.2f} + optimizer "
          f"{optim * nproc / GIB:.2f}: {'met' if ck_total <= 1.15 * m['embedding_bytes'] + optim * nproc + 64 * 2**20 else 'NOT met'}")


# ---------------------------------------------------------------------------- build time
def _build(rows: int, row_start: int, table_rows_: int, dim: int, threads: int, out) -> None:
    import torch

    from torchrec_shark.modules import CompressedEmbeddingBagConfig, MixedPrecision, SparseOptimizerSpec
    from torchrec_shark.modules.kinds import kind_of

    torch.set_num_threads(threads)
    c = CompressedEmbeddingBagConfig(name="t", num_embeddings=table_rows_, embedding_dim=dim, feature_names=["f"],
                                     compression=MixedPrecision())
    t0 = time.perf_counter()
    kind_of(c).build(c, SparseOptimizerSpec("rowwise_adagrad"), row_start, rows, torch.device("cpu"), 0, row_wise=True)
    out.put(time.perf_counter() - t0)


def bench_build(rows: int, dim: int) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    single = {}
    for threads in (2, 1):
        p = ctx.Process(target=_build, args=(rows, 0, rows, dim, threads, q))
        p.start()
        single[threads] = q.get()
        p.join()
    one = single[2]
    half = rows // 2
    procs = [ctx.Process(target=_build, args=(n, s, rows, dim, 1, q)) for s, n in ((0, half), (half, rows - half))]
    t1 = time.perf_counter()
    for p in procs:
        p.start()
    two = [q.get(), q.get()]
    for p in procs:
        p.join()
    wall_two = time.perf_counter() - t1
    print(f"building a {rows:,} x {dim} mixed-precision table (initial values, tiers, optimizer state):")
    print(f"  1 process, 2 threads, all rows:      {one:7.1f} s   {rows / one / 2:>12,.0f} rows/s per thread")
    print(f"  1 process, 1 thread, all rows:       {single[1]:7.1f} s   {rows / single[1]:>12,.0f} rows/s per thread")
    print(f"  2 processes, 1 thread each, half:    {max(two):7.1f} s   {half / max(two):>12,.0f} rows/s per thread "
          f"(wall {wall_two:.1f} s with start-up)")
    print(f"  build time, 2 ranks / 1 rank: {max(two) / one:.2f} (1 rank on 2 threads), "
          f"{max(two) / single[1]:.2f} (1 rank on 1 thread)")


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", nargs="+", default=["shark", "int8", "tt"])
    ap.add_argument("--fp32-ram-ratio", type=float, default=1.5)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--tables", type=int, default=4)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "outputs", "bench_scale"))
    ap.add_argument("--build", action="store_true", help="time shard building instead of training")
    ap.add_argument("--build-rows", type=int, default=20_000_000)
    args = ap.parse_args(argv)
    if args.build:
        bench_build(args.build_rows, args.dim)
        return
    os.makedirs(args.out, exist_ok=True)
    ram = meminfo("MemTotal")
    target = int(args.fp32_ram_ratio * ram / (args.dim * 4))
    rows, factors = table_rows(math.ceil(target / args.tables), args.nproc)
    fp32 = rows * args.tables * args.dim * 4
    print(f"machine: {ram / GIB:.1f} GiB RAM; model: {args.tables} tables of {rows:,} x {args.dim} "
          f"(+ 2 small) = {fp32 / GIB:.1f} GiB of fp32 tables, {fp32 / ram:.2f}x RAM; {args.nproc} ranks row-wise")
    print(f"stock fp32: {fp32 / GIB:.1f} GiB of tables (+ {rows * args.tables * 4 / GIB:.1f} GiB row-wise Adagrad "
          f"state) cannot be held in {ram / GIB:.1f} GiB: not started")
    for kind in args.kinds:
        kind_rows, kind_factors, note = rows, factors, f"(fp32 tables {fp32 / ram:.2f}x RAM)"
        while True:
            tables_b, optim_b = shard_bytes(table_configs(kind, kind_rows, kind_factors, args.tables, args.dim),
                                            args.nproc)
            need = args.nproc * (tables_b + optim_b + OVERHEAD)
            available = meminfo("MemAvailable")
            if need <= 0.92 * available:
                break
            kind_rows, kind_factors = table_rows(int(kind_rows * 0.9), args.nproc)
            note = (f"(scaled down: its shards + 2 GiB a rank would need {need / GIB:.1f} GiB of the "
                    f"{available / GIB:.1f} GiB available; fp32 tables "
                    f"{kind_rows * args.tables * args.dim * 4 / ram:.2f}x RAM)")
        res = bench_kind(kind, kind_rows, kind_factors, args, args.out)
        report(kind, res, tables_b, optim_b, args.nproc, note)


if __name__ == "__main__":
    main()
