"""Export a finished run as an inference model: ``python -m torchrec_shark.export run_dir=RUN out=DIR``.

Reads the checkpoint a run reference names (``<run_dir>``: its latest, ``<run_dir>@best``: its best), saved
under any sharding, and writes the directory :func:`torchrec_shark.serving.load` reads (layout:
:mod:`torchrec_shark.serving.format`):

* every table in its trained representation, through its kind
  (:meth:`~torchrec_shark.modules.table_kind.TableKind.export_serving`), a table at a time and each table a
  chunk of rows at a time, straight from the checkpoint into its files: rows stay in their tier's precision
  (nothing is re-quantised), tensor-train tables stay cores (``materialize_max_rows=N``: tables of at most N
  rows become fp32 rows);
* the dense parameters in fp32 (``dense_dtype=fp16``: stored in fp16, computed in fp32);
* the model's shape, the table configs, the data config and evaluation settings of the run, and its data
  transforms (``data_stats.json`` and the id counts, when the run has them);
* no optimizer state, priorities or training counters;
* ``manifest.json`` last, with a format version and every file's size and SHA-256: an interrupted export
  has none, and a damaged or truncated file fails to load with an error naming it.

The export is written to ``<out>.tmp-<pid>`` and renamed to ``out`` when complete; an existing ``out`` is
refused unless ``overwrite=true``. Its own Hydra run dir gets ``export.json`` (what was written, sizes,
seconds) and ``export.log``.

Example::

    python -m torchrec_shark.export run_dir=outputs/base@best out=outputs/base_export
    python -m torchrec_shark.export run_dir=outputs/tt out=outputs/tt_export materialize_max_rows=200000
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from hydra.core.config_store import ConfigStore

from torchrec_shark.modules.table_kind import ServingOptions, ServingSink
from torchrec_shark.serving.format import DTYPE_NAMES, FORMAT, MANIFEST, VERSION, ExportError, file_digest

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "serving")
DENSE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
DATA_FILES = ("data_stats.json", "data_id_counts.npz")
_COLLECTION = "embedding_bag_collection."


@dataclass
class ExportConfig:
    """``conf/export.yaml``: which run to export, where to, and how."""

    run_dir: str = "???"  # <run_dir> (latest checkpoint) or <run_dir>@best
    out: str = "???"  # the export directory
    dense_dtype: str = "fp32"  # fp32 | fp16: how the dense parameters are stored (computed in fp32)
    materialize_max_rows: int = 0  # tensor-train tables of at most this many rows are written as fp32 rows
    overwrite: bool = False  # replace an existing export at `out`


def register_configs() -> None:
    ConfigStore.instance().store(name="export_schema", node=ExportConfig)


class FileSink(ServingSink):
    """Tensors of one table as files under ``<root>/<folder>/``, each mapped into memory while it is written
    (the pages go to the file, not to this process's heap)."""

    def __init__(self, root: str, folder: str) -> None:
        self.root, self.folder = root, folder
        self.entries: Dict[str, Dict] = {}
        os.makedirs(os.path.join(root, folder), exist_ok=True)

    def tensor(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        if name in self.entries:
            raise ValueError(f"{self.folder}: serving tensor {name!r} written twice")
        shape = [int(n) for n in shape]
        numel = 1
        for n in shape:
            numel *= n
        rel = f"{self.folder}/{name}.bin"
        with open(os.path.join(self.root, rel), "wb") as f:
            f.truncate(numel * dtype.itemsize)
        self.entries[name] = {"file": rel, "shape": shape, "dtype": DTYPE_NAMES[dtype]}
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.from_file(os.path.join(self.root, rel), shared=True, size=numel, dtype=dtype).view(shape)


def _prefixes(checkpoint: str, names: Sequence[str]) -> Dict[str, str]:
    """``{table: checkpoint key prefix of its state}`` and ``""``: the prefix of the model the tables are in."""
    from torchrec_shark.training.checkpoint import checkpoint_tensor_shapes

    keys = list(checkpoint_tensor_shapes(checkpoint, prefix="model."))
    out: Dict[str, str] = {}
    for name in names:
        mark = f"{_COLLECTION}embedding_bags.{name}."
        found = next((k for k in keys if mark in k), None)
        if found is None:
            raise ExportError(f"checkpoint {checkpoint} holds no state of table {name!r}")
        out[name] = "model." + found[: found.index(mark) + len(mark)]
        out[""] = "model." + found[: found.index(_COLLECTION)]
    return out


def _dense_keys(checkpoint: str, model_prefix: str) -> List[str]:
    """The dense parameters of the model (relative to its prefix): everything but the tables."""
    from torchrec_shark.training.checkpoint import checkpoint_tensor_shapes

    inner = model_prefix[len("model."):]
    return sorted(k[len(inner):] for k in checkpoint_tensor_shapes(checkpoint, prefix="model.")
                  if k.startswith(inner) and not k[len(inner):].startswith(_COLLECTION))


def export_run(run: str, out: str, dense_dtype: str = "fp32", materialize_max_rows: int = 0,
               overwrite: bool = False, log: Callable[[str], None] = print) -> Dict:
    """Export the checkpoint ``run`` names (``<run_dir>`` or ``<run_dir>@best``) to ``out``; returns the
    manifest. Raises :class:`~torchrec_shark.serving.ExportError` for an ``out`` that exists (unless
    ``overwrite``) and :class:`~torchrec_shark.training.checkpoint.CheckpointError` for a run without one."""
    from omegaconf import OmegaConf

    from torchrec_shark.data import build_dataset
    from torchrec_shark.distributed.state_readers import CheckpointStateReader
    from torchrec_shark.modules.kinds import kind_of
    from torchrec_shark.training.checkpoint import read_meta
    from torchrec_shark.training.run_ref import resolve_run
    from torchrec_shark.training.table_factory import build_table_configs

    if dense_dtype not in DENSE_DTYPES:
        raise ExportError(f"dense_dtype={dense_dtype!r} must be one of {list(DENSE_DTYPES)}")
    if materialize_max_rows < 0:
        raise ExportError(f"materialize_max_rows={materialize_max_rows} must be >= 0")
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise ExportError(f"{out} already exists: choose another out= or pass overwrite=true")
    t0 = time.perf_counter()
    ref = resolve_run(run)
    cfg = ref.config()
    dataset = build_dataset(cfg.data)
    configs = build_table_configs(cfg.tables, dataset.feature_names, dataset.num_embeddings_per_feature)
    meta = read_meta(ref.checkpoint)
    metrics = ref.metrics() or {}
    prefixes = _prefixes(ref.checkpoint, [c.name for c in configs])
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        tables = []
        options = ServingOptions(materialize_max_rows=materialize_max_rows)
        for c in configs:
            kind = kind_of(c)
            sink = FileSink(tmp, f"tables/{c.name}")
            reader = CheckpointStateReader(ref.checkpoint, prefixes[c.name])
            description = kind.export_serving(c, reader, sink, options)
            tables.append({"name": c.name, "kind": kind.name, "features": list(c.feature_names),
                           "num_embeddings": int(c.num_embeddings), "embedding_dim": int(c.embedding_dim),
                           "pooling": "mean" if c.pooling.value == "MEAN" else "sum",
                           **description, "tensors": sink.entries})
            size = sum(os.path.getsize(os.path.join(tmp, e["file"])) for e in sink.entries.values())
            log(f"{c.name}: {kind.describe(c)} -> {description['format']} ({size:,} bytes)")
        dense = _export_dense(ref.checkpoint, prefixes[""], tmp, DENSE_DTYPES[dense_dtype])
        data_files = []
        for name in DATA_FILES:
            if os.path.isfile(ref.path(name)):
                os.makedirs(os.path.join(tmp, "data"), exist_ok=True)
                shutil.copyfile(ref.path(name), os.path.join(tmp, "data", name))
                data_files.append(f"data/{name}")
        files = _file_records(tmp)
        table_files = {e["file"] for t in tables for e in t["tensors"].values()}
        dense_files = {e["file"] for e in dense.values()}
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "model": {
                "feature_names": [f for c in configs for f in c.feature_names],
                "feature_widths": {f: int(c.embedding_dim) for c in configs for f in c.feature_names},
                "dense_in_features": int(dataset.num_dense),
                "dense_arch_layer_sizes": [*cfg.model.dense_arch_layer_sizes, cfg.model.interaction_dim],
                "over_arch_layer_sizes": list(cfg.model.over_arch_layer_sizes),
                "projection": cfg.model.projection,
                "is_weighted": False,
            },
            "tables": tables,
            "dense": {"dtype": DTYPE_NAMES[DENSE_DTYPES[dense_dtype]], "tensors": dense},
            "data": {"config": OmegaConf.to_container(OmegaConf.structured(cfg.data), resolve=True),
                     "files": data_files,
                     "eval": {"batch_size": cfg.trainer.batch_size, "eval_batches": cfg.trainer.eval_batches}},
            "source": {"run": ref.spec, "checkpoint": os.path.abspath(ref.checkpoint), "step": meta.get("step"),
                       "val_auc": metrics.get("val_auc"), "val_logloss": metrics.get("val_logloss"),
                       "world_size": metrics.get("world_size")},
            "bytes": {"tables": sum(files[f]["bytes"] for f in table_files),
                      "dense": sum(files[f]["bytes"] for f in dense_files),
                      "data": sum(files[f]["bytes"] for f in data_files),
                      "total": sum(r["bytes"] for r in files.values())},
            "files": files,
        }
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(out):
            aside = f"{out}.replaced-{os.getpid()}"
            os.rename(out, aside)
            os.rename(tmp, out)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    b = manifest["bytes"]
    log(f"exported {ref.spec} (step {meta.get('step')}) to {out} in {time.perf_counter() - t0:.1f} s: tables "
        f"{b['tables']:,} bytes, dense {b['dense']:,}, data {b['data']:,}, total {b['total']:,}")
    return manifest


def _export_dense(checkpoint: str, model_prefix: str, root: str, dtype: torch.dtype) -> Dict[str, Dict]:
    from torchrec_shark.distributed.state_readers import CheckpointStateReader

    reader = CheckpointStateReader(checkpoint, model_prefix)
    sink = FileSink(root, "dense")
    out = {}
    for key in _dense_keys(checkpoint, model_prefix):
        value = reader.read(key)
        if not value.is_floating_point():
            continue  # counters and the like: nothing a forward reads
        sink.tensor(key, value.shape, dtype).copy_(value.to(dtype))
        out[key] = sink.entries[key]
    return out


def _file_records(root: str) -> Dict[str, Dict]:
    """``{relative path: {bytes, sha256}}`` of every file under ``root``, each written to disk first."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in sorted(names):
            path = os.path.join(folder, name)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            out[rel] = {"bytes": os.path.getsize(path), "sha256": file_digest(path)}
    return dict(sorted(out.items()))


register_configs()


def _hydra_main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig, OmegaConf

    from torchrec_shark.cli import job, run_hydra_app

    found = os.path.isfile(os.path.join(CONF_DIR, "export.yaml"))

    @hydra.main(version_base="1.3", config_path=CONF_DIR if found else None,
                config_name="export" if found else "export_schema")
    @job
    def main(dcfg: DictConfig) -> None:
        from torchrec_shark.config import ConfigError, check_known_keys
        from torchrec_shark.training import checkpoint as ckpt
        from torchrec_shark.training.job_log import setup_job_logging

        out_dir = HydraConfig.get().runtime.output_dir
        setup_job_logging(out_dir, "export.log")
        t0 = time.perf_counter()
        try:
            check_known_keys(dcfg, ExportConfig)
            cfg: ExportConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
            print(f"export: run dir {out_dir} (report: {os.path.join(out_dir, 'export.json')}); reads run "
                  f"{cfg.run_dir}; writes {os.path.abspath(cfg.out)}", flush=True)
            manifest = export_run(cfg.run_dir, cfg.out, cfg.dense_dtype, cfg.materialize_max_rows, cfg.overwrite,
                                  log=lambda m: print(m, flush=True))
        except (ExportError, ConfigError, ckpt.CheckpointError, FileNotFoundError) as e:
            print(f"export: error: {e}", file=sys.stderr)
            sys.exit(2)
        report = {"out": os.path.abspath(cfg.out), "source": manifest["source"], "bytes": manifest["bytes"],
                  "tables": {t["name"]: {"kind": t["kind"], "format": t["format"]} for t in manifest["tables"]},
                  "seconds": time.perf_counter() - t0}
        with open(os.path.join(out_dir, "export.json"), "w") as f:
            json.dump(report, f, indent=2)

    run_hydra_app(main, ExportConfig, prog="export")


if __name__ == "__main__":
    _hydra_main()
