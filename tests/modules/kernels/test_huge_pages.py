import os
import sys

import pytest
import torch

from torchrec_shark.modules import CompressedEmbeddingBagCollection, CompressedEmbeddingBagConfig, kind_of
from torchrec_shark.modules.kernels import huge_pages
from torchrec_shark.modules.kernels.huge_pages import HUGE_PAGE_BYTES, MIN_BYTES, zeros_on_huge_pages
from torchrec_shark.modules.kinds import KINDS

THP = "/sys/kernel/mm/transparent_hugepage/enabled"
needs_thp = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.path.exists(THP) or "[never]" in open(THP).read(),
    reason="transparent huge pages are off or absent here",
)


def _vm_flags(address: int) -> set:
    """The VmFlags of the mapping of this process that holds ``address`` (``hg``: advised onto huge pages)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


def _inside_page(t: torch.Tensor) -> int:
    """An address in the first whole 2 MB page of ``t``'s memory."""
    return -(-t.data_ptr() // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES


@pytest.mark.parametrize("shape,dtype", [((3, 5), torch.float32), ((MIN_BYTES // 68 + 7, 68), torch.uint8),
                                         ((MIN_BYTES // 4 + 3,), torch.float32)])
def test_zeros_on_huge_pages_are_zeros_of_the_asked_shape(shape, dtype):
    t = zeros_on_huge_pages(shape, dtype, "cpu")
    assert t.shape == shape and t.dtype == dtype and t.device.type == "cpu"
    assert not t.any()
    assert zeros_on_huge_pages(shape, dtype, None).device.type == "cpu"
    meta = zeros_on_huge_pages(shape, dtype, "meta")
    assert meta.device.type == "meta" and meta.shape == shape


@needs_thp
def test_a_large_buffer_is_advised():
    big = zeros_on_huge_pages((MIN_BYTES + 3 * HUGE_PAGE_BYTES,), torch.uint8, "cpu")
    assert "hg" in _vm_flags(_inside_page(big))


@pytest.mark.parametrize("env,numel,advised", [("1", MIN_BYTES, True), ("0", MIN_BYTES, False),
                                               ("1", MIN_BYTES - 1, False)])
def test_only_a_large_host_buffer_is_advised_and_the_switch_turns_it_off(monkeypatch, env, numel, advised):
    # (the memory's own flags cannot show "not advised": the allocator may hand out memory advised before)
    calls = []
    monkeypatch.setattr(huge_pages, "advise_huge_pages", lambda t, advice=14: calls.append(advice) or True)
    monkeypatch.setenv("TORCHREC_SHARK_HUGE_PAGES", env)
    t = zeros_on_huge_pages((numel,), torch.uint8, "cpu")
    assert not t.any() and t.numel() == numel
    assert bool(calls) == (advised and sys.platform.startswith("linux"))


@needs_thp
@pytest.mark.parametrize("fused", [True, False])
def test_a_large_tables_rows_are_on_advised_memory(fused):
    kind = next(k for k in KINDS if k.name == "int8")
    rows = 1 << 20  # int8 rows of 8 columns: 12 bytes each, 12 MB
    cfg = CompressedEmbeddingBagConfig(name="t", num_embeddings=rows, embedding_dim=8, feature_names=["f"],
                                       compression=kind.example_spec())
    assert kind_of(cfg) is kind
    table = CompressedEmbeddingBagCollection([cfg], fused=fused).embedding_bags["t"]
    pool = max(table.buffers(), key=lambda b: b.numel() * b.element_size())
    assert pool.dtype == torch.uint8 and pool.shape[0] == rows
    assert "hg" in _vm_flags(_inside_page(pool))
