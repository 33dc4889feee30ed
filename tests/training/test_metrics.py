import math

import pytest
import torch

from tests.dist_utils import run_ranks
from torchrec_shark.training.metrics import EvalMetrics


def reference(logits, labels):
    """AUC as the fraction of (positive, negative) pairs ranked correctly (ties count half)."""
    p = torch.sigmoid(logits)
    pos, neg = p[labels == 1], p[labels == 0]
    diff = pos[:, None] - neg[None, :]
    auc = float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())
    loss = float(torch.nn.functional.binary_cross_entropy_with_logits(logits.double(), labels.double()))
    return auc, loss


def data(n=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=g) < 0.3).float()
    logits = labels * 0.8 + torch.randn(n, generator=g)
    return logits, labels


def test_single_process_matches_the_pairwise_definition():
    logits, labels = data()
    m = EvalMetrics(torch.device("cpu"))
    for chunk in range(0, 500, 128):
        m.update(logits[chunk:chunk + 128], labels[chunk:chunk + 128])
    out = m.compute()
    auc, loss = reference(logits, labels)
    assert out["samples"] == 500
    assert out["auc"] == pytest.approx(auc, abs=1e-6)
    assert out["logloss"] == pytest.approx(loss, rel=1e-6)


def _two_ranks(rank, world_size):
    logits, labels = data()
    half = slice(rank * 250, (rank + 1) * 250)
    m = EvalMetrics(torch.device("cpu"))
    m.update(logits[half], labels[half])
    return m.compute()


def test_two_ranks_reduce_to_the_whole_set():
    logits, labels = data()
    auc, loss = reference(logits, labels)
    for out in run_ranks(_two_ranks, 2):
        assert out["samples"] == 500
        assert out["auc"] == pytest.approx(auc, abs=1e-6)
        assert math.isclose(out["logloss"], loss, rel_tol=1e-6)


def test_single_class_validation_set_has_undefined_auc():
    logits, _ = data()
    m = EvalMetrics(torch.device("cpu"))
    m.update(logits, torch.zeros(500))
    with pytest.warns(UserWarning, match="AUC is undefined"):
        out = m.compute()
    assert math.isnan(out["auc"]) and out["samples"] == 500 and math.isfinite(out["logloss"])


def _one_class_per_rank(rank, world_size):
    logits, _ = data()
    m = EvalMetrics(torch.device("cpu"))
    m.update(logits[rank * 250:(rank + 1) * 250], torch.full((250,), float(rank)))
    return m.compute()


def test_one_class_on_each_rank_is_still_defined_over_both():
    logits, _ = data()
    labels = torch.cat([torch.zeros(250), torch.ones(250)])
    auc, _ = reference(logits, labels)
    for out in run_ranks(_one_class_per_rank, 2):
        assert out["auc"] == pytest.approx(auc, abs=1e-6)
