"""Serving: exported models' samples/s, their AUC against the runs', and their size.

``python -m torchrec_shark.bench.serve`` trains one run per ``tables=`` preset (default: every preset in
``conf/tables``; ``--train`` adds ``train.py`` overrides to all of them), exports each
(``python -m torchrec_shark.export``), scores each export on its run's evaluation samples
(``python -m torchrec_shark.score``) and then, in this one CPU process, times every export against the
exported stock fp32 model (``baseline``) and TorchRec's quantised ``EmbeddingBagCollection`` of the same
precision (``torchrec.inference.modules.quantize_embeddings`` of the baseline's fp32 tables: the
``QuantEmbeddingBagCollection`` a TorchRec user would serve, with the same dense layers). Runs, exports and
scores already done with the same settings are reused (``--out``).

Timing: every model is scripted (``torch.jit.script``, what a C++ server runs), the batches are the run's
validation samples (the same ``--iters`` batches for every model), and the models take turns in each of
``--rounds`` rounds (the order rotated each round) after one warm-up round, so the host's other load falls on
all of them alike. A model's samples/s in a round is the batch size over its median forward time; a ratio
is taken within each round and reported as the median over rounds and its range. Every model is timed
whole (``model``) and its embedding lookups alone (``lookups``: every feature's pooled rows, no dense layers),
which shows how much of a forward the tables are.

Sizes: the export's files against the run's ``embedding_bytes`` less the tables' priorities (training
state) plus the dense parameters (fp32).

Writes ``serve.json`` and ``serve.md`` under ``--out`` and prints the latter.

Example::

    python -m torchrec_shark.bench.serve --steps 300 --batch-sizes 512,4096 --rounds 10
    python -m torchrec_shark.bench.serve --presets baseline,shark --skip-speed --train data=criteo_tsv data.path=...
"""


import argparse
import json
import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_shark.passes.command_line import hydra_quote
from torchrec_shark.pipeline.config import table_presets
from torchrec_shark.pipeline.stages import StageRunner, read_json

REFERENCE = "baseline"
# TorchRec's quantised collection of each precision this package also serves uniformly
TORCHREC_DTYPES = {"fp16": torch.half, "int8": torch.qint8, "int4": torch.quint4x2, "int2": torch.quint2x4}


def prepare(presets: Sequence[str], steps: int, train: Sequence[str], out: str) -> Dict[str, Dict]:
    """Train, export and score every preset not yet done; ``{preset: {run, export, metrics, score}}``."""
    runner = StageRunner(out, resume=True)
    done = {}
    for preset in presets:
        run = runner.train(preset, 1, [f"tables={preset}", f"trainer.max_steps={steps}", f"trainer.eval_every={steps}",
                                       f"trainer.checkpoint_every={steps}", *train])
        model = runner.path("passes", f"export_{preset}", "model")
        runner.run_pass(f"export_{preset}", "torchrec_shark.export", 1,
                        [f"run_dir={hydra_quote(run.out_dir)}", f"out={hydra_quote(model)}", "overwrite=true"],
                        "export.json", after=[preset])
        scored = runner.run_pass(f"score_{preset}", "torchrec_shark.score", 1, [f"model={hydra_quote(model)}"],
                                 "score.json", after=[f"export_{preset}"])
        done[preset] = {"run": run.out_dir, "export": model,
                        "metrics": read_json(os.path.join(run.out_dir, "metrics.json")),
                        "score": read_json(os.path.join(scored.out_dir, "score.json"))}
    return done


def priority_bytes(checkpoint: str) -> int:
    """Bytes of the tables' saved priorities (training state the export leaves behind)."""
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    total = 0
    for key, item in md.items():
        if key.startswith("model.") and key.endswith(".priority") and hasattr(item, "size"):
            n = 1
            for d in item.size:
                n *= d
            total += n * item.properties.dtype.itemsize
    return total


def size_row(preset: str, entry: Dict) -> Dict:
    from torchrec_shark.serving.format import read_manifest

    manifest = read_manifest(entry["export"])
    metrics = entry["metrics"]
    prio = priority_bytes(manifest["source"]["checkpoint"])
    reference = metrics["embedding_bytes"] - prio + manifest["bytes"]["dense"]
    exported = manifest["bytes"]["tables"] + manifest["bytes"]["dense"] + os.path.getsize(
        os.path.join(entry["export"], "manifest.json"))
    return {"preset": preset, "embedding_bytes": metrics["embedding_bytes"], "priority_bytes": prio,
            "dense_bytes": manifest["bytes"]["dense"], "reference_bytes": reference,
            "export_table_bytes": manifest["bytes"]["tables"], "export_bytes": exported,
            "export_over_reference": exported / reference}


def auc_row(preset: str, entry: Dict) -> Dict:
    run_auc, served = entry["metrics"]["val_auc"], entry["score"]["val_auc"]
    return {"preset": preset, "run_val_auc": run_auc, "export_val_auc": served, "difference": served - run_auc,
            "samples": entry["score"]["samples"]}


class QuantEBCModel(nn.Module):
    """TorchRec's quantised ``EmbeddingBagCollection`` under the dense layers of an exported model."""

    def __init__(self, served: nn.Module, qebc: nn.Module) -> None:
        super().__init__()
        self.qebc = qebc
        self.feature_names: List[str] = list(served.feature_names)
        self.projections = served.projections
        self.dense_arch, self.inter_arch, self.over_arch = served.dense_arch, served.inter_arch, served.over_arch

    def forward(self, dense: torch.Tensor, features: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.qebc(features).to_dict()
        embedded: List[torch.Tensor] = []
        for j, projection in enumerate(self.projections):
            embedded.append(projection(pooled[self.feature_names[j]]))
        sparse = torch.stack(embedded, dim=1)
        return torch.sigmoid(self.over_arch(self.inter_arch(self.dense_arch(dense), sparse)).squeeze(-1))


class Lookups(nn.Module):
    """The embedding lookups of a served model alone (every feature's pooled rows, as the model reads them, no
    copy into one tensor): timed next to the whole model so that the tables' share of a forward is seen."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, dense: torch.Tensor, features: KeyedJaggedTensor) -> List[torch.Tensor]:
        return self.model.pooled(features)


class QuantEBCLookups(nn.Module):
    """TorchRec's quantised collection alone (its pooled ``KeyedTensor``'s values, as its model reads them)."""

    def __init__(self, model: QuantEBCModel) -> None:
        super().__init__()
        self.qebc = model.qebc

    def forward(self, dense: torch.Tensor, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.qebc(features).values()


def torchrec_quantized(baseline_export: str, precision: str) -> nn.Module:
    """TorchRec's quantised collection of ``precision`` from the baseline export's fp32 tables, in a model with
    the baseline's dense layers."""
    import torchrec
    from torchrec.inference.modules import quantize_embeddings
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

    from torchrec_shark import serving
    from torchrec_shark.serving.format import read_manifest, read_tensor

    manifest = read_manifest(baseline_export)
    configs, weights = [], {}
    for t in manifest["tables"]:
        if t["format"] != "row_tiers" or t.get("slot_map") or t["tiers"][0]["precision"] != "fp32":
            raise ValueError(f"{baseline_export}: table {t['name']} is not stock fp32 rows")
        configs.append(EmbeddingBagConfig(name=t["name"], embedding_dim=t["embedding_dim"],
                                          num_embeddings=t["num_embeddings"], feature_names=list(t["features"]),
                                          pooling=PoolingType.MEAN if t["pooling"] == "mean" else PoolingType.SUM))
        weights[t["name"]] = read_tensor(baseline_export, t["tensors"][t["tiers"][0]["tensor"]])

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ebc = torchrec.EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))

    holder = Holder()
    with torch.no_grad():
        for name, w in weights.items():
            holder.ebc.embedding_bags[name].weight.copy_(w)
    quantize_embeddings(holder, dtype=TORCHREC_DTYPES[precision], inplace=True)
    return QuantEBCModel(serving.load(baseline_export), holder.ebc).eval()


def uniform_precision(export: str) -> Optional[str]:
    """The precision every row of an export is stored in, or ``None`` (tiers, cores, several precisions)."""
    from torchrec_shark.serving.format import read_manifest

    found = set()
    for t in read_manifest(export)["tables"]:
        if t["format"] != "row_tiers" or t.get("slot_map"):
            return None
        found.add(t["tiers"][0]["precision"])
    return found.pop() if len(found) == 1 else None


def validation_batches(export: str, batch_size: int, count: int) -> List:
    """``count`` validation batches of ``batch_size`` of the export's data (fewer when the split is shorter)."""
    from omegaconf import OmegaConf

    from torchrec_shark.config import DataConfig
    from torchrec_shark.data import build_dataset
    from torchrec_shark.data.statistics import load_statistics
    from torchrec_shark.serving.format import read_manifest

    manifest = read_manifest(export)
    data = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), manifest["data"]["config"]))
    dataset = build_dataset(data)
    if getattr(dataset, "uses_statistics", False):
        dataset.use_statistics(load_statistics(os.path.join(export, "data")))
    out = []
    for batch in dataset.batches("val", batch_size, 0, 1):
        if batch.labels.numel() < batch_size or len(out) >= count:
            break
        out.append((batch.dense_features, batch.sparse_features))
    return out


def time_models(models: Dict[str, Callable], batches: List, rounds: int) -> Dict[str, List[float]]:
    """Samples/s of each model per round (after one warm-up round), the models taking turns in each round."""
    names = list(models)
    per_round: Dict[str, List[float]] = {n: [] for n in names}
    batch = batches[0][1].stride()
    with torch.no_grad():
        for r in range(rounds + 1):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                times = []
                for dense, kjt in batches:
                    t0 = time.perf_counter()
                    models[name](dense, kjt)
                    times.append(time.perf_counter() - t0)
                if r:
                    per_round[name].append(batch / statistics.median(times))
    return per_round


def script(model: nn.Module) -> nn.Module:
    """The scripted module a C++ server would run. TorchRec's quantised collection scripts only after its own
    FX trace (``torchrec.fx.symbolic_trace``: how TorchRec's inference path prepares it); ours scripts as is."""
    if isinstance(model, (QuantEBCModel, QuantEBCLookups)):
        from torchrec.fx import symbolic_trace

        return torch.jit.script(symbolic_trace(model))
    return torch.jit.script(model)


def _spread(values: Sequence[float]) -> Dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def speed_rows(prepared: Dict[str, Dict], batch_sizes: Sequence[int], rounds: int, iters: int,
               eager: bool) -> List[Dict]:
    from torchrec_shark import serving

    if REFERENCE not in prepared:
        raise ValueError(f"the speed comparison needs the {REFERENCE!r} preset (the exported stock fp32 model)")
    models: Dict[str, nn.Module] = {p: serving.load(e["export"]) for p, e in prepared.items()}
    versus: Dict[str, str] = {}
    for p, e in prepared.items():
        precision = uniform_precision(e["export"])
        if precision in TORCHREC_DTYPES:
            name = f"torchrec_{precision}"
            if name not in models:
                models[name] = torchrec_quantized(prepared[REFERENCE]["export"], precision)
            versus[p] = name
    parts: Dict[str, Dict[str, nn.Module]] = {
        "model": models,
        "lookups": {n: QuantEBCLookups(m) if isinstance(m, QuantEBCModel) else Lookups(m) for n, m in models.items()},
    }
    timed: Dict[str, nn.Module] = {}
    for part, members in parts.items():
        for n, m in members.items():
            timed[f"{part}:{n}"] = m if eager else script(m)
    rows = []
    for b in batch_sizes:
        batches = validation_batches(prepared[REFERENCE]["export"], b, iters)
        if not batches:
            print(f"bench.serve: the validation split has fewer than {b} samples: batch size {b} skipped", flush=True)
            continue
        sps = time_models(timed, batches, rounds)
        for part, members in parts.items():
            reference = sps[f"{part}:{REFERENCE}"]
            for name in members:
                mine = sps[f"{part}:{name}"]
                row = {"batch_size": b, "part": part, "model": name, "samples_per_s": _spread(mine),
                       "vs_stock_fp32": _spread([a / s for a, s in zip(mine, reference)])}
                if name in versus:
                    other = versus[name]
                    row["vs_torchrec"] = {"model": other, **_spread(
                        [a / s for a, s in zip(mine, sps[f"{part}:{other}"])])}
                rows.append(row)
    return rows


def write_report(out: str, command: str, auc: List[Dict], sizes: List[Dict], speed: List[Dict], threads: int) -> str:
    lines = [f"Command: `{command}`", "", "AUC of each export on its run's evaluation samples (`score`) against the "
             "run's own final evaluation:", "",
             "| preset | run val AUC | export val AUC | difference | samples |", "|---|---:|---:|---:|---:|"]
    for r in auc:
        lines.append(f"| {r['preset']} | {r['run_val_auc']:.6f} | {r['export_val_auc']:.6f} | {r['difference']:+.1e} | "
                     f"{r['samples']:,} |")
    lines += ["", "Sizes: the export's tables, dense parameters and manifest against the run's `embedding_bytes` "
              "less priorities plus the dense parameters (fp32):", "",
              "| preset | embedding_bytes | priorities | dense | reference | exported | exported / reference |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in sizes:
        lines.append(f"| {r['preset']} | {r['embedding_bytes']:,} | {r['priority_bytes']:,} | {r['dense_bytes']:,} | "
                     f"{r['reference_bytes']:,} | {r['export_bytes']:,} | {r['export_over_reference']:.4f} |")
    if speed:
        lines += ["", f"Samples/s, one process, {threads} thread(s), scripted models taking turns (median over rounds "
                  "and range); `model` is the whole forward, `lookups` its embedding lookups alone:", "",
                  "| batch | part | model | samples/s | vs exported stock fp32 | vs TorchRec's quantised EBC |",
                  "|---:|---|---|---:|---:|---:|"]
        for r in speed:
            s, v = r["samples_per_s"], r["vs_stock_fp32"]
            tr = r.get("vs_torchrec")
            lines.append(f"| {r['batch_size']} | {r['part']} | {r['model']} | "
                         f"{s['median']:,.0f} ({s['min']:,.0f}-{s['max']:,.0f}) | "
                         f"{v['median']:.2f}x ({v['min']:.2f}-{v['max']:.2f}) | "
                         + (f"{tr['median']:.2f}x ({tr['min']:.2f}-{tr['max']:.2f}) vs {tr['model']}" if tr else "-")
                         + " |")
    path = os.path.join(out, "serve.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default=None, help="comma-separated tables= presets (default: all of conf/tables)")
    ap.add_argument("--steps", type=int, default=300, help="training steps of each run")
    ap.add_argument("--train", nargs="*", default=[], help="train.py overrides for every run (data, model...)")
    ap.add_argument("--batch-sizes", default="512,4096")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--iters", type=int, default=5, help="batches per model per round")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    ap.add_argument("--eager", action="store_true", help="time the modules as they are instead of scripted")
    ap.add_argument("--skip-speed", action="store_true", help="AUC and sizes only")
    ap.add_argument("--out", default="outputs/bench_serve")
    args = ap.parse_args(argv)
    presets = args.presets.split(",") if args.presets else table_presets()
    unknown = sorted(set(presets) - set(table_presets()))
    if unknown:
        ap.error(f"unknown presets {unknown}; presets: {table_presets()}")
    if not args.skip_speed and REFERENCE not in presets:
        ap.error(f"the speed comparison needs --presets to include {REFERENCE} (or --skip-speed)")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    prepared = prepare(presets, args.steps, args.train, args.out)
    auc = [auc_row(p, e) for p, e in prepared.items()]
    sizes = [size_row(p, e) for p, e in prepared.items()]
    speed = [] if args.skip_speed else speed_rows(prepared, [int(b) for b in args.batch_sizes.split(",")],
                                                   args.rounds, args.iters, args.eager)
    command = "python -m torchrec_shark.bench.serve " + " ".join(
        [f"--presets {','.join(presets)}", f"--steps {args.steps}", f"--batch-sizes {args.batch_sizes}",
         f"--rounds {args.rounds}", f"--iters {args.iters}", f"--threads {args.threads}"]
        + (["--eager"] if args.eager else []) + (["--skip-speed"] if args.skip_speed else [])
        + ([f"--train {' '.join(hydra_quote(t) for t in args.train)}"] if args.train else []))
    report = {"command": command, "auc": auc, "sizes": sizes, "speed": speed, "threads": args.threads}
    with open(os.path.join(args.out, "serve.json"), "w") as f:
        json.dump(report, f, indent=2)
    path = write_report(args.out, command, auc, sizes, speed, args.threads)
    print(open(path).read(), flush=True)
    return report


if __name__ == "__main__":
    main()
