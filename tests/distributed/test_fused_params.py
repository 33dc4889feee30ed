"""TorchRec's fused_params on our sharder: mapped onto the tables' fused optimizer (checked against
FBGEMM's TBE through stock FusedEmbeddingBagCollection), or refused naming the setting."""

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.dist_utils import run_ranks
from torchrec_shark import (
    CompressedEmbeddingBagCollection,
    CompressedEmbeddingBagCollectionSharder,
    CompressedEmbeddingBagConfig,
    MixedPrecision,
    three_tier,
    TensorTrain,
)
from torchrec_shark.distributed.fused_params import UnsupportedFusedParamError, optimizer_spec_from_fused_params
from torchrec_shark.modules import SparseOptimizerSpec

DEFAULT = SparseOptimizerSpec("sgd", lr=0.1)


def test_no_fused_params_keep_the_modules_optimizer():
    assert optimizer_spec_from_fused_params(None, DEFAULT) is DEFAULT
    assert optimizer_spec_from_fused_params({}, DEFAULT) is DEFAULT


def test_fused_params_map_onto_the_spec():
    spec = optimizer_spec_from_fused_params({"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.5}, DEFAULT)
    assert (spec.name, spec.lr) == ("adagrad", 0.5)
    spec = optimizer_spec_from_fused_params(
        {"optimizer": EmbOptimType.ADAM, "learning_rate": 0.01, "eps": 1e-6, "beta1": 0.8, "beta2": 0.95,
         "weight_decay": 0.1, "cache_load_factor": 0.2}, DEFAULT)
    assert (spec.name, spec.lr, spec.eps, spec.beta1, spec.beta2, spec.weight_decay) == ("adam", 0.01, 1e-6, 0.8, 0.95, 0.1)
    spec = optimizer_spec_from_fused_params(
        {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "weight_decay": 0.01, "weight_decay_mode": WeightDecayMode.L2},
        DEFAULT)
    assert (spec.name, spec.weight_decay, spec.lr) == ("rowwise_adagrad", 0.01, 0.1)  # lr from the module's spec
    assert optimizer_spec_from_fused_params({"learning_rate": 0.3}, DEFAULT) == SparseOptimizerSpec("sgd", lr=0.3)


@pytest.mark.parametrize("fused_params, named", [
    ({"optimizer": EmbOptimType.LAMB}, "lamb"),
    ({"optimizer": EmbOptimType.EXACT_SGD, "max_gradient": 1.0}, "max_gradient"),
    ({"optimizer": EmbOptimType.EXACT_ADAGRAD, "beta1": 0.9}, "beta1"),
    ({"optimizer": EmbOptimType.EXACT_ADAGRAD, "weight_decay": 0.1}, "weight_decay"),
    ({"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "weight_decay": 0.1,
      "weight_decay_mode": WeightDecayMode.DECOUPLE}, "weight_decay_mode"),
    ({"optimizer": EmbOptimType.EXACT_SGD, "weight_decay": 0.1}, "weight_decay"),
    ({"stochastic_rounding": False}, "stochastic_rounding"),
    ({"output_dtype": "fp16"}, "output_dtype"),
])
def test_unsupported_settings_fail_naming_the_setting(fused_params, named):
    with pytest.raises(UnsupportedFusedParamError, match=named):
        optimizer_spec_from_fused_params(fused_params, DEFAULT)


_TORCH_CLASS = {EmbOptimType.EXACT_SGD: torch.optim.SGD, EmbOptimType.EXACT_ADAGRAD: torch.optim.Adagrad,
                EmbOptimType.EXACT_ROWWISE_ADAGRAD: RowWiseAdagrad}


@pytest.mark.parametrize("fused_params", [
    {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.3},
    {"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.3, "eps": 1e-3},
    {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.3, "eps": 1e-2},
])
def test_mapped_spec_trains_like_fbgemm_with_the_same_settings(fused_params):
    """Two steps of an fp32 table with the mapped spec == stock FusedEmbeddingBagCollection (FBGEMM TBE)."""
    kw = {k: v for k, v in fused_params.items() if k != "optimizer"}
    kw["lr"] = kw.pop("learning_rate")
    cfg = dict(name="t", num_embeddings=20, embedding_dim=8, feature_names=["f"])
    stock = FusedEmbeddingBagCollection([EmbeddingBagConfig(**cfg)], optimizer_type=_TORCH_CLASS[fused_params["optimizer"]],
                                        optimizer_kwargs=kw, device=torch.device("cpu"))
    ours = CompressedEmbeddingBagCollection([CompressedEmbeddingBagConfig(**cfg)],
                                            optimizer=optimizer_spec_from_fused_params(fused_params, DEFAULT))
    table = ours.embedding_bags["t"]
    stock.state_dict()["embedding_bags.t.weight"].copy_(table.full_weight())
    kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.tensor([1, 2, 3, 1, 5, 1]), torch.tensor([2, 1, 3]))
    probe = torch.arange(8.0)
    for _ in range(2):
        for m in (stock, ours):
            (m(kjt).values() * probe).sum().backward()
    torch.testing.assert_close(table.full_weight(), stock.state_dict()["embedding_bags.t.weight"])


# ---------------------------------------------------------------------------- through DMP (one spawned rank)
def _configs():
    return [
        CompressedEmbeddingBagConfig(name="t_fp", num_embeddings=32, embedding_dim=8, feature_names=["a"]),
        CompressedEmbeddingBagConfig(name="t_mp", num_embeddings=32, embedding_dim=8, feature_names=["b"],
                                     compression=three_tier(0.5, 0.5, rounding="nearest")),
        CompressedEmbeddingBagConfig(name="t_tt", num_embeddings=64, embedding_dim=8, feature_names=["c"],
                                     compression=TensorTrain(ranks=(4,), row_factors=(4, 4, 4))),
    ]


def _batch(step):
    g = torch.Generator().manual_seed(step)
    lengths = torch.randint(0, 3, (12,), generator=g)
    return KeyedJaggedTensor.from_lengths_sync(["a", "b", "c"], torch.randint(0, 32, (int(lengths.sum()),), generator=g),
                                               lengths)


def _sharded_with_fused_params(rank, world_size):
    from torchrec.distributed.model_parallel import DistributedModelParallel

    fused = {"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.5}
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"ebc": CompressedEmbeddingBagCollection(_configs(), optimizer=DEFAULT)})
    dmp = DistributedModelParallel(model, device=torch.device("cpu"),
                                   sharders=[CompressedEmbeddingBagCollectionSharder(fused_params=fused)])
    torch.manual_seed(0)
    expected = CompressedEmbeddingBagCollection(_configs(), optimizer=SparseOptimizerSpec("adagrad", lr=0.5))
    torch.manual_seed(0)
    ignored = CompressedEmbeddingBagCollection(_configs(), optimizer=DEFAULT)
    sharded = dmp.module["ebc"]
    for step in range(2):
        out = sharded(_batch(step))
        out = out.wait() if hasattr(out, "wait") else out
        out.values().square().sum().backward()
        dmp.fused_optimizer.step()  # row-wise TT shards apply their replicated cores' updates here
        for m in (expected, ignored):
            m(_batch(step)).values().square().sum().backward()
            m.fused_optimizer.step()
    probe = _batch(5)
    got = sharded(probe)
    got = (got.wait() if hasattr(got, "wait") else got).to_dict()
    diff_expected = max(float((got[k] - v).detach().abs().max()) for k, v in expected(probe).to_dict().items())
    diff_ignored = max(float((got[k] - v).detach().abs().max()) for k, v in ignored(probe).to_dict().items())
    lrs = [g["lr"] for g in dmp.fused_optimizer.param_groups]
    try:
        DistributedModelParallel(
            torch.nn.ModuleDict({"ebc": CompressedEmbeddingBagCollection(_configs())}), device=torch.device("cpu"),
            sharders=[CompressedEmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.LAMB})])
        refused = ""
    except Exception as e:  # noqa: BLE001
        refused = str(e)
    return {"diff_expected": diff_expected, "diff_ignored": diff_ignored, "lrs": lrs, "refused": refused}


def test_sharder_fused_params_choose_the_sharded_tables_optimizer():
    (result,) = run_ranks(_sharded_with_fused_params, 1)
    assert result["diff_expected"] < 1e-5
    assert result["diff_ignored"] > 1e-3  # the module's own SGD would have given other tables
    assert result["lrs"] and all(lr == 0.5 for lr in result["lrs"])
    assert "lamb" in result["refused"]


def test_apply_optimizer_in_backward_has_nothing_to_attach_to():
    """The collection registers no parameters (its tables update themselves in backward), so
    ``apply_optimizer_in_backward`` over its parameters registers nothing: the optimizer is set by
    ``optimizer=`` or the sharder's ``fused_params``."""
    from torch.distributed.optim import _apply_optimizer_in_backward  # what TorchRec's helpers call

    ebc = CompressedEmbeddingBagCollection(_configs())
    assert list(ebc.parameters()) == []
    _apply_optimizer_in_backward(torch.optim.Adagrad, ebc.parameters(), {"lr": 0.5})
    assert not any(hasattr(t, "_in_backward_optimizers") for t in ebc.buffers())
