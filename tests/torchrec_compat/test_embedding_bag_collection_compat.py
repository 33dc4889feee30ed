"""The checks of TorchRec's own ``EmbeddingBagCollection`` / ``FusedEmbeddingBagCollection`` tests,
written against TorchRec's public API, with ``CompressedEmbeddingBagCollection`` in the place of the
stock class: output keys, shapes and values for SUM / MEAN / weighted pooling, shared tables and
features, int32 ids and offsets, changing batch sizes, and fused SGD / Adagrad / row-wise Adagrad
over two steps against FBGEMM's TBE. A compressed kind is compared with a stock collection holding
its dequantised tables (its storage rounds values; the lookup over them is the same)."""

from typing import List

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.stock_reference import stock_from
from torchrec_shark import (
    CompressedEmbeddingBagCollection,
    CompressedEmbeddingBagConfig,
    MixedPrecision,
    three_tier,
    SparseOptimizerSpec,
    TensorTrain,
    Uniform,
)

KINDS = {
    "fp32": None,
    "fp16": Uniform("fp16"),
    "int8": Uniform("int8"),
    "mixed_precision": three_tier(0.25, 0.25),
    "tensor_train": TensorTrain(ranks=(4,), row_factors=(2, 2, 3)),
}


def _configs(kind, pooling=PoolingType.SUM, shared_feature=False) -> List[CompressedEmbeddingBagConfig]:
    spec = KINDS[kind]
    t1_features = ["f1", "f2"] if not shared_feature else ["f1"]
    return [
        CompressedEmbeddingBagConfig(name="t1", num_embeddings=12, embedding_dim=4, feature_names=t1_features,
                                     pooling=pooling, compression=spec),
        CompressedEmbeddingBagConfig(name="t2", num_embeddings=12, embedding_dim=8,
                                     feature_names=["f1"] if shared_feature else ["f3"], pooling=pooling,
                                     compression=spec),
    ]




def _kjt(keys, batch, seed=0, weighted=False, dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(keys) * batch,), generator=g)
    values = torch.randint(0, 12, (int(lengths.sum()),), generator=g)
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return KeyedJaggedTensor(keys=keys, values=values.to(dtype), offsets=offsets.to(dtype), weights=weights)


def _frozen(configs, weighted=False):
    torch.manual_seed(0)
    return CompressedEmbeddingBagCollection(configs, is_weighted=weighted, optimizer=SparseOptimizerSpec("sgd", lr=0.0))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_unweighted_pooling_matches_stock(kind, pooling):
    ebc = _frozen(_configs(kind, pooling))
    out, ref = ebc(_kjt(["f1", "f2", "f3"], 3)), stock_from(ebc)(_kjt(["f1", "f2", "f3"], 3))
    assert out.keys() == ref.keys() == ["f1", "f2", "f3"]
    assert out.values().shape == (3, 4 + 4 + 8) and out.length_per_key() == [4, 4, 8]
    torch.testing.assert_close(out.values(), ref.values())


@pytest.mark.parametrize("kind", list(KINDS))
def test_weighted_matches_stock(kind):
    ebc = _frozen(_configs(kind), weighted=True)
    kjt = _kjt(["f1", "f2", "f3"], 4, weighted=True)
    torch.testing.assert_close(ebc(kjt).values(), stock_from(ebc)(kjt).values())


@pytest.mark.parametrize("kind", list(KINDS))
def test_shared_feature_across_tables_matches_stock(kind):
    ebc = _frozen(_configs(kind, shared_feature=True))
    kjt = _kjt(["f1"], 3)
    out, ref = ebc(kjt), stock_from(ebc)(kjt)
    assert out.keys() == ref.keys() == ["f1@t1", "f1@t2"]
    torch.testing.assert_close(out.values(), ref.values())


@pytest.mark.parametrize("kind", ["fp32", "int8", "tensor_train"])
def test_int32_ids_and_offsets(kind):
    ebc = _frozen(_configs(kind))
    out32 = ebc(_kjt(["f1", "f2", "f3"], 3, dtype=torch.int32))
    out64 = ebc(_kjt(["f1", "f2", "f3"], 3, dtype=torch.int64))
    torch.testing.assert_close(out32.values(), out64.values())
    torch.testing.assert_close(out32.values(), stock_from(ebc)(_kjt(["f1", "f2", "f3"], 3, dtype=torch.int32)).values())


@pytest.mark.parametrize("kind", ["fp32", "mixed_precision"])
def test_changing_batch_sizes(kind):
    ebc = _frozen(_configs(kind))
    stock = stock_from(ebc)
    for batch in (2, 5, 1, 3):
        kjt = _kjt(["f3", "f2", "f1"], batch, seed=batch)
        out = ebc(kjt)
        assert out.values().shape[0] == batch
        torch.testing.assert_close(out.values(), stock(kjt).values())


_FUSED = {"sgd": (torch.optim.SGD, {"lr": 0.1}), "adagrad": (torch.optim.Adagrad, {"lr": 0.1, "eps": 1e-8}),
          "rowwise_adagrad": (RowWiseAdagrad, {"lr": 0.1, "eps": 1e-8})}


@pytest.mark.parametrize("optimizer", list(_FUSED))
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_fused_updates_match_fused_embedding_bag_collection_over_two_steps(optimizer, pooling):
    cls, kwargs = _FUSED[optimizer]
    configs = _configs("fp32", pooling)
    torch.manual_seed(0)
    ours = CompressedEmbeddingBagCollection(configs, optimizer=SparseOptimizerSpec(optimizer, lr=0.1, eps=1e-8))
    stock = FusedEmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name=c.name, num_embeddings=c.num_embeddings, embedding_dim=c.embedding_dim,
                                   feature_names=list(c.feature_names), pooling=c.pooling) for c in configs],
        optimizer_type=cls, optimizer_kwargs=kwargs, device=torch.device("cpu"),
    )
    for name, table in ours.embedding_bags.items():
        stock.state_dict()[f"embedding_bags.{name}.weight"].copy_(table.full_weight())
    for step in range(2):
        kjt = _kjt(["f1", "f2", "f3"], 3 + step, seed=step)
        probe = torch.randn(3 + step, 16, generator=torch.Generator().manual_seed(step))
        for m in (ours, stock):
            (m(kjt).values() * probe).sum().backward()
    for name, table in ours.embedding_bags.items():
        torch.testing.assert_close(table.full_weight(), stock.state_dict()[f"embedding_bags.{name}.weight"])


# ---------------------------------------------------------------------------- documented differences
def test_a_compressed_update_is_the_stock_update_rounded_to_the_tables_storage():
    """Stock's fused update lands exactly; an int8 table stores the updated row re-quantised (nearest
    rounding here), so it differs from stock by at most that row's quantisation step."""
    configs = [CompressedEmbeddingBagConfig(name="t", num_embeddings=12, embedding_dim=8, feature_names=["f"],
                                            compression=Uniform("int8", rounding="nearest"))]
    torch.manual_seed(0)
    ours = CompressedEmbeddingBagCollection(configs, optimizer=SparseOptimizerSpec("sgd", lr=0.5))
    stock = FusedEmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name="t", num_embeddings=12, embedding_dim=8, feature_names=["f"])],
        optimizer_type=torch.optim.SGD, optimizer_kwargs={"lr": 0.5}, device=torch.device("cpu"))
    weight = stock.state_dict()["embedding_bags.t.weight"]
    weight.copy_(ours.embedding_bags["t"].full_weight())
    kjt = _kjt(["f"], 4)
    for m in (ours, stock):
        (m(kjt).values() * torch.arange(8.0)).sum().backward()
    got = ours.embedding_bags["t"].full_weight()
    step = (weight.amax(1) - weight.amin(1)) / 255
    assert (got - weight).abs().amax(1).le(step + 1e-6).all()
    assert (got - weight).abs().max() > 0  # rounded, not the exact stock update


@pytest.mark.parametrize("kind", list(KINDS))
def test_meta_device_construction_allocates_no_table_storage(kind):
    """As ``EmbeddingBagCollection(device="meta")``: the sharder builds each rank's shards later."""
    ebc = CompressedEmbeddingBagCollection(_configs(kind), device=torch.device("meta"))
    tensors = list(ebc.buffers()) + [t for m in ebc.modules() for t in vars(m).values() if isinstance(t, torch.Tensor)]
    assert all(t.device.type == "meta" or t.numel() <= 16 for t in tensors)
    assert ebc.memory_bytes()["total"] > 0  # what the tables will take once built
