"""The served model's own layers."""

import torch


def test_the_served_interaction_equals_torchrec_s():
    from torchrec.models.dlrm import InteractionArch

    from torchrec_shark.serving.model import ServedInteraction

    dense, sparse = torch.randn(7, 4), torch.randn(7, 5, 4)
    want = InteractionArch(num_sparse_features=5)(dense, sparse)
    assert torch.equal(ServedInteraction(5)(dense, sparse), want)
    assert torch.equal(torch.jit.script(ServedInteraction(5))(dense, sparse), want)
