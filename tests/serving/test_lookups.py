"""Served lookups over several tables at once: tiered tables of different tier lists (and a table read by two
features) in one lookup pool what each table pools on its own."""

import pytest
import torch

from tests.modules.test_kind_contract import _serving_entry
from torchrec_shark.modules import CompressedEmbeddingBagConfig, SparseOptimizerSpec, build_table, kind_of
from torchrec_shark.modules.mixed_precision import MixedPrecision
from torchrec_shark.serving.build import MemorySource, build_lookups
from torchrec_shark.serving.format import ExportError
from torchrec_shark.serving.lookups import TieredRows

DIM = 8
TABLES = {  # name: (rows, tiers, features)
    "three": (90, (("fp32", 0.1), ("fp16", 0.3), ("int8", 0.6)), ("a",)),
    "four": (70, (("fp32", 0.1), ("int8", 0.2), ("int4", 0.3), ("int2", 0.4)), ("b", "c")),
    "two": (50, (("int8", 0.5), ("int4", 0.5)), ("d",)),
}


def _trained(name):
    rows, tiers, features = TABLES[name]
    cfg = CompressedEmbeddingBagConfig(name=name, num_embeddings=rows, embedding_dim=DIM,
                                       feature_names=list(features),
                                       compression=MixedPrecision(tiers=tiers, retier_every=2))
    torch.manual_seed(len(name))
    table = build_table(cfg, SparseOptimizerSpec("rowwise_adagrad", lr=0.05))
    g = torch.Generator().manual_seed(rows)
    for _ in range(4):  # retiers twice: rows leave their initial tiers
        lengths = torch.randint(0, 4, (16,), generator=g)
        ids = torch.randint(0, rows, (int(lengths.sum()),), generator=g)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        table.record_labels(ids, offsets, torch.randint(0, 2, (16,), generator=g).float())
        table(ids, offsets).sum().backward()
        table.step_end()
    return cfg, table


def _entry(cfg, table):
    return _serving_entry(kind_of(cfg), table, cfg)


@pytest.fixture(scope="module")
def trained():
    return {name: _trained(name) for name in TABLES}


def _feature_bags(rows, batch, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 5, (batch,), generator=g)
    lengths[1] = 0
    return torch.randint(0, rows, (int(lengths.sum()),), generator=g), lengths


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_one_lookup_over_tables_of_different_tiers_pools_what_each_table_pools(trained, weighted):
    entries, tensors = [], {}
    for cfg, table in trained.values():
        entry, t = _entry(cfg, table)
        assert entry.get("slot_map"), "a mixed-precision table is served through its slot map"
        entries.append(entry)
        tensors[cfg.name] = t
    (lookup,), (features,) = build_lookups(entries, MemorySource(tensors))
    assert isinstance(lookup, TieredRows) and features == ["a", "b", "c", "d"]
    # one TBE table per precision, not per table and tier
    assert lookup.num_pools == len({p for _, tiers, _ in TABLES.values() for p, _ in tiers})

    batch = 9
    values, lengths, weights, expected = [], [], [], []
    for i, (cfg, table) in enumerate(trained.values()):
        for j, _ in enumerate(cfg.feature_names):
            ids, ln = _feature_bags(cfg.num_embeddings, batch, seed=10 * i + j)
            psw = torch.rand(ids.numel(), generator=torch.Generator().manual_seed(i + j)) if weighted else None
            offsets = torch.cat([torch.zeros(1, dtype=torch.long), ln.cumsum(0)])
            expected.append(table(ids, offsets, psw).detach())
            values.append(ids)
            lengths.append(ln)
            weights.append(psw)
    lengths_all = torch.cat(lengths)
    offsets_all = torch.cat([torch.zeros(1, dtype=torch.long), lengths_all.cumsum(0)])
    got = lookup(torch.cat(values), lengths_all, offsets_all, torch.cat(weights) if weighted else None, batch)
    for g, want in zip(got, expected):
        torch.testing.assert_close(g, want, rtol=1e-6, atol=1e-6)


def test_an_id_outside_its_table_is_named(trained):
    cfg, table = trained["two"]
    entry, t = _entry(cfg, table)
    (lookup,), _ = build_lookups([entry], MemorySource({cfg.name: t}))
    ids = torch.tensor([3, cfg.num_embeddings])
    with pytest.raises(ValueError, match=f"id {cfg.num_embeddings} is outside its table's {cfg.num_embeddings} rows"):
        lookup(ids, torch.tensor([2]), torch.tensor([0, 2]), None, 1)


def test_a_slot_map_pointing_past_the_tiers_fails_to_load(trained):
    cfg, table = trained["three"]
    entry, t = _entry(cfg, table)
    slots = t[entry["slot_map"]].clone()
    slots[5] = cfg.num_embeddings
    t = {**t, entry["slot_map"]: slots}
    with pytest.raises(ExportError, match="slots outside its 90 tier rows"):
        build_lookups([entry], MemorySource({cfg.name: t}))

