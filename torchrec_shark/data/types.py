"""What every data source provides to the training loop.

A source yields TorchRec :class:`~torchrec.datasets.utils.Batch` objects (dense features
``[b, num_dense]`` float32, a :class:`KeyedJaggedTensor` of sparse ids with keys
``feature_names`` in that order, labels ``[b]`` float32 in {0, 1}). ``batch_size`` is the
global batch: rank ``r`` of ``world_size`` gets rows ``[r*b, (r+1)*b)`` of every global
batch, ``b = batch_size // world_size``, so results do not depend on the world size.
"""

from __future__ import annotations

import abc
from typing import Any, Dict, Iterator, List, Optional

from torchrec.datasets.utils import Batch


class DataError(ValueError):
    """Bad input data, naming the feature (or column) and the offending value."""


class ClickDataset(abc.ABC):
    """A click-through data source with a train and a validation split."""

    feature_names: List[str]
    num_embeddings_per_feature: List[int]
    num_dense: int

    @abc.abstractmethod
    def batches(
        self,
        split: str,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
    ) -> Iterator[Batch]:
        """Local slices of consecutive global batches of ``split`` (``train`` or ``val``).

        ``train`` cycles forever (epoch after epoch); ``val`` stops at the end of the split.
        ``start_batch`` skips that many global batches (resuming from a checkpoint).
        """

    def epoch_rows(self, split: str = "train", count: bool = False) -> Optional[int]:
        """Rows of one pass over ``split``; ``None`` when unknown without reading it (unless ``count``)."""
        return None

    def truth(self) -> Optional[Dict]:
        """Planted ground truth (synthetic data only), written to ``data_truth.json``."""
        return None

    # Sources that learn input transforms from the training split set this and provide
    # compute_statistics / check_statistics / describe_transforms / use_statistics
    # (see torchrec_shark.data.statistics.prepare_statistics).
    uses_statistics: bool = False

    def stats(self) -> Dict[str, Any]:
        """Entries for ``metrics.json`` (e.g. ``malformed_lines``, ``data_transforms``)."""
        return {}
