"""``maskc.compile`` against the brute-force oracle: block map, empty rows and
columns, ``dense()``, pair counts, both index tables, and simplification."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import maskc
from maskc.passes.simplify import simplify
from oracle import block_kinds, dense_mask, spec_masks
from strategies import Scope, block_sizes, masks, specs


def decode(table: "maskc.passes.tables.IndexTable", slot: int, n_groups: int, n_other: int) -> np.ndarray:
    """``uint8[n_groups, n_other]``: the block map one direction of a table describes."""
    out = np.zeros((n_groups, n_other), dtype=np.uint8)
    for group in range(n_groups):
        for full, kind in ((True, maskc.FULL), (False, maskc.PARTIAL)):
            for start, end, _ in table.runs_of(slot, group, full):
                assert 0 <= start < end <= n_other
                assert (out[group, start:end] == maskc.EMPTY).all(), "tiles listed twice"
                out[group, start:end] = kind
    return out


def per_head(value, n_heads: int) -> list:
    return list(value) if isinstance(value, tuple) else [value] * n_heads


def compiled_and_oracle(spec, block_size):
    cm = maskc.compile(spec, block_size)
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    masks_ = spec_masks(spec)
    return cm, masks_, block_kinds(masks_, bq, bk)


# -- properties over random specs -----------------------------------------------------


@given(specs(), block_sizes)
def test_block_kinds_match_oracle_exactly(spec, block_size):
    cm, _, expected = compiled_and_oracle(spec, block_size)
    assert cm.block_kinds.dtype == torch.uint8
    np.testing.assert_array_equal(cm.block_kinds.numpy(), expected)
    counts = cm.tile_counts()
    assert (counts["full"], counts["partial"], counts["empty"]) == tuple(
        int((expected == k).sum()) for k in (maskc.FULL, maskc.PARTIAL, maskc.EMPTY))


@given(specs(), block_sizes)
def test_empty_rows_cols_dense_and_allowed_pairs_match_oracle(spec, block_size):
    cm, dense, _ = compiled_and_oracle(spec, block_size)
    rows, cols = per_head(cm.empty_rows, len(dense)), per_head(cm.empty_cols, len(dense))
    assert isinstance(cm.empty_rows, torch.Tensor) == (not isinstance(spec.mask, tuple))
    for h, mask in enumerate(dense):
        assert rows[h].dtype == cols[h].dtype == torch.int64
        np.testing.assert_array_equal(rows[h].numpy(), np.flatnonzero(~mask.any(1)))
        np.testing.assert_array_equal(cols[h].numpy(), np.flatnonzero(~mask.any(0)))
        got = cm.dense(h)
        assert got.dtype == torch.bool and got.shape == (spec.q_len, spec.kv_len)
        np.testing.assert_array_equal(got.numpy(), mask)
    assert cm.allowed_pairs() == int(dense.sum())


def tile_bits(mask: np.ndarray, qb: int, kb: int, bq: int, bk: int) -> np.ndarray:
    """``bool[bq, bk]``: one tile of a dense mask, out-of-range positions False."""
    tile = np.zeros((bq, bk), dtype=bool)
    part = mask[qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk]
    tile[: part.shape[0], : part.shape[1]] = part
    return tile


@given(specs(), block_sizes)
def test_forward_and_backward_tables_decode_to_the_block_map(spec, block_size):
    cm, dense, expected = compiled_and_oracle(spec, block_size)
    bq, bk = cm.block_size
    n_q, n_k = expected.shape[1:]
    table = cm.table
    assert table.head_slot.shape == (len(dense),)
    for h, slot in enumerate(table.head_slot.tolist()):
        forward = decode(table.forward, slot, n_q, n_k)
        backward = decode(table.backward, slot, n_k, n_q)
        np.testing.assert_array_equal(forward, expected[h])
        np.testing.assert_array_equal(backward, expected[h].T)
        for direction, blocks in ((table.forward, forward), (table.backward, backward)):
            work = (blocks > 0).sum(1)
            np.testing.assert_array_equal(direction.work[slot].numpy(), work)
            order = direction.order[slot].numpy()
            assert sorted(order.tolist()) == list(range(len(blocks)))
            assert (np.diff(work[order]) <= 0).all(), "groups not by decreasing work"
        # Dense / Predicate heads: each PARTIAL tile's stored bits are its mask, in both directions
        for qb in range(n_q):
            for kb, _, pattern in table.forward.runs_of(slot, qb, full=False):
                if pattern >= 0:
                    np.testing.assert_array_equal(table.patterns[pattern].numpy(), tile_bits(dense[h], qb, kb, bq, bk))
        for kb in range(n_k):
            for qb, _, pattern in table.backward.runs_of(slot, kb, full=False):
                if pattern >= 0:
                    np.testing.assert_array_equal(table.patterns[pattern].numpy(), tile_bits(dense[h], qb, kb, bq, bk))
