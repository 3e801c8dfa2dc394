"""The tensor selection behind every surgery: exact values, layout kept, any chunking."""
import pytest
import torch

from graphprune import surgery


def _expected(data, index):
    for dim in sorted(index):
        data = data.index_select(dim, index[dim])
    return data


@pytest.mark.parametrize("chunk_bytes", [1, 64, 1 << 22])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_select_along_several_dims_equals_successive_index_selects(monkeypatch, chunk_bytes, layout):
    monkeypatch.setattr(surgery, "_CHUNK_BYTES", chunk_bytes)
    data = torch.randn(9, 7, 5, 4).contiguous(memory_format=layout)
    index = {0: torch.tensor([0, 3, 4, 8]), 1: torch.tensor([1, 2, 6]), 3: torch.tensor([0, 3])}
    selected = surgery._select(data, index)
    assert torch.equal(selected, _expected(data, index))
    assert selected.is_contiguous(memory_format=layout)
    if layout is torch.channels_last:
        assert not selected.is_contiguous()


def test_select_along_one_dim_keeps_channels_last():
    data = torch.randn(6, 5, 3, 3).contiguous(memory_format=torch.channels_last)
    selected = surgery._select(data, {1: torch.tensor([0, 4])})
    assert torch.equal(selected, data[:, [0, 4]])
    assert selected.is_contiguous(memory_format=torch.channels_last)


def test_select_of_a_strided_tensor_returns_a_contiguous_copy():
    data = torch.randn(8, 10).t()  # neither contiguous nor channels-last
    index = {0: torch.tensor([1, 9]), 1: torch.tensor([0, 2, 7])}
    selected = surgery._select(data, index)
    assert torch.equal(selected, _expected(data, index)) and selected.is_contiguous()
