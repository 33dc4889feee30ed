"""Field importance math on a tiny DLRM: F-Permutation and exact permutation importance against brute force.

The multi-rank reductions are checked in test_importance_ranks.py."""

from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_shark.models.dlrm import DLRM
from torchrec_shark.passes.importance import (
    EvalCache,
    FPermAccumulator,
    exact_importance,
    fperm_importance,
    mean_pooled,
    permutation,
    rank_of,
    spearman,
)
from torchrec_shark.passes.run_loader import loss_gradients

WIDTHS = {"a": 8, "b": 4, "c": 8, "d": 12}
NUM_DENSE = 3
BATCHES, GLOBAL_B = 3, 8


def _model(seed=0):
    torch.manual_seed(seed)
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=w, num_embeddings=10, feature_names=[f])
              for f, w in WIDTHS.items()]
    model = DLRM(EmbeddingBagCollection(tables=tables), NUM_DENSE, [8], [8, 1])
    model.eval()
    return model


def _global_batches(seed=1):
    """Pooled embeddings, dense features and labels of BATCHES global batches."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(BATCHES):
        pooled = {f: torch.randn(GLOBAL_B, w, generator=g) * 2 for f, w in WIDTHS.items()}
        out.append(SimpleNamespace(dense=torch.randn(GLOBAL_B, NUM_DENSE, generator=g),
                                   labels=torch.randint(0, 2, (GLOBAL_B,), generator=g).float(),
                                   pooled=pooled))
    return out


def _cat(batches):
    return EvalCache.collect(batches)


def _sample_loss(model, dense, label, pooled):
    logit = model.predict(dense[None], {f: e[None] for f, e in pooled.items()})
    return F.binary_cross_entropy_with_logits(logit, label[None])


def test_fperm_matches_per_sample_autograd():
    model, cache = _model(), _cat(_global_batches())
    n = len(cache)
    ebar = {f: e.double().mean(0) for f, e in cache.pooled.items()}
    brute = {f: 0.0 for f in WIDTHS}
    for i in range(n):  # independent per-sample gradients: one backward per sample
        leaves = {f: e[i].clone().requires_grad_(True) for f, e in cache.pooled.items()}
        loss = _sample_loss(model, cache.dense[i], cache.labels[i], leaves)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        for f, g in zip(leaves, grads):
            brute[f] += abs(float(g.double() @ (ebar[f] - cache.pooled[f][i].double()))) / n
    # The pass's path: batched gradients from run_loader, then the accumulator.
    run = SimpleNamespace(dlrm=model)
    acc = FPermAccumulator()
    for b in _global_batches():
        grads, losses = loss_gradients(run, b.dense, b.labels, b.pooled)
        assert losses.shape == (GLOBAL_B,)
        acc.update(b.pooled, grads)
    got = acc.finalize()
    # The same with the mean embedding known up front (each batch reduced at once).
    acc = FPermAccumulator(ebar=mean_pooled(cache.pooled))
    for b in _global_batches():
        acc.update(b.pooled, loss_gradients(run, b.dense, b.labels, b.pooled)[0])
    got_direct = acc.finalize()
    assert list(got) == list(WIDTHS) == list(got_direct)
    for f in WIDTHS:
        assert got[f] == pytest.approx(brute[f], rel=1e-5, abs=1e-9), f
        assert got_direct[f] == pytest.approx(brute[f], rel=1e-5, abs=1e-9), f
        assert got[f] > 0


def test_fperm_is_zero_for_a_field_the_model_ignores_and_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    pooled = {"used": torch.randn(50, 3, generator=g), "unused": torch.randn(50, 2, generator=g)}
    w = torch.tensor([1.0, -2.0, 0.5])
    labels = torch.randint(0, 2, (50,), generator=g).float()
    leaves = {k: v.clone().requires_grad_(True) for k, v in pooled.items()}
    logits = leaves["used"] @ w + 0 * leaves["unused"].sum(1)
    losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    grads = dict(zip(leaves, torch.autograd.grad(losses.sum(), list(leaves.values()))))
    imp = fperm_importance(pooled, grads)
    assert imp["unused"] == 0.0
    # Closed form for a linear logit: g(x) = (sigmoid(z) - y) w.
    r = torch.sigmoid(pooled["used"] @ w) - labels
    expected = (r * ((pooled["used"].mean(0) - pooled["used"]) @ w)).abs().mean()
    assert imp["used"] == pytest.approx(float(expected), rel=1e-6)


def test_exact_matches_explicit_loop_over_permutations():
    model, cache = _model(), _cat(_global_batches())
    n, repeats, seed = len(cache), 2, 7
    base = sum(float(_sample_loss(model, cache.dense[i], cache.labels[i],
                                  {f: e[i] for f, e in cache.pooled.items()})) for i in range(n)) / n
    brute = {}
    for j, f in enumerate(WIDTHS):
        incs = []
        for t in range(repeats):
            perm = permutation(n, seed, j, t)
            tot = 0.0
            for i in range(n):  # sample i sees field f of sample perm[i]
                pooled = {k: e[i] for k, e in cache.pooled.items()}
                pooled[f] = cache.pooled[f][perm[i]]
                tot += float(_sample_loss(model, cache.dense[i], cache.labels[i], pooled))
            incs.append(tot / n - base)
        brute[f] = sum(incs) / repeats
    with torch.no_grad():
        res = exact_importance(cache, model.predict, repeats=repeats, seed=seed, chunk=5)
    assert res.num_samples == n
    assert res.baseline_loss == pytest.approx(base, rel=1e-5)
    for f in WIDTHS:
        assert res.importance[f] == pytest.approx(brute[f], rel=1e-4, abs=1e-6), f
        assert len(res.per_repeat[f]) == repeats


def test_permutations_are_seeded_and_differ_by_field_and_repeat():
    a = permutation(100, 0, 1, 0)
    assert torch.equal(a, permutation(100, 0, 1, 0))
    assert sorted(a.tolist()) == list(range(100))
    assert not torch.equal(a, permutation(100, 0, 2, 0))
    assert not torch.equal(a, permutation(100, 0, 1, 1))
    assert not torch.equal(a, permutation(100, 1, 1, 0))


def test_rank_and_spearman():
    assert rank_of({"a": 0.1, "b": 0.3, "c": 0.2}) == {"b": 1, "c": 2, "a": 3}
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)


def test_errors():
    with pytest.raises(ValueError, match="no batches"):
        FPermAccumulator().finalize()
    with pytest.raises(ValueError, match="no evaluation batches"):
        EvalCache.collect([])
    with pytest.raises(ValueError, match="differ"):
        fperm_importance({"a": torch.zeros(2, 3)}, {"a": torch.zeros(2, 4)})
    cache = _cat(_global_batches())
    with pytest.raises(ValueError, match="repeats"):
        exact_importance(cache, _model().predict, repeats=0)
