"""The export directory: its manifest, its tensor files, their checksums, and the table representations.

An export (``python -m torchrec_shark.export``) is a directory::

    manifest.json          format, version, the model, every table's representation, every file's size and
                           SHA-256, where it came from (written last: an interrupted export has none)
    tables/<table>/*.bin   each table's tensors, raw little-endian, shapes and dtypes in the manifest
    dense/*.bin            the dense parameters (fp32, or fp16 when asked)
    data/                  the data transforms the model's inputs need (data_stats.json, ...), when the run had them

Table representations (``format`` of a table in the manifest):

* ``row_tiers``: rows in one or more tiers, each a pool of one precision (``fp32``, ``fp16``, ``int8``,
  ``int4``, ``int2``), most precise first, in the row layout of FBGEMM's inference TBE (integer rows: fp16
  scale, fp16 bias, then the packed codes). One tier: row ``r`` is pool row ``r``. Several: ``slot_map``
  (int32 per row) holds each row's global slot, tier 0's slots first, then tier 1's, ...
* ``tensor_train``: the cores ``(R_{k-1}, p_k, q_k, R_k)`` (row ``i`` uses slice ``i_k`` of core ``k``,
  ``i = ((i_1 p_2) + i_2) p_3 + ...``; column ``j = ((j_1 q_2) + j_2) q_3 + ...``) and, when the table kept
  an LFU cache, the cached rows (``cache_ids`` ascending, ``cache_rows`` fp32) that override the cores' rows.

Nothing here imports more than torch.

Example::

    manifest = read_manifest("outputs/base_export")       # ExportError naming what is wrong
    verify_files("outputs/base_export", manifest)
    weight = read_tensor("outputs/base_export", manifest["tables"][0]["tensors"]["fp32_rows"])
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict

import torch

FORMAT = "torchrec_shark.serving"
VERSION = 1
MANIFEST = "manifest.json"

ROW_TIERS = "row_tiers"
TENSOR_TRAIN = "tensor_train"
REPRESENTATIONS = (ROW_TIERS, TENSOR_TRAIN)

DTYPES: Dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "uint8": torch.uint8,
    "int32": torch.int32,
    "int64": torch.int64,
}
DTYPE_NAMES: Dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

_HASH_BLOCK = 1 << 23


class ExportError(ValueError):
    """An export directory that cannot be served: missing, incomplete, damaged, or of another version."""


def file_digest(path: str) -> str:
    """SHA-256 of a file, read a block at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(_HASH_BLOCK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def read_manifest(path: str) -> Dict[str, Any]:
    """The manifest of the export at ``path``; :class:`ExportError` when there is none, it does not parse, or
    it is of another format or version."""
    if not os.path.isdir(path):
        raise ExportError(f"{path!r} is not a directory (an export is the directory `torchrec_shark.export out=` wrote)")
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise ExportError(f"{path!r} is not a complete export: {MANIFEST} is missing (an export writes it last, so "
                          "the export was interrupted or this is another directory); export the run again")
    try:
        with open(manifest_path, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"{manifest_path} is damaged (not valid JSON: {e}); export the run again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{manifest_path} is not a manifest of format {FORMAT!r}")
    version = manifest.get("version")
    if version != VERSION:
        raise ExportError(f"{path!r} is an export of format version {version!r}; this package reads version "
                          f"{VERSION}: export the run again with this version")
    for key in ("model", "tables", "dense", "files"):
        if key not in manifest:
            raise ExportError(f"{manifest_path} has no {key!r} entry: damaged; export the run again")
    return manifest


def verify_files(path: str, manifest: Dict[str, Any], checksums: bool = True) -> None:
    """Every file the manifest lists exists with its recorded size and (``checksums``) SHA-256, and every
    tensor's file holds exactly its shape; :class:`ExportError` naming the first file that does not."""
    files = manifest["files"]
    for name, entry in files.items():
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            raise ExportError(f"export {path!r}: {name} is missing; export the run again")
        size = os.path.getsize(full)
        if size != entry["bytes"]:
            raise ExportError(f"export {path!r}: {name} has {size:,} bytes, the manifest records {entry['bytes']:,} "
                              "(truncated or replaced); export the run again")
        if checksums and file_digest(full) != entry["sha256"]:
            raise ExportError(f"export {path!r}: {name} does not match its SHA-256 in the manifest (damaged); "
                              "export the run again")
    for tensor in _tensor_entries(manifest):
        if tensor["file"] not in files:
            raise ExportError(f"export {path!r}: tensor file {tensor['file']} is not among the manifest's files")
        want = tensor_bytes(tensor)
        if want != files[tensor["file"]]["bytes"]:
            raise ExportError(f"export {path!r}: {tensor['file']} holds {files[tensor['file']]['bytes']:,} bytes "
                              f"for a tensor of shape {tensor['shape']} {tensor['dtype']} ({want:,} bytes)")


def _tensor_entries(manifest: Dict[str, Any]):
    for table in manifest["tables"]:
        yield from table["tensors"].values()
    yield from manifest["dense"]["tensors"].values()


def tensor_bytes(entry: Dict[str, Any]) -> int:
    n = 1
    for d in entry["shape"]:
        n *= int(d)
    return n * DTYPES[entry["dtype"]].itemsize


def read_tensor(path: str, entry: Dict[str, Any]) -> torch.Tensor:
    """The tensor a manifest entry (``file``, ``shape``, ``dtype``) describes, read into memory."""
    dtype = DTYPES[entry["dtype"]]
    shape = [int(d) for d in entry["shape"]]
    numel = 1
    for d in shape:
        numel *= d
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    mapped = torch.from_file(os.path.join(path, entry["file"]), shared=False, size=numel, dtype=dtype)
    return mapped.clone().view(shape)


def read_into(path: str, entry: Dict[str, Any], dest: torch.Tensor) -> None:
    """Copy the bytes of a manifest entry's file into ``dest`` (a uint8 tensor of exactly that many bytes)."""
    size = tensor_bytes(entry)
    if dest.numel() != size or dest.dtype != torch.uint8:
        raise ExportError(f"{entry['file']}: {size} bytes for a destination of {dest.numel()} {dest.dtype}")
    if size:
        dest.copy_(torch.from_file(os.path.join(path, entry["file"]), shared=False, size=size, dtype=torch.uint8))
