"""The served model: DLRM's dense arch, interaction and over arch (TorchRec's own modules; the interaction as
training computes it, :class:`~torchrec_shark.models.interaction.TriangleInteraction`) over the exported
tables' lookups; ``forward(dense, kjt) -> scores``. It scripts with ``torch.jit.script``.

Example::

    model = torchrec_shark.serving.load("outputs/base_export")
    scores = model(dense, kjt)              # [B] probabilities
    logits = model.logits(dense, kjt)       # [B]
"""


from typing import List

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.models.dlrm import DenseArch, OverArch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_shark.models.interaction import TriangleInteraction


class ZeroPad(nn.Module):
    """A narrower field padded with zeros to the interaction width (``model.projection=zero_pad``)."""

    def __init__(self, extra: int) -> None:
        super().__init__()
        self.extra = extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, [0, self.extra])


class ServedDLRM(nn.Module):
    """Scores of DLRM from dense features and a ``KeyedJaggedTensor`` of ids, over exported tables.

    Args:
        feature_names: the model's features in its interaction order.
        widths: the pooled width of each of them.
        dense_in_features, dense_arch_layer_sizes, over_arch_layer_sizes: the MLPs (the dense arch ends at the
            interaction width).
        projection: ``linear`` or ``zero_pad`` for a field narrower than the interaction width.
        lookups: the tables' lookups (:mod:`~torchrec_shark.serving.lookups`), each returning one pooled tensor per
            feature of ``lookup_features``.
        mean_features: features of tables that pool by MEAN (sums divided by the bag lengths).
        is_weighted: the ids carry per-id weights (the KJT's ``weights()``).

    The input KJT may hold more features than the model reads and in any order: it is permuted to the
    lookups' order once per call when its keys differ.
    """

    feature_names: List[str]
    lookup_order: List[str]
    group_sizes: List[int]
    from_lookup: List[int]
    mean_positions: List[int]
    is_weighted: bool

    def __init__(self, feature_names: List[str], widths: List[int], dense_in_features: int,
                 dense_arch_layer_sizes: List[int], over_arch_layer_sizes: List[int], projection: str,
                 lookups: List[nn.Module], lookup_features: List[List[str]], mean_features: List[str],
                 is_weighted: bool = False) -> None:
        super().__init__()
        if projection not in ("linear", "zero_pad"):
            raise ValueError(f"projection={projection!r} must be 'linear' or 'zero_pad'")
        interaction = dense_arch_layer_sizes[-1]
        self.feature_names: List[str] = list(feature_names)
        self.lookup_order: List[str] = [f for group in lookup_features for f in group]
        if sorted(self.lookup_order) != sorted(self.feature_names):
            raise ValueError(f"the lookups serve features {self.lookup_order}, the model reads {self.feature_names}")
        self.group_sizes: List[int] = [len(group) for group in lookup_features]
        self.from_lookup: List[int] = [self.lookup_order.index(f) for f in self.feature_names]
        self.mean_positions: List[int] = [self.lookup_order.index(f) for f in mean_features]
        self.is_weighted = is_weighted
        self.lookups = nn.ModuleList(lookups)
        projections: List[nn.Module] = []
        for f, w in zip(feature_names, widths):
            if w == interaction:
                projections.append(nn.Identity())
            elif projection == "linear":
                projections.append(nn.Linear(w, interaction, bias=False))
            elif w < interaction:
                projections.append(ZeroPad(interaction - w))
            else:
                raise ValueError(f"feature {f!r}: width {w} > interaction width {interaction} cannot be zero-padded")
        self.projections = nn.ModuleList(projections)
        num_f = len(feature_names)
        self.dense_arch = DenseArch(dense_in_features, list(dense_arch_layer_sizes))
        self.inter_arch = TriangleInteraction(num_f)
        self.over_arch = OverArch(interaction + num_f * (num_f + 1) // 2, list(over_arch_layer_sizes))

    def _in_lookup_order(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        keys = features.keys()
        if keys == self.lookup_order:
            return features
        index: List[int] = []
        for f in self.lookup_order:
            if f not in keys:
                raise ValueError("feature " + f + " is missing from the KeyedJaggedTensor (keys "
                                 + ", ".join(keys) + ")")
            index.append(keys.index(f))
        return features.permute(index)

    def pooled(self, features: KeyedJaggedTensor) -> List[torch.Tensor]:
        """Pooled embedding of every feature, ``[B, width]`` each, in the model's feature order."""
        if features.variable_stride_per_key():
            raise ValueError("a KeyedJaggedTensor with a variable batch per feature is not served")
        features = self._in_lookup_order(features)
        batch = features.stride()
        parts = features.split(self.group_sizes) if len(self.group_sizes) > 1 else [features]
        pooled: List[torch.Tensor] = []
        for i, lookup in enumerate(self.lookups):
            part = parts[i]
            weights = part.weights_or_none() if self.is_weighted else None
            pooled.extend(lookup(part.values(), part.lengths(), part.offsets(), weights, batch))
        if len(self.mean_positions) > 0:
            lengths = features.lengths().view(-1, batch)
            for p in self.mean_positions:
                pooled[p] = pooled[p] / lengths[p].clamp(min=1).unsqueeze(1).to(pooled[p].dtype)
        return [pooled[j] for j in self.from_lookup]

    @torch.jit.export
    def logits(self, dense: torch.Tensor, features: KeyedJaggedTensor) -> torch.Tensor:
        """Logits ``[B]``."""
        pooled = self.pooled(features)
        embedded: List[torch.Tensor] = []
        for j, projection in enumerate(self.projections):
            embedded.append(projection(pooled[j]))
        sparse = torch.stack(embedded, dim=1)
        return self.over_arch(self.inter_arch(self.dense_arch(dense), sparse)).squeeze(-1)

    def forward(self, dense: torch.Tensor, features: KeyedJaggedTensor) -> torch.Tensor:
        """Scores ``[B]``: the probability of a click."""
        return torch.sigmoid(self.logits(dense, features))

    def dense_keys(self) -> List[str]:
        """State-dict keys of the dense parameters, as the trained model names them (a field's projection is
        ``projection.proj.<feature>.weight`` there)."""
        out: List[str] = []
        for key in self.state_dict().keys():
            if key.startswith(("dense_arch.", "over_arch.")):
                out.append(key)
        for j, f in enumerate(self.feature_names):
            if isinstance(self.projections[j], nn.Linear):
                out.append(f"projection.proj.{f}.weight")
        return out

    @torch.no_grad()
    def load_dense(self, tensors: dict) -> None:
        """Set the dense parameters from tensors named as :meth:`dense_keys` (exactly those)."""
        want, given = set(self.dense_keys()), set(tensors)
        if want != given:
            raise ValueError(f"dense parameters: missing {sorted(want - given)}, unexpected {sorted(given - want)}")
        own = self.state_dict()
        position = {f: j for j, f in enumerate(self.feature_names)}
        for key, value in tensors.items():
            if key.startswith("projection.proj."):
                target = own[f"projections.{position[key[len('projection.proj.'):-len('.weight')]]}.weight"]
            else:
                target = own[key]
            if tuple(target.shape) != tuple(value.shape):
                raise ValueError(f"dense parameter {key}: shape {tuple(value.shape)}, the model has {tuple(target.shape)}")
            target.copy_(value.to(target.dtype))
