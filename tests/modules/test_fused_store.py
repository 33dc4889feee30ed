"""The fused store: a collection whose row stores share one batched store trains exactly as the same collection
with one lookup per table, and both pool as ``embedding_bag`` over the tables' dequantised rows.

Every registered row-store kind, every optimizer, SUM and MEAN pooling, per-id weights, empty bags, a table
read by two features, a feature read by two tables, and tables of other kinds (not fused) beside them.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_shark.modules import (
    KINDS,
    CompressedEmbeddingBagCollection,
    CompressedEmbeddingBagConfig,
    SparseOptimizerSpec,
)
from torchrec_shark.modules.base import TableInputError
from torchrec_shark.modules.fused_store import FusedRowStore
from torchrec_shark.modules.kernels.host import torch_ops_only

ROW_STORE_KINDS = [pytest.param(k, id=k.name) for k in KINDS if k.state_family == "row_store"]
OTHER_KINDS = [k for k in KINDS if k.state_family != "row_store"]
OPTIMIZERS = ["sgd", "adagrad", "rowwise_adagrad", "adam"]
BATCH, DIM = 6, 8
# (table, rows, features): t1 is read by two features, f2 feeds t2 and t3
LAYOUT = [("t0", 40, ["f0"]), ("t1", 64, ["f1", "f3"]), ("t2", 23, ["f2"]), ("t3", 50, ["f2"])]
KEYS = ["f0", "f1", "f2", "f3"]


def configs(kind, pooling=PoolingType.SUM, extra=()):
    out = [CompressedEmbeddingBagConfig(name=n, num_embeddings=r, embedding_dim=DIM, feature_names=list(f),
                                        pooling=pooling, compression=kind.example_spec()) for n, r, f in LAYOUT]
    for i, other in enumerate(extra):  # other kinds beside them (not fused with these)
        out.append(CompressedEmbeddingBagConfig(name=f"x{i}", num_embeddings=32, embedding_dim=DIM,
                                                feature_names=["f0"], pooling=pooling,
                                                compression=other.example_spec()))
    return out


def collection(cfgs, optimizer: str, fused: bool, weighted: bool = False) -> CompressedEmbeddingBagCollection:
    torch.manual_seed(0)
    return CompressedEmbeddingBagCollection(cfgs, is_weighted=weighted, fused=fused,
                                            optimizer=SparseOptimizerSpec(optimizer, lr=0.05))


def batch(step: int, weighted: bool = False) -> KeyedJaggedTensor:
    """Bags of 0..3 ids (the first bag of every feature empty), ids below every table's rows."""
    g = torch.Generator().manual_seed(100 + step)
    lengths = torch.randint(0, 4, (len(KEYS) * BATCH,), generator=g)
    lengths[::BATCH] = 0
    values = torch.randint(0, 23, (int(lengths.sum()),), generator=g)
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(KEYS, values, lengths, weights)


def train(ebc, steps: int = 4, weighted: bool = False, label_aware: bool = False):
    outs, grads = [], []
    for step in range(steps):
        kjt = batch(step, weighted)
        if weighted:
            kjt = KeyedJaggedTensor.from_lengths_sync(KEYS, kjt.values(), kjt.lengths(),
                                                      kjt.weights().clone().requires_grad_())
        if label_aware:
            ebc.record_labels(kjt, torch.randint(0, 2, (BATCH,), generator=torch.Generator().manual_seed(step)).float())
        out = ebc(kjt).values()
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7 + step))
        out.backward(g)
        ebc.step_end()
        outs.append(out.detach())
        if weighted:
            grads.append(kjt.weights().grad)
    return outs, grads


def assert_same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    oa, ob = a.fused_optimizer.state_dict()["state"], b.fused_optimizer.state_dict()["state"]
    for k in oa:
        for name in oa[k]:
            assert torch.equal(oa[k][name], ob[k][name]), (k, name)


@pytest.mark.parametrize("kind", ROW_STORE_KINDS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_fused_trains_exactly_as_per_table(kind, optimizer):
    fused, single = (collection(configs(kind), optimizer, f) for f in (True, False))
    assert len(fused._stores) == 1 and len(fused._stores[0].members) == len(LAYOUT) and not single._stores
    assert_same_state(fused, single)
    out_f, _ = train(fused, label_aware=kind.label_aware)
    out_s, _ = train(single, label_aware=kind.label_aware)
    for a, b in zip(out_f, out_s):
        assert torch.equal(a, b)
    assert_same_state(fused, single)
    for name in fused.embedding_bags:  # the per-step counters the store keeps for its members
        a, b = fused.embedding_bags[name], single.embedding_bags[name]
        assert (a.updates, a.version > 0) == (b.updates, True)
        if kind.label_aware:
            assert (a._age, a._step) == (b._age, b._step)
            assert a.tier_activity() == b.tier_activity()


@pytest.mark.parametrize("kind", ROW_STORE_KINDS)
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN], ids=["sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_fused_pools_and_weight_gradients_as_per_table(kind, pooling, weighted):
    fused, single = (collection(configs(kind, pooling, OTHER_KINDS), "rowwise_adagrad", f, weighted)
                     for f in (True, False))
    assert len(fused._stores) == 1  # the other kinds stay on their own
    out_f, grad_f = train(fused, 3, weighted, kind.label_aware)
    out_s, grad_s = train(single, 3, weighted, kind.label_aware)
    for a, b in zip(out_f + grad_f, out_s + grad_s):
        assert torch.equal(a, b)
    assert_same_state(fused, single)


@pytest.mark.parametrize("kind", ROW_STORE_KINDS)
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN], ids=["sum", "mean"])
def test_fused_forward_is_embedding_bag_over_dequantised_rows(kind, pooling):
    ebc = collection(configs(kind, pooling), "rowwise_adagrad", True, weighted=True)
    train(ebc, 2, weighted=True, label_aware=kind.label_aware)  # rows trained, re-tiered
    kjt = batch(9, weighted=True)
    out = ebc(kjt).to_dict()
    jagged = kjt.to_dict()
    for name, _, features in LAYOUT:
        weight = ebc.embedding_bags[name].full_weight()
        for f in features:
            key = f if f != "f2" else f"f2@{name}"
            j = jagged[f]
            want = F.embedding_bag(j.values(), weight, j.offsets(), mode="sum", per_sample_weights=j.weights(),
                                   include_last_offset=True)
            if pooling == PoolingType.MEAN:
                want = want / j.lengths().clamp(min=1).unsqueeze(1)
            torch.testing.assert_close(out[key], want, rtol=1e-5, atol=1e-6)
            assert torch.equal(out[key][0], torch.zeros(DIM))  # the empty bag


def test_members_are_views_of_the_store_and_report_their_own_bytes():
    kind = next(k for k in KINDS if k.label_aware)
    fused, single = (collection(configs(kind), "adam", f) for f in (True, False))
    store: FusedRowStore = fused._stores[0]
    for name in fused.embedding_bags:
        a, b = fused.embedding_bags[name], single.embedding_bags[name]
        assert a.memory_bytes() == b.memory_bytes()
        storages = {t.untyped_storage().data_ptr() for t in a.buffers()}
        fused_storages = {t.untyped_storage().data_ptr() for t in [*store.buffers.values(),
                                                                    *(q.pool for q in store.precisions)]}
        assert storages <= fused_storages
    # the store holds exactly the members' bytes, plus nothing
    held = sum(t.numel() * t.element_size() for t in [*store.buffers.values(), *(q.pool for q in store.precisions)])
    own = sum(t.numel() * t.element_size() for m in fused.embedding_bags.values() for t in m.buffers())
    assert held == own


def test_bad_ids_name_their_table_and_change_nothing():
    kind = next(k for k in KINDS if k.name == "int8")
    ebc = collection(configs(kind), "rowwise_adagrad", True)
    before = {k: v.clone() for k, v in ebc.state_dict().items()}
    lengths = torch.ones(len(KEYS) * 2, dtype=torch.long)
    values = torch.tensor([0, 1, 2, 3, 30, 4, 5, 6])  # 30 >= t2's 23 rows (feature f2, bag 0)
    with pytest.raises(TableInputError, match="table 't2'.*\\[0, 23\\)"):
        ebc(KeyedJaggedTensor.from_lengths_sync(KEYS, values, lengths))
    assert all(torch.equal(before[k], v) for k, v in ebc.state_dict().items())


def test_non_finite_gradient_updates_no_table():
    kind = next(k for k in KINDS if k.name == "fp16")
    ebc = collection(configs(kind), "rowwise_adagrad", True)
    before = {k: v.clone() for k, v in ebc.state_dict().items()}
    out = ebc(batch(0)).values()
    g = torch.zeros_like(out)
    g[1, DIM + 2] = float("nan")
    with pytest.raises(TableInputError, match="non-finite gradient"):
        out.backward(g)
    assert all(torch.equal(before[k], v) for k, v in ebc.state_dict().items())


def test_moved_collection_keeps_its_members_as_views():
    kind = next(k for k in KINDS if k.label_aware)
    fused, single = (collection(configs(kind), "rowwise_adagrad", f) for f in (True, False))
    moved = set()

    def move(t):  # as a move to another device: a copy, and a no-op on what was already moved
        if t.untyped_storage().data_ptr() in moved:
            return t
        out = t.clone()
        moved.add(out.untyped_storage().data_ptr())
        return out

    old = fused._stores[0].buffers["row_slot"].untyped_storage().data_ptr()
    fused._apply(move)  # the store moves first, the members stay its views
    store = fused._stores[0]
    assert store.buffers["row_slot"].untyped_storage().data_ptr() != old
    for name, table in fused.embedding_bags.items():
        assert table.row_slot.untyped_storage().data_ptr() == store.buffers["row_slot"].untyped_storage().data_ptr()
    train(fused, 2, label_aware=True)
    train(single, 2, label_aware=True)
    assert_same_state(fused, single)


@pytest.mark.parametrize("kind", ROW_STORE_KINDS)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "per_table"])
def test_torch_ops_path_trains_as_the_numpy_path(kind, fused):
    """The bookkeeping CUDA tensors get (torch ops: dedupe, slot resolution, rounding bits, labels, decode),
    run on the CPU, trains exactly as the numpy path."""
    host = collection(configs(kind, PoolingType.MEAN), "rowwise_adagrad", fused, weighted=True)
    with torch_ops_only():
        device = collection(configs(kind, PoolingType.MEAN), "rowwise_adagrad", fused, weighted=True)
        out_d, grad_d = train(device, 4, True, kind.label_aware)
    out_h, grad_h = train(host, 4, True, kind.label_aware)
    for a, b in zip(out_h + grad_h, out_d + grad_d):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert_same_state(host, device)


@pytest.mark.parametrize("kind", ROW_STORE_KINDS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_one_store_of_every_feature_pools_sample_major_as_per_table(kind, weighted):
    """Features in table order, one store: bags are pooled sample after sample straight into the output."""
    cfgs = [CompressedEmbeddingBagConfig(name=f"t{i}", num_embeddings=23 + 7 * i, embedding_dim=DIM,
                                         feature_names=[KEYS[i]], pooling=PoolingType.MEAN if i == 1 else PoolingType.SUM,
                                         compression=kind.example_spec()) for i in range(len(KEYS))]
    fused, single = (collection(cfgs, "adagrad", f, weighted) for f in (True, False))
    plan = fused._plan(tuple(KEYS))
    assert plan.whole
    out_f, grad_f = train(fused, 3, weighted, kind.label_aware)
    out_s, grad_s = train(single, 3, weighted, kind.label_aware)
    for a, b in zip(out_f + grad_f, out_s + grad_s):
        assert torch.equal(a, b)
    assert_same_state(fused, single)


@pytest.mark.parametrize("host", [True, False], ids=["numpy", "torch_ops"])
@pytest.mark.parametrize("weights", ["same", "per_table"])
def test_labels_of_a_sample_major_lookup_count_as_record_labels(host, weights):
    """A lookup handed the labels with sample-major pooling (what a sharded table's kernel does) counts them
    from its own distinct rows: the same priorities, bit for bit, as recording them first and looking up after,
    with a row repeated in a bag and a table read by two features (each row counted once per sample)."""
    kind = next(k for k in KINDS if k.label_aware)
    nf = len(KEYS)
    members = [0, 1, 2, 1]  # f3 reads t1 as f1 does
    states = []
    cfgs = configs(kind)
    if weights == "per_table":  # members count labels with their own weights (and decays)
        for i, c in enumerate(cfgs):
            c.compression = dataclasses.replace(c.compression, pos_weight=1.0 + i, neg_weight=0.5 / (1 + i),
                                                decay=0.9 + 0.02 * i)
    for mode in ("record_first", "in_lookup"):
        ebc = collection(cfgs, "rowwise_adagrad", True)
        store: FusedRowStore = ebc._stores[0]
        with (contextlib.nullcontext() if host else torch_ops_only()):
            for step in range(3):
                g = torch.Generator().manual_seed(50 + step)
                lengths = torch.randint(0, 4, (nf * BATCH,), generator=g)
                values = torch.randint(0, 23, (int(lengths.sum()),), generator=g)
                values[1] = values[0]  # both in feature f0's first non-empty bags or one of them: a repeat
                labels = torch.rand(BATCH, generator=g)
                offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
                counts = lengths.view(nf, BATCH).sum(1).tolist()
                if mode == "record_first":
                    store.record_labels(values, offsets, members, counts, [BATCH] * nf, labels)
                    out = store.lookup(values, offsets, members, counts, [BATCH] * nf, sample_major=True)
                else:
                    out = store.lookup(values, offsets, members, counts, [BATCH] * nf, labels=labels,
                                       sample_major=True)
                out.backward(torch.randn(out.shape, generator=g))
                store.step_end()
        states.append({k: v.clone() for k, v in ebc.state_dict().items()})
    assert any(torch.count_nonzero(v.float()) for k, v in states[0].items() if k.endswith("priority"))
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


@pytest.mark.parametrize("host", [True, False], ids=["numpy", "torch_ops"])
def test_sample_major_order_moves_every_bag_to_its_sample(host):
    from torchrec_shark.modules.fused_store import _sample_major

    features, b = 3, 5
    g = torch.Generator().manual_seed(4)
    lengths = torch.randint(0, 4, (features * b,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    ids = torch.arange(int(offsets[-1]))
    # the reference: bag f * B + s of feature-major order goes to s * F + f
    want = torch.cat([ids[offsets[f * b + s] : offsets[f * b + s + 1]] for s in range(b) for f in range(features)])
    want_lengths = lengths.view(features, b).t().reshape(-1)
    with (contextlib.nullcontext() if host else torch_ops_only()):
        order, new_offsets = _sample_major(offsets, features, b)
    assert torch.equal(ids[order], want)
    assert torch.equal(new_offsets[1:] - new_offsets[:-1], want_lengths)


def test_labels_wait_for_their_own_batch_lookup_and_are_counted_without_one():
    """One store of every feature counts a batch's labels in that batch's lookup; labels recorded for
    another batch, or with no lookup before ``step_end``, count as they were recorded, as per table."""
    kind = next(k for k in KINDS if k.label_aware)
    cfgs = [CompressedEmbeddingBagConfig(name=f"t{i}", num_embeddings=23 + 7 * i, embedding_dim=DIM,
                                         feature_names=[KEYS[i]], compression=kind.example_spec())
            for i in range(len(KEYS))]
    fused, single = (collection(cfgs, "adagrad", f) for f in (True, False))
    assert fused._plan(tuple(KEYS)).whole
    for ebc in (fused, single):
        for step in range(4):
            labels = torch.randint(0, 2, (BATCH,), generator=torch.Generator().manual_seed(step)).float()
            recorded, looked_up = batch(step), batch(step + 10)
            ebc.record_labels(recorded, labels)
            if step == 1:  # no lookup this step
                ebc.step_end()
                continue
            out = ebc(recorded if step % 2 == 0 else looked_up).values()
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(7 + step)))
            ebc.step_end()
    assert_same_state(fused, single)
    assert any(torch.count_nonzero(v.float()) for k, v in fused.state_dict().items() if k.endswith("priority"))
