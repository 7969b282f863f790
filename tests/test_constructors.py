"""``from_seqlens``, ``from_cu_seqlens`` and ``from_padded_kv_cache`` mean what their sources mean.

Each oracle below restates the source's own definition on a dense grid:
FlashAttention's varlen docstring (causal aligned to the bottom right of each
sequence; ``window_size=(left, right)`` keeps keys
``i + lk - lq - left <= j <= i + lk - lq + right``, ``-1`` unbounded) and
xformers' ``BlockDiagonalCausalWithOffsetPaddedKeysMask`` (keys of sequence
``n`` at ``n * kv_padding``, only ``kv_seqlen[n]`` in use, a query never
attends a key nearer the last in-use key than it is to its last query).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import maskc
from oracle import spec_masks


def flash_varlen_mask(cu_q, cu_k, causal, window, q_len, kv_len) -> np.ndarray:
    left, right = window
    out = np.zeros((q_len, kv_len), dtype=bool)
    for q0, q1, k0, k1 in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]):
        lq, lk = q1 - q0, k1 - k0
        i = np.arange(lq)[:, None]
        j = np.arange(lk)[None, :]
        ok = np.ones((lq, lk), dtype=bool)
        if causal:
            right = 0
            ok &= j <= i + lk - lq
        if left >= 0:
            ok &= j >= i + lk - lq - left
        if right >= 0:
            ok &= j <= i + lk - lq + right
        out[q0:q1, k0:k1] = ok
    return out


def xformers_padded_mask(q_seqlen, kv_padding, kv_seqlen) -> np.ndarray:
    out = np.zeros((sum(q_seqlen), len(kv_seqlen) * kv_padding), dtype=bool)
    q0 = 0
    for n, (lq, lk) in enumerate(zip(q_seqlen, kv_seqlen)):
        for i in range(lq):
            for j in range(lk):
                # the key's distance to the last in-use key must not be below the query's to its last query
                out[q0 + i, n * kv_padding + j] = (lk - 1 - j) >= (lq - 1 - i)
        q0 += lq
    return out


def picture(spec: maskc.Spec) -> list[str]:
    return ["".join("#" if x else "." for x in row) for row in spec_masks(spec)[0]]


# -- the sources' own examples ---------------------------------------------------------


def test_flash_attention_docstring_examples():
    # "if seqlen_q = 2 and seqlen_k = 5, the causal mask is 11110 / 11111"; 5 x 2: 00 00 00 10 11
    assert picture(maskc.from_cu_seqlens([0, 2], [0, 5], causal=True)) == ["####.", "#####"]
    assert picture(maskc.from_cu_seqlens([0, 5], [0, 2], causal=True)) == ["..", "..", "..", "#.", "##"]


def test_xformers_docstring_layout():
    # "space for 12 keys, three blocks of max length 4, use the first 2, 3 and 2 of each"
    spec = maskc.from_padded_kv_cache([1, 1, 1], 4, [2, 3, 2])
    assert (spec.q_len, spec.kv_len) == (3, 12)
    assert picture(spec) == ["##..........", "....###.....", "........##.."]


def test_from_seqlens_is_a_plain_documents_spec():
    spec = maskc.from_seqlens([3, 2])
    assert spec == maskc.Spec(q_len=5, kv_len=5, mask=maskc.Documents(lengths=[3, 2], inner=maskc.Causal()))
    assert maskc.loads(spec.dumps()) == spec
    assert picture(spec) == ["#....", "##...", "###..", "...#.", "...##"]
    windowed = maskc.from_seqlens([4, 3], window=1, q_len=8, kv_len=9)
    assert windowed.mask.inner == maskc.SlidingWindow(left=1)
    assert picture(windowed)[:4] == ["#........", "##.......", ".##......", "..##....."]
    assert picture(windowed)[7] == "." * 9  # padding past the documents attends nothing
    assert maskc.from_seqlens([4], causal=False).mask.inner == maskc.Full()


# -- random inputs against the oracles --------------------------------------------------


@st.composite
def varlen(draw):
    n = draw(st.integers(1, 5))
    lq = draw(st.lists(st.integers(0, 9), min_size=n, max_size=n))
    lk = draw(st.just(lq) | st.lists(st.integers(0, 9), min_size=n, max_size=n))
    side = st.just(-1) | st.integers(0, 6)
    window = draw(st.just((-1, -1)) | st.tuples(side, side))
    return np.cumsum([0] + lq).tolist(), np.cumsum([0] + lk).tolist(), draw(st.booleans()), window


@given(varlen(), st.integers(0, 3), st.integers(0, 3), st.booleans())
def test_from_cu_seqlens_matches_flash_attention(args, q_pad, kv_pad, as_tensor):
    cu_q, cu_k, causal, window = args
    q_len, kv_len = cu_q[-1] + q_pad, cu_k[-1] + kv_pad
    if q_len == 0 or kv_len == 0:
        return
    given_q, given_k = (torch.tensor(x, dtype=torch.int32) for x in (cu_q, cu_k)) if as_tensor else (cu_q, cu_k)
    spec = maskc.from_cu_seqlens(given_q, given_k, causal=causal, window=window, q_len=q_len, kv_len=kv_len)
    np.testing.assert_array_equal(spec_masks(spec)[0], flash_varlen_mask(cu_q, cu_k, causal, window, q_len, kv_len))
    # from_seqlens is the same mask, spelled with lengths
    same = maskc.from_seqlens(np.diff(cu_q), causal, window, kv_lengths=np.diff(cu_k), q_len=q_len, kv_len=kv_len)
    assert same == spec


@given(st.lists(st.integers(0, 6), min_size=1, max_size=5), st.integers(1, 8), st.data())
def test_from_padded_kv_cache_matches_xformers(q_seqlen, kv_padding, data):
    if sum(q_seqlen) == 0:
        return
    kv_seqlen = data.draw(st.lists(st.integers(0, kv_padding), min_size=len(q_seqlen), max_size=len(q_seqlen)))
    spec = maskc.from_padded_kv_cache(q_seqlen, kv_padding, kv_seqlen)
    np.testing.assert_array_equal(spec_masks(spec)[0], xformers_padded_mask(q_seqlen, kv_padding, kv_seqlen))
    cm = maskc.compile(spec, block_size=4)
    padding = [n * kv_padding + j for n, lk in enumerate(kv_seqlen) for j in range(lk, kv_padding)]
    assert set(padding) <= set(cm.empty_cols.tolist())  # padding is never attended


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("call, path, message", [
    (lambda: maskc.from_cu_seqlens([1, 4]), "cu_seqlens_q[0]", "must start at 0"),
    (lambda: maskc.from_cu_seqlens([0, 4], [2, 4]), "cu_seqlens_k[0]", "must start at 0"),
    (lambda: maskc.from_cu_seqlens([0, 4, 3, 6]), "cu_seqlens_q[2]", "must not decrease: 4 then 3"),
    (lambda: maskc.from_cu_seqlens(torch.tensor([0, 5, 2]), [0, 1, 2]), "cu_seqlens_q[2]", "must not decrease"),
    (lambda: maskc.from_cu_seqlens([0, 4, 8], q_len=6), "cu_seqlens_q", "end at 8, past q_len=6"),
    (lambda: maskc.from_cu_seqlens([0, 4], [0, 9], kv_len=8), "cu_seqlens_k", "end at 9, past kv_len=8"),
    (lambda: maskc.from_cu_seqlens([0, 4], [0, 2, 4]), "cu_seqlens_k", "3 entries but cu_seqlens_q has 2"),
    (lambda: maskc.from_cu_seqlens([]), "cu_seqlens_q", "at least one entry"),
    (lambda: maskc.from_cu_seqlens([[0, 4]]), "cu_seqlens_q", "1-D"),
    (lambda: maskc.from_cu_seqlens([0, [4, 5]]), "cu_seqlens_q", "1-D"),
    (lambda: maskc.from_cu_seqlens([0, 2.5]), "cu_seqlens_q", "integers"),
    (lambda: maskc.from_cu_seqlens([0, 4], window=(-2, 0)), "window[0]", "-1 / None for unbounded"),
    (lambda: maskc.from_cu_seqlens([0, 4], window=(1, 2, 3)), "window", "(left, right) pair"),
    (lambda: maskc.from_seqlens([3, -1]), "lengths[1]", ">= 0"),
    (lambda: maskc.from_seqlens([3, None]), "lengths[1]", "must be an integer"),
    (lambda: maskc.from_seqlens([3, 2], kv_lengths=[3]), "kv_lengths", "1 entries but lengths has 2"),
    (lambda: maskc.from_seqlens([3, 2], q_len=4), "lengths", "past q_len=4"),
    (lambda: maskc.from_seqlens([0, 0]), "q_len", "greater than 0"),
    (lambda: maskc.from_padded_kv_cache([1, 1], 4, [2, 5]), "kv_seqlen[1]", "kv_padding=4"),
    (lambda: maskc.from_padded_kv_cache([1, 1], 0, [0, 0]), "kv_padding", "positive"),
    (lambda: maskc.from_padded_kv_cache([1, 1], 4, [2]), "kv_seqlen", "1 entries but q_seqlen has 2"),
])
def test_bad_input_raises_spec_error_naming_the_argument(call, path, message):
    with pytest.raises(maskc.SpecError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        call()
    assert error.value.path == path


def test_wrong_types_raise_type_error():
    with pytest.raises(TypeError, match="causal must be a bool"):
        maskc.from_seqlens([3], causal="yes")
    with pytest.raises(TypeError, match="q_len must be an int"):
        maskc.from_cu_seqlens([0, 3], q_len=3.0)
