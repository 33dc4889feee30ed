import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_shark.models.dlrm import DLRM, DLRMTrain, FieldProjection


def _ebc(dims):
    tables = [EmbeddingBagConfig(name=f"t_{i}", embedding_dim=d, num_embeddings=20, feature_names=[f"f{i}"])
              for i, d in enumerate(dims)]
    return EmbeddingBagCollection(tables=tables)


def _kjt(n_features, batch, rows=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 3, (n_features * batch,), generator=g)
    values = torch.randint(0, rows, (int(lengths.sum()),), generator=g)
    return KeyedJaggedTensor.from_lengths_sync([f"f{i}" for i in range(n_features)], values, lengths)


def test_mixed_widths_are_projected_to_interaction_width():
    torch.manual_seed(0)
    model = DLRM(_ebc([8, 16, 4]), dense_in_features=3, dense_arch_layer_sizes=[16], over_arch_layer_sizes=[8, 1])
    assert set(model.projection.proj) == {"f0", "f2"}  # f1 already has the interaction width
    assert model.projection.proj["f0"].weight.shape == (16, 8)
    logits = model(torch.randn(5, 3), _kjt(3, 5))
    assert logits.shape == (5,)


def test_embed_then_predict_equals_forward():
    torch.manual_seed(0)
    model = DLRM(_ebc([8, 8]), dense_in_features=2, dense_arch_layer_sizes=[8], over_arch_layer_sizes=[4, 1])
    dense, kjt = torch.randn(6, 2), _kjt(2, 6)
    pooled = model.embed(kjt)
    assert sorted(pooled) == ["f0", "f1"]
    torch.testing.assert_close(model.predict(dense, pooled), model(dense, kjt))


def test_zero_pad_projection_pads_and_rejects_wider_fields():
    proj = FieldProjection({"a": 4, "b": 8}, interaction_dim=8, kind="zero_pad")
    out = proj({"a": torch.ones(2, 4), "b": torch.ones(2, 8)})
    assert out.shape == (2, 2, 8)
    assert torch.all(out[:, 0, 4:] == 0) and torch.all(out[:, 0, :4] == 1)
    with pytest.raises(ValueError, match="cannot be zero-padded"):
        FieldProjection({"a": 16}, interaction_dim=8, kind="zero_pad")


def test_train_wrapper_returns_pipeline_shaped_output():
    from torchrec.datasets.utils import Batch

    model = DLRMTrain(DLRM(_ebc([8]), 2, [8], [4, 1]))
    batch = Batch(torch.randn(4, 2), _kjt(1, 4), torch.tensor([0.0, 1.0, 1.0, 0.0]))
    loss, (loss_d, logits, labels) = model(batch)
    assert loss.requires_grad and not loss_d.requires_grad
    assert logits.shape == labels.shape == (4,)


def test_over_arch_must_end_in_one():
    with pytest.raises(ValueError, match="end in 1"):
        DLRM(_ebc([8]), 2, [8], [4, 2])
