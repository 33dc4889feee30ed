"""DLRM whose fields may have different embedding widths.

Follows ``torchrec.models.dlrm.DLRM`` (dense arch -> pairwise dot interaction -> over arch)
and reuses its ``DenseArch`` and ``OverArch`` (the interaction is ``InteractionArch``'s, bit for bit, read faster:
:mod:`~torchrec_shark.models.interaction`). The sparse side differs
in two ways the compression passes need:

- every pooled field embedding whose width differs from ``interaction_dim`` goes through
  its own learned projection (``projection="linear"``) or is zero-padded (``"zero_pad"``);
- the model can be split at the pooled embeddings (:meth:`DLRM.embed` then
  :meth:`DLRM.predict`), so importance and saliency are taken there for any table kind
  and under any sharding.

Example::

    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t_a", embedding_dim=8,
                                 num_embeddings=100, feature_names=["a"])])
    model = DLRM(ebc, dense_in_features=13, dense_arch_layer_sizes=[64, 32],
                 over_arch_layer_sizes=[64, 1], interaction_dim=32)
    logits = model(dense, kjt)  # [B]
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DenseArch, OverArch
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_shark.models.interaction import TriangleInteraction


def feature_widths(ebc: EmbeddingBagCollectionInterface) -> Dict[str, int]:
    """Pooled width of every feature, in config order."""
    return {f: t.embedding_dim for t in ebc.embedding_bag_configs() for f in t.feature_names}


class FieldProjection(nn.Module):
    """Maps each field's pooled embedding to the interaction width."""

    def __init__(self, widths: Dict[str, int], interaction_dim: int, kind: str = "linear") -> None:
        super().__init__()
        if kind not in ("linear", "zero_pad"):
            raise ValueError(f"projection={kind!r} must be 'linear' or 'zero_pad'")
        self.kind = kind
        self.interaction_dim = interaction_dim
        self.feature_names: List[str] = list(widths)
        self.proj = nn.ModuleDict()
        for f, w in widths.items():
            if w == interaction_dim:
                continue
            if kind == "zero_pad" and w > interaction_dim:
                raise ValueError(f"feature {f!r}: width {w} > interaction_dim {interaction_dim} cannot be zero-padded")
            if kind == "linear":
                self.proj[f] = nn.Linear(w, interaction_dim, bias=False)

    def forward(self, pooled: Dict[str, torch.Tensor]) -> torch.Tensor:
        out = []
        for f in self.feature_names:
            e = pooled[f]
            if e.shape[1] != self.interaction_dim:
                if self.kind == "linear":
                    e = self.proj[f](e)
                else:
                    e = nn.functional.pad(e, (0, self.interaction_dim - e.shape[1]))
            out.append(e)
        return torch.stack(out, dim=1)  # [B, F, D]


class DLRM(nn.Module):
    """DLRM over an embedding-bag collection with per-field widths.

    Args:
        embedding_bag_collection: stock or compressed collection (KJT in, KeyedTensor out).
        dense_in_features: number of dense features.
        dense_arch_layer_sizes: bottom MLP; its last size is the interaction width.
        over_arch_layer_sizes: top MLP; must end in 1.
        projection: ``linear`` or ``zero_pad`` for fields narrower than the interaction width.
    """

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollectionInterface,
        dense_in_features: int,
        dense_arch_layer_sizes: List[int],
        over_arch_layer_sizes: List[int],
        projection: str = "linear",
        dense_device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        interaction_dim = dense_arch_layer_sizes[-1]
        if over_arch_layer_sizes[-1] != 1:
            raise ValueError(f"over_arch_layer_sizes must end in 1, got {over_arch_layer_sizes}")
        widths = feature_widths(embedding_bag_collection)
        self.feature_names = list(widths)
        num_f = len(self.feature_names)
        self.embedding_bag_collection = embedding_bag_collection
        self.projection = FieldProjection(widths, interaction_dim, projection).to(dense_device)
        self.dense_arch = DenseArch(dense_in_features, dense_arch_layer_sizes, device=dense_device)
        self.inter_arch = TriangleInteraction(num_f)
        over_in = interaction_dim + num_f * (num_f + 1) // 2
        self.over_arch = OverArch(over_in, over_arch_layer_sizes, device=dense_device)

    def embed(self, sparse_features: KeyedJaggedTensor) -> Dict[str, torch.Tensor]:
        """Pooled embedding per feature (sharded KeyedTensors are keyed, never positional)."""
        return self.embedding_bag_collection(sparse_features).to_dict()

    def predict(self, dense_features: torch.Tensor, pooled: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits ``[B]`` from dense features and pooled field embeddings."""
        dense = self.dense_arch(dense_features)
        sparse = self.projection(pooled)
        return self.over_arch(self.inter_arch(dense, sparse)).squeeze(-1)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        return self.predict(dense_features, self.embed(sparse_features))


class DLRMTrain(nn.Module):
    """Loss wrapper in the shape ``TrainPipelineSparseDist`` expects: ``(loss, (loss, logits, labels))``.

    When the collection's tables read labels (its ``label_aware``: mixed-precision tables), the
    training step hands it the batch's labels through ``record_labels`` before the lookup.
    """

    def __init__(self, model: DLRM) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = nn.BCEWithLogitsLoss()

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        ebc = self.model.embedding_bag_collection
        if self.training and getattr(ebc, "label_aware", False):  # a stock EmbeddingBagCollection has none
            ebc.record_labels(batch.sparse_features, batch.labels)
        logits = self.model(batch.dense_features, batch.sparse_features)
        loss = self.loss_fn(logits, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)
