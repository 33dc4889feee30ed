"""CompressedEmbeddingBagCollection: TorchRec's EmbeddingBagCollection contract, training against
FBGEMM's fused kernel, the fused KeyedOptimizer, label routing, storage report, state round trip."""

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from tests.stock_reference import stock_from
from torchrec_shark.modules import (
    CompressedEmbeddingBagCollection,
    CompressedEmbeddingBagConfig,
    MixedPrecision,
    three_tier,
    SparseOptimizerSpec,
    TableInputError,
    Uniform,
)

B = 4


def _configs(mean=True):
    return [
        # two features share t0; feature "a" also feeds t2
        CompressedEmbeddingBagConfig(name="t0", num_embeddings=30, embedding_dim=8, feature_names=["a", "b"],
                                     compression=three_tier(0.2, 0.3)),
        CompressedEmbeddingBagConfig(name="t1", num_embeddings=20, embedding_dim=4, feature_names=["c"],
                                     pooling=PoolingType.MEAN if mean else PoolingType.SUM, compression=Uniform("int8")),
        CompressedEmbeddingBagConfig(name="t2", num_embeddings=30, embedding_dim=6, feature_names=["a"],
                                     compression=None),
        CompressedEmbeddingBagConfig(name="t3", num_embeddings=25, embedding_dim=4, feature_names=["d"],
                                     compression=Uniform("fp16")),
    ]


def _kjt(weighted, seed=0):
    """Keys in a different order than the tables, an extra key, empty and multi-hot bags."""
    g = torch.Generator().manual_seed(seed)
    keys = ["c", "x", "b", "d", "a"]
    lengths = torch.tensor([1, 0, 2, 3] + [1, 1, 1, 1] + [0, 0, 4, 1] + [2, 1, 0, 1] + [3, 0, 1, 2])
    values = torch.randint(0, 20, (int(lengths.sum()),), generator=g)
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths, weights=weights)




@pytest.mark.parametrize("weighted", [False, True])
def test_forward_matches_stock_collection_over_dequantised_tables(weighted):
    torch.manual_seed(0)
    # torch's embedding_bag has no weighted mean (the table tests cover it)
    ebc = CompressedEmbeddingBagCollection(_configs(mean=not weighted), is_weighted=weighted)
    assert ebc.is_weighted() == weighted
    assert [c.name for c in ebc.embedding_bag_configs()] == ["t0", "t1", "t2", "t3"]
    t0 = ebc.embedding_bags["t0"]
    t0.priority.copy_(torch.rand(30))
    t0.retier()  # a non-trivial row -> tier map
    kjt = _kjt(weighted)
    kt = ebc(kjt)
    ref = stock_from(ebc)(kjt)
    assert isinstance(kt, KeyedTensor)
    assert kt.keys() == ref.keys() == ["a@t0", "b", "c", "a@t2", "d"]
    assert kt.length_per_key() == ref.length_per_key() == [8, 8, 4, 6, 4]
    torch.testing.assert_close(kt.values(), ref.values(), rtol=1e-6, atol=1e-6)
    for key in kt.keys():
        torch.testing.assert_close(kt[key], ref[key], rtol=1e-6, atol=1e-6)


def test_missing_feature_is_a_clear_error():
    ebc = CompressedEmbeddingBagCollection(_configs())
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["a", "b"], values=torch.tensor([1, 2]), lengths=torch.tensor([1] * 8))
    with pytest.raises(ValueError, match=r"features \['c', 'd'\] are missing"):
        ebc(kjt)


def _fbgemm_pair(pooling, weighted):
    from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
    from torchrec.optim import RowWiseAdagrad

    cfg = dict(num_embeddings=50, embedding_dim=8, pooling=pooling)
    stock = FusedEmbeddingBagCollection(
        [EmbeddingBagConfig(name="t0", feature_names=["a", "b"], **cfg), EmbeddingBagConfig(name="t1", feature_names=["c"], **cfg)],
        optimizer_type=RowWiseAdagrad, optimizer_kwargs={"lr": 0.1, "eps": 1e-8}, is_weighted=weighted,
    )
    ours = CompressedEmbeddingBagCollection(
        [CompressedEmbeddingBagConfig(name="t0", feature_names=["a", "b"], **cfg),
         CompressedEmbeddingBagConfig(name="t1", feature_names=["c"], **cfg)],
        is_weighted=weighted, optimizer=SparseOptimizerSpec("rowwise_adagrad", lr=0.1, eps=1e-8),
    )
    sd = stock.state_dict()
    with torch.no_grad():
        for name in ("t0", "t1"):
            ours.embedding_bags[name].weight.copy_(sd[f"embedding_bags.{name}.weight"])
    return stock, ours


@pytest.mark.parametrize("pooling,weighted", [(PoolingType.SUM, False), (PoolingType.MEAN, False), (PoolingType.SUM, True)])
def test_uncompressed_tables_train_like_fbgemm_fused_kernel(pooling, weighted):
    """compression=None behaves like stock: same outputs and same weights after fused
    row-wise Adagrad steps as TorchRec's FBGEMM-backed FusedEmbeddingBagCollection."""
    stock, ours = _fbgemm_pair(pooling, weighted)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        lengths = torch.randint(0, 4, (3 * B,), generator=g)
        values = torch.randint(0, 50, (int(lengths.sum()),), generator=g)
        weights = torch.rand(values.numel(), generator=g) if weighted else None
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=["a", "b", "c"], values=values, lengths=lengths, weights=weights)
        out_s, out_o = stock(kjt), ours(kjt)
        torch.testing.assert_close(out_o.values(), out_s.values(), rtol=1e-5, atol=1e-6)
        grad = torch.randn(out_s.values().shape, generator=g)
        out_s.values().backward(grad)
        out_o.values().backward(grad)
    sd = stock.state_dict()
    for name in ("t0", "t1"):
        torch.testing.assert_close(ours.embedding_bags[name].weight, sd[f"embedding_bags.{name}.weight"], rtol=1e-5, atol=1e-6)
        assert not torch.equal(ours.embedding_bags[name].weight, torch.zeros(50, 8))


def test_fused_optimizer_is_a_keyed_optimizer_over_live_state():
    torch.manual_seed(0)
    ebc = CompressedEmbeddingBagCollection(_configs(), optimizer=SparseOptimizerSpec("rowwise_adagrad", lr=0.05))
    opt = ebc.fused_optimizer
    assert isinstance(opt, KeyedOptimizer)
    kt = ebc(_kjt(False))
    kt.values().sum().backward()
    sd = opt.state_dict()
    assert set(sd["state"]) == {f"embedding_bags.{t}.weight" for t in ("t0", "t1", "t2", "t3")}
    m = sd["state"]["embedding_bags.t0.weight"]["t0.momentum1"]
    assert m.shape == (30,) and float(m.abs().sum()) > 0
    # loading writes into the tables' own state
    new = {k: {n: torch.full_like(v, 0.5) for n, v in s.items()} for k, s in sd["state"].items()}
    opt.load_state_dict({**sd, "state": new})
    assert torch.equal(ebc.embedding_bags["t1"].optim.momentum1, torch.full((20,), 0.5))
    # the combined optimizer (as DistributedModelParallel builds it) pushes lr changes to the tables
    combined = CombinedOptimizer([("sparse", opt)])
    for group in combined.param_groups:
        group["lr"] = 0.01
    combined.step()
    assert all(t.optim.lr == 0.01 for t in ebc.embedding_bags.values())
    assert list(ebc.parameters()) == []  # nothing for DDP or dense optimizers


def test_record_labels_counts_a_sample_once_across_features_of_a_table():
    spec = MixedPrecision(decay=1.0, pos_weight=1.0, neg_weight=0.5, retier_every=100)
    ebc = CompressedEmbeddingBagCollection(
        [CompressedEmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=4, feature_names=["a", "b"], compression=spec)]
    )
    # sample 0: a=[3], b=[3, 4]; sample 1: a=[], b=[4]
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["b", "a"], values=torch.tensor([3, 4, 4, 3]),
                                              lengths=torch.tensor([2, 1, 1, 0]))
    ebc.record_labels(kjt, torch.tensor([1.0, 0.0]))
    ebc.step_end()
    expect = torch.zeros(10)
    expect[3], expect[4] = 1.0, 1.5
    torch.testing.assert_close(ebc.embedding_bags["t"].priorities(), expect)
    with pytest.raises(TableInputError, match="3 labels for a batch of 2"):
        ebc.record_labels(kjt, torch.ones(3))


def test_storage_report():
    ebc = CompressedEmbeddingBagCollection(_configs())
    t0 = ebc.table_memory_bytes("t0")
    assert {"fp32_rows", "fp16_rows", "int8_codes", "int8_scale_bias", "row_slot", "priority", "total"} <= set(t0)
    assert t0 == ebc.embedding_bags["t0"].memory_bytes()
    assert ebc.table_memory_bytes("t2")["total"] == 30 * 6 * 4
    assert ebc.table_memory_bytes("t3")["total"] == 25 * 4 * 2 + 8  # + the update counter (rounding noise step)
    mem = ebc.memory_bytes()
    assert mem["total"] == sum(p["total"] for p in mem["per_table"].values())
    assert ebc.fp32_bytes() == (30 * 8 + 20 * 4 + 30 * 6 + 25 * 4) * 4


def test_state_dict_round_trip_with_optimizer_state():
    torch.manual_seed(0)
    a = CompressedEmbeddingBagCollection(_configs(), optimizer=SparseOptimizerSpec("adam", lr=0.05))
    for seed in range(3):
        kjt = _kjt(False, seed)
        a.record_labels(kjt, torch.tensor([1.0, 0.0, 1.0, 0.0]))
        a(kjt).values().sum().backward()
        a.step_end()
    a.embedding_bags["t0"].retier()
    torch.manual_seed(1)
    b = CompressedEmbeddingBagCollection(_configs(), optimizer=SparseOptimizerSpec("adam", lr=0.05))
    b.load_state_dict(a.state_dict())
    b.fused_optimizer.load_state_dict(a.fused_optimizer.state_dict())
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and "embedding_bags.t0.row_slot" in sa
    assert not any(".optim." in k for k in sa)  # optimizer state is the fused optimizer's (as with TBE)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a.embedding_bags["t0"].priorities(), b.embedding_bags["t0"].priorities())
    kjt = _kjt(False, 9)
    with torch.no_grad():
        torch.testing.assert_close(a(kjt).values(), b(kjt).values(), rtol=0, atol=0)
    opt_a, opt_b = a.fused_optimizer.state_dict(), b.fused_optimizer.state_dict()
    for k in opt_a["state"]:
        for n in opt_a["state"][k]:
            assert torch.equal(opt_a["state"][k][n], opt_b["state"][k][n])


def test_building_leaves_the_global_rng_alone_and_is_seeded():
    torch.manual_seed(5)
    expect = torch.rand(3)
    torch.manual_seed(5)
    a = CompressedEmbeddingBagCollection(_configs())
    assert torch.equal(torch.rand(3), expect)  # dense layers built next initialise as without tables
    torch.manual_seed(5)
    b = CompressedEmbeddingBagCollection(_configs()[::-1])  # per-table streams: order does not matter
    assert torch.equal(a.embedding_bags["t2"].weight, b.embedding_bags["t2"].weight)
    assert not torch.equal(a.embedding_bags["t0"].full_weight()[:, :6], a.embedding_bags["t2"].weight)
    torch.manual_seed(6)
    c = CompressedEmbeddingBagCollection(_configs())
    assert not torch.equal(a.embedding_bags["t2"].weight, c.embedding_bags["t2"].weight)


def test_stock_tables_have_stock_state_dict_keys_and_no_optimizer_state():
    stock_cfgs = [EmbeddingBagConfig(name=f"t{i}", num_embeddings=20 + i, embedding_dim=4, feature_names=[f"f{i}"])
                  for i in range(3)]
    stock = EmbeddingBagCollection(tables=stock_cfgs)
    ours = CompressedEmbeddingBagCollection(
        [CompressedEmbeddingBagConfig(**{k: getattr(c, k) for k in ("name", "num_embeddings", "embedding_dim",
                                                                     "feature_names")}) for c in stock_cfgs],
        optimizer=SparseOptimizerSpec("adam"))
    sd, ref = ours.state_dict(), stock.state_dict()
    assert list(sd) == list(ref) and all(sd[k].shape == ref[k].shape for k in ref)
    ours.load_state_dict(ref)  # strict, both ways
    stock.load_state_dict(ours.state_dict())
    assert all(torch.equal(ours.state_dict()[k], ref[k]) for k in ref)


@pytest.mark.parametrize("spec", [three_tier(0.2, 0.3), Uniform("int8"), Uniform("fp16")])
def test_stock_state_dict_loads_into_a_compressed_kind(spec):
    cfg = dict(name="t", num_embeddings=50, embedding_dim=8, feature_names=["f"])
    torch.manual_seed(3)
    stock = EmbeddingBagCollection(tables=[EmbeddingBagConfig(**cfg)])
    ours = CompressedEmbeddingBagCollection([CompressedEmbeddingBagConfig(**cfg, compression=spec)])
    before = ours.embedding_bags["t"].full_weight()
    ours.load_state_dict(stock.state_dict())  # another layout: encoded through the table's kind
    w, ref = ours.embedding_bags["t"].full_weight(), stock.state_dict()["embedding_bags.t.weight"]
    step = 1.01 * (ref.amax(1, keepdim=True) - ref.amin(1, keepdim=True)) / 255 + ref.abs() * 2.0**-10
    assert bool(((w - ref).abs() <= step).all()) and not torch.equal(w, before)
