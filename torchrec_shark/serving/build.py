"""From table representations (an export's manifest, or a kind's in-memory representation) to lookups and the
served model.

Tables are grouped into as few lookups as their representations allow: every one-tier table in one
:class:`~torchrec_shark.serving.lookups.DirectRows`, the tiered tables of each width in one
:class:`~torchrec_shark.serving.lookups.TieredRows`, each tensor-train table in its own lookup.

Example::

    lookups, features = build_lookups(manifest["tables"], FileSource(path))
    model = build_model(manifest, FileSource(path))
"""

from __future__ import annotations

import abc
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from torchrec_shark.serving.format import REPRESENTATIONS, ROW_TIERS, TENSOR_TRAIN, ExportError, read_into, read_tensor
from torchrec_shark.serving.lookups import DirectRows, RowTable, TensorTrainRows, TieredRows, TieredTable
from torchrec_shark.serving.model import ServedDLRM


class TensorSource(abc.ABC):
    """Where the tensors of table representations come from."""

    @abc.abstractmethod
    def tensor(self, table: Dict[str, Any], name: str) -> torch.Tensor:
        """Tensor ``name`` of ``table``'s representation."""

    def bytes_into(self, table: Dict[str, Any], name: str, dest: torch.Tensor) -> None:
        """Copy tensor ``name``'s bytes into ``dest`` (uint8 of the same number of bytes)."""
        t = self.tensor(table, name).contiguous()
        dest.copy_(t.reshape(-1).view(torch.uint8) if t.dtype != torch.uint8 else t.reshape(-1))

    def dense(self, name: str) -> torch.Tensor:
        raise NotImplementedError


class FileSource(TensorSource):
    """The tensor files of an export directory (as its manifest lists them)."""

    def __init__(self, path: str, manifest: Dict[str, Any]) -> None:
        self.path, self.manifest = path, manifest

    def _entry(self, table: Dict[str, Any], name: str) -> Dict[str, Any]:
        try:
            return table["tensors"][name]
        except KeyError:
            raise ExportError(f"table {table['name']!r}: no tensor {name!r} in the manifest") from None

    def tensor(self, table, name):
        return read_tensor(self.path, self._entry(table, name))

    def bytes_into(self, table, name, dest):
        read_into(self.path, self._entry(table, name), dest)

    def dense(self, name):
        return read_tensor(self.path, self.manifest["dense"]["tensors"][name])


class MemorySource(TensorSource):
    """Tensors in memory, ``{table name: {tensor name: tensor}}``."""

    def __init__(self, tensors: Dict[str, Dict[str, torch.Tensor]]) -> None:
        self.tensors = tensors

    def tensor(self, table, name):
        return self.tensors[table["name"]][name]


def _check(table: Dict[str, Any]) -> None:
    fmt = table.get("format")
    if fmt not in REPRESENTATIONS:
        raise ExportError(f"table {table.get('name')!r}: representation {fmt!r} is not served "
                          f"(known: {list(REPRESENTATIONS)})")


def build_lookups(tables: List[Dict[str, Any]], source: TensorSource) -> Tuple[List[nn.Module], List[List[str]]]:
    """The lookups of ``tables`` (each a representation with ``name``, ``features``, ``num_embeddings``,
    ``embedding_dim``) filled from ``source``, and the features each one serves, in order."""
    for t in tables:
        _check(t)
    direct = [t for t in tables if t["format"] == ROW_TIERS and not t.get("slot_map")]
    tiered = [t for t in tables if t["format"] == ROW_TIERS and t.get("slot_map")]
    tt = [t for t in tables if t["format"] == TENSOR_TRAIN]
    lookups: List[nn.Module] = []
    features: List[List[str]] = []
    if direct:
        for t in direct:
            if len(t["tiers"]) != 1:
                raise ExportError(f"table {t['name']!r}: {len(t['tiers'])} tiers without a slot map")
        pools = [RowTable(t["name"], int(t["num_embeddings"]), int(t["embedding_dim"]), t["tiers"][0]["precision"],
                          len(t["features"])) for t in direct]
        lookup = DirectRows(pools)
        for i, t in enumerate(direct):
            source.bytes_into(t, t["tiers"][0]["tensor"], lookup.table_bytes(i))
        lookups.append(lookup)
        features.append([f for t in direct for f in t["features"]])
    for dim in dict.fromkeys(int(t["embedding_dim"]) for t in tiered):
        group = [t for t in tiered if int(t["embedding_dim"]) == dim]
        specs = [TieredTable(t["name"], int(t["num_embeddings"]), dim,
                             [(tier["precision"], int(tier["rows"])) for tier in t["tiers"]], len(t["features"]))
                 for t in group]
        lookup = TieredRows(specs)
        for i, t in enumerate(group):
            for k, tier in enumerate(t["tiers"]):
                source.bytes_into(t, tier["tensor"], lookup.table_bytes(i, k))
            slots = source.tensor(t, t["slot_map"])
            if slots.numel() != int(t["num_embeddings"]):
                raise ExportError(f"table {t['name']!r}: a slot map of {slots.numel()} rows for "
                                  f"{t['num_embeddings']} rows")
            try:
                lookup.set_slots(i, slots)
            except ValueError as e:
                raise ExportError(str(e)) from e
        lookups.append(lookup)
        features.append([f for t in group for f in t["features"]])
    for t in tt:
        cores = [source.tensor(t, name) for name in t["cores"]]
        cache = t.get("cache")
        lookups.append(TensorTrainRows(
            t["name"], int(t["num_embeddings"]), cores, len(t["features"]),
            source.tensor(t, cache["ids"]) if cache else None, source.tensor(t, cache["rows"]) if cache else None))
        features.append(list(t["features"]))
    return lookups, features


def build_model(manifest: Dict[str, Any], source: TensorSource) -> ServedDLRM:
    """The served model of a manifest, its tables and dense parameters from ``source``."""
    m = manifest["model"]
    tables = manifest["tables"]
    lookups, features = build_lookups(tables, source)
    mean = [f for t in tables if t.get("pooling", "sum") == "mean" for f in t["features"]]
    model = ServedDLRM(
        feature_names=list(m["feature_names"]),
        widths=[int(m["feature_widths"][f]) for f in m["feature_names"]],
        dense_in_features=int(m["dense_in_features"]),
        dense_arch_layer_sizes=[int(x) for x in m["dense_arch_layer_sizes"]],
        over_arch_layer_sizes=[int(x) for x in m["over_arch_layer_sizes"]],
        projection=m["projection"],
        lookups=lookups,
        lookup_features=features,
        mean_features=mean,
        is_weighted=bool(m.get("is_weighted", False)),
    )
    model.load_dense({name: source.dense(name) for name in manifest["dense"]["tensors"]})
    return model.eval()
