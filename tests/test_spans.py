"""``codegen/spans.py``: the one-interval rows and columns that PARTIAL tiles test, against the oracle."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import maskc
from maskc.codegen.block_lists import expand
from maskc.codegen.spans import partial_steps, spans
from oracle import spec_masks
from strategies import specs


def span_masks(found, q_len: int, kv_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``bool[S, q_len, kv_len]`` twice: what the row spans allow, and what the column spans allow."""
    i = np.arange(q_len)[None, :, None]
    j = np.arange(kv_len)[None, None, :]
    rows = (j >= found.row_lo[:, :, None]) & (j < found.row_hi[:, :, None])
    cols = (i >= found.col_lo[:, None, :]) & (i < found.col_hi[:, None, :])
    return rows, cols


@given(specs(max_heads=3))
def test_spans_where_found_allow_exactly_the_mask(spec):
    cm = maskc.compile(spec)
    found = spans(cm)
    assume(found is not None)  # hypothesis fails the test if too few drawn masks have spans
    dense = spec_masks(spec)
    slot = cm.table.head_slot.numpy()
    for allowed in span_masks(found, spec.q_len, spec.kv_len):
        np.testing.assert_array_equal(allowed[slot] if len(dense) > 1 else allowed, dense)


@pytest.mark.parametrize("mask", [
    maskc.Causal(),
    maskc.Causal(align="bottom_right"),
    maskc.SlidingWindow(left=7, right=2),
    maskc.Chunked(size=12) & maskc.Causal(),
    maskc.Prefix(length=11) | maskc.Causal(),
    maskc.Documents(lengths=[7, 20, 13]) & maskc.Causal(),
    maskc.Documents(lengths=[0, 30, 10], kv_lengths=[25, 15, 0]),  # a ring tile: empty rows and columns
    maskc.Range(q=(5, 30), kv=(3, 21)),
    ~maskc.Causal(),
])
def test_masks_people_train_with_have_spans(mask):
    spec = maskc.Spec(q_len=40, kv_len=40, mask=mask)
    found = spans(maskc.compile(spec))
    assert found is not None
    rows, cols = span_masks(found, 40, 40)
    np.testing.assert_array_equal(rows, spec_masks(spec))
    np.testing.assert_array_equal(cols, spec_masks(spec))


@pytest.mark.parametrize("mask", [
    maskc.Chunked(size=10) | maskc.Prefix(length=3),  # rows of two intervals
    maskc.Range(q=(0, 20), kv=(20, 40)) | maskc.Range(q=(20, 40), kv=(0, 20)),  # spans moving backwards
    maskc.Dense(values=np.eye(40, dtype=bool)),  # no exact intervals
])
def test_other_masks_keep_the_generated_predicate(mask):
    assert spans(maskc.compile(maskc.Spec(q_len=40, kv_len=40, mask=mask))) is None


@given(specs(max_heads=3), st.sampled_from([(4, 8), (8, 8), (16, 4), (8, 16)]), st.data())
def test_trimmed_steps_are_those_that_meet_the_hull_of_each_programs_allowed_pairs(spec, blocks, data):
    bq, bk = blocks
    cm = maskc.compile(spec, block_size=blocks)
    found = spans(cm)
    assume(found is not None)  # hypothesis fails the test if too few drawn masks have spans
    dense = spec_masks(spec)
    head_slot = cm.table.head_slot.numpy()
    for forward in (True, False):
        own_block, entry_block = (bq, bk) if forward else (bk, bq)
        program = data.draw(st.sampled_from([p for p in (1, 2, 4, 8, 16) if own_block % p == 0]))
        step = data.draw(st.sampled_from([t for t in (1, 2, 4, 8, 16) if entry_block % t == 0]))
        own_len, entry_len = (spec.q_len, spec.kv_len) if forward else (spec.kv_len, spec.q_len)
        cut = entry_len // entry_block if entry_len % entry_block else -1
        lists = expand(cm.table.forward if forward else cm.table.backward, cut)
        lo, hi = (found.row_lo, found.row_hi) if forward else (found.col_lo, found.col_hi)
        ptr, idx = lists.part_ptr.numpy(), lists.part_idx.numpy()
        trimmed = partial_steps(ptr, idx, lo, hi, own_block, entry_block, program, step)
        subs = entry_block // step
        for slot in range(len(lo)):
            allowed = dense[int(np.flatnonzero(head_slot == slot)[0])] if len(dense) > 1 else dense[0]
            allowed = allowed if forward else allowed.T
            for p in range(-(-own_len // program)):
                keys = np.flatnonzero(allowed[p * program:(p + 1) * program].any(axis=0))
                hull = (keys[0], keys[-1] + 1) if len(keys) else (0, 0)
                group = p * program // own_block
                first, end = trimmed[slot, p]
                for k in range(ptr[slot, group] * subs, ptr[slot, group + 1] * subs):
                    start = idx[k // subs] * entry_block + k % subs * step
                    meets = start < hull[1] and start + step > hull[0]
                    assert (first <= k < end) == meets, (forward, slot, p, k)
