"""``from_seqlens``, ``from_cu_seqlens`` and ``from_padded_kv_cache`` mean what their sources mean;
``pack_batch`` means per-sample attention.

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
from oracle import attention, spec_masks
from strategies import Options, Scope, masks


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


# -- pack_batch: a batch of layouts is per-sample attention ------------------------------


def block_diagonal(per_sample: list[np.ndarray]) -> np.ndarray:
    """The oracle's packed mask: sample ``b``'s mask on its diagonal block, nothing elsewhere."""
    h, q_len, kv_len = per_sample[0].shape
    out = np.zeros((h, len(per_sample) * q_len, len(per_sample) * kv_len), dtype=bool)
    for b, m in enumerate(per_sample):
        out[:, b * q_len:(b + 1) * q_len, b * kv_len:(b + 1) * kv_len] = m
    return out


@st.composite
def batches(draw):
    """2-4 samples of one shape: arbitrary masks, documents sharing one inner (the joined form), or copies."""
    q_len, kv_len = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    one = masks(Scope.of_spec(q_len, kv_len), 2, Options(huge=False))
    n = draw(st.integers(2, 4))
    shape = draw(st.sampled_from(["any", "documents", "same"]))
    if shape == "same":
        return [maskc.Spec(q_len=q_len, kv_len=kv_len, mask=draw(one))] * n
    if shape == "documents":
        inner = draw(st.sampled_from([maskc.Causal(), maskc.Full(), maskc.SlidingWindow(left=1),
                                      maskc.Causal(align="bottom_right")]))
        out = []
        for _ in range(n):
            lq = draw(st.lists(st.integers(0, 4), max_size=3).filter(lambda x: sum(x) <= q_len))
            lk = draw(st.lists(st.integers(0, 4), min_size=len(lq), max_size=len(lq))
                      .filter(lambda x: sum(x) <= kv_len))
            q0, k0 = draw(st.integers(0, q_len - sum(lq))), draw(st.integers(0, kv_len - sum(lk)))
            out.append(maskc.Spec(q_len=q_len, kv_len=kv_len, mask=maskc.Documents(
                lengths=lq, kv_lengths=lk, inner=inner, q_start=q0, kv_start=k0)))
        return out
    return [maskc.Spec(q_len=q_len, kv_len=kv_len, mask=draw(one)) for _ in range(n)]


@given(batches())
def test_pack_batch_places_each_sample_on_the_diagonal(samples):
    packed = maskc.pack_batch(samples)
    n = len(samples)
    assert (packed.q_len, packed.kv_len) == (n * samples[0].q_len, n * samples[0].kv_len)
    np.testing.assert_array_equal(spec_masks(packed), block_diagonal([spec_masks(s) for s in samples]))


def test_pack_batch_joins_documents_into_one():
    right_padded = maskc.from_seqlens([3], q_len=4, kv_len=4)
    left_padded = maskc.Spec(q_len=4, kv_len=4, mask=maskc.Documents(lengths=[3], inner=maskc.Causal(), q_start=1,
                                                                     kv_start=1))
    packed = maskc.pack_batch([right_padded, left_padded])
    # the padding between the samples: 2 queries with no keys, 2 keys with no queries
    assert packed.mask == maskc.Documents(lengths=[3, 2, 0, 3], kv_lengths=[3, 0, 2, 3], inner=maskc.Causal())
    assert picture(packed) == [
        "#.......", "##......", "###.....", "........",
        "........", ".....#..", ".....##.", ".....###",
    ]
    # per-sample document lengths, padded to the longest sample (or seq_len)
    assert maskc.pack_batch([[2, 1], [3]]) == maskc.from_seqlens([2, 1, 3])
    assert maskc.pack_batch([[2], [1]], seq_len=3).mask == maskc.Documents(
        lengths=[2, 1, 0, 1], kv_lengths=[2, 0, 1, 1], inner=maskc.Causal())
    assert maskc.pack_batch([[4], [2, 2]], window=(1, 0)) == maskc.from_seqlens([4, 2, 2], window=(1, 0))
    # samples of one mask that is no Documents: one document per sample
    causal = maskc.Spec(q_len=3, kv_len=3, mask=maskc.Causal())
    assert maskc.pack_batch([causal, causal]).mask == maskc.Documents(lengths=[3, 3], inner=maskc.Causal())


def test_pack_batch_per_head_samples():
    shared = maskc.from_seqlens([2, 2])
    per_head = maskc.Spec(q_len=4, kv_len=4, mask=[maskc.Causal(), maskc.Full()])
    packed = maskc.pack_batch([shared, per_head])
    assert len(packed.mask) == 2
    np.testing.assert_array_equal(spec_masks(packed), block_diagonal([spec_masks(shared).repeat(2, 0),
                                                                      spec_masks(per_head)]))


@pytest.mark.parametrize("hq, hkv", [(4, 2), (2, 2)])
def test_pack_batch_attention_is_per_sample_attention(hq, hkv):
    """The reshape of pack_batch's docstring, [B, H, L, D] -> [1, H, B*L, D] and back, against the oracle per sample."""
    samples = [maskc.from_seqlens([3, 5], q_len=10, kv_len=10), maskc.from_seqlens([10]),
               maskc.Spec(q_len=10, kv_len=10, mask=maskc.Documents(lengths=[4, 4], inner=maskc.Causal(), q_start=2,
                                                                   kv_start=2))]
    B, L, D = len(samples), 10, 8
    g = torch.Generator().manual_seed(0)
    # as models hold them: [B, L, H, D] in memory, seen as [B, H, L, D]
    q = torch.randn(B, L, hq, D, generator=g, dtype=torch.float64).transpose(1, 2)
    k, v = (torch.randn(B, L, hkv, D, generator=g, dtype=torch.float64).transpose(1, 2) for _ in range(2))
    cm = maskc.compile(maskc.pack_batch(samples), block_size=4)

    def flat(x):
        return x.transpose(1, 2).reshape(1, B * x.shape[2], x.shape[1], D).transpose(1, 2)

    assert flat(q).data_ptr() == q.data_ptr() and flat(q).shape == (1, hq, B * L, D)  # a view, no copy
    out, lse = cm(flat(q), flat(k), flat(v), return_lse=True)
    out = out.transpose(1, 2).reshape(B, L, hq, D).transpose(1, 2)
    lse = lse.reshape(hq, B, L).transpose(0, 1)
    for b, spec in enumerate(samples):
        want_out, want_lse = attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], spec_masks(spec))
        torch.testing.assert_close(out[b:b + 1], want_out)
        torch.testing.assert_close(lse[b:b + 1], want_lse.to(lse.dtype))


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
