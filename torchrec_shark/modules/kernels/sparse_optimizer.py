"""Fused sparse optimizers over row-indexed state, applied to the rows a batch touched.

The update rules are FBGEMM TBE's (``EXACT_SGD``, ``EXACT_ADAGRAD``,
``EXACT_ROWWISE_ADAGRAD``, ``ADAM`` with L2 weight decay folded into the gradient for the
Adagrads), so an fp32 table trained here matches a stock table trained by TBE.

State tensors are indexed by *row id* (never by storage slot): a row that moves between
precision tiers keeps its state without any copy, and a row-wise shard's state is a slice.

Example::

    opt = RowOptimizer(SparseOptimizerSpec("rowwise_adagrad", lr=0.05), num_rows=1000, dim=64)
    new_w = opt.update(rows, w, g)   # rows: unique int64 [U]; w, g: fp32 [U, D]
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Union

import torch
from torch import nn

from torchrec_shark.modules.base import SparseOptimizerSpec
from torchrec_shark.modules.buffer_source import allocate

OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam")


class RowOptimizer(nn.Module):
    """Optimizer state as buffers (so it is part of the owning table's ``state_dict``).

    ``lr`` is a plain attribute: the collection's ``KeyedOptimizer`` pushes its param group's
    ``lr`` here, so TorchRec/torch LR schedulers work as with TBE.
    """

    def __init__(self, spec: SparseOptimizerSpec, num_rows: int, dim: int, device: Optional[torch.device] = None) -> None:
        super().__init__()
        if spec.name not in OPTIMIZERS:
            raise ValueError(f"sparse optimizer {spec.name!r} is not one of {OPTIMIZERS}")
        self.spec = spec
        self.lr = float(spec.lr)
        # Not persistent: optimizer state belongs to the fused optimizer's state dict (as with TBE),
        # not to the module's, so a table's state dict has the same keys whatever the optimizer.
        for name, (shape, dtype) in self.state_shapes(spec, num_rows, dim).items():
            role = ("rows",) if shape else ("scalar",)
            self.register_buffer(name, allocate(name, shape, dtype, device, role), persistent=False)

    @classmethod
    def over(cls, spec: SparseOptimizerSpec, lr: float, state: Dict[str, torch.Tensor]) -> "RowOptimizer":
        """An optimizer whose state is the given tensors (e.g. a fused store's, every member's rows at once)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.spec, self.lr = spec, float(lr)
        for name, value in state.items():
            self.register_buffer(name, value, persistent=False)
        return self

    @staticmethod
    def state_shapes(spec: SparseOptimizerSpec, num_rows: int, dim: int) -> Dict[str, tuple]:
        """``{name: (shape, dtype)}`` of the state ``spec`` keeps for ``num_rows`` rows of ``dim`` values."""
        if spec.name == "adagrad":
            return {"momentum1": ((num_rows, dim), torch.float32)}
        if spec.name == "rowwise_adagrad":
            return {"momentum1": ((num_rows,), torch.float32)}
        if spec.name == "adam":
            return {"exp_avg": ((num_rows, dim), torch.float32), "exp_avg_sq": ((num_rows, dim), torch.float32),
                    "iter": ((), torch.int64)}
        return {}

    @staticmethod
    def state_bytes(spec: SparseOptimizerSpec, num_rows: int, dim: int) -> int:
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in RowOptimizer.state_shapes(spec, num_rows, dim).values())

    def state(self) -> Dict[str, torch.Tensor]:
        """The live state tensors by name (the same objects as the buffers)."""
        return dict(self.named_buffers())

    def state_rows(self, rows: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Per-row state (row-indexed tensors only) for ``rows``."""
        return {k: v.index_select(0, rows) for k, v in self.named_buffers() if v.dim() > 0}

    def load_state_rows(self, rows: torch.Tensor, state: Dict[str, torch.Tensor]) -> None:
        for k, v in self.named_buffers():
            if v.dim() > 0:
                v.index_copy_(0, rows, state[k].to(v))

    @torch.no_grad()
    def update(self, rows: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """New values of ``rows`` (unique) given their values ``w`` and summed gradients ``g``."""
        t = None
        if self.spec.name == "adam":
            self.iter += 1
            t = int(self.iter)
        return self.rule(rows, w, g, t)

    @torch.no_grad()
    def rule(self, rows: torch.Tensor, w: torch.Tensor, g: torch.Tensor,
             t: Union[int, torch.Tensor, None] = None) -> torch.Tensor:
        """The update rule on ``rows`` (updating their state); ``t``: Adam's step, an int or one per row
        (``[U]``: rows of tables at different steps, as a fused store's members may be)."""
        spec, lr = self.spec, self.lr
        wd = spec.weight_decay
        if spec.name == "sgd":
            if wd:
                g = g + wd * w
            return w - lr * g
        if spec.name == "rowwise_adagrad":
            if wd:
                g = g + wd * w
            m = self.momentum1.index_select(0, rows) + g.square().mean(dim=1)
            self.momentum1.index_copy_(0, rows, m)
            return torch.addcmul(w, g, (-lr / (m.sqrt() + spec.eps)).unsqueeze(1))
        if spec.name == "adagrad":
            if wd:
                g = g + wd * w
            m = self.momentum1.index_select(0, rows).addcmul_(g, g)
            self.momentum1.index_copy_(0, rows, m)
            return torch.addcdiv(w, g, m.sqrt_().add_(spec.eps), value=-lr)
        # adam (FBGEMM's: bias-corrected moments, decoupled weight decay)
        m1 = self.exp_avg.index_select(0, rows).lerp_(g, 1 - spec.beta1)
        m2 = self.exp_avg_sq.index_select(0, rows).mul_(spec.beta2).addcmul_(g, g, value=1 - spec.beta2)
        self.exp_avg.index_copy_(0, rows, m1)
        self.exp_avg_sq.index_copy_(0, rows, m2)
        if isinstance(t, torch.Tensor):
            t = t.to(torch.float64)
            c1 = (1 - torch.pow(spec.beta1, t)).to(m1.dtype).unsqueeze(1)
            c2 = (1 - torch.pow(spec.beta2, t)).to(m2.dtype).unsqueeze(1)
        else:
            c1, c2 = 1 - spec.beta1**t, 1 - spec.beta2**t
        denom = (m2 / c2).sqrt_().add_(spec.eps)
        upd = (m1 / c1).div_(denom)
        if wd:
            upd = upd + wd * w
        return w - lr * upd
