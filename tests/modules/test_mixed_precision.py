"""Row-store tables (fp32, uniform fp16/int8, per-row mixed precision): lookup, fused update,
priorities, re-tiering, stochastic rounding, state round trip and input validation."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torchrec.modules.embedding_configs import PoolingType

from torchrec_shark.modules import (
    CompressedEmbeddingBagConfig,
    Int8Codec,
    MixedPrecision,
    three_tier,
    SparseOptimizerSpec,
    TableInputError,
    Uniform,
    build_table,
)

from torchrec_shark.modules.quantization import CODECS

Z_MAX = 5.0  # z-test threshold: a false alarm is a < 1e-6 event


def _table(n=40, dim=8, spec=MixedPrecision(), opt=SparseOptimizerSpec("sgd", lr=0.1), pooling=PoolingType.SUM, seed=0):
    torch.manual_seed(seed)
    cfg = CompressedEmbeddingBagConfig(
        name="t", num_embeddings=n, embedding_dim=dim, feature_names=["f"], pooling=pooling, compression=spec
    )
    return build_table(cfg, opt)


def _shuffle_tiers(table, seed=1):
    """Random priorities and a re-tiering, so the row -> slot map is far from the identity."""
    g = torch.Generator().manual_seed(seed)
    table.priority.copy_(torch.rand(table.num_embeddings, generator=g))
    table.retier()


def _bags(n, seed=2):
    """Bags with repeats, multi-hot and empty bags (first, middle and last)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([0, 1, 3, 0, 5, 2, 4, 1, 0])
    ids = torch.randint(0, n, (int(lengths.sum()),), generator=g)
    ids[2:4] = ids[1]  # the same row twice in one bag and across bags
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return ids, offsets


def _state(table):
    """Module state and the fused optimizer's (which the module's state dict leaves out, as TBE does)."""
    out = {k: v.clone() for k, v in table.state_dict().items()}
    out.update({f"optim.{k}": v.clone() for k, v in table.optimizer_state().items()})
    return out


def _assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


SPECS = [None, Uniform("fp16"), Uniform("int8"), three_tier(0.25, 0.35)]


@pytest.mark.parametrize("spec", SPECS, ids=["fp32", "fp16", "int8", "mixed"])
@pytest.mark.parametrize("mode", ["sum", "mean", "weighted_sum", "weighted_mean"])
def test_lookup_equals_embedding_bag_over_dequantised_table(spec, mode):
    pooling = PoolingType.MEAN if "mean" in mode else PoolingType.SUM
    table = _table(spec=spec, pooling=pooling)
    if isinstance(spec, MixedPrecision):
        _shuffle_tiers(table)
        assert set(table.tier_of_rows().tolist()) == {0, 1, 2}
    ids, offsets = _bags(table.num_embeddings)
    psw = torch.rand(ids.numel(), generator=torch.Generator().manual_seed(3)) if "weighted" in mode else None
    with torch.no_grad():
        out = table(ids, offsets, psw)
    w = table.full_weight()
    if psw is not None and pooling == PoolingType.MEAN:  # torch has no weighted mean: sum / bag length
        ref = F.embedding_bag(ids, w, offsets, mode="sum", per_sample_weights=psw, include_last_offset=True)
        ref = ref / (offsets[1:] - offsets[:-1]).clamp(min=1).unsqueeze(1)
    else:
        ref = F.embedding_bag(
            ids, w, offsets, mode="mean" if pooling == PoolingType.MEAN else "sum",
            per_sample_weights=psw, include_last_offset=True,
        )
    assert out.shape == (offsets.numel() - 1, table.embedding_dim)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[0], torch.zeros(table.embedding_dim))  # empty bag


def _reference_step(name, w, g, state, lr, eps=1e-8, beta1=0.9, beta2=0.999):
    """FBGEMM TBE's update rules, written out in float64."""
    if name == "sgd":
        return w - lr * g
    if name == "rowwise_adagrad":
        m = state["momentum1"] + g.square().mean(1)
        return w - lr * g / (m.sqrt() + eps).unsqueeze(1)
    if name == "adagrad":
        m = state["momentum1"] + g.square()
        return w - lr * g / (m.sqrt() + eps)
    m1 = (1 - beta1) * g
    m2 = (1 - beta2) * g.square()
    return w - lr * (m1 / (1 - beta1)) / ((m2 / (1 - beta2)).sqrt() + eps)


def _fp16_ulp(x):
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp(min=2.0**-14))) - 10)


@pytest.mark.parametrize("opt", ["sgd", "rowwise_adagrad", "adagrad", "adam"])
def test_one_step_matches_fp32_reference(opt):
    """fp32 rows: the reference exactly (fp32 arithmetic); fp16/int8 rows: within half a step
    of the reference (nearest rounding); rows not in the batch: bit-identical."""
    table = _table(n=60, dim=8, spec=three_tier(0.3, 0.3, rounding="nearest"),
                   opt=SparseOptimizerSpec(opt, lr=0.05))
    _shuffle_tiers(table)
    ids, offsets = _bags(table.num_embeddings, seed=5)
    psw = torch.rand(ids.numel(), generator=torch.Generator().manual_seed(6))
    w0 = table.full_weight().double()
    state0 = {k: v.double().clone() for k, v in table.optimizer_state().items()}
    before = _state(table)
    grad_out = torch.randn(offsets.numel() - 1, 8, generator=torch.Generator().manual_seed(7))
    table(ids, offsets, psw).backward(grad_out)

    wref = w0.clone().requires_grad_(True)
    F.embedding_bag(ids, wref, offsets, mode="sum", per_sample_weights=psw.double(),
                    include_last_offset=True).backward(grad_out.double())
    rows = torch.unique(ids)
    expect = _reference_step(opt, w0[rows], wref.grad[rows], {k: v[rows] for k, v in state0.items() if v.dim()}, 0.05)
    got = table.full_weight().double()
    tier = table.tier_of_rows(rows)
    err = (got[rows] - expect).abs()
    # fp32 arithmetic on terms as large as the row itself (w - lr * update)
    assert bool((err[tier == 0] <= 1e-6 * (expect[tier == 0].abs() + w0[rows][tier == 0].abs()) + 1e-9).all())
    assert bool((err[tier == 1] <= 0.5 * _fp16_ulp(expect[tier == 1]) * (1 + 1e-6)).all())
    int8_rows = rows[tier == 2]
    q = table.int8_rows.index_select(0, table.row_slot[int8_rows].long() - table._bounds[1])
    assert bool((err[tier == 2] <= 0.5 * Int8Codec.step(q).double().unsqueeze(1) * (1 + 1e-5) + 1e-12).all())
    assert (tier == 0).any() and (tier == 1).any() and (tier == 2).any()
    untouched = torch.ones(table.num_embeddings, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(got[untouched], w0[untouched])
    for k, v in table.optimizer_state().items():
        if v.dim() > 0:
            assert torch.equal(v[untouched], before[f"optim.{k}"][untouched]), k
    assert all(p.grad is None for p in table.parameters())


def test_priorities_equal_hand_computed_values():
    spec = MixedPrecision(decay=0.5, pos_weight=1.0, neg_weight=0.25, retier_every=1000)
    table = _table(n=6, dim=4, spec=spec)
    # step 1: bag 0 (label 1) = rows [1, 1, 2]; bag 1 (label 0) = [2, 3]; bag 2 (label 1) = []
    table.record_labels(torch.tensor([1, 1, 2, 2, 3]), torch.tensor([0, 3, 5, 5]), torch.tensor([1.0, 0.0, 1.0]))
    table.step_end()
    p1 = torch.tensor([0, 1.0, 1.25, 0.25, 0, 0])  # row 1 counts once for bag 0 although it appears twice
    torch.testing.assert_close(table.priorities(), p1)
    # step 2: bag 0 (label 0) = [3]; bag 1 (label 0) = [3, 5]
    table.record_labels(torch.tensor([3, 3, 5]), torch.tensor([0, 1, 3]), torch.tensor([0.0, 0.0]))
    table.step_end()
    p2 = 0.5 * p1 + torch.tensor([0, 0, 0, 0.5, 0, 0.25])
    torch.testing.assert_close(table.priorities(), p2)
    table.step_end()  # a step with no labels only decays
    torch.testing.assert_close(table.priorities(), 0.5 * p2)


def test_priorities_track_the_recurrence_over_many_steps():
    """The lazily-rescaled bfloat16 store follows the plain recurrence after many steps (rescales included)
    within a few bfloat16 steps (2**-8 relative): stochastic rounding keeps the errors from adding up."""
    spec = MixedPrecision(decay=0.9, pos_weight=2.0, neg_weight=0.5, retier_every=10_000)
    table = _table(n=30, dim=4, spec=spec)
    g = torch.Generator().manual_seed(8)
    ref = torch.zeros(30, dtype=torch.float64)
    for _ in range(300):
        ids = torch.randint(0, 30, (12,), generator=g)
        offsets = torch.tensor([0, 4, 8, 12])
        labels = torch.randint(0, 2, (3,), generator=g).float()
        table.record_labels(ids, offsets, labels)
        table.step_end()
        ref *= 0.9
        for b in range(3):
            for r in torch.unique(ids[offsets[b] : offsets[b + 1]]).tolist():
                ref[r] += 2.0 if labels[b] else 0.5
    torch.testing.assert_close(table.priorities().double(), ref, rtol=4 * 2.0**-8, atol=1e-6)


def test_small_counts_added_to_a_large_priority_are_not_lost():
    """Nearest rounding in bfloat16 would drop every +0.25 added to a priority of 1024 (its step is 8);
    stochastic rounding keeps the expected total: 400 additions of 0.25 give 1124 +- a few steps."""
    spec = MixedPrecision(decay=1.0, pos_weight=1024.0, neg_weight=0.25, retier_every=10_000)
    table = _table(n=4, dim=4, spec=spec)
    ids, offsets = torch.tensor([0]), torch.tensor([0, 1])
    table.record_labels(ids, offsets, torch.tensor([1.0]))
    table.step_end()
    assert float(table.priorities()[0]) == 1024.0
    for _ in range(400):
        table.record_labels(ids, offsets, torch.tensor([0.0]))
        table.step_end()
    # each step's rounding error has variance <= 8**2 / 4: the sum's sd is at most 4 * sqrt(400) = 80
    assert abs(float(table.priorities()[0]) - 1124.0) < 4 * 80
    assert float(table.priorities()[0]) > 1024.0


@pytest.mark.parametrize("n", [10, 7, 101])
def test_retier_exact_sizes_and_preserves_values_and_state(n):
    spec = three_tier(0.2, 0.3, retier_every=2, rounding="nearest")
    table = _table(n=n, dim=8, spec=spec, opt=SparseOptimizerSpec("rowwise_adagrad", lr=0.1))
    n32, n16 = int(round(0.2 * n)), int(round(0.5 * n)) - int(round(0.2 * n))
    assert table.tier_counts() == {"fp32": n32, "fp16": n16, "int8": n - n32 - n16}
    g = torch.Generator().manual_seed(9)
    table.optim.momentum1.copy_(torch.rand(n, generator=g))  # per-row state that must follow its row
    momentum = table.optim.momentum1.clone()
    w_before = table.full_weight()
    tier_before = table.tier_of_rows().long()
    # two steps of labels with distinct counts per row: a strict priority order
    hot = torch.randperm(n, generator=g)
    for _ in range(2):
        ids = torch.cat([hot[: k + 1] for k in range(n)])  # row hot[j] in n - j bags
        lengths = torch.arange(1, n + 1)
        table.record_labels(ids, torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]), torch.ones(n))
        table.step_end()  # the second one re-tiers
    tier = table.tier_of_rows().long()
    assert torch.equal(torch.bincount(tier, minlength=3), torch.tensor([n32, n16, n - n32 - n16]))
    assert torch.equal(tier[hot], torch.tensor([0] * n32 + [1] * n16 + [2] * (n - n32 - n16)))
    assert torch.equal(torch.sort(table.row_slot.long()).values, torch.arange(n))  # a permutation of slots
    assert torch.equal(table.optim.momentum1, momentum)
    w = table.full_weight()
    # values preserved: unmoved rows and rows moved into fp32 exactly, others within half a step
    # of their new tier (an int8 value needs more than fp16's 11 significant bits)
    exact = (tier == tier_before) | (tier == 0)
    assert torch.equal(w[exact], w_before[exact])
    to16 = (tier != tier_before) & (tier == 1)
    assert bool(((w - w_before).abs()[to16] <= 0.5 * _fp16_ulp(w_before[to16])).all())
    to8 = ((tier != tier_before) & (tier == 2)).nonzero().squeeze(1)
    q = table.int8_rows.index_select(0, table.row_slot[to8].long() - table._bounds[1])
    assert bool(((w[to8] - w_before[to8]).abs() <= 0.5 * Int8Codec.step(q).unsqueeze(1) * (1 + 1e-5)).all())
    moved_down = tier > tier_before
    if n >= 10:
        assert moved_down.any() and (tier < tier_before).any()


FIVE = (("fp32", 0.1), ("fp16", 0.15), ("int8", 0.2), ("int4", 0.25), ("int2", 0.3))


@pytest.mark.parametrize("n", [23, 200])
def test_retier_across_five_tiers_keeps_sizes_order_values_and_state(n):
    """Five tiers: exact sizes, rows cut by priority, optimizer state with its row, and every moved row within
    half a quantisation step of its new tier (fp32: exact)."""
    spec = MixedPrecision(tiers=FIVE, retier_every=1, rounding="nearest")
    table = _table(n=n, dim=8, spec=spec, opt=SparseOptimizerSpec("rowwise_adagrad", lr=0.1))
    sizes = spec.sizes(n)
    assert list(table.tier_counts().values()) == sizes and sum(sizes) == n
    g = torch.Generator().manual_seed(3)
    table.optim.momentum1.copy_(torch.rand(n, generator=g))
    momentum = table.optim.momentum1.clone()
    w_before, tier_before = table.full_weight(), table.tier_of_rows().long()
    order = torch.randperm(n, generator=g)
    table.priority.copy_(torch.linspace(1.0, 0.0, n)[torch.argsort(order)].to(table.priority.dtype))
    table.retier()
    tier = table.tier_of_rows().long()
    cuts = torch.repeat_interleave(torch.arange(5), torch.tensor(sizes))
    assert torch.equal(tier[order], cuts)  # the highest priorities in the most precise tier
    assert torch.equal(torch.sort(table.row_slot.long()).values, torch.arange(n))
    assert torch.equal(table.optim.momentum1, momentum)
    w = table.full_weight()
    moved = tier != tier_before
    assert moved.any()
    exact = ~moved | (tier == 0)
    assert torch.equal(w[exact], w_before[exact])
    for k, (precision, _) in enumerate(FIVE[1:], start=1):
        rows = (moved & (tier == k)).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        err = (w[rows] - w_before[rows]).abs()
        if precision == "fp16":
            bound = 0.5 * _fp16_ulp(w_before[rows])
        else:
            q = table._pool(k).index_select(0, table.row_slot[rows].long() - table._bounds[k - 1])
            bound = 0.5 * CODECS[precision].step(q).unsqueeze(1)
        assert bool((err <= bound * (1 + 1e-5) + 1e-7).all()), precision


@pytest.mark.parametrize("dtype", ["fp16", "int8", "int4", "int2"])
def test_stochastic_rounding_of_updates_is_unbiased(dtype):
    """Many rows of one precision get the same update, a tenth of their quantisation step: the mean
    stored change equals the exact update (z-test, variance from each element's rounding
    probability), while nearest rounding loses it entirely."""
    n, dim = 3000, 8
    results = {}
    for rounding in ("stochastic", "nearest"):
        table = _table(n=n, dim=dim, spec=Uniform(dtype, rounding=rounding), opt=SparseOptimizerSpec("sgd", lr=1.0),
                       seed=10)
        base = torch.linspace(-1.0, 1.0, dim).expand(n, dim)
        table.write_rows(torch.arange(n), base, rounding="nearest")
        w0 = table.full_weight()[0].double()
        codec = CODECS[dtype]
        step = _fp16_ulp(w0) if dtype == "fp16" else codec.step(table._pool(0)[:1]).double()
        delta = 0.1 * step * torch.linspace(0.5, 1.5, dim).double()  # below half a step everywhere
        grad = (-delta).float().expand(n, dim)  # sgd, lr 1: w - g
        table(torch.arange(n), torch.arange(n + 1)).backward(grad)
        exact = (w0.float() - grad[0]).double()  # what the optimizer computes in fp32
        w1 = table.full_weight().double()
        if dtype == "fp16":
            near = exact.float().half().double()
            lo = torch.where(near > exact, near - step, near)
            p = (exact - lo) / step
            var = p * (1 - p) * step**2
        else:  # each row's grid: its new scale/bias (the same for every row here)
            sb = codec.scale_bias(table._pool(0)).double()
            assert torch.equal(sb, sb[:1].expand_as(sb))
            s, b = sb[0, 0], sb[0, 1]
            y = (exact - b) / s
            var = (y - y.floor()) * (1 - (y - y.floor())) * s**2
        results[rounding] = (w1.mean(0) - exact, var, exact - w0)
    bias, var, _ = results["stochastic"]
    sd = torch.sqrt(var / n)
    inner = sd > 0  # a row's min and max are exact at 2 and 4 bits (they set its range)
    assert int(inner.sum()) >= dim - 2
    z = bias[inner] / sd[inner]
    assert float(z.abs().max()) < Z_MAX, z
    assert bool((bias[~inner].abs() < 1e-6).all())
    if dtype in ("fp16", "int8"):
        # the test has the power to see a bias: nearest rounding fails it (small updates are lost or
        # distorted, not averaged). At 4 and 2 bits the update moves the row's range, and with it the grid.
        bias_n, _, _ = results["nearest"]
        assert float((bias_n / sd).abs().max()) > Z_MAX


def _train(table, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids, offsets = _bags(table.num_embeddings, seed=int(torch.randint(0, 1000, (), generator=g)))
        table.record_labels(ids, offsets, torch.randint(0, 2, (offsets.numel() - 1,), generator=g).float())
        table(ids, offsets).backward(torch.randn(offsets.numel() - 1, table.embedding_dim, generator=g))
        table.step_end()


@pytest.mark.parametrize("opt", ["rowwise_adagrad", "adam"])
def test_state_dict_round_trip(opt):
    spec = three_tier(0.2, 0.3, retier_every=3, decay=0.8)
    a = _table(n=50, dim=8, spec=spec, opt=SparseOptimizerSpec(opt, lr=0.05), seed=11)
    _train(a, 7, seed=12)  # two re-tierings and a step of pending age
    sd = a.state_dict()
    assert {"fp32_rows", "fp16_rows", "int8_rows", "row_slot", "priority", "priority_age", "step"} <= set(sd)
    assert not any(k.startswith("optim.") for k in sd)  # the fused optimizer's, not the module's
    # the same job (seed) restarted: its fresh table differs from the trained one until loaded
    b = _table(n=50, dim=8, spec=spec, opt=SparseOptimizerSpec(opt, lr=0.05), seed=11)
    assert not torch.equal(a.full_weight(), b.full_weight())
    b.load_state_dict(sd)
    for k, v in a.optimizer_state().items():
        b.optimizer_state()[k].copy_(v)
    _assert_state_equal(_state(a), _state(b))
    assert torch.equal(a.full_weight(), b.full_weight())
    assert torch.equal(a.tier_of_rows(), b.tier_of_rows())
    assert torch.equal(a.priorities(), b.priorities())
    # both continue identically: the stochastic-rounding noise is a function of (seed, step, row), all saved
    _train(a, 4, seed=14)
    _train(b, 4, seed=14)
    _assert_state_equal(_state(a), _state(b))


def test_memory_bytes_by_tier_within_target():
    table = _table(n=1000, dim=64, spec=MixedPrecision())
    mem = table.memory_bytes()
    assert mem["fp32_rows"] == 100 * 64 * 4 and mem["fp16_rows"] == 300 * 64 * 2
    assert mem["int8_codes"] == 600 * 64 and mem["int8_scale_bias"] == 600 * 4
    assert mem["row_slot"] == 1000 * 4 and mem["priority"] == 1000 * 2  # bfloat16 priorities
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")
    buffers = sum(b.numel() * b.element_size() for k, b in table.named_buffers() if not k.startswith("optim."))
    assert mem["total"] == buffers  # every allocated byte but optimizer state is counted
    assert table.fp32_bytes() == 1000 * 64 * 4
    assert mem["total"] <= 0.45 * table.fp32_bytes()


# ---------------------------------------------------------------------------------- bad input
@pytest.fixture
def trained():
    table = _table(n=20, dim=4, spec=three_tier(0.2, 0.3, retier_every=2),
                   opt=SparseOptimizerSpec("rowwise_adagrad", lr=0.1))
    _train(table, 3, seed=15)
    return table


@pytest.mark.parametrize("bad", [[-1], [20], [3, 25]])
def test_out_of_range_ids_rejected(trained, bad):
    reference = copy.deepcopy(trained)
    ids = torch.tensor([1, 2] + bad)
    offsets = torch.tensor([0, 2, ids.numel()])
    with pytest.raises(TableInputError, match=r"table 't'.*\[0, 20\)"):
        trained(ids, offsets)
    with pytest.raises(TableInputError, match=r"\[0, 20\)"):
        trained.record_labels(ids, offsets, torch.tensor([1.0, 0.0]))
    _assert_state_equal(_state(reference), _state(trained))
    for t in (trained, reference):  # nothing of the bad batch was kept for the priorities either
        t.step_end()
    _assert_state_equal(_state(reference), _state(trained))


def test_nan_weights_and_labels_rejected(trained):
    before = _state(trained)
    ids, offsets = torch.tensor([1, 2, 3]), torch.tensor([0, 1, 3])
    with pytest.raises(TableInputError, match="weights contain NaN"):
        trained(ids, offsets, torch.tensor([1.0, float("nan"), 1.0]))
    with pytest.raises(TableInputError, match="labels contain NaN"):
        trained.record_labels(ids, offsets, torch.tensor([1.0, float("nan")]))
    _assert_state_equal(before, _state(trained))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_gradients_rejected_and_not_written(trained, value):
    before = _state(trained)
    ids, offsets = torch.tensor([1, 2, 3, 7]), torch.tensor([0, 1, 4])
    grad = torch.ones(2, 4)
    grad[1, 2] = value
    out = trained(ids, offsets)
    with pytest.raises(TableInputError, match=r"non-finite gradient.*not updated"):
        out.backward(grad)
    _assert_state_equal(before, _state(trained))


def test_tier_activity_counts_lookups_by_the_tier_serving_them_and_rows_moved():
    table = _table(n=20, spec=three_tier(0.2, 0.3, retier_every=1000))
    _shuffle_tiers(table)
    table.tier_activity(reset=True)  # the shuffle's own moves
    ids, offsets = _bags(20)
    tier = table.tier_of_rows().long()
    expected = torch.bincount(tier.index_select(0, ids), minlength=3)  # every id looked up (repeats too)
    table.record_labels(ids, offsets, torch.ones(offsets.numel() - 1))
    table(ids, offsets).sum().backward()
    table.step_end()
    activity = table.tier_activity()
    assert activity["rows"] == {"fp32": 4, "fp16": 6, "int8": 10}
    assert [activity["hits"][t] for t in ("fp32", "fp16", "int8")] == expected.tolist()
    assert activity["moves"] == 0
    table.priority.copy_(torch.arange(20, dtype=torch.float32))
    moved = table.retier()
    assert moved > 0 and table.tier_activity()["moves"] == moved
    assert table.tier_activity() == {"rows": activity["rows"], "hits": {"fp32": 0, "fp16": 0, "int8": 0}, "moves": 0}


def test_retier_in_small_chunks_equals_one_pass(monkeypatch):
    """Re-tiering moves rows a bounded chunk at a time; the result does not depend on the chunk size."""
    import torchrec_shark.modules.row_store as row_store

    spec = three_tier(0.2, 0.3, rounding="nearest", retier_every=1000)
    a, b = _table(n=80, dim=8, spec=spec, seed=4), _table(n=80, dim=8, spec=spec, seed=4)
    g = torch.Generator().manual_seed(5)
    pr = torch.rand(80, generator=g)
    a.priority.copy_(pr)
    b.priority.copy_(pr)
    moved = a.retier()
    monkeypatch.setattr(row_store, "CHUNK_ROWS", 3)
    assert b.retier() == moved > 3 * 2  # several chunks
    _assert_state_equal(_state(a), _state(b))


@pytest.mark.parametrize("spec", SPECS, ids=["fp32", "fp16", "int8", "mixed"])
def test_tables_built_without_initial_values_start_zeroed_and_load_the_same(spec):
    from torchrec_shark.modules.table_kind import without_initial_values

    drawn = _table(spec=spec)
    assert drawn.read_rows(torch.arange(40)).abs().sum() > 0
    with without_initial_values():
        blank = _table(spec=spec)
    assert torch.equal(blank.read_rows(torch.arange(40)), torch.zeros(40, 8))
    assert _table(spec=spec).read_rows(torch.arange(40)).abs().sum() > 0  # only inside the block
    blank.load_state_dict(drawn.state_dict())
    assert torch.equal(blank.read_rows(torch.arange(40)), drawn.read_rows(torch.arange(40)))


@pytest.mark.parametrize("rows, want", [(10, [10, 0, 0]), (1000, [1000, 0, 0]), (10_000, [4096, 239, 5665]),
                                        (1_000_000, [10_000, 40_000, 950_000])])
def test_hot_rows_keep_small_tables_in_the_first_tier(rows, want):
    """At least ``hot_rows`` rows (all of a smaller table) in the first tier; the others share the rest in
    proportion to their fractions; a large table keeps its fractions."""
    spec = MixedPrecision(tiers=(("fp32", 0.01), ("fp16", 0.04), ("int4", 0.95)), hot_rows=4096)
    assert spec.sizes(rows) == want and sum(spec.sizes(rows)) == rows
    table = _table(n=rows, dim=4, spec=spec) if rows <= 10_000 else None
    if table is not None:
        assert list(table.tier_counts().values()) == want
    # row-wise shards hold their share of the hot rows: the shards of a table add up to the table's tiers
    lengths = [rows // 4 + (1 if k < rows % 4 else 0) for k in range(4)]
    starts = [sum(lengths[:k]) for k in range(4)]
    shards = [spec.sizes(n, rows, start) for start, n in zip(starts, lengths)]
    assert [sum(t) for t in zip(*shards)] == want
    assert [sum(s) for s in shards] == lengths


@pytest.mark.parametrize("tiers", [(("fp32", 0.1), ("fp16", 0.3), ("int8", 0.6)),
                                   (("fp32", 0.02), ("int8", 0.08), ("int4", 0.3), ("int2", 0.6))])
def test_any_row_wise_split_of_a_table_adds_up_to_its_tier_sizes_exactly(tiers):
    """However a table is split into row ranges (any world size, uneven blocks), the ranges' tier sizes add up
    to the whole table's: a checkpoint resharded to another world size has room for every row in its tier.
    Rounding each shard's fractions on its own did not (30 rows of the paper's split on 2 ranks: 4/8/18 rows
    against the table's 3/9/18)."""
    spec = MixedPrecision(tiers=tiers, hot_rows=7)
    g = torch.Generator().manual_seed(0)
    for rows in list(range(1, 120)) + [2000, 12_345]:
        whole = spec.sizes(rows)
        for world in (2, 3, 4, 8):
            cuts = sorted(set(torch.randint(0, rows + 1, (world - 1,), generator=g).tolist()))
            bounds = [0, *cuts, rows]
            shards = [spec.sizes(b - a, rows, a) for a, b in zip(bounds, bounds[1:])]
            assert all(min(s) >= 0 and sum(s) == b - a for s, (a, b) in zip(shards, zip(bounds, bounds[1:])))
            assert [sum(t) for t in zip(*shards)] == whole, (rows, bounds, shards)


def test_priority_order_is_a_stable_descending_sort_of_bf16_values():
    from torchrec_shark.modules.mixed_precision import descending_bf16_order

    g = torch.Generator().manual_seed(3)
    values = (torch.randn(5000, generator=g) * 10).to(torch.bfloat16)
    values[::7] = 0.0
    values[1::11] = -0.0  # ties with +0
    values[2::13] = values[3]  # more ties
    values[5], values[6] = float("inf"), float("-inf")
    want = torch.sort(values.float(), descending=True, stable=True).indices
    assert torch.equal(descending_bf16_order(values), want)


@pytest.mark.parametrize("ends", [[1, 5], [0, 40, 40, 1999], [100, 3000], [2000]], ids=str)
def test_tiers_by_priority_rank_without_sorting_match_the_sorted_order(ends):
    from torchrec_shark.modules.mixed_precision import descending_bf16_ranks_past

    g = torch.Generator().manual_seed(len(ends))
    values = (torch.rand(2000, generator=g) ** 6 * 50).round().to(torch.bfloat16)  # many ties, zeros
    values[::9] = -0.0
    values[3::17] = -1.5
    order = torch.sort(values.float(), descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    want = sum((rank >= e).to(torch.int8) for e in ends)
    assert torch.equal(descending_bf16_ranks_past(values, ends), want)
