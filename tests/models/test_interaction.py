"""The interaction computes TorchRec's InteractionArch bit for bit, forward and backward, eager and scripted."""

import pytest
import torch
from torchrec.models.dlrm import InteractionArch

from torchrec_shark.models.interaction import TriangleInteraction


@pytest.mark.parametrize("num_sparse", [1, 5, 26])
def test_triangle_interaction_is_torchrec_s_forward_and_backward(num_sparse):
    g = torch.Generator().manual_seed(num_sparse)
    dense = torch.randn(7, 4, generator=g)
    sparse = torch.randn(7, num_sparse, 4, generator=g)
    outputs, grads = [], []
    for module in (InteractionArch(num_sparse_features=num_sparse), TriangleInteraction(num_sparse)):
        d, s = dense.clone().requires_grad_(), sparse.clone().requires_grad_()
        out = module(d, s)
        out.backward(torch.arange(out.numel(), dtype=torch.float32).view_as(out).sin())
        outputs.append(out.detach())
        grads.append((d.grad, s.grad))
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert torch.equal(torch.jit.script(TriangleInteraction(num_sparse))(dense, sparse), outputs[0])
