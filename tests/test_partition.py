"""``maskc.partition`` and ``maskc.merge_partials`` against the brute-force oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import maskc
import oracle
from strategies import specs


def splits(length: int):
    """A part count or explicit part sizes for ``length`` positions."""
    count = st.integers(1, min(length, 5))

    @st.composite
    def sizes(draw):
        cuts = sorted(draw(st.sets(st.integers(1, length - 1), max_size=4))) if length > 1 else []
        return np.diff([0, *cuts, length]).tolist()

    return count | sizes()


@settings(max_examples=40)
@given(data=st.data())
def test_every_tile_is_the_slice_of_the_whole_mask(data):
    spec = data.draw(specs(max_len=40, depth=2, huge=True))
    q_split = data.draw(splits(spec.q_len))
    kv_split = data.draw(splits(spec.kv_len))
    whole = oracle.spec_masks(spec)
    q_points = maskc.split_points(q_split, spec.q_len)
    kv_points = maskc.split_points(kv_split, spec.kv_len)
    tiles = maskc.partition(spec, q_split, kv_split)
    assert len(tiles) == len(q_points) - 1 and all(len(row) == len(kv_points) - 1 for row in tiles)
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            expected = whole[:, q_points[i]:q_points[i + 1], kv_points[j]:kv_points[j + 1]]
            np.testing.assert_array_equal(oracle.spec_masks(tile), expected, err_msg=f"tile ({i}, {j}): {tile.mask}")


def test_tiles_of_a_structured_spec_stay_structured():
    """Crops are written in the IR: no Dense appears, and a 1M-token tile is small."""
    lengths = [4096, 100_000, 500_000, 444_480]
    spec = maskc.Spec(q_len=2**20, kv_len=2**20, mask=maskc.Documents(lengths=lengths, inner=maskc.Causal()))
    tiles = maskc.partition(spec, 4, 4)
    for row in tiles:
        for tile in row:
            assert all(not isinstance(n, maskc.Dense) for h in tile.heads for n in maskc.ir.walk(h))
            assert len(tile.dumps()) < 2000
    assert tiles[0][3].mask == maskc.Empty()


def _split_attention(spec, q, k, v, q_split, kv_split):
    q_points = maskc.split_points(q_split, spec.q_len)
    kv_points = maskc.split_points(kv_split, spec.kv_len)
    rows_out, rows_lse = [], []
    for i, row in enumerate(maskc.partition(spec, q_split, kv_split)):
        outs, lses = [], []
        for j, tile in enumerate(row):
            rows, cols = slice(q_points[i], q_points[i + 1]), slice(kv_points[j], kv_points[j + 1])
            out, lse = maskc.compile(tile, block_size=4)(q[:, :, rows], k[:, :, cols], v[:, :, cols], return_lse=True)
            outs.append(out)
            lses.append(lse)
        out, lse = maskc.merge_partials(outs, lses)
        rows_out.append(out)
        rows_lse.append(lse)
    return torch.cat(rows_out, dim=2), torch.cat(rows_lse, dim=2)


def test_xformers_995_split_3x3_merges_exactly_forward_and_backward():
    spec = maskc.Spec(q_len=12, kv_len=12, mask=maskc.Documents(lengths=[5, 4, 3]) & maskc.Causal())
    tiles = maskc.partition(spec, 3, 3)
    below = maskc.compile(tiles[1][0], block_size=2)
    assert below.empty_rows.tolist() == [1, 2, 3]  # queries of document 2 see nothing of part 0
    assert maskc.compile(tiles[2][1], block_size=2).empty_cols.tolist() == [0]  # key 4 ends document 1
    assert tiles[0][1].mask != maskc.Empty() and maskc.compile(tiles[0][2]).block_kinds.max() == maskc.EMPTY

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 12, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, lse = _split_attention(spec, q, k, v, 3, 3)
    ref_out, ref_lse = oracle.attention(q, k, v, oracle.spec_masks(spec))
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-12)
    weights = torch.randn_like(out)
    got = torch.autograd.grad((out * weights).sum(), (q, k, v))
    want = torch.autograd.grad((ref_out * weights).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, want):
        assert not a.isnan().any(), name
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11, msg=f"d{name}")


@settings(max_examples=25)
@given(data=st.data())
def test_split_attention_equals_whole_attention(data):
    spec = data.draw(specs(max_len=24, depth=2, max_heads=1))
    q_split, kv_split = data.draw(splits(spec.q_len)), data.draw(splits(spec.kv_len))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    q = torch.randn(1, 2, spec.q_len, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, 1, spec.kv_len, 8, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(2))
    out, lse = _split_attention(spec, q, k, v, q_split, kv_split)
    ref_out, ref_lse = oracle.attention(q, k, v, oracle.spec_masks(spec))
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-10)
    got = torch.autograd.grad(out.sum() + lse.nan_to_num(neginf=0).sum(), (q, k, v))
    want = torch.autograd.grad(ref_out.sum() + ref_lse.nan_to_num(neginf=0).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


def test_merge_partials_of_all_empty_parts_is_zero_without_nan():
    outs = [torch.zeros(1, 2, 3, 4, requires_grad=True) for _ in range(3)]
    lses = [torch.full((1, 2, 3), -math.inf, requires_grad=True) for _ in range(3)]
    out, lse = maskc.merge_partials(outs, lses)
    assert (out == 0).all() and torch.isinf(lse).all()
    grads = torch.autograd.grad(out.sum(), outs + lses, allow_unused=True)
    assert all(g is None or not g.isnan().any() for g in grads)


@pytest.mark.parametrize("split, message", [
    (0, "q_splits=0 must be a positive"),
    (13, "cannot split 12 positions"),
    ([5, 5], "sum to 10, not the length 12"),
    ([6, 0, 6], r"q_splits\[1\]: part sizes must be positive"),
    ("three", "must be an int or a list"),
])
def test_bad_splits_raise_spec_error(split, message):
    spec = maskc.Spec(q_len=12, kv_len=12, mask=maskc.Causal())
    with pytest.raises(maskc.SpecError, match=message):
        maskc.partition(spec, split, 2)


def test_merge_partials_rejects_mismatched_parts():
    with pytest.raises(ValueError, match="one lse per output"):
        maskc.merge_partials([torch.zeros(1, 1, 2, 3)], [])
    with pytest.raises(ValueError, match=r"outs\[1\]"):
        maskc.merge_partials([torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 3, 3)], [torch.zeros(1, 1, 2)] * 2)
