"""DLRM's pairwise interaction, its upper triangle read with one ``index_select``.

:class:`TriangleInteraction` computes what TorchRec's ``InteractionArch`` computes, bit for bit, forward and
backward: the dense output and the dot products of every pair of (dense, sparse) vectors above the diagonal.
TorchRec takes the triangle with a two-tensor advanced index, whose backward is an accumulating
``index_put_``; one ``index_select`` over the flattened products reads the same values and its backward is a
plain scatter, several times faster on CPU, where the interaction is a large share of a DLRM step. Each
product is read once, so no gradient is a sum in another order.

Example::

    inter = TriangleInteraction(num_sparse_features=26)
    out = inter(dense, sparse)      # [B, D + F + F * (F - 1) / 2] for dense [B, D], sparse [B, F, D]
"""

import torch
from torchrec.models.dlrm import InteractionArch


class TriangleInteraction(InteractionArch):
    """TorchRec's ``InteractionArch`` with the upper triangle taken by one ``index_select`` (see the module doc)."""

    def __init__(self, num_sparse_features: int) -> None:
        super().__init__(num_sparse_features)
        n = num_sparse_features + 1
        self.register_buffer("flat_triu", self.triu_indices[0] * n + self.triu_indices[1], persistent=False)

    def forward(self, dense_features: torch.Tensor, sparse_features: torch.Tensor) -> torch.Tensor:
        if self.F <= 0:
            return dense_features
        combined = torch.cat((dense_features.unsqueeze(1), sparse_features), dim=1)
        interactions = torch.bmm(combined, torch.transpose(combined, 1, 2))
        return torch.cat((dense_features, interactions.flatten(1).index_select(1, self.flat_triu)), dim=1)
