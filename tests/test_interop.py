"""``to_block_mask``: FlexAttention's ``BlockMask`` from a compiled mask.

The exported ``mask_mod`` is checked against the brute-force oracle through
FlexAttention's own ``create_mask`` (which runs it under ``torch.vmap``); the
tables against the oracle's block map and against ``create_block_mask`` on
the same ``mask_mod``; and ``flex_attention`` with the exported mask against
maskc's op. Eager ``flex_attention`` reads only the ``mask_mod``; one compiled
run (CPU, and CUDA where present) reads the tables too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, create_mask, flex_attention

import maskc
from maskc.interop import to_block_mask
from oracle import block_kinds, spec_masks
from strategies import specs

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

rng = np.random.default_rng(0)
DOCS = maskc.Documents(lengths=[100, 0, 90, 50], kv_lengths=[80, 20, 100, 60], inner=maskc.Causal(align="bottom_right"))

# (spec, block_size): every node kind, on sizes that are and are not multiples of the blocks
CASES = {
    "full": (maskc.Spec(q_len=256, kv_len=256, mask=maskc.Full()), 64),
    "empty": (maskc.Spec(q_len=256, kv_len=128, mask=maskc.Empty()), 64),
    "causal": (maskc.Spec(q_len=256, kv_len=256, mask=maskc.Causal()), 64),
    "causal_bottom_right_offset": (
        maskc.Spec(q_len=200, kv_len=330, mask=maskc.Causal(offset=-7, align="bottom_right")), 64),
    "sliding_window": (maskc.Spec(q_len=256, kv_len=256, mask=maskc.SlidingWindow(left=40, right=10)), (64, 32)),
    "sliding_window_bottom_right": (
        maskc.Spec(q_len=150, kv_len=300, mask=maskc.SlidingWindow(left=None, right=5, align="bottom_right")), 64),
    "chunked_or_prefix": (maskc.Spec(q_len=256, kv_len=256, mask=maskc.Chunked(size=48) | maskc.Prefix(length=70)),
                          64),
    "range": (maskc.Spec(q_len=256, kv_len=192, mask=maskc.Range(q=(10, 200), kv=(30, 150))), 64),
    "documents_with_padding": (maskc.Spec(q_len=256, kv_len=320, mask=DOCS), 64),
    "documents_nested_and_placed": (maskc.Spec(q_len=256, kv_len=256, mask=maskc.Documents(
        lengths=[120, 100], q_start=20, kv_start=8,
        inner=maskc.Documents(lengths=[60, 40], inner=maskc.SlidingWindow(left=16)) | maskc.Prefix(length=4))), 64),
    "dense": (maskc.Spec(q_len=130, kv_len=100, mask=maskc.Dense(values=rng.random((130, 100)) < 0.3)
                         & maskc.Causal()), 32),
    "dense_in_documents": (maskc.Spec(q_len=128, kv_len=128, mask=maskc.Documents(
        lengths=[64, 64], inner=maskc.Dense(values=rng.random((64, 64)) < 0.5))), 32),
    "predicate": (maskc.Spec(q_len=192, kv_len=192, mask=maskc.Predicate(fn=lambda i, j: (i + 2 * j) % 3 != 0)
                             & maskc.Causal()), 64),
    "not": (maskc.Spec(q_len=256, kv_len=256, mask=~maskc.SlidingWindow(left=20, right=20)), 64),
    "per_head": (maskc.Spec(q_len=256, kv_len=320, mask=[
        maskc.Causal(), maskc.SlidingWindow(left=32), maskc.Causal(), DOCS]), 64),
}
RAGGED = {"causal_bottom_right_offset", "sliding_window_bottom_right", "dense"}


def decode(num: torch.Tensor, indices: torch.Tensor, n_cols: int) -> np.ndarray:
    """``bool[H, R, C]``: the tiles a ``(num_blocks, indices)`` pair lists (batch 0)."""
    num, indices = num[0].numpy(), indices[0].numpy()
    out = np.zeros(num.shape + (n_cols,), dtype=bool)
    h, r = np.nonzero(num > 0)
    for a, b in zip(h.tolist(), r.tolist()):
        listed = indices[a, b, : num[a, b]]
        assert len(set(listed.tolist())) == len(listed), "a block listed twice"
        out[a, b, listed] = True
    return out


def kinds_of(num, indices, full_num, full_indices, n_cols) -> np.ndarray:
    partial, full = decode(num, indices, n_cols), decode(full_num, full_indices, n_cols)
    assert not (partial & full).any()
    return np.where(full, maskc.FULL, np.where(partial, maskc.PARTIAL, maskc.EMPTY)).astype(np.uint8)


def check_block_mask(spec, block_size) -> tuple:
    """The exported ``BlockMask`` against the oracle: ``mask_mod`` densely, both table directions."""
    cm = maskc.compile(spec, block_size=block_size)
    bm = cm.to_block_mask()
    masks = spec_masks(spec)
    heads = len(masks)
    assert bm.BLOCK_SIZE == cm.block_size and bm.seq_lengths == (spec.q_len, spec.kv_len)
    assert bm.kv_indices.shape == (1, heads, cm.n_q_blocks, cm.n_kv_blocks)
    assert bm.q_indices.shape == (1, heads, cm.n_kv_blocks, cm.n_q_blocks)
    assert all(x.dtype == torch.int32 for x in (bm.kv_num_blocks, bm.kv_indices, bm.q_num_blocks, bm.q_indices))
    dense = create_mask(bm.mask_mod, 1, heads, spec.q_len, spec.kv_len, device="cpu")[0]
    np.testing.assert_array_equal(dense.numpy(), masks)
    expected = block_kinds(masks, *cm.block_size)
    forward = kinds_of(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices, cm.n_kv_blocks)
    backward = kinds_of(bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices, cm.n_q_blocks)
    np.testing.assert_array_equal(forward, expected)
    np.testing.assert_array_equal(backward, expected.transpose(0, 2, 1))
    return cm, bm


@pytest.mark.parametrize("name", sorted(CASES))
def test_block_mask_matches_oracle_and_create_block_mask(name):
    spec, block_size = CASES[name]
    cm, bm = check_block_mask(spec, block_size)
    ref = create_block_mask(bm.mask_mod, 1, cm.n_heads, spec.q_len, spec.kv_len, device="cpu", BLOCK_SIZE=block_size)
    fields = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
              "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")
    bq, bk = cm.block_size
    if spec.q_len % bq == 0 and spec.kv_len % bk == 0:
        assert name not in RAGGED
        for field in fields:  # the very tensors create_block_mask builds
            torch.testing.assert_close(getattr(bm, field), getattr(ref, field), rtol=0, atol=0, msg=field)
        return
    assert name in RAGGED
    # create_block_mask counts out-of-range padding as masked, so its edge tiles are
    # never FULL; the tiles visited and everything off the edge agree
    ours = kinds_of(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices, cm.n_kv_blocks)
    theirs = kinds_of(ref.kv_num_blocks, ref.kv_indices, ref.full_kv_num_blocks, ref.full_kv_indices, cm.n_kv_blocks)
    np.testing.assert_array_equal(ours > 0, theirs > 0)
    edge = np.zeros(ours.shape[1:], dtype=bool)
    edge[-1, :] |= spec.q_len % bq != 0
    edge[:, -1] |= spec.kv_len % bk != 0
    np.testing.assert_array_equal(ours[:, ~edge], theirs[:, ~edge])
    assert (theirs[:, edge] != maskc.FULL).all()
    torch.testing.assert_close(bm.kv_num_blocks + bm.full_kv_num_blocks, ref.kv_num_blocks + ref.full_kv_num_blocks)


@pytest.mark.parametrize("name", ["causal", "documents_with_padding", "dense", "predicate", "per_head", "empty"])
def test_flex_attention_with_exported_mask_equals_maskc(name):
    spec, block_size = CASES[name]
    cm = maskc.compile(spec, block_size=block_size)
    torch.manual_seed(0)
    hq, hkv = 4, 2
    q = torch.randn(2, hq, spec.q_len, 16, dtype=torch.float64)
    k, v = (torch.randn(2, hkv, spec.kv_len, 16, dtype=torch.float64) for _ in range(2))
    out, aux = flex_attention(q, k, v, block_mask=cm.to_block_mask(), enable_gqa=True,
                              return_aux=AuxRequest(lse=True))
    ours, lse = cm(q, k, v, return_lse=True)
    torch.testing.assert_close(out, ours)
    torch.testing.assert_close(aux.lse.to(lse.dtype), lse)


@given(specs(max_len=40))
def test_random_specs_export_exactly(spec):
    """Any spec, per-head included, on tiny tiles: every rule's torch form under vmap."""
    check_block_mask(spec, 8)


def test_unexportable_predicate_is_named():
    def uses_numpy(i, j):
        return torch.from_numpy(i.numpy() >= j.numpy())

    def branches(i, j):
        return i >= j if bool((i > 3).any()) else i < j

    for fn in (uses_numpy, branches):
        spec = maskc.Spec(q_len=64, kv_len=64, mask=maskc.Causal() & maskc.Documents(
            lengths=[32, 32], inner=maskc.Full() & maskc.Predicate(fn=fn)))
        cm = maskc.compile(spec, block_size=16)
        with pytest.raises(maskc.SpecError, match="cannot be expressed for FlexAttention") as error:
            cm.to_block_mask()
        assert error.value.path == "mask.of[1].inner.of[1]"


def test_predicate_returning_the_wrong_thing_is_named():
    numbers = maskc.Spec(q_len=32, kv_len=32, mask=maskc.Predicate(fn=lambda i, j: (i - j).float()))
    with pytest.raises(TypeError, match="must return booleans, got dtype torch.float32"):
        maskc.compile(numbers, block_size=16)  # refused before any export

    def booleans_unless_vmapped(i, j):  # the compiler passes 2-D index tensors, torch.vmap 0-d ones
        return (i >= j) if i.dim() else (i - j).float()

    spec = maskc.Spec(q_len=32, kv_len=32, mask=maskc.Predicate(booleans_unless_vmapped))
    with pytest.raises(maskc.SpecError, match="must return a bool tensor") as error:
        to_block_mask(maskc.compile(spec, block_size=16))
    assert error.value.path == "mask"


def test_partition_tiles_export():
    """Tiles of a ring-attention split (shifted predicates, placed documents) export exactly."""
    spec = maskc.Spec(q_len=96, kv_len=96, mask=maskc.Documents(lengths=[50, 46], inner=maskc.Causal())
                      & maskc.Predicate(fn=lambda i, j: (i + j) % 5 != 0))
    for row in maskc.partition(spec, 2, 3):
        for tile in row:
            check_block_mask(tile, 16)


def test_compiled_flex_attention_reads_the_tables():
    """Compiled flex_attention skips EMPTY tiles and runs FULL ones unmasked: only right tables give right output."""
    spec = maskc.Spec(q_len=384, kv_len=384, mask=maskc.Documents(lengths=[200, 100, 60]) & maskc.Causal())
    cm = maskc.compile(spec, block_size=128)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 2, 384, 32, device=device) for _ in range(3))
        bm = to_block_mask(cm, device=device)
        out = torch.compile(flex_attention)(q, k, v, block_mask=bm)
        torch.testing.assert_close(out, cm(q, k, v), atol=2e-5, rtol=2e-5)
