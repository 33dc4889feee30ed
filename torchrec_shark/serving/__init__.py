"""Serving an exported model: ``load(path) -> nn.Module`` with ``forward(dense, kjt) -> scores``.

Imports torch, TorchRec and FBGEMM only (neither Hydra nor the training code), so a server needs nothing
else of this package. Tables are served in their trained representation: rows in their tier's precision
through FBGEMM's inference TBE (mixed-precision tables by one fused lookup over every tier of every table),
tensor-train tables from their cores.

The loaded model scripts with ``torch.jit.script`` (:func:`script`); the scripted module saves with
``torch.jit.save`` and runs from C++ (``torch::jit::load``) or a TorchServe-style server once FBGEMM's
operators are loaded (``import fbgemm_gpu`` in Python, its shared library in C++).

Example::

    from torchrec_shark import serving

    model = serving.load("outputs/base_export")          # checks version, sizes and checksums
    scores = model(dense, kjt)                           # [B] click probabilities
    torch.jit.save(serving.script(model), "model.pt")
"""

from __future__ import annotations

import torch

from torchrec_shark.serving.build import FileSource, build_model
from torchrec_shark.serving.format import FORMAT, VERSION, ExportError, read_manifest, verify_files
from torchrec_shark.serving.model import ServedDLRM

__all__ = ["FORMAT", "VERSION", "ExportError", "ServedDLRM", "load", "read_manifest", "script"]


def load(path: str, verify: bool = True) -> ServedDLRM:
    """The model exported to ``path``, in eval mode.

    Raises :class:`ExportError` for a directory that is not a complete export of this format version, or
    whose files do not have their recorded sizes or (``verify``, the default) SHA-256 checksums.
    """
    manifest = read_manifest(path)
    verify_files(path, manifest, checksums=verify)
    return build_model(manifest, FileSource(path, manifest))


def script(model: ServedDLRM) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of a loaded model (``forward`` and ``logits``)."""
    return torch.jit.script(model)
