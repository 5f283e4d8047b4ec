"""The exact radix-select top-k (``ops/topk/triton.py``) against its naive reference (``TRITON_INTERPRET=1`` on CPU).

Rows with many ties at the k-th score (small integers, ``-0.0`` beside ``+0.0``), valid prefixes shorter than,
equal to and longer than ``topk`` (and empty), one and several programs per row (segments), and the
``len_offset`` of the prefill path (``lens`` = last visible position).
"""
from __future__ import annotations

import pytest
import torch
from tritonkit import DEV  # sets TRITON_INTERPRET (no GPU) before vllm_indexcache imports Triton

from vllm_indexcache.ops.topk.naive import to_ascending, topk_rows_naive
from vllm_indexcache.ops.topk.triton import topk_rows


def _scores(kind: str, R: int, N: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(len(kind))
    if kind == "normal":
        return torch.randn(R, N, generator=g)
    x = torch.randint(-2, 3, (R, N), generator=g).float()        # five values: ties straddle every boundary
    if kind == "signed_zeros":
        zeros = x == 0
        x[zeros] = torch.where(torch.rand(int(zeros.sum()), generator=g) < 0.5, -0.0, 0.0)
    return x


@pytest.mark.parametrize("kind", ["normal", "ties", "signed_zeros"])
@pytest.mark.parametrize("segment,block,len_offset", [(None, 16, 0), (32, 16, 0), (64, 32, 1), (128, 64, -3),
                                                          (320, 64, 1)])
def test_topk_rows_equals_naive(kind, segment, block, len_offset):
    R, N, topk = 7, 300, 20
    x = _scores(kind, R, N)
    lens = torch.tensor([0, 5, 20, 21, 150, 299, 300])
    got = topk_rows(x.to(DEV), lens.to(DEV), topk, len_offset, block=block, segment=segment).cpu()
    ref = topk_rows_naive(x, lens, topk, len_offset)
    assert got.dtype == torch.int32 and got.shape == (R, topk)
    assert torch.equal(got, ref)


def test_naive_selection_is_the_indexer_rule():
    """The reference itself: best scores, ties towards the lower position, listed ascending."""
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, -0.0, 0.0]])
    assert topk_rows_naive(x, torch.tensor([7]), 2).tolist() == [[1, 2]]
    assert topk_rows_naive(x, torch.tensor([7]), 4).tolist() == [[1, 2, 3, 4]]
    assert topk_rows_naive(x, torch.tensor([6]), 6, len_offset=1).tolist() == [[0, 1, 2, 3, 4, 5]]
    assert topk_rows_naive(-x, torch.tensor([7]), 2).tolist() == [[5, 6]]   # -0.0 ties +0.0; lower first
    assert to_ascending(torch.tensor([[4, 1, -1]], dtype=torch.int32)).tolist() == [[1, 4, -1]]


def test_topk_rows_rejects_bad_input():
    x = torch.zeros(2, 8, device=DEV)
    with pytest.raises(ValueError, match="topk"):
        topk_rows(x, torch.tensor([1, 2], device=DEV), 0)
    with pytest.raises(ValueError, match="lens"):
        topk_rows(x, torch.tensor([1], device=DEV), 2)
    with pytest.raises(ValueError, match="float32"):
        topk_rows(x.half(), torch.tensor([1, 2], device=DEV), 2)
    with pytest.raises(ValueError, match="segment"):
        topk_rows(x, torch.tensor([1, 2], device=DEV), 2, block=16, segment=24)
