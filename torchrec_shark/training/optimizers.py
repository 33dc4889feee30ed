"""Optimizer factories: fused sparse optimizers for tables, torch optimizers for dense parts.

Example::

    apply_embedding_optimizer(ebc, "rowwise_adagrad", lr=0.05)  # before DistributedModelParallel
    dense = dense_optimizer(dmp, "adam", lr=1e-3)
    opt = CombinedOptimizer([dmp.fused_optimizer, dense])
"""

from __future__ import annotations

from typing import Dict, Tuple, Type

import torch
from torch import nn
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from torchrec_shark.modules.base import SparseOptimizerSpec

_EMBEDDING: Dict[str, Tuple[Type[torch.optim.Optimizer], Dict]] = {
    "sgd": (torch.optim.SGD, {}),
    "adagrad": (torch.optim.Adagrad, {"eps": 1e-8}),
    "rowwise_adagrad": (RowWiseAdagrad, {"eps": 1e-8}),
    "adam": (torch.optim.Adam, {"eps": 1e-8}),
}
_DENSE: Dict[str, Type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "adam": torch.optim.Adam,
}


def apply_embedding_optimizer(module: nn.Module, name: str, lr: float) -> None:
    """Fuse the optimizer into the backward of a stock collection's tables (FBGEMM TBE does the update)."""
    cls, extra = _EMBEDDING[name]
    apply_optimizer_in_backward(cls, module.parameters(), {"lr": lr, **extra})


def sparse_optimizer_spec(name: str, lr: float) -> SparseOptimizerSpec:
    """The same choice for compressed tables, whose kernels apply it themselves."""
    return SparseOptimizerSpec(name=name, lr=lr)


def dense_optimizer(model: nn.Module, name: str, lr: float) -> KeyedOptimizerWrapper:
    """A keyed torch optimizer over every parameter not already updated in backward."""
    params = dict(in_backward_optimizer_filter(model.named_parameters()))
    cls = _DENSE[name]
    return KeyedOptimizerWrapper(params, lambda p: cls(p, lr=lr))
