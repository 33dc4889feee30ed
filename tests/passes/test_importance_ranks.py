"""Field importances on 2 gloo ranks equal those of one process over the whole evaluation data.

Kept apart from test_importance.py and free of torchrec imports on purpose: every spawned rank
re-imports this module, and a plain-torch scorer with field interactions is all the reductions
and gathers need.
"""

import pytest
import torch
from torch.nn import functional as F

from tests.dist_utils import run_ranks
from torchrec_shark.passes.importance import EvalCache, FPermAccumulator, exact_importance, mean_pooled

WIDTHS = {"a": 6, "b": 3, "c": 5}
NUM_DENSE, BATCHES, GLOBAL_B = 2, 3, 8


class _Scorer:
    """logit = w_d.dense + sum_f w_f.e_f + sum_{f<g} (A_f e_f).(A_g e_g): fields interact, so
    shuffling one field moves the loss through several terms."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.wd = torch.randn(NUM_DENSE, generator=g)
        self.w = {f: torch.randn(d, generator=g) for f, d in WIDTHS.items()}
        self.a = {f: torch.randn(d, 4, generator=g) / d ** 0.5 for f, d in WIDTHS.items()}

    def __call__(self, dense, pooled):
        z = dense @ self.wd
        proj = {}
        for f, e in pooled.items():
            z = z + e @ self.w[f]
            proj[f] = e @ self.a[f]
        names = list(pooled)
        for i, f in enumerate(names):
            for h in names[i + 1:]:
                z = z + (proj[f] * proj[h]).sum(1)
        return z


def _global_batches():
    g = torch.Generator().manual_seed(1)
    return [dict(dense=torch.randn(GLOBAL_B, NUM_DENSE, generator=g),
                 labels=torch.randint(0, 2, (GLOBAL_B,), generator=g).float(),
                 pooled={f: torch.randn(GLOBAL_B, d, generator=g) for f, d in WIDTHS.items()})
            for _ in range(BATCHES)]


class _Batch:
    def __init__(self, b, rank, world):
        n = GLOBAL_B // world
        sl = slice(rank * n, (rank + 1) * n)  # the data sources give rank r rows [r*n, (r+1)*n) of each batch
        self.dense, self.labels = b["dense"][sl], b["labels"][sl]
        self.pooled = {f: e[sl] for f, e in b["pooled"].items()}


def _importances(rank, world):
    score = _Scorer()
    local = [_Batch(b, rank, world) for b in _global_batches()]
    cache = EvalCache.collect(local)
    streamed, direct = FPermAccumulator(), FPermAccumulator(ebar=mean_pooled(cache.pooled))
    for b in local:
        leaves = {f: e.clone().requires_grad_(True) for f, e in b.pooled.items()}
        losses = F.binary_cross_entropy_with_logits(score(b.dense, leaves), b.labels, reduction="none")
        grads = dict(zip(leaves, torch.autograd.grad(losses.sum(), list(leaves.values()))))
        streamed.update(b.pooled, grads)
        direct.update(b.pooled, grads)
    exact = exact_importance(cache, score, repeats=2, seed=3)
    full = {f: cache.gather_field(f) for f in WIDTHS}
    return (streamed.finalize(), direct.finalize()), exact.importance, exact.baseline_loss, exact.num_samples, full


def test_two_ranks_give_the_single_process_importances():
    (single_fperm, _), single_exact, single_base, n, _ = _importances(0, 1)
    assert n == BATCHES * GLOBAL_B and all(v > 0 for v in single_fperm.values())
    ref = EvalCache.collect([_Batch(b, 0, 1) for b in _global_batches()])
    for (streamed, direct), exact, base, n2, full in run_ranks(_importances, 2):
        assert n2 == n and base == pytest.approx(single_base, rel=1e-6)
        for f in WIDTHS:
            assert streamed[f] == pytest.approx(single_fperm[f], rel=1e-5), f
            assert direct[f] == pytest.approx(single_fperm[f], rel=1e-5), f
            assert exact[f] == pytest.approx(single_exact[f], rel=1e-5, abs=1e-7), f
            torch.testing.assert_close(full[f], ref.pooled[f])  # gathered back in global sample order
