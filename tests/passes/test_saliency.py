"""SSEDS math: saliency = |dL/dalpha| of a per-dimension mask at the pooled embeddings, and the budgeted choice."""

import math
from types import SimpleNamespace

import pytest
import torch
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torch.nn import functional as F

from torchrec_shark.models.dlrm import DLRM
from torchrec_shark.passes import saliency as sal
from torchrec_shark.passes.run_loader import pooled_gradients

WIDTHS = [8, 4, 8]  # f1 is narrower than the interaction width: it goes through a projection
ROWS = [30, 12, 50]
BATCH = 16


class _Double(torch.nn.Module):
    """The DLRM's dense side in float64 (pooled embeddings cast up) so finite differences are exact."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def embed(self, kjt):
        return {f: v.double() for f, v in self.model.embed(kjt).items()}

    def predict(self, dense, pooled):
        return self.model.predict(dense, pooled)


def _model():
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=f"t_{i}", embedding_dim=w, num_embeddings=n, feature_names=[f"f{i}"])
              for i, (w, n) in enumerate(zip(WIDTHS, ROWS))]
    model = DLRM(EmbeddingBagCollection(tables=tables), dense_in_features=3, dense_arch_layer_sizes=[8],
                 over_arch_layer_sizes=[8, 1])
    for p in model.embedding_bag_collection.parameters():
        torch.nn.init.normal_(p, std=0.5)
    for m in (model.projection, model.dense_arch, model.over_arch):
        m.double()
    return _Double(model.eval())


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(ROWS) * BATCH,), generator=g)  # empty bags included
    per_field = lengths.view(len(ROWS), BATCH).sum(1)
    values = torch.cat([torch.randint(0, n, (int(c),), generator=g) for n, c in zip(ROWS, per_field)])
    kjt = KeyedJaggedTensor.from_lengths_sync([f"f{i}" for i in range(len(ROWS))], values, lengths)
    dense = torch.randn(BATCH, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 2, (BATCH,), generator=g).double()
    return Batch(dense, kjt, labels)


class _Data:
    def __init__(self, seeds):
        self.seeds = seeds

    def batches(self, split, batch_size, rank=0, world_size=1, start_batch=0):
        assert split == "val" and batch_size == BATCH
        return iter([_batch(s) for s in self.seeds])


def _fake_run(model, seeds):
    """What pooled_gradients reads of a LoadedRun."""
    return SimpleNamespace(
        cfg=SimpleNamespace(trainer=SimpleNamespace(batch_size=BATCH)),
        env=SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu")),
        trainer=SimpleNamespace(dataset=_Data(seeds)),
        dlrm=model,
    )


def _masked_loss(model, batches, alpha):
    """Summed loss with an explicit mask alpha[f] (shape [width]) on every pooled embedding."""
    total = 0.0
    for b in batches:
        pooled = model.embed(b.sparse_features)
        logits = model.predict(b.dense_features, {f: v * alpha[f] for f, v in pooled.items()})
        total = total + F.binary_cross_entropy_with_logits(logits, b.labels, reduction="sum")
    return total


def test_saliency_equals_finite_differences_of_an_explicit_mask():
    model, seeds = _model(), [1, 2]
    sums = sal.signed_sums(pooled_gradients(_fake_run(model, seeds), num_batches=len(seeds)))
    batches = [_batch(s) for s in seeds]
    ones = {f"f{i}": torch.ones(w, dtype=torch.float64) for i, w in enumerate(WIDTHS)}
    eps = 1e-6
    with torch.no_grad():
        for f, w in zip(ones, WIDTHS):
            fd = torch.zeros(w, dtype=torch.float64)
            for d in range(w):
                up = {k: v.clone() for k, v in ones.items()}
                dn = {k: v.clone() for k, v in ones.items()}
                up[f][d] += eps
                dn[f][d] -= eps
                fd[d] = (_masked_loss(model, batches, up) - _masked_loss(model, batches, dn)) / (2 * eps)
            assert sums[f].shape == (w,)
            torch.testing.assert_close(sums[f], fd, rtol=1e-6, atol=1e-8, msg=f)
    saliency = sal.normalise(sums)
    total = sum(v.abs().sum() for v in sums.values())
    for f in sums:
        torch.testing.assert_close(saliency[f], sums[f].abs() / total)
    assert math.isclose(sum(float(v.sum()) for v in saliency.values()), 1.0, rel_tol=1e-12)


def _centred_masked_loss(model, batch, alpha):
    """One batch's summed loss with each dimension's deviation from its batch mean masked."""
    pooled = model.embed(batch.sparse_features)
    masked = {f: v.mean(0, keepdim=True) + alpha[f] * (v - v.mean(0, keepdim=True)) for f, v in pooled.items()}
    logits = model.predict(batch.dense_features, masked)
    return F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="sum")


def test_centred_per_batch_saliency_equals_summed_abs_finite_differences():
    model, seeds = _model(), [1, 2, 3]
    got = sal.signed_sums(pooled_gradients(_fake_run(model, seeds), num_batches=len(seeds)),
                          per_batch_abs=True, center=True)
    plain = sal.signed_sums(pooled_gradients(_fake_run(model, seeds), num_batches=len(seeds)))
    eps = 1e-6
    with torch.no_grad():
        for f, w in zip(got, WIDTHS):
            ref = torch.zeros(w, dtype=torch.float64)
            for s in seeds:
                batch = _batch(s)
                for d in range(w):
                    up = {f"f{i}": torch.ones(n, dtype=torch.float64) for i, n in enumerate(WIDTHS)}
                    dn = {k: v.clone() for k, v in up.items()}
                    up[f][d] += eps
                    dn[f][d] -= eps
                    fd = (_centred_masked_loss(model, batch, up) - _centred_masked_loss(model, batch, dn)) / (2 * eps)
                    ref[d] += abs(float(fd))
            torch.testing.assert_close(got[f], ref, rtol=1e-6, atol=1e-8, msg=f)
            assert not torch.allclose(got[f], plain[f].abs())  # a different quantity from the plain sums


def test_num_batches_limits_the_accumulation():
    model = _model()
    one = sal.signed_sums(pooled_gradients(_fake_run(model, [1, 2, 3]), num_batches=1))
    ref = sal.signed_sums(pooled_gradients(_fake_run(model, [1]), num_batches=5))
    for f in ref:
        torch.testing.assert_close(one[f], ref[f])


def test_normalise_of_all_zeros_stays_zero():
    out = sal.normalise({"a": torch.zeros(4), "b": torch.zeros(8)})
    assert all(float(v.abs().sum()) == 0 for v in out.values())


def test_all_reduce_sums_without_a_group_copies_in_field_order():
    # Two ranks summing their sums: tests/passes/test_dim_search.py (two-rank search == one-rank search).
    sums = {"b": torch.full((2,), 2.0), "a": torch.arange(3.0)}
    out = sal.all_reduce_sums(sums, fields=["b", "a"])
    assert list(out) == ["b", "a"]
    torch.testing.assert_close(out["a"], sums["a"])
    assert out["a"].data_ptr() != sums["a"].data_ptr()


# ---------------------------------------------------------------------------- widths and budget
@pytest.mark.parametrize("kept,current,expected", [
    (0, 32, 4), (1, 32, 4), (4, 32, 4), (5, 32, 8), (8, 32, 8), (9, 32, 12), (29, 32, 32), (32, 32, 32),
    (3, 4, 4), (0, 4, 4), (7, 8, 8),
])
def test_round_width(kept, current, expected):
    assert sal.round_width(kept, current) == expected


def _tables():
    return [
        sal.TableInfo("big", rows=1000, width=8, features=("fb",)),
        sal.TableInfo("mid", rows=100, width=8, features=("fm",)),
        sal.TableInfo("small", rows=10, width=8, features=("fs",)),
    ]


def _sal(values):
    return {f: torch.tensor(v, dtype=torch.float64) for f, v in values.items()}


def test_budget_keeps_the_most_salient_dims_with_exact_parameter_count():
    tables = _tables()  # current params: 8 * (1000 + 100 + 10) = 8880
    s = _sal({
        "fb": [0.20, 0.15, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001],
        "fm": [0.10, 0.09, 0.08, 0.07, 0.06, 0.002, 0.002, 0.002],
        "fs": [0.05, 0.04, 0.03, 0.02, 0.01, 0.009, 0.008, 0.0005],
    })
    sel = sal.select_dims(s, tables, budget=0.3)  # target 2664
    # ranked: fb0, fb1 (1000 each), fm0..fm4 (100 each), fs0..fs6 (10 each): 2570; fm5 (100) would reach
    # 2670 > 2664 and closes "mid", fb2 closes "big"; fs7, ranked last, still fits.
    assert sel.kept_dims == {"big": 2, "mid": 5, "small": 8}
    assert sel.selected_params == 2 * 1000 + 5 * 100 + 8 * 10 == 2580
    assert [(n, d) for n, d, _, ok in sel.ranking if not ok][:2] == [("mid", 5), ("mid", 6)]
    assert sel.selected_params <= sel.target_params == pytest.approx(0.3 * 8880)
    assert sel.table_widths == {"big": 4, "mid": 8, "small": 8}
    assert sel.field_widths == {"fb": 4, "fm": 8, "fs": 8}
    assert sel.final_params == 4 * 1000 + 8 * 100 + 8 * 10
    final = sal.select_dims(s, tables, budget=0.6, budget_on="final")  # target 5328: "big" can not go to 8
    assert final.table_widths == {"big": 4, "mid": 8, "small": 8} and final.final_params == 4880
    assert sel.columns["big"] == [0, 1, 2, 3]  # top 2 plus the next most salient (ties: lower dim)
    assert sel.columns["mid"] == list(range(8))


def test_columns_are_each_tables_top_dims_sorted():
    tables = [sal.TableInfo("t", rows=10, width=16, features=("f",)), sal.TableInfo("u", rows=10, width=16,
                                                                                  features=("g",))]
    order = [13, 2, 7, 0, 9, 15, 4, 11, 1, 3, 5, 6, 8, 10, 12, 14]
    sf = torch.zeros(16, dtype=torch.float64)
    for r, d in enumerate(order):
        sf[d] = 1.0 - r / 100
    s = {"f": sf, "g": torch.full((16,), 1e-3, dtype=torch.float64)}
    sel = sal.select_dims(s, tables, budget=5 * 10 / 320)  # 5 dims of t fit
    assert sel.kept_dims == {"t": 5, "u": 0}
    assert sel.table_widths == {"t": 8, "u": 4}
    assert sel.columns["t"] == sorted(order[:8])
    assert sel.columns["u"] == [0, 1, 2, 3]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("budget_on", ["selected", "final"])
def test_budget_invariants_on_random_saliency(seed, budget_on):
    g = torch.Generator().manual_seed(seed)
    tables = [sal.TableInfo(f"t{i}", rows=int(r), width=int(w), features=(f"f{i}",))
              for i, (r, w) in enumerate(zip(torch.randint(5, 5000, (7,), generator=g),
                                             [32, 16, 32, 8, 4, 32, 16]))]
    s = {t.features[0]: torch.rand(t.width, generator=g, dtype=torch.float64) for t in tables}
    budget = 0.25 + 0.1 * seed
    sel = sal.select_dims(s, tables, budget=budget, budget_on=budget_on)
    current = sum(t.rows * t.width for t in tables)
    assert sel.current_params == current
    assert sel.selected_params == sum(t.rows * sel.kept_dims[t.name] for t in tables)
    assert sel.final_params == sum(t.rows * sel.table_widths[t.name] for t in tables)
    charged = sel.selected_params if budget_on == "selected" else sel.final_params
    assert charged <= budget * current
    for t in tables:
        w = sel.table_widths[t.name]
        assert w == min(t.width, max(4, 4 * math.ceil(sel.kept_dims[t.name] / 4)))
        assert w % 4 == 0 and 4 <= w <= t.width
        cols = sel.columns[t.name]
        assert cols == sorted(cols) and len(cols) == w
        ranked = sorted(range(t.width), key=lambda d: -float(s[t.features[0]][d]))
        assert set(cols) == set(ranked[:w])
    # Greedy and maximal: a table that stopped short could not take its next dim.
    for t in tables:
        k = sel.kept_dims[t.name]
        if k < t.width:
            if budget_on == "selected":
                extra = t.rows
            else:
                extra = t.rows * (sal.round_width(k + 1, t.width) - sal.round_width(k, t.width))
            assert extra > 0 and charged + extra > budget * current
    # Kept dims are a prefix of the global ranking restricted to the tables that were never refused.
    kept = [(n, d) for n, d, _, ok in sel.ranking if ok]
    assert len(kept) == sum(sel.kept_dims.values())


def test_shared_table_sums_the_saliency_of_its_features():
    tables = [sal.TableInfo("shared", rows=100, width=8, features=("a", "b")),
              sal.TableInfo("own", rows=100, width=8, features=("c",))]
    s = _sal({"a": [0.1] * 4 + [0.0] * 4, "b": [0.0] * 4 + [0.1] * 4, "c": [0.09] * 8})
    sel = sal.select_dims(s, tables, budget=0.5)  # 8 of 16 dims fit: all of "shared" (0.1 each) beat "own"
    torch.testing.assert_close(sel.table_saliency["shared"], torch.full((8,), 0.1, dtype=torch.float64))
    assert sel.kept_dims == {"shared": 8, "own": 0}
    assert sel.field_widths == {"a": 8, "b": 8, "c": 4}


def test_infeasible_budget_gives_the_minimum_width_everywhere():
    tables = _tables()
    s = {t.features[0]: torch.rand(t.width, dtype=torch.float64) for t in tables}
    sel = sal.select_dims(s, tables, budget=0.1, budget_on="final")  # min widths alone are 0.5
    assert sel.infeasible
    assert set(sel.table_widths.values()) == {4}
    sel = sal.select_dims(s, tables, budget=0.1)
    assert not sel.infeasible and sel.selected_params <= 0.1 * 8880


def test_budget_one_keeps_every_dim():
    tables = _tables()
    s = {t.features[0]: torch.rand(t.width, dtype=torch.float64) for t in tables}
    for mode in ("selected", "final"):
        sel = sal.select_dims(s, tables, budget=1.0, budget_on=mode)
        assert sel.table_widths == {t.name: t.width for t in tables}
        assert sel.final_params == sel.current_params


def test_bad_arguments_are_rejected():
    tables = _tables()
    s = {t.features[0]: torch.rand(t.width, dtype=torch.float64) for t in tables}
    with pytest.raises(ValueError, match="budget"):
        sal.select_dims(s, tables, budget=0.0)
    with pytest.raises(ValueError, match="budget_on"):
        sal.select_dims(s, tables, budget=0.5, budget_on="rounded")
    with pytest.raises(ValueError, match="dims"):
        sal.select_dims({**s, "fb": torch.rand(4)}, tables, budget=0.5)
    with pytest.raises(KeyError, match="fm"):
        sal.select_dims({"fb": s["fb"], "fs": s["fs"]}, tables, budget=0.5)


def test_table_infos_reads_stock_and_compressed_configs():
    from torchrec_shark.modules import CompressedEmbeddingBagConfig, MixedPrecision, TensorTrain

    configs = [
        EmbeddingBagConfig(name="a", embedding_dim=8, num_embeddings=10, feature_names=["fa"]),
        CompressedEmbeddingBagConfig(name="b", embedding_dim=16, num_embeddings=20, feature_names=["fb", "fc"],
                                     compression=MixedPrecision()),
        CompressedEmbeddingBagConfig(name="c", embedding_dim=16, num_embeddings=20, feature_names=["fd"],
                                     compression=TensorTrain()),
    ]
    infos = sal.table_infos(configs)
    assert [(t.name, t.rows, t.width, t.features, t.kind) for t in infos] == [
        ("a", 10, 8, ("fa",), "none"), ("b", 20, 16, ("fb", "fc"), "mixed_precision"),
        ("c", 20, 16, ("fd",), "tensor_train")]
    assert [t.inherits_columns for t in infos] == [True, True, False]
