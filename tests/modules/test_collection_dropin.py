"""CompressedEmbeddingBagCollection where a TorchRec model uses EmbeddingBagCollection: nn.Module
hooks (apply), learnable per-id weights of a feature shared by two tables, variable batch per
feature, torch.fx tracing, and the top-level exports."""

import pytest
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

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


def _configs(mean=True):
    # feature "a" feeds t0 (with "b") and t1; MEAN pooling on t1 (stock refuses per-id weights with MEAN)
    return [
        CompressedEmbeddingBagConfig(name="t0", num_embeddings=30, embedding_dim=8, feature_names=["a", "b"],
                                     compression=three_tier(0.3, 0.3)),
        CompressedEmbeddingBagConfig(name="t1", num_embeddings=30, embedding_dim=4, feature_names=["a"],
                                     pooling=PoolingType.MEAN if mean else PoolingType.SUM,
                                     compression=Uniform("int8")),
        CompressedEmbeddingBagConfig(name="t2", num_embeddings=20, embedding_dim=4, feature_names=["c"]),
    ]


def _collection(weighted=False):
    # lr 0: the tables stay as they are, so forward passes compare against the same stock tables
    return CompressedEmbeddingBagCollection(_configs(mean=not weighted), is_weighted=weighted, optimizer=SparseOptimizerSpec("sgd", lr=0.0))




def _kjt(weights=None):
    keys = ["c", "x", "b", "a"]  # another order than the tables, and an unused key
    lengths = torch.tensor([1, 0, 2] + [1, 1, 1] + [0, 3, 1] + [2, 1, 0])
    values = torch.arange(int(lengths.sum())) % 20
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths, weights=weights)


def test_module_apply_reaches_every_submodule():
    model = nn.Sequential(_collection(), nn.Linear(2, 2))
    seen = []
    model.apply(lambda m: seen.append(type(m).__name__))
    assert "CompressedEmbeddingBagCollection" in seen and "Linear" in seen
    assert sum(n.endswith("Table") for n in seen) == 3


def test_learnable_per_id_weights_of_a_feature_shared_by_two_tables_match_stock():
    ebc = _collection(weighted=True)
    stock = stock_from(ebc)
    n = int(_kjt().values().numel())
    w_ours = torch.linspace(0.5, 1.5, n).requires_grad_()
    w_stock = w_ours.detach().clone().requires_grad_()
    out_ours, out_stock = ebc(_kjt(w_ours)), stock(_kjt(w_stock))
    assert out_ours.keys() == out_stock.keys() == ["a@t0", "b", "a@t1", "c"]
    torch.testing.assert_close(out_ours.values(), out_stock.values())
    probe = torch.randn_like(out_stock.values())
    (out_ours.values() * probe).sum().backward()
    (out_stock.values() * probe).sum().backward()
    torch.testing.assert_close(w_ours.grad, w_stock.grad)
    # ids of "a" get gradient from both tables (not only one of them)
    a = slice(6, 9)
    assert w_ours.grad[a].abs().min() > 0


def _vbe_kjt():
    # per-feature batch sizes 2, 3, 1, 2 for keys c, x, b, a; the full batch has 3 samples
    keys = ["c", "x", "b", "a"]
    lengths = torch.tensor([1, 2] + [1, 0, 1] + [3] + [0, 2])
    values = torch.arange(int(lengths.sum())) % 20
    inverse = torch.tensor([[0, 1, 1], [0, 1, 2], [0, 0, 0], [1, 0, 1]])
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths,
                             stride_per_key_per_rank=[[2], [3], [1], [2]], inverse_indices=(keys, inverse))


def test_variable_batch_per_feature_matches_stock():
    ebc = _collection()
    stock = stock_from(ebc)
    kjt = _vbe_kjt()
    assert kjt.variable_stride_per_key()
    ours, ref = ebc(kjt), stock(kjt)
    assert ours.keys() == ref.keys()
    assert ours.values().shape == ref.values().shape == (3, 8 + 8 + 4 + 4)
    torch.testing.assert_close(ours.values(), ref.values())


def test_variable_batch_without_inverse_indices_is_refused_with_reason():
    kjt = _vbe_kjt()
    bare = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(),
                             stride_per_key_per_rank=[[2], [3], [1], [2]])
    with pytest.raises(ValueError, match="inverse_indices"):
        _collection()(bare)
    with pytest.raises(TableInputError, match="variable-batch"):
        _collection().record_labels(kjt, torch.zeros(3))


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.ebc = _collection()
        self.over = nn.Linear(24, 1)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.over(self.ebc(kjt).values())


@pytest.mark.parametrize("tracer", ["torch.fx", "torchrec.fx"])
def test_symbolic_trace_keeps_the_collection_as_one_call(tracer):
    model = _Model()
    if tracer == "torch.fx":
        gm = torch.fx.symbolic_trace(model)
    else:
        from torchrec.fx import symbolic_trace

        gm = symbolic_trace(model)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == ["ebc", "over"]
    kjt = _kjt()
    torch.testing.assert_close(gm(kjt), model(kjt))


def test_top_level_exports():
    import torchrec_shark
    from torchrec_shark import (  # noqa: F401
        CompressedEmbeddingBagCollection as C,
        CompressedEmbeddingBagCollectionSharder,
        CompressedEmbeddingBagConfig,
        MixedPrecision,
        TensorTrain,
        Uniform,
    )

    assert C is CompressedEmbeddingBagCollection
    assert CompressedEmbeddingBagCollectionSharder().module_type is CompressedEmbeddingBagCollection
    assert set(torchrec_shark.__all__) >= {"CompressedEmbeddingBagCollection", "TensorTrain", "Uniform"}
    with pytest.raises(AttributeError):
        torchrec_shark.NotAThing  # noqa: B018
