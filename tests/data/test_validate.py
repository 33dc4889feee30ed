import pytest
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_shark.data import DataError, validate_batch

F = ["a", "b"]


def batch(values=(0, 1, 2, 9), lengths=(1, 1, 1, 1), dense=None, labels=(0.0, 1.0)):
    return Batch(
        dense_features=torch.zeros(2, 3) if dense is None else dense,
        sparse_features=KeyedJaggedTensor(keys=F, values=torch.tensor(values), lengths=torch.tensor(lengths)),
        labels=torch.tensor(labels),
    )


def test_a_good_batch_passes():
    validate_batch(batch(), F, [5, 10])


@pytest.mark.parametrize(
    "b, message",
    [
        (batch(values=(0, 5, 2, 3)), "feature 'a': id 5 is outside its table of 5 rows"),
        (batch(values=(0, 1, -1, 3)), "feature 'b': id -1 is outside"),
        (batch(values=(0, 1, 2, 10)), "feature 'b': id 10 is outside its table of 10 rows (row 1 of the batch)"),
        (batch(dense=torch.tensor([[0.0, float("nan"), 0.0], [0.0] * 3])), "dense feature 1: non-finite value nan"),
        (batch(labels=(0.0, 0.5)), "label 0.5 is not 0 or 1 (row 1 of the batch)"),
        (batch(dense=torch.zeros(3, 3)), "batch shapes disagree"),
    ],
)
def test_bad_batches_fail_naming_what_is_wrong(b, message):
    with pytest.raises(DataError, match="") as e:
        validate_batch(b, F, [5, 10])
    assert message in str(e.value)


def test_wrong_keys():
    with pytest.raises(DataError, match="sparse feature keys"):
        validate_batch(batch(), ["a", "c"], [5, 10])
