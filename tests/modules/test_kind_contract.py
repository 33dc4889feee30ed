"""The contract every registered table kind keeps (and any kind a test registers): a kind that passes this
works everywhere (collection, sharder, planner, checkpoints, warm start).

Each kind provides its example spec (:meth:`TableKind.example_spec`); stock tables have none. Checked
here on one process: construction on ``meta``, forward == ``embedding_bag`` over its dequantised rows,
backward with one update per optimizer, state dict round trip, loading its own and compatible kinds'
state, bytes, and its serving representation computing what the table computes; on two gloo ranks (``tests/distributed/test_kind_contract_sharded.py``): table-wise and
row-wise sharding, loading an unsharded state into shards and a sharded checkpoint into one process.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_shark.distributed.compressed_kernels import allocated_bytes
from torchrec_shark.modules import (
    KINDS,
    CompressedEmbeddingBagCollection,
    CompressedEmbeddingBagConfig,
    SparseOptimizerSpec,
    build_table,
    kind_of,
)
from torchrec_shark.modules.table_kind import DictStateReader, MemorySink, ServingOptions
from torchrec_shark.serving.build import MemorySource, build_lookups

ROWS, DIM = 64, 8
OPTIMIZERS = ["sgd", "adagrad", "rowwise_adagrad", "adam"]
KIND_PARAMS = [pytest.param(k, id=k.name) for k in KINDS]


def kind_config(kind, rows: int = ROWS, dim: int = DIM, pooling=PoolingType.SUM, name: str = "t",
                features=("f",)) -> CompressedEmbeddingBagConfig:
    """A table of ``kind`` from its example spec."""
    cfg = CompressedEmbeddingBagConfig(name=name, num_embeddings=rows, embedding_dim=dim, feature_names=list(features),
                                       pooling=pooling, compression=kind.example_spec())
    assert kind_of(cfg) is kind, f"the example spec of {kind.name} is owned by {kind_of(cfg).name}"
    return cfg


def bags(rows: int = ROWS, batch: int = 12, seed: int = 0):
    """Ids and offsets of ``batch`` bags of 0..4 ids (empty bags included, repeats included)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 5, (batch,), generator=g)
    lengths[0] = 0
    ids = torch.randint(0, rows, (int(lengths.sum()),), generator=g)
    return ids, torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])


def _reference(weight, ids, offsets, psw, mean):
    out = F.embedding_bag(ids, weight, offsets, mode="sum", per_sample_weights=psw, include_last_offset=True)
    if mean:  # TBE's weighted mean: weighted sum / bag length
        out = out / (offsets[1:] - offsets[:-1]).clamp(min=1).unsqueeze(1)
    return out


@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_builds_on_meta_with_no_storage_and_propagates_shapes(kind):
    cfg = kind_config(kind)
    with torch.device("meta"):
        ebc = CompressedEmbeddingBagCollection([cfg], optimizer=SparseOptimizerSpec())
    table = ebc.embedding_bags["t"]
    assert all(b.device.type == "meta" for b in table.buffers())
    assert ebc.device.type == "meta"
    kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.zeros(5, dtype=torch.long, device="meta"),
                                              torch.ones(5, dtype=torch.long, device="meta"))
    out = ebc(kjt)
    assert out.values().shape == (5, DIM) and out.values().device.type == "meta"
    assert build_table(cfg, SparseOptimizerSpec(), device=torch.device("meta")).memory_bytes()["total"] >= 0


@pytest.mark.parametrize("kind", KIND_PARAMS)
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN], ids=["sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_forward_is_embedding_bag_over_its_dequantised_rows(kind, pooling, weighted):
    table = build_table(kind_config(kind, pooling=pooling), SparseOptimizerSpec())
    ids, offsets = bags()
    psw = torch.rand(ids.numel()) if weighted else None
    want = _reference(table.full_weight(), ids, offsets, psw, pooling == PoolingType.MEAN)
    torch.testing.assert_close(table(ids, offsets, psw), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(table(ids, offsets, psw)[0], torch.zeros(DIM))  # the empty bag


@pytest.mark.parametrize("kind", KIND_PARAMS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_backward_applies_one_descent_step_per_optimizer(kind, optimizer):
    """After one fused update the rows moved against their gradient: <W1 - W0, G> < 0 (first order: every
    rule here scales the gradient by a positive per-element factor, for rows or for TT core slices alike)."""
    table = build_table(kind_config(kind), SparseOptimizerSpec(optimizer, lr=0.05))
    ids, offsets = bags(batch=32, seed=1)
    w0 = table.full_weight().detach().clone()
    g = torch.randn(offsets.numel() - 1, DIM, generator=torch.Generator().manual_seed(2))
    table(ids, offsets).backward(g)
    w1 = table.full_weight()
    assert torch.isfinite(w1).all()
    grad_rows = torch.zeros_like(w0).index_add_(0, ids, g.index_select(0, _bag_of(offsets, ids.numel())))
    assert float(((w1 - w0) * grad_rows).sum()) < 0
    assert not torch.equal(w1, w0)


def _bag_of(offsets, n):
    return torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets[1:] - offsets[:-1], output_size=n)


def _trained(kind, seed: int = 0):
    torch.manual_seed(seed)
    table = build_table(kind_config(kind), SparseOptimizerSpec("rowwise_adagrad", lr=0.05))
    for step in range(3):
        ids, offsets = bags(batch=16, seed=10 + step)
        if kind.label_aware:
            table.record_labels(ids, offsets, torch.randint(0, 2, (offsets.numel() - 1,)).float())
        table(ids, offsets).sum().backward()
        table.step_end()
    return table


@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_state_dict_round_trip_and_checkpoint_state_load(kind):
    """A table of another seed that loads a trained table's state dict (or its kind's exported state, as a
    checkpoint carries it) computes what the trained one computes."""
    trained = _trained(kind)
    ids, offsets = bags(seed=3)
    want = trained(ids, offsets)
    other = _trained(kind, seed=1)
    other.load_state_dict(trained.state_dict())
    torch.testing.assert_close(other(ids, offsets), want, rtol=0, atol=0)
    again = _trained(kind, seed=2)
    kind.load_state(again, DictStateReader(kind.local_state(trained)), 0)
    torch.testing.assert_close(again(ids, offsets), want, rtol=0, atol=0)
    for name, state in trained.optimizer_state().items():
        assert torch.equal(again.optimizer_state()[name], state)


@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_warm_start_from_every_kind_of_its_family(kind):
    """Loading another kind's state: accepted exactly when the kinds share a state family, and then the rows
    come over within the destination's rounding (a row-store of any precision from any other)."""
    source_kinds = [k for k in KINDS if k.state_family == kind.state_family and k is not kind]
    cfg = kind_config(kind)
    for source in source_kinds:
        src = _trained(source)
        reader = DictStateReader(source.local_state(src))
        assert kind.unloadable(cfg, reader) is None, f"{kind.name} refuses {source.name}'s state"
        table = build_table(cfg, SparseOptimizerSpec(), seed=5)
        kind.load_state(table, reader, 0)
        src_w, got = src.full_weight(), table.full_weight()
        span = (src_w.amax(1) - src_w.amin(1)).unsqueeze(1)
        assert bool(((got - src_w).abs() <= span / 2 + 1e-6).all()), f"{kind.name} from {source.name}"
    for other in (k for k in KINDS if k.state_family != kind.state_family):
        reader = DictStateReader(other.local_state(_trained(other)))
        assert kind.unloadable(cfg, reader) is not None, f"{kind.name} accepts {other.name}'s state"


@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_reported_bytes_are_what_the_table_allocates(kind):
    cfg = kind_config(kind, rows=1000)
    opt = SparseOptimizerSpec("rowwise_adagrad")
    table = build_table(cfg, opt)
    planned = kind.storage_bytes(cfg, opt, 0, cfg.num_embeddings)
    optimizer_bytes = sum(v.numel() * v.element_size() for v in table.optimizer_state().values())
    assert planned["optimizer"] == optimizer_bytes
    assert table.memory_bytes()["total"] == planned["total"] - planned["optimizer"]
    assert allocated_bytes(table) - optimizer_bytes == table.memory_bytes()["total"]


@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_collection_training_protocol(kind):
    """The collection asks the kind whether labels are needed; label-aware kinds count them, others ignore them."""
    cfg = kind_config(kind, features=("f", "g"))
    ebc = CompressedEmbeddingBagCollection([cfg], optimizer=SparseOptimizerSpec())
    assert ebc.label_aware == kind.label_aware
    ids, _ = bags(batch=8)
    kjt = KeyedJaggedTensor.from_lengths_sync(["f", "g"], torch.cat([ids, ids]), torch.cat([_lengths(ids.numel())] * 2))
    ebc.record_labels(kjt, torch.ones(4))
    ebc(kjt).values().sum().backward()
    ebc.step_end()


def _lengths(n_ids: int) -> torch.Tensor:
    return torch.tensor([n_ids // 4, n_ids // 4, n_ids // 4, n_ids - 3 * (n_ids // 4)])


def test_symbolic_trace_of_the_collection_computes_what_it_computes():
    """``torch.fx.symbolic_trace`` with the collection as the root (as of a stock EmbeddingBagCollection):
    one call per table, the same pooled embeddings, and the traced module trains the same tables."""
    configs = [kind_config(k, name=f"t{i}", features=(f"f{i}", f"g{i}") if i % 2 else (f"f{i}",))
               for i, k in enumerate(KINDS)]
    ebc = CompressedEmbeddingBagCollection(configs, optimizer=SparseOptimizerSpec("sgd", lr=0.1))
    traced = torch.fx.symbolic_trace(ebc)
    calls = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    assert calls == [f"embedding_bags.{c.name}" for c in configs]
    keys = [f for c in configs for f in c.feature_names]
    ids, offsets = bags(batch=4 * len(keys))
    lengths = offsets[1:] - offsets[:-1]
    kjt = KeyedJaggedTensor.from_lengths_sync(keys, ids, lengths)
    want = ebc(kjt)
    got = traced(kjt)
    assert got.keys() == want.keys()
    torch.testing.assert_close(got.values(), want.values(), rtol=0, atol=0)
    got.values().sum().backward()  # the traced module's tables are the collection's: they train
    assert not torch.equal(ebc(kjt).values(), want.values())


def test_a_model_holding_the_collection_traces_it_as_one_call():
    ebc = CompressedEmbeddingBagCollection([kind_config(k, name=f"t{i}", features=(f"f{i}",))
                                            for i, k in enumerate(KINDS)])

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ebc = ebc

        def forward(self, kjt):
            return self.ebc(kjt).values()

    traced = torch.fx.symbolic_trace(Model())
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["ebc"]


def _serving_entry(kind, table, cfg, options=ServingOptions()):
    sink = MemorySink()
    description = kind.export_serving(cfg, DictStateReader(kind.local_state(table)), sink, options)
    entry = {"name": cfg.name, "features": list(cfg.feature_names), "num_embeddings": cfg.num_embeddings,
             "embedding_dim": cfg.embedding_dim, "pooling": "sum", **description}
    return entry, sink.tensors


@pytest.mark.parametrize("kind", KIND_PARAMS)
@pytest.mark.parametrize("materialize", [False, True], ids=["as_stored", "materialized"])
def test_serving_representation_computes_what_the_table_computes(kind, materialize):
    """Every kind exports its trained table for serving (a kind without it cannot be registered: the method is
    abstract), with no training state, and the served lookup pools what the table pools: exactly, up to the
    order of additions (rows are read as stored, nothing is re-quantised)."""
    table = _trained(kind)
    cfg = kind_config(kind)
    options = ServingOptions(materialize_max_rows=ROWS if materialize else 0)
    entry, tensors = _serving_entry(kind, table, cfg, options)
    training_state = {"priority", "update_count", "step", "priority_age", "shards", "frequency", "steps"}
    assert not training_state & set(tensors) and not any(k.startswith("optim.") for k in tensors)
    (lookup,), features = build_lookups([entry], MemorySource({cfg.name: tensors}))
    assert features == [["f"]]
    ids, offsets = bags(batch=12, seed=4)
    psw = torch.rand(ids.numel())
    for weights in (None, psw):
        (got,) = lookup(ids, offsets[1:] - offsets[:-1], offsets, weights, 12)
        torch.testing.assert_close(got, table(ids, offsets, weights).detach(), rtol=1e-6, atol=1e-6)
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    assert stored <= table.memory_bytes()["total"] or materialize  # no more than the table holds


def test_a_kind_without_a_serving_representation_cannot_be_built():
    from torchrec_shark.modules.table_kind import TableKind

    class NoServing(type(KINDS[0])):
        export_serving = TableKind.export_serving  # what a new kind that omits it inherits

    with pytest.raises(TypeError, match="export_serving"):
        NoServing()
