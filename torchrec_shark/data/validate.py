"""Cheap checks of a batch before it reaches the model."""

from __future__ import annotations

from typing import Sequence

import torch
from torchrec.datasets.utils import Batch

from torchrec_shark.data.types import DataError


class BatchRowError(DataError):
    """A bad value in row ``row`` of a batch; ``what`` says what, so that a source can name the row's place
    in its data instead of in the batch."""

    def __init__(self, what: str, row: int) -> None:
        super().__init__(f"{what} (row {row} of the batch)")
        self.what, self.row = what, row


def validate_batch(batch: Batch, feature_names: Sequence[str], num_embeddings_per_feature: Sequence[int]) -> None:
    """Raise :class:`DataError` for ids outside their table, non-finite dense features or
    labels, and labels other than 0/1. Costs a few vectorised passes over the batch."""
    kjt = batch.sparse_features
    if list(kjt.keys()) != list(feature_names):
        raise DataError(f"sparse feature keys {list(kjt.keys())} differ from the expected {list(feature_names)}")
    if len(num_embeddings_per_feature) != len(feature_names):
        raise DataError(
            f"{len(num_embeddings_per_feature)} table sizes given for {len(feature_names)} features"
        )
    n = batch.labels.shape[0]
    if batch.dense_features.dim() != 2 or batch.dense_features.shape[0] != n or kjt.stride() != n:
        raise DataError(
            f"batch shapes disagree: dense {tuple(batch.dense_features.shape)}, labels {tuple(batch.labels.shape)}, "
            f"sparse stride {kjt.stride()}"
        )
    values = kjt.values()
    if values.numel():
        per_key = torch.tensor(kjt.length_per_key(), device=values.device)
        limit = torch.repeat_interleave(
            torch.tensor(list(num_embeddings_per_feature), dtype=values.dtype, device=values.device), per_key
        )
        bad = (values < 0) | (values >= limit)
        if bool(bad.any()):
            pos = int(torch.nonzero(bad)[0])
            f = int(torch.searchsorted(torch.cumsum(per_key, 0), torch.tensor(pos, device=values.device), right=True))
            bag = int(torch.searchsorted(kjt.offsets(), torch.tensor(pos, device=values.device), right=True)) - 1
            raise BatchRowError(
                f"feature {feature_names[f]!r}: id {int(values[pos])} is outside its table of "
                f"{num_embeddings_per_feature[f]} rows", bag % n if n else 0
            )
    dense = batch.dense_features
    if dense.numel() and not bool(torch.isfinite(dense).all()):
        row, col = (int(i) for i in torch.nonzero(~torch.isfinite(dense))[0])
        raise BatchRowError(f"dense feature {col}: non-finite value {float(dense[row, col])}", row)
    labels = batch.labels
    bad = ~((labels == 0) | (labels == 1))
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0])
        raise BatchRowError(f"label {float(labels[row])} is not 0 or 1", row)
