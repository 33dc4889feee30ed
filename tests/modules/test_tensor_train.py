import math

import pytest
import torch
import torch.nn.functional as F
from torchrec.modules.embedding_configs import PoolingType

from torchrec_shark.modules import SparseOptimizerSpec, TableInputError, build_table
from torchrec_shark.modules import CompressedEmbeddingBagConfig, TensorTrain
from torchrec_shark.modules.tensor_train import TensorTrainTable
from torchrec_shark.modules.tt_factorization import balanced_col_factors, balanced_row_factors

SGD = SparseOptimizerSpec("sgd", lr=0.1)


def config(n=1000, dim=16, pooling=PoolingType.SUM, name="t_tt", **spec):
    return CompressedEmbeddingBagConfig(
        name=name, num_embeddings=n, embedding_dim=dim, feature_names=["f"], pooling=pooling,
        compression=TensorTrain(**spec),
    )


def make(n=1000, dim=16, optimizer=SGD, fused=True, dtype=torch.float32, pooling=PoolingType.SUM, seed=0, **spec):
    torch.manual_seed(seed)
    spec.setdefault("ranks", (4,))
    return TensorTrainTable(config(n, dim, pooling, **spec), optimizer=optimizer, fused=fused, dtype=dtype)


def explicit_product(cores, n):
    """The TT product written out with einsum on the canonical (R, p, q, R') cores."""
    d = len(cores)
    r, p, q = "abcde", "ijkl", "wxyz"
    terms = [f"{r[k]}{p[k]}{q[k]}{r[k + 1]}" for k in range(d)]
    full = torch.einsum(",".join(terms) + "->" + p[:d] + q[:d], *cores)
    rows = math.prod(c.shape[1] for c in cores)
    return full.reshape(rows, -1)[:n]


def random_bags(n, batch=32, max_len=5, seed=1, empty_every=4):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (batch,), generator=g)
    lengths[::empty_every] = 0
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    ids = torch.randint(0, n, (int(offsets[-1]),), generator=g)
    ids[: len(ids) // 3] = ids[0]  # repeated ids, across and within bags
    return ids, offsets


# ---------------------------------------------------------------- factorisation and layout
def test_default_factorisations():
    assert balanced_row_factors(1_000_000, 3) == (100, 100, 100)
    assert balanced_row_factors(10_000_000, 3) == (216, 216, 215)
    assert balanced_col_factors(128, 3) == (4, 4, 8)
    assert balanced_col_factors(32, 3) == (2, 4, 4)
    t = make(n=26000, dim=64, ranks=(8,))
    assert t.layout.row_factors == (30, 30, 29) and math.prod(t.layout.row_factors) >= 26000
    assert [tuple(c.shape) for c in t.cores] == [(1, 30, 4, 8), (8, 30, 4, 8), (8, 29, 4, 1)]


def test_build_table_uses_registry():
    t = build_table(config(ranks=(4,)), SGD)
    assert isinstance(t, TensorTrainTable) and t.fused
    assert t.fp32_bytes() == 1000 * 16 * 4


@pytest.mark.parametrize(
    "spec",
    [
        dict(num_cores=2, ranks=(5,)),
        dict(num_cores=3, ranks=(3, 6)),
        dict(num_cores=4, ranks=(2, 3, 4)),
        dict(num_cores=3, ranks=(4,), row_factors=(12, 10, 9), col_factors=(4, 2, 2)),
    ],
)
def test_full_weight_is_the_tt_product(spec):
    t = make(n=1000, dim=16, dtype=torch.float64, **spec)
    torch.testing.assert_close(t.full_weight(), explicit_product(t.cores, 1000))


# ---------------------------------------------------------------- lookup
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("weighted", [False, True])
def test_lookup_matches_embedding_bag(pooling, weighted):
    t = make(n=1000, dim=16, pooling=pooling, num_cores=3, ranks=(4,))
    ids, offsets = random_bags(1000)
    w = torch.rand(ids.numel()) if weighted else None
    weight = t.full_weight()
    if weighted:
        ref = F.embedding_bag(ids, weight, offsets, mode="sum", per_sample_weights=w, include_last_offset=True)
        if pooling == PoolingType.MEAN:
            ref = ref / (offsets[1:] - offsets[:-1]).clamp(min=1).unsqueeze(1)
    else:
        mode = "sum" if pooling == PoolingType.SUM else "mean"
        ref = F.embedding_bag(ids, weight, offsets, mode=mode, include_last_offset=True)
    out = t(ids, offsets.int(), w)
    assert out.shape == (32, 16)
    torch.testing.assert_close(out, ref)
    assert (out[::4] == 0).all()  # empty bags


def test_all_bags_empty_and_out_of_range_ids():
    t = make()
    out = t(torch.zeros(0, dtype=torch.long), torch.zeros(5, dtype=torch.long))
    assert out.shape == (4, 16) and (out == 0).all()
    out.sum().backward()  # nothing to update, no error
    with pytest.raises(TableInputError, match="t_tt"):
        t(torch.tensor([3, 1000]), torch.tensor([0, 2]))
    with pytest.raises(TableInputError, match="t_tt"):
        t(torch.tensor([3, 4]), torch.tensor([0, 1]))
    with pytest.raises(TableInputError, match="t_tt"):
        t(torch.tensor([3, 4]), torch.tensor([0, 2]), torch.tensor([1.0, float("inf")]))


# ---------------------------------------------------------------- gradients and fused optimizers
def _reference_core_grads(cores, n, ids, offsets, weights, upstream, mode="sum"):
    leaves = [c.detach().clone().requires_grad_(True) for c in cores]
    full = explicit_product(leaves, n)
    out = F.embedding_bag(ids, full, offsets, mode=mode, per_sample_weights=weights, include_last_offset=True)
    (out * upstream).sum().backward()
    return [c.grad for c in leaves]


@pytest.mark.parametrize("num_cores,ranks", [(2, (3,)), (3, (3, 4)), (4, (2, 3, 2))])
def test_core_gradients_match_autograd_float64(num_cores, ranks):
    t = make(n=300, dim=8, fused=False, dtype=torch.float64, num_cores=num_cores, ranks=ranks)
    ids, offsets = random_bags(300)
    upstream = torch.randn(32, 8, dtype=torch.float64)
    (t(ids, offsets) * upstream).sum().backward()
    ref = _reference_core_grads(t.cores, 300, ids, offsets, None, upstream)
    for c, g in zip(t.cores, ref):
        torch.testing.assert_close(c.grad, g)


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_core_gradients_weighted_and_mean(pooling):
    t = make(n=300, dim=8, fused=False, pooling=pooling, ranks=(3, 4))
    ids, offsets = random_bags(300)
    upstream = torch.randn(32, 8)
    if pooling == PoolingType.SUM:
        w = torch.rand(ids.numel())
        (t(ids, offsets, w) * upstream).sum().backward()
        ref = _reference_core_grads(t.cores, 300, ids, offsets, w, upstream)
    else:
        (t(ids, offsets) * upstream).sum().backward()
        ref = _reference_core_grads(t.cores, 300, ids, offsets, None, upstream, mode="mean")
    for c, g in zip(t.cores, ref):
        torch.testing.assert_close(c.grad, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_per_sample_weight_gradient_matches_autograd(pooling):
    """Per-id weights that require grad get the gradient autograd gives through embedding_bag (float64)."""
    t = make(n=300, dim=8, fused=False, dtype=torch.float64, pooling=pooling, ranks=(3, 4))
    ids, offsets = random_bags(300)
    w = torch.rand(ids.numel(), dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(32, 8, dtype=torch.float64)
    (t(ids, offsets, w) * upstream).sum().backward()
    w_ref = w.detach().clone().requires_grad_(True)
    out = F.embedding_bag(ids, t.full_weight(), offsets, mode="sum", per_sample_weights=w_ref, include_last_offset=True)
    if pooling == PoolingType.MEAN:
        out = out / (offsets[1:] - offsets[:-1]).clamp(min=1).unsqueeze(1)
    (out * upstream).sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad)


def test_consecutive_backwards_of_different_sizes_accumulate_exact_gradients():
    """Backward reuses its temporary storage from call to call (resized to each batch); two lookups of
    different sizes must still give the reference gradients, summed."""
    t = make(n=300, dim=8, fused=False, dtype=torch.float64, ranks=(3, 4))
    refs = []
    for seed, batch in ((1, 32), (5, 9)):
        ids, offsets = random_bags(300, batch=batch, seed=seed)
        upstream = torch.randn(batch, 8, dtype=torch.float64)
        (t(ids, offsets) * upstream).sum().backward()
        refs.append(_reference_core_grads(t.cores, 300, ids, offsets, None, upstream))
    for c, g1, g2 in zip(t.cores, *refs):
        torch.testing.assert_close(c.grad, g1 + g2)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_one_id_per_bag(pooling, weighted):
    """Bags of exactly one id (the usual one-hot feature) take their own forward and backward path: the
    pooled rows of embedding_bag, and the reference core and weight gradients (float64)."""
    t = make(n=300, dim=8, fused=False, dtype=torch.float64, pooling=pooling, ranks=(3, 4))
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(2))
    ids[5:9] = ids[0]  # repeated ids
    offsets = torch.arange(41)
    w = torch.rand(40, dtype=torch.float64, requires_grad=True) if weighted else None
    upstream = torch.randn(40, 8, dtype=torch.float64)
    out = t(ids, offsets, w)
    # a one-id bag's mean is its sum (weighted too: TBE divides the weighted sum by the bag length)
    mode = "sum" if pooling == PoolingType.SUM or weighted else "mean"
    full = t.full_weight()
    want = F.embedding_bag(ids, full, offsets, mode=mode, per_sample_weights=w, include_last_offset=True)
    torch.testing.assert_close(out, want)
    (out * upstream).sum().backward()
    ref = _reference_core_grads(t.cores, 300, ids, offsets, None if w is None else w.detach(), upstream, mode=mode)
    for c, g in zip(t.cores, ref):
        torch.testing.assert_close(c.grad, g)
    if weighted:
        torch.testing.assert_close(w.grad, (full[ids] * upstream).sum(1))


@pytest.mark.parametrize("name", ["sgd", "adagrad", "rowwise_adagrad"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_in_place_core_update_equals_row_optimizer(monkeypatch, name, weight_decay):
    """When a batch touches every slice of a core the update is written into the core in place; it must
    give the cores and optimizer state of the general path (RowOptimizer.update on copied-out slices)."""
    from torchrec_shark.modules import tensor_train

    opt = SparseOptimizerSpec(name, lr=0.05, eps=1e-8, weight_decay=weight_decay)
    ids = torch.arange(0, 300, 8)  # every slice of every core of (7, 7, 7) digits: 300 rows, 38 ids
    offsets = torch.arange(ids.numel() + 1)
    upstream = torch.randn(ids.numel(), 8, generator=torch.Generator().manual_seed(3))
    results = []
    for in_place in (True, False):
        if not in_place:
            monkeypatch.setattr(tensor_train, "_update_every_slice", lambda *a: False)
        t = make(n=300, dim=8, optimizer=opt, ranks=(3, 4), row_factors=(7, 7, 7))
        for _ in range(2):  # the second step sees non-zero optimizer state
            (t(ids, offsets) * upstream).sum().backward()
        results.append((t.cores, t.optimizer_state()))
    (cores_a, state_a), (cores_b, state_b) = results
    assert all(split_ids_touch_all(ids, (7, 7, 7)))
    for a, b in zip(cores_a, cores_b):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        torch.testing.assert_close(state_a[k], state_b[k], rtol=1e-6, atol=1e-9)


def split_ids_touch_all(ids, row_factors):
    from torchrec_shark.modules.tt_factorization import split_ids

    return [torch.unique(d).numel() == p for d, p in zip(split_ids(ids, row_factors), row_factors)]


def test_fused_sgd_step_is_cores_minus_lr_grad():
    dense = make(n=300, dim=8, fused=False, dtype=torch.float64, ranks=(3, 4))
    fused = make(n=300, dim=8, optimizer=SparseOptimizerSpec("sgd", lr=0.3), dtype=torch.float64, ranks=(3, 4))
    fused.load_state_dict({k: v.detach() for k, v in dense.state_dict().items()}, strict=False)
    ids, offsets = random_bags(300)
    upstream = torch.randn(32, 8, dtype=torch.float64)
    (dense(ids, offsets) * upstream).sum().backward()
    before = [c.clone() for c in fused.cores]
    (fused(ids, offsets) * upstream).sum().backward()
    for c, c0, p in zip(fused.cores, before, dense.cores):
        torch.testing.assert_close(c, c0 - 0.3 * p.grad)
    assert all(not isinstance(c, torch.nn.Parameter) and c.grad is None for c in fused.cores)


@pytest.mark.parametrize("name", ["rowwise_adagrad", "adagrad"])
def test_fused_adagrad_updates_touched_slices(name):
    opt = SparseOptimizerSpec(name, lr=0.05, eps=1e-8)
    dense = make(n=300, dim=8, fused=False, ranks=(3, 4))
    fused = make(n=300, dim=8, optimizer=opt, ranks=(3, 4))
    fused.load_state_dict({k: v.detach() for k, v in dense.state_dict().items()}, strict=False)
    ids, offsets = random_bags(300)
    upstream = torch.randn(32, 8)
    (dense(ids, offsets) * upstream).sum().backward()
    before = [c.clone() for c in fused.cores]
    (fused(ids, offsets) * upstream).sum().backward()
    state = fused.optimizer_state()
    for k, (c, c0, p) in enumerate(zip(fused.cores, before, dense.cores)):
        g = p.grad.transpose(0, 1).reshape(p.shape[1], -1)  # one row per core slice
        touched = g.abs().sum(1) > 0
        if name == "rowwise_adagrad":
            m = g.square().mean(1, keepdim=True)
            assert state[f"core_{k}.momentum1"].shape == (p.shape[1],)
        else:
            m = g.square()
        step = -0.05 * g / (m.sqrt() + 1e-8)
        expect = c0.transpose(0, 1).reshape(p.shape[1], -1) + torch.where(touched.unsqueeze(1), step, 0)
        torch.testing.assert_close(c.transpose(0, 1).reshape(p.shape[1], -1), expect)
        torch.testing.assert_close(state[f"core_{k}.momentum1"].view(p.shape[1], -1), m.expand_as(state[f"core_{k}.momentum1"].view(p.shape[1], -1)) * touched.unsqueeze(1))


def test_no_update_without_backward_and_no_counting_in_eval():
    t = make(cache_fraction=0.1)
    ids, offsets = random_bags(1000)
    before = [c.clone() for c in t.cores]
    with torch.no_grad():
        t(ids, offsets)
    t.eval()
    t(ids, offsets)
    assert int(t.frequency.sum()) == ids.numel()  # the no_grad training forward counted, eval did not
    for c, c0 in zip(t.cores, before):
        assert torch.equal(c, c0)


def test_non_finite_gradient_leaves_table_unchanged():
    t = make()
    ids, offsets = random_bags(1000)
    before = [c.clone() for c in t.cores]
    up = torch.ones(32, 16)
    up[3, 0] = float("nan")
    with pytest.raises(TableInputError, match="t_tt"):
        (t(ids, offsets) * up).sum().backward()
    for c, c0 in zip(t.cores, before):
        assert torch.equal(c, c0)


# ---------------------------------------------------------------- init
def test_sampled_gaussian_init_variance():
    n, dim = 100_000, 32
    t = make(n=n, dim=dim, ranks=(16,), seed=3)
    target = 1.0 / (3 * n)  # variance of DLRM's U(-1/sqrt(n), 1/sqrt(n))
    var = t.full_weight().double().var().item()
    # Relative variance of a sample variance of m i.i.d. Gaussians is 2/(m-1). The table's entries are
    # products of core entries, so the samples that fluctuate independently are each core's entries:
    # to first order rel.var = sum_k 2/numel(core_k) + 2/(n*dim) (checked over seeds: 0.084 predicted,
    # 0.084 measured for a 20000 x 32 rank-8 table).
    rel_std = math.sqrt(sum(2.0 / c.numel() for c in t.cores) + 2.0 / (n * dim))
    assert abs(var / target - 1.0) < 4.5 * rel_std, (var / target, rel_std)
    naive = make(n=n, dim=dim, ranks=(16,), init="naive")
    assert naive.full_weight().var().item() < 1e-3 * target


# ---------------------------------------------------------------- cache
def _train_step(t, ids, offsets, upstream):
    (t(ids, offsets) * upstream).sum().backward()
    t.step_end()


def test_cache_population_keeps_lookups():
    t = make(n=1000, dim=16, cache_fraction=0.05, cache_refresh_every=1000)
    plain = make(n=1000, dim=16)  # same seed: same cores, no cache
    ids, offsets = random_bags(1000, batch=64)
    with torch.no_grad():
        t(ids, offsets)  # training mode: counts frequencies
    assert int(t.frequency.sum()) == ids.numel()
    t.refresh_cache()
    k = t._cached_count()
    assert 0 < k <= 50 and set(t.cache_ids[:k].tolist()) <= set(ids.tolist())
    t.eval()
    torch.testing.assert_close(t(ids, offsets), plain(ids, offsets))
    torch.testing.assert_close(t.full_weight(), plain.full_weight())


def test_cached_rows_train_directly_and_lookups_match_full_weight():
    lr = 0.1
    t = make(n=1000, dim=16, optimizer=SparseOptimizerSpec("sgd", lr=lr), cache_fraction=0.05, cache_refresh_every=1)
    ids, offsets = random_bags(1000, batch=64)
    upstream = torch.randn(64, 16)
    with torch.no_grad():
        t(ids, offsets)
    t.refresh_cache()
    k = t._cached_count()
    cached = t.cache_ids[:k].clone()
    weight0 = t.full_weight()
    # gradient of each row: sum over its occurrences of upstream[bag]
    bag = torch.repeat_interleave(torch.arange(64), offsets[1:] - offsets[:-1])
    grad_rows = torch.zeros(1000, 16).index_add_(0, ids, upstream[bag])
    (t(ids, offsets) * upstream).sum().backward()
    torch.testing.assert_close(t.full_weight()[cached], weight0[cached] - lr * grad_rows[cached])
    t.eval()
    torch.testing.assert_close(
        t(ids, offsets), F.embedding_bag(ids, t.full_weight(), offsets, mode="sum", include_last_offset=True)
    )


def test_repopulation_keeps_values_and_folds_evicted_rows():
    p = 10  # rows 0..99 share first-core slice 0, rows 100..199 slice 1, ...
    t = make(n=1000, dim=16, ranks=(8,), optimizer=SparseOptimizerSpec("adagrad", lr=0.05),
             cache_fraction=0.004, cache_refresh_every=3)
    first = torch.tensor([5, 150, 420, 777])  # four rows in four different first-core slices
    offsets = torch.tensor([0, 4])
    for _ in range(3):  # counts, then train the cached rows (refresh at step 3 caches `first`)
        _train_step(t, first, offsets, torch.randn(1, 16))
    assert torch.equal(t.cache_ids, first)
    for _ in range(2):
        _train_step(t, first, offsets, torch.randn(1, 16))
    second = torch.tensor([5, 150, 333, 901])  # 420, 777 get evicted; 333, 901 come in
    t.frequency.zero_()
    with torch.no_grad():
        t(torch.cat([second] * 3), torch.tensor([0, 12]))
    before = t.full_weight()
    state_before = t.optimizer_state()["cache.momentum1"].clone()
    t.step_end()  # step 6: refresh
    assert t.cache_ids.tolist() == [5, 150, 333, 901]
    after = t.full_weight()
    kept, added = second[:2], second[2:]
    torch.testing.assert_close(after[kept], before[kept], rtol=0, atol=0)  # stay cached: same values, bit for bit
    # newly cached rows are materialised by the lookup chain, full_weight() contracts whole cores: the
    # two fp32 reconstructions of one row differ by rounding only
    torch.testing.assert_close(after[added], before[added], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(after[[420, 777]], before[[420, 777]], rtol=1e-4, atol=1e-6)  # folded back
    untouched = [i for i in range(1000) if i // (1000 // p) not in (4, 7) and i not in added.tolist()]
    torch.testing.assert_close(after[untouched], before[untouched], rtol=0, atol=0)  # other slices as they were
    moved = [i for i in range(400, 500) if i != 420] + [i for i in range(700, 800) if i != 777]
    assert not torch.equal(after[moved], before[moved])  # the fold changed core_0 slices 4 and 7
    state = t.optimizer_state()["cache.momentum1"]
    torch.testing.assert_close(state[:2], state_before[:2])  # rows 5, 150 keep their state
    assert (state[2:] == 0).all()


def _whole_state(kind, cfg, optimizer, ranges, shards):
    """A reader of the whole tensors that the sharded state of ``shards`` (one per range) stands for."""
    from torchrec_shark.modules.table_kind import DictStateReader

    layout = kind.state_layout(cfg, optimizer, ranges)
    out = {}
    for key, first in layout[0].items():
        if first.replicated:
            out[key] = kind.local_state(shards[0])[key].clone()
            continue
        whole = torch.zeros(first.global_size, dtype=first.dtype)
        for specs, shard in zip(layout, shards):
            spec = specs[key]
            whole.narrow(spec.dim, spec.offset, spec.length).copy_(kind.local_state(shard)[key])
        out[key] = whole
    return DictStateReader(out)


def test_cache_state_moves_between_shardings():
    """The LFU cache is part of the state under any sharding: one table -> two row-wise shards -> one table
    gives back the cached rows, their values and optimizer state exactly; a smaller cache keeps the most
    frequent rows and folds the others into the cores."""
    from torchrec_shark.modules.kinds import kind_of
    from torchrec_shark.modules.table_kind import DictStateReader

    opt = SparseOptimizerSpec("rowwise_adagrad", lr=0.05)
    cfg = config(n=1000, dim=16, ranks=(4,), row_factors=(10, 10, 10), cache_fraction=0.05, cache_refresh_every=2)
    kind = kind_of(cfg)
    full = kind.build(cfg, opt, 0, 1000, None, seed=3)
    g = torch.Generator().manual_seed(0)
    hot = torch.cat([torch.randperm(500, generator=g)[:20], 500 + torch.randperm(500, generator=g)[:20]])
    for step in range(5):  # repopulated at steps 2 and 4: the 40 hot rows are cached and trained there
        ids = hot[torch.randint(0, 40, (64,), generator=g)]
        _train_step(full, ids, torch.arange(0, 65, 4), torch.randn(16, 16, generator=g))
    cached = full.cache_ids[: full._cached_count()].clone()
    assert cached.numel() == 40
    weight = full.full_weight()

    ranges = [(0, 500), (500, 500)]
    shards = [kind.build(cfg, opt, r0, n, None, seed=99, row_wise=True) for r0, n in ranges]
    for (r0, n), shard in zip(ranges, shards):  # as the sharder builds a shard from an unsharded table
        kind.load_state(shard, DictStateReader(kind.local_state(full)), r0)
        mine = cached[(cached >= r0) & (cached < r0 + n)]
        assert torch.equal(shard.cache_ids[: shard._cached_count()] + r0, mine)
        torch.testing.assert_close(shard.full_weight()[mine - r0], weight[mine], rtol=0, atol=0)
        torch.testing.assert_close(shard.full_weight(), weight[r0 : r0 + n], rtol=1e-5, atol=1e-7)
        assert int(shard.steps) == 5

    back = kind.build(cfg, opt, 0, 1000, None, seed=7)
    kind.load_state(back, _whole_state(kind, cfg, opt, ranges, shards), 0)
    assert torch.equal(back.cache_ids, full.cache_ids) and torch.equal(back.cache_weight, full.cache_weight)
    torch.testing.assert_close(back.cache_optimizer.momentum1, full.cache_optimizer.momentum1, rtol=0, atol=0)
    torch.testing.assert_close(back.full_weight()[cached], weight[cached], rtol=0, atol=0)

    small = kind.build(config(n=1000, dim=16, ranks=(4,), row_factors=(10, 10, 10), cache_fraction=0.01),
                       opt, 0, 1000, None, seed=7)
    kind.load_state(small, _whole_state(kind, cfg, opt, ranges, shards), 0)
    kept = small.cache_ids[: small._cached_count()]
    assert kept.numel() == 10 and set(kept.tolist()) <= set(cached.tolist())
    torch.testing.assert_close(small.full_weight()[kept], weight[kept], rtol=0, atol=0)
    assert not torch.equal(small.core_0, back.core_0)  # the rows that did not fit were folded in


def test_cache_needs_fused():
    with pytest.raises(ValueError, match="t_tt"):
        make(fused=False, cache_fraction=0.1)


# ---------------------------------------------------------------- state, memory
def test_state_dict_round_trip():
    opt = SparseOptimizerSpec("rowwise_adagrad", lr=0.05)
    a = make(n=1000, dim=16, optimizer=opt, cache_fraction=0.02, cache_refresh_every=2, seed=0)
    for s in range(5):
        ids, offsets = random_bags(1000, seed=s)
        _train_step(a, ids, offsets, torch.randn(32, 16))
    b = make(n=1000, dim=16, optimizer=opt, cache_fraction=0.02, cache_refresh_every=2, seed=1)
    b.load_state_dict(a.state_dict())
    for k, v in a.optimizer_state().items():  # the fused optimizer's state, outside the module's state dict
        b.optimizer_state()[k].copy_(v)
    sd = a.state_dict()
    for key in ["core_0", "core_2", "cache_ids", "cache_weight", "frequency", "steps"]:
        assert key in sd
    assert not any("optimizer" in k for k in sd)
    torch.testing.assert_close(b.full_weight(), a.full_weight())
    for k, v in a.optimizer_state().items():
        torch.testing.assert_close(b.optimizer_state()[k], v)
    for s in range(5, 8):  # and they keep training identically (refresh at step 6 included)
        ids, offsets = random_bags(1000, seed=s)
        up = torch.randn(32, 16)
        _train_step(a, ids, offsets, up)
        _train_step(b, ids, offsets, up)
    torch.testing.assert_close(b.full_weight(), a.full_weight())
    assert torch.equal(a.cache_ids, b.cache_ids)


def test_memory_bytes():
    t = make(n=1000, dim=16, ranks=(4,), cache_fraction=0.01)
    mem = t.memory_bytes()
    assert mem["cores"] == 4 * t.layout.num_parameters
    assert mem["cache_rows"] == 10 * 16 * 4 and mem["cache_index"] == 10 * 8 and mem["frequency"] == 1000 * 4
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")
    big = TensorTrainTable(config(10_000_000, 128, ranks=(32,)), SGD)
    assert big.fp32_bytes() / big.memory_bytes()["total"] >= 100


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "n,dim,spec,match",
    [
        (1000, 16, dict(col_factors=(2, 2, 2)), "not factorable"),
        (1000, 16, dict(col_factors=(2, 8)), "num_cores=3 entries"),
        (1000, 16, dict(ranks=(2, 2, 2)), "ranks"),
        (1000, 16, dict(row_factors=(9, 10, 10)), "fewer than num_embeddings"),
        (1000, 16, dict(row_factors=(1, 1000, 1)), ">= 2"),
        (4, 16, dict(num_cores=3), "too few rows"),
    ],
)
def test_bad_shapes_raise_naming_the_table(n, dim, spec, match):
    spec.setdefault("ranks", (4,))
    with pytest.raises(ValueError, match=match) as err:
        TensorTrainTable(config(n, dim, name="t_bad", **spec), SGD)
    assert "t_bad" in str(err.value)


@pytest.mark.parametrize("spec, match", [
    (dict(ranks=(0,)), r"TensorTrain.ranks=\[0\]"),
    (dict(num_cores=5), "TensorTrain.num_cores=5"),
    (dict(init="xavier"), "TensorTrain.init='xavier'"),
    (dict(cache_fraction=1.5), "TensorTrain.cache_fraction=1.5"),
    (dict(cache_refresh_every=0), "TensorTrain.cache_refresh_every=0"),
])
def test_bad_settings_are_refused_by_the_spec_naming_the_field(spec, match):
    with pytest.raises(ValueError, match=match):
        TensorTrain(**spec)


# ---------------------------------------------------------------- in the collection
def test_tensor_train_table_in_collection():
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from torchrec_shark.modules.embedding_bag_collection import CompressedEmbeddingBagCollection

    tt_cfg = config(n=1000, dim=16, name="t_tt", ranks=(4,), cache_fraction=0.01, cache_refresh_every=1)
    tt_cfg.feature_names = ["a", "b"]  # two features share the TT table
    fp_cfg = CompressedEmbeddingBagConfig(name="t_fp", num_embeddings=50, embedding_dim=8, feature_names=["c"])
    ebc = CompressedEmbeddingBagCollection(
        tables=[tt_cfg, fp_cfg], optimizer=SparseOptimizerSpec("rowwise_adagrad", lr=0.05)
    )
    table = ebc.embedding_bags["t_tt"]
    assert isinstance(table, TensorTrainTable)
    ids_a, off_a = random_bags(1000, batch=8, seed=1)
    ids_b, off_b = random_bags(1000, batch=8, seed=2)
    ids_c = torch.tensor([1, 2, 3, 4])
    lengths = torch.cat([off_a.diff(), off_b.diff(), torch.tensor([1, 0, 0, 1, 0, 2, 0, 0])])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["a", "b", "c"], values=torch.cat([ids_a, ids_b, ids_c]), lengths=lengths)
    weight = table.full_weight()
    out = ebc(kjt).to_dict()
    for f, ids, off in (("a", ids_a, off_a), ("b", ids_b, off_b)):
        torch.testing.assert_close(out[f], F.embedding_bag(ids, weight, off, mode="sum", include_last_offset=True))
    sum(v.sum() for v in out.values()).backward()
    assert not torch.equal(table.full_weight(), weight)  # updated in backward
    opt = ebc.fused_optimizer
    assert "t_tt.core_1.momentum1" in opt.state_dict()["state"]["embedding_bags.t_tt.weight"]
    opt.param_groups[0]["lr"] = 0.01
    opt.step()
    assert table.core_optimizers[0].lr == 0.01 and table.cache_optimizer.lr == 0.01
    ebc.step_end()  # refresh: the rows seen are cached now
    assert table._cached_count() == 10
    assert ebc.memory_bytes()["per_table"]["t_tt"] == table.memory_bytes()


# ---------------------------------------------------------------- GEMM paths
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_cores,ranks,dim", [(2, (5,), 16), (3, (4, 6), 16), (4, (3, 4, 2), 32)])
def test_gemm_paths_agree(monkeypatch, num_cores, ranks, dim, dtype):
    """The chain's three ways to run its products give the same rows and slice gradients, including digits no
    id uses (empty groups): MKL's batch GEMM (where the library has it), torch._grouped_mm + bmm, and the mm
    loop (torch's fallback)."""
    from torchrec_shark.modules.kernels import mkl_gemm_batch, tt_chain
    from torchrec_shark.modules.tt_factorization import split_ids

    t = make(n=3000, dim=dim, num_cores=num_cores, ranks=ranks, dtype=dtype)
    ids = torch.unique(torch.randint(0, 3000, (200,), generator=torch.Generator().manual_seed(4)))
    ids = ids[split_ids(ids, t.layout.row_factors)[-2] != 1]  # digit 1 of the last middle core unused
    digits = split_ids(ids, t.layout.row_factors)
    grad = torch.randn(ids.numel(), dim, dtype=dtype)
    paths = {"mkl": (True, True), "grouped_mm": (False, True), "mm_loop": (False, False)}
    if not mkl_gemm_batch.available(dtype):
        paths.pop("mkl")
    if not hasattr(torch, "_grouped_mm"):
        paths.pop("grouped_mm")
    results = {}
    for name, (use_mkl, grouped) in paths.items():
        monkeypatch.setattr(mkl_gemm_batch, "ENABLED", use_mkl)
        monkeypatch.setattr(tt_chain, "USE_GROUPED_MM", grouped)
        rows, saved = tt_chain.chain_forward(t.cores, digits, save=True)
        results[name] = (rows, tt_chain.chain_backward(t.cores, saved, grad))
    assert len(results) >= 2 or not torch.backends.mkl.is_available()
    r_ref, g_ref = results.pop("mm_loop")
    torch.testing.assert_close(r_ref, t.full_weight()[ids])
    for rows, grads in results.values():
        torch.testing.assert_close(rows, r_ref)
        for (i1, s1), (i2, s2) in zip(grads, g_ref):
            assert torch.equal(i1, i2)
            torch.testing.assert_close(s1, s2)


def test_fp32_core_gradients_four_cores():
    t = make(n=2000, dim=16, fused=False, num_cores=4, ranks=(3, 4, 2))
    ids, offsets = random_bags(2000)
    upstream = torch.randn(32, 16)
    (t(ids, offsets) * upstream).sum().backward()
    ref = _reference_core_grads(t.cores, 2000, ids, offsets, None, upstream)
    for c, g in zip(t.cores, ref):
        torch.testing.assert_close(c.grad, g, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- train.py tables=tt
def _tables_cfg(extra_yaml=""):
    """conf/tables/tt.yaml merged with ``extra_yaml`` into the typed schema (as Hydra composes a tables file)."""
    import os

    from omegaconf import OmegaConf

    from torchrec_shark.config import TablesConfig

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "conf", "tables", "tt.yaml")
    cfg = OmegaConf.merge(OmegaConf.structured(TablesConfig), OmegaConf.load(path), OmegaConf.create(extra_yaml))
    return OmegaConf.to_object(cfg)


def test_tables_tt_compresses_large_tables_only_and_takes_per_table_settings():
    from torchrec_shark.training.table_factory import build_table_configs

    tables = _tables_cfg("""
compression: {tensor_train: {min_rows: 1000}}
overrides:
  t_b: {compression: {kind: tensor_train, tensor_train: {ranks: [5], cache_fraction: 0.01, min_rows: 1000}}}
""")
    configs = {c.name: c for c in build_table_configs(tables, ["a", "b", "c"], [5000, 2000, 999])}
    assert configs["t_a"].compression == TensorTrain(num_cores=3, ranks=(32,))
    assert configs["t_b"].compression.ranks == (5,) and configs["t_b"].compression.cache_fraction == 0.01
    assert configs["t_c"].compression is None  # below min_rows: stock
    from torchrec_shark.training.table_factory import build_collection

    ebc = build_collection(list(configs.values()), torch.device("cpu"))
    kinds = {name: type(t).__name__ for name, t in ebc.embedding_bags.items()}
    assert kinds["t_a"] == kinds["t_b"] == "TensorTrainTable" and kinds["t_c"] != "TensorTrainTable"
    assert ebc.embedding_bags["t_b"].layout.ranks == (1, 5, 5, 1) and ebc.embedding_bags["t_b"].cache_rows == 20


def test_tables_tt_impossible_shape_names_the_table():
    from torchrec_shark.training.table_factory import build_collection, build_table_configs

    tables = _tables_cfg("compression: {tensor_train: {min_rows: 10, col_factors: [2, 2, 2]}}")
    configs = build_table_configs(tables, ["a"], [5000])
    with pytest.raises(ValueError, match="t_a.*not factorable"):
        build_collection(configs, torch.device("cpu"))
