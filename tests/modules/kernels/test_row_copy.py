import pytest
import torch

from torchrec_shark.modules.kernels.row_copy import _word_view, put_rows_, take_rows


def _pools():
    """Pools as the row stores hold them: whole tensors and row slices of a larger buffer (a fused store's
    tier pools), with row widths that tile into int64, int32 or no wider word at all."""
    g = torch.Generator().manual_seed(0)
    out = []
    for dtype, width in [(torch.uint8, 68), (torch.uint8, 36), (torch.uint8, 12), (torch.uint8, 6), (torch.uint8, 5),
                         (torch.float16, 64), (torch.float16, 6), (torch.float16, 3), (torch.float32, 16)]:
        row_bytes = width * dtype.itemsize
        whole = torch.randint(0, 256, (50, row_bytes), generator=g, dtype=torch.uint8).view(dtype)
        out.append(whole)
        for start in (1, 3, 8):  # a tier pool starting at another row of a shared buffer
            out.append(whole[start:start + 20])
    return out


@pytest.mark.parametrize("pool", _pools(), ids=lambda p: f"{p.dtype}-{p.shape[1]}-off{p.storage_offset()}")
def test_take_and_put_move_the_same_bytes_as_index_select_and_index_copy(pool):
    g = torch.Generator().manual_seed(1)
    index = torch.randperm(pool.shape[0], generator=g)[:7]
    assert torch.equal(take_rows(pool, index).view(torch.uint8), pool.index_select(0, index).view(torch.uint8))

    rows = torch.randint(0, 255, (7, pool.shape[1] * pool.element_size()), generator=g,
                         dtype=torch.uint8).view(pool.dtype)
    expected = pool.clone().index_copy_(0, index, rows)
    got = pool.clone()
    assert put_rows_(got, index, rows) is got
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))


def test_a_pool_slice_moves_as_words_only_where_its_offset_allows():
    buffer = torch.zeros(10, 68, dtype=torch.uint8)
    assert _word_view(buffer).dtype == torch.int32  # 68 bytes: 17 int32, not int64
    assert _word_view(buffer[1:]).dtype == torch.int32
    assert _word_view(torch.zeros(10, 16, dtype=torch.uint8)[1:]).dtype == torch.int64
    assert _word_view(torch.zeros(10, 5, dtype=torch.uint8)).dtype == torch.uint8  # no word tiles 5 bytes
    assert _word_view(torch.zeros(10, 64, dtype=torch.float32)).dtype == torch.float32  # already 4-byte moves
    column_slice = torch.zeros(10, 68, dtype=torch.uint8)[:, :64]  # rows not contiguous in the buffer
    assert _word_view(column_slice).dtype == torch.int32  # stride 68 bytes, 64 bytes a row: both tile by 4


def test_rows_of_another_layout_fall_back_to_index_copy():
    pool = torch.zeros(8, 16, dtype=torch.uint8)
    rows = torch.arange(48, dtype=torch.uint8).view(16, 3).t()  # rows not contiguous
    put_rows_(pool, torch.tensor([0, 2, 5]), rows)
    assert torch.equal(pool[[0, 2, 5]], rows)
