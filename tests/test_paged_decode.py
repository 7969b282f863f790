"""The decode path and paged KV caches, in Triton's CPU interpreter against the float64 oracle.

``TRITON_INTERPRET=1`` is set before maskc's kernels are defined, as in
``test_triton.py``, whose ``check`` (forward and backward against the oracle)
these tests reuse. Split-K is exercised by shrinking the key chunks so that
groups have several items and the merge kernel runs; with the default chunks
the same small masks give one item a group (the decode kernel's direct store).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402 - the interpreter switch above must come first

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import maskc  # noqa: E402
from maskc.codegen import decode, kernels, tuning  # noqa: E402
from maskc.codegen.plan import Section  # noqa: E402
from test_triton import check  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(params=["split", "whole"])
def chunks(request, monkeypatch):
    """``split``: one key block of 16 an item, so every group of more blocks is merged."""
    if request.param == "split":
        monkeypatch.setattr(tuning, "DECODE_CHUNK_KEYS", 16)
        monkeypatch.setattr(tuning, "DECODE_CHUNK_KEYS_PER_ROW", 1)
    return request.param


def items_per_group(cm) -> np.ndarray:
    return np.diff(cm.plan(CPU).section(Section.DECODE_GROUP_ITEMS))


def shuffled_page_table(n_seq: int, max_pages: int, n_pages: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.permutation(n_pages)[: n_seq * max_pages].reshape(n_seq, max_pages)


def paged_dense(page_table, page_size, kv_lengths, q_per_seq, n_pages, causal=True) -> np.ndarray:
    """The paged mask by its definition: each sequence's logical mask, scattered to its pages."""
    q_per_seq = [q_per_seq] * len(kv_lengths) if isinstance(q_per_seq, int) else q_per_seq
    out = np.zeros((sum(q_per_seq), n_pages * page_size), dtype=bool)
    row = 0
    for n, (length, count) in enumerate(zip(kv_lengths, q_per_seq)):
        for t in range(count):
            for p in range(length):
                if not causal or p <= t + length - count:
                    out[row + t, page_table[n][p // page_size] * page_size + p % page_size] = True
        row += count
    return out


# -- the decode kernel against the oracle ------------------------------------------------
@pytest.mark.parametrize("q_per_seq, heads, kv_heads", [(1, 4, 1), (1, 2, 2), (3, 4, 2), (2, 8, 2)])
def test_padded_cache_decode_matches_the_oracle(chunks, q_per_seq, heads, kv_heads):
    # ragged lengths: an empty sequence, one shorter than its queries (empty rows), a full slot
    spec = maskc.from_padded_kv_cache([q_per_seq] * 4, 48, [1, 0, 48, 29])
    cm = check(spec, heads=heads, kv_heads=kv_heads)
    assert cm.plan(CPU).structure.decode
    assert (items_per_group(cm) > 1).any() == (chunks == "split")


def test_decode_with_a_padded_head_dim_values_of_another_width_and_a_batch(chunks):
    spec = maskc.from_padded_kv_cache([2, 1, 3], 64, [40, 64, 3])
    cm = check(spec, batch=2, heads=4, kv_heads=2, head_dim=24, v_dim=40)
    assert cm.plan(CPU).structure.decode


def test_decode_float16_and_a_negative_scale():
    spec = maskc.from_padded_kv_cache([1, 2], 64, [50, 33])
    check(spec, heads=4, kv_heads=1, dtype=torch.float16, atol=2e-3)
    check(spec, heads=2, kv_heads=1, scale=-0.3)


def test_groups_wider_than_a_tile_split_their_heads():
    # 16 rows of one sequence times 4 heads exceed the interpreter's 16-row tiles: four programs a KV head
    spec = maskc.from_padded_kv_cache([16, 16], 64, [64, 40])
    cm = check(spec, block_size=(64, 16), heads=4, kv_heads=1)  # query blocks of 4 groups
    assert cm.plan(CPU).structure.decode_rows == 16
    assert decode.tile_of(16, 4, tuning.INTERPRETER.block_m) == (1, 16)


@pytest.mark.parametrize("page_size", [16, 32, 8])
def test_paged_cache_with_shuffled_pages_matches_the_oracle(chunks, page_size):
    # pages of one block, of two, and half a block (a block then holds pages of two sequences, or
    # two of one sequence: read once for each)
    max_pages = 64 // page_size
    n_pages = 3 * max_pages + 2
    table = shuffled_page_table(3, max_pages, n_pages, seed=page_size)
    lengths, per_seq = [37, 64, 9], [1, 3, 2]
    spec = maskc.from_paged_kv_cache(table, page_size, lengths, per_seq, n_pages=n_pages)
    assert np.array_equal(maskc.compile(spec, block_size=16).dense().numpy(),
                          paged_dense(table, page_size, lengths, per_seq, n_pages))
    cm = check(spec, heads=4, kv_heads=2)
    assert cm.plan(CPU).structure.decode


def test_paged_and_padded_caches_give_the_same_attention():
    page_size, max_pages, n_pages = 16, 4, 16
    lengths, per_seq = [50, 7, 64], 2
    table = shuffled_page_table(3, max_pages, n_pages, seed=1)
    torch.manual_seed(0)
    q = torch.randn(1, 4, 3 * per_seq, 16)
    padded_k, padded_v = (torch.randn(1, 2, 3 * max_pages * page_size, 16) for _ in range(2))
    # the padded cache's slot n, page b is the pool's page table[n, b]
    pool_k, pool_v = (torch.zeros(1, 2, n_pages * page_size, 16) for _ in range(2))
    for n in range(3):
        for b in range(max_pages):
            slot = slice((n * max_pages + b) * page_size, (n * max_pages + b + 1) * page_size)
            page = slice(table[n, b] * page_size, (table[n, b] + 1) * page_size)
            pool_k[:, :, page], pool_v[:, :, page] = padded_k[:, :, slot], padded_v[:, :, slot]
    padded = maskc.compile(maskc.from_padded_kv_cache([per_seq] * 3, max_pages * page_size, lengths), block_size=16)
    paged = maskc.compile(maskc.from_paged_kv_cache(table, page_size, lengths, per_seq, n_pages=n_pages),
                          block_size=16)
    want = padded(q, padded_k, padded_v, return_lse=True, backend="triton")
    got = paged(q, pool_k, pool_v, return_lse=True, backend="triton")
    assert padded.plan(CPU).structure.decode and paged.plan(CPU).structure.decode
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@settings(max_examples=40)
@given(st.data())
def test_paged_masks_are_their_page_tables(data):
    page_size = data.draw(st.sampled_from([1, 2, 3, 4]), "page_size")
    n_seq = data.draw(st.integers(1, 4), "n_seq")
    max_pages = data.draw(st.integers(1, 4), "max_pages")
    n_pages = data.draw(st.integers(n_seq * max_pages, n_seq * max_pages + 3), "n_pages")
    table = np.array(data.draw(st.permutations(range(n_pages)), "pages")[: n_seq * max_pages]).reshape(n_seq, -1)
    lengths = data.draw(st.lists(st.integers(0, max_pages * page_size), min_size=n_seq, max_size=n_seq), "lengths")
    per_seq = data.draw(st.lists(st.integers(0, 3), min_size=n_seq, max_size=n_seq), "q_per_seq")
    causal = data.draw(st.booleans(), "causal")
    if not sum(per_seq):
        with pytest.raises(maskc.SpecError, match="no sequence has a new query"):
            maskc.from_paged_kv_cache(table, page_size, lengths, per_seq, n_pages=n_pages)
        return
    spec = maskc.from_paged_kv_cache(table, page_size, lengths, per_seq, causal=causal, n_pages=n_pages)
    assert (spec.q_len, spec.kv_len) == (sum(per_seq), n_pages * page_size)
    cm = maskc.compile(spec, block_size=4)
    assert np.array_equal(cm.dense().numpy(), paged_dense(table, page_size, lengths, per_seq, n_pages, causal))


@settings(max_examples=8)
@given(st.data())
def test_decode_over_random_page_tables_matches_the_oracle(data):
    page_size = data.draw(st.sampled_from([8, 16, 32]), "page_size")
    n_seq = data.draw(st.integers(1, 3), "n_seq")
    max_pages = 64 // page_size
    table = shuffled_page_table(n_seq, max_pages, n_seq * max_pages + 1, data.draw(st.integers(0, 99), "seed"))
    lengths = data.draw(st.lists(st.integers(0, 64), min_size=n_seq, max_size=n_seq), "lengths")
    per_seq = data.draw(st.lists(st.integers(1, 3), min_size=n_seq, max_size=n_seq), "q_per_seq")
    if not any(lengths):
        lengths[0] = 1
    spec = maskc.from_paged_kv_cache(table, page_size, lengths, per_seq, n_pages=n_seq * max_pages + 1)
    check(spec, heads=2, kv_heads=1)


# -- when the decode path runs ------------------------------------------------------------
def test_the_plan_chooses_decode_for_few_rows_of_long_reach():
    def structure(spec):
        return maskc.compile(spec).plan(CPU).structure  # blocks of 128 rows, groups of at most 16

    assert structure(maskc.from_padded_kv_cache([1] * 8, 256, [200] * 8)).decode
    assert structure(maskc.from_padded_kv_cache([4] * 8, 256, [200] * 8)).decode_rows == 4
    # prefill: a query block's rows share its keys, the main kernels read them once
    assert not structure(maskc.Spec(q_len=256, kv_len=256, mask=maskc.Causal())).decode
    assert not structure(maskc.from_padded_kv_cache([64] * 4, 256, [200] * 4)).decode
    # per-head masks, and masks the row intervals do not describe exactly
    heads = [maskc.Causal(align="bottom_right"), maskc.Full()]
    assert not structure(maskc.Spec(q_len=2, kv_len=256, mask=heads)).decode
    opaque = maskc.Predicate(fn=lambda i, j: j % 3 == 0)
    assert not structure(maskc.Spec(q_len=2, kv_len=256, mask=opaque)).decode


def test_decode_work_lists_only_the_blocks_each_group_needs():
    spec = maskc.from_padded_kv_cache([1, 1, 1], 64, [20, 0, 33])
    plan = maskc.compile(spec, block_size=16).plan(CPU)
    assert plan.section(Section.DECODE_GROUP_ROWS).tolist() == [[0, 1], [1, 1], [2, 1]]
    assert plan.section(Section.DECODE_BLOCKS).tolist() == [0, 1, 8, 9, 10]  # sequence 1 allows nothing
    assert plan.section(Section.DECODE_SPANS)[:, :, 0].tolist() == [[0, 16], [16, 20], [128, 144], [144, 160],
                                                                     [160, 161]]
    assert plan.structure.decode_items == 2
    assert items_per_group(maskc.compile(spec, block_size=16)).tolist() == [1, 0, 1]


def test_a_decode_mask_skips_the_main_forward(monkeypatch):
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("the main forward kernel ran")

    monkeypatch.setattr(kernels, "_attn_fwd", NoLaunch())
    cm = maskc.compile(maskc.from_padded_kv_cache([1, 1], 64, [10, 64]), block_size=16)
    x = torch.randn(1, 2, 2, 16)
    kv = torch.randn(1, 1, 128, 16)
    out, lse = cm(x, kv, kv, return_lse=True, backend="triton")
    ref = cm(x, kv, kv, return_lse=True, backend="reference")
    torch.testing.assert_close(out, ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref[1].float(), atol=1e-5, rtol=1e-5)


def test_decode_runs_under_torch_compile():
    cm = maskc.compile(maskc.from_padded_kv_cache([2, 1], 64, [40, 64]), block_size=16, device="cpu")
    assert cm.plan(CPU).structure.decode

    def attend(q, k, v):
        out, lse = cm(q, k, v, return_lse=True, backend="triton")
        return out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()

    q = torch.randn(1, 4, 3, 16, requires_grad=True)
    k, v = (torch.randn(1, 2, 128, 16, requires_grad=True) for _ in range(2))
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    want = torch.autograd.grad(attend(q, k, v), (q, k, v))
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# -- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize("args, where, words", [
    (dict(page_table=[[0, 9]]), "page_table[0, 1]", "page 9 is outside the pool's n_pages=4 pages"),
    (dict(page_table=[[0, -1]]), "page_table[0, 1]", "page -1 is outside"),
    (dict(page_table=[[2, 2]]), "page_table[0, 1]", "page 2 is also sequence 0's page 0"),
    (dict(page_table=[[0.0, 1.0]]), "page_table", "must hold integers, got dtype float64"),
    (dict(page_table=[0, 1]), "page_table", "must be a 2-D"),
    (dict(kv_lengths=[9]), "kv_lengths[0]", "9 keys do not fit max_pages * page_size = 2 * 4"),
    (dict(kv_lengths=[3, 3]), "kv_lengths", "has 2 entries but page_table has 1 rows"),
    (dict(q_per_seq=[1, 1]), "q_per_seq", "has 2 entries but page_table has 1 rows"),
    (dict(q_per_seq=-1), "q_per_seq[0]", "lengths must be >= 0"),
    (dict(page_size=0), "page_size", "must be a positive int"),
])
def test_bad_page_tables_are_refused_naming_the_argument(args, where, words):
    given_args = dict(page_table=[[0, 1]], page_size=4, kv_lengths=[6], q_per_seq=1, n_pages=4) | args
    with pytest.raises(maskc.SpecError) as error:
        maskc.from_paged_kv_cache(**given_args)
    assert error.value.path == where and words in str(error.value)


def test_unfilled_page_table_entries_are_not_read():
    spec = maskc.from_paged_kv_cache([[1, -1, 99]], 4, [3], 1, n_pages=2)  # one page filled; vLLM pads the rest
    assert spec.kv_len == 8 and np.flatnonzero(maskc.compile(spec, block_size=4).dense()[0]).tolist() == [4, 5, 6]


def test_a_cache_that_does_not_match_the_mask_is_refused_before_launch(monkeypatch):
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("a kernel was launched")

    monkeypatch.setattr(decode, "_decode_fwd", NoLaunch())
    cm = maskc.compile(maskc.from_paged_kv_cache([[0, 1], [2, 3]], 16, [20, 32], 1, n_pages=4), block_size=16)
    q = torch.randn(1, 4, 2, 16)
    pool = torch.randn(1, 2, 64, 16)
    with pytest.raises(TypeError, match="q, k, v must share a dtype"):
        cm(q, pool.half(), pool.half(), backend="triton")
    with pytest.raises(ValueError, match=r"k has 48 keys .* kv_len=64"):
        cm(q, pool[:, :, :48], pool, backend="triton")
    with pytest.raises(ValueError, match="q's 4 heads must be a multiple of k's 3 heads"):
        cm(q, pool[:, :1].expand(1, 3, 64, 16), pool[:, :1].expand(1, 3, 64, 16), backend="triton")


def test_empty_rows_give_zero_and_minus_infinity_never_nan(chunks):
    spec = maskc.from_padded_kv_cache([2, 2, 1], 32, [1, 0, 32])  # rows 0, 2, 3 allow nothing
    q = torch.randn(1, 2, 5, 16)
    k, v = (torch.randn(1, 1, 96, 16) for _ in range(2))
    out, lse = maskc.compile(spec, block_size=16)(q, k, v, return_lse=True, backend="triton")
    assert torch.equal(torch.isinf(lse[0, 0]), torch.tensor([True, False, True, True, False]))
    assert (out[:, :, [0, 2, 3]] == 0).all() and not out.isnan().any() and (lse[torch.isinf(lse)] < 0).all()
    assert not math.isnan(float(lse.sum()))
