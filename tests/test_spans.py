"""``codegen/spans.py``: the one-interval rows and columns that PARTIAL tiles test, against the oracle."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

import maskc
from maskc.codegen.spans import spans
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
    if found is None:
        return
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
