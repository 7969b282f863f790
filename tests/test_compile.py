"""``maskc.compile`` against the brute-force oracle: block map, empty rows and
columns, ``dense()``, pair counts, both index tables, and simplification."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import maskc
from maskc.ir import is_opaque, walk
from maskc.passes.simplify import simplify
from maskc.passes.tables import IndexTable
from oracle import block_kinds, dense_mask, spec_masks
from strategies import Options, Scope, block_sizes, many_terms, masks, specs

SPECS = specs(huge=True)


def decode(table: IndexTable, slot: int, n_groups: int, n_other: int) -> np.ndarray:
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
    """``(CompiledMask, the oracle's bool[H, q_len, kv_len], the oracle's block kinds)``."""
    cm = maskc.compile(spec, block_size)
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    dense = spec_masks(spec)
    return cm, dense, block_kinds(dense, bq, bk)


# -- properties over random specs -----------------------------------------------------


@given(SPECS, block_sizes)
def test_block_kinds_match_oracle_exactly(spec, block_size):
    cm, _, expected = compiled_and_oracle(spec, block_size)
    assert cm.block_kinds.dtype == torch.uint8
    np.testing.assert_array_equal(cm.block_kinds.numpy(), expected)
    counts = cm.tile_counts()
    assert (counts["full"], counts["partial"], counts["empty"]) == tuple(
        int((expected == k).sum()) for k in (maskc.FULL, maskc.PARTIAL, maskc.EMPTY))


@given(SPECS, block_sizes)
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
        assert cm.allowed_pairs(h) == int(mask.sum())
    assert cm.allowed_pairs() == int(dense.sum())


def tile_bits(mask: np.ndarray, qb: int, kb: int, bq: int, bk: int) -> np.ndarray:
    """``bool[bq, bk]``: one tile of a dense mask, out-of-range positions False."""
    tile = np.zeros((bq, bk), dtype=bool)
    part = mask[qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk]
    tile[: part.shape[0], : part.shape[1]] = part
    return tile


@given(SPECS, block_sizes)
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
        # heads still holding Dense / Predicate after simplification keep each PARTIAL tile's bits
        # (single-tile runs, in both directions); the others have generated predicates (-1)
        opaque = any(is_opaque(node) for node in walk(cm.simplified.heads[h]))
        for direction, n_groups in ((table.forward, n_q), (table.backward, n_k)):
            for group in range(n_groups):
                for start, end, pattern in direction.runs_of(slot, group, full=False):
                    if not opaque:
                        assert pattern == -1
                        continue
                    assert end == start + 1 and 0 <= pattern < len(table.patterns)
                    qb, kb = (group, start) if direction is table.forward else (start, group)
                    np.testing.assert_array_equal(table.patterns[pattern].numpy(), tile_bits(dense[h], qb, kb, bq, bk))


@given(st.integers(1, 40), st.integers(1, 40), st.data())
def test_simplify_preserves_meaning_and_is_a_fixpoint(q_len, kv_len, data):
    mask = data.draw(masks(Scope.of_spec(q_len, kv_len), options=Options(huge=True)))
    simple = simplify(mask)
    np.testing.assert_array_equal(dense_mask(simple, q_len, kv_len), dense_mask(mask, q_len, kv_len))
    assert simplify(simple) == simple


# -- each node, by its documented picture ---------------------------------------------------


def picture(mask: np.ndarray) -> str:
    return "/".join("".join("#" if x else "." for x in row) for row in mask)


NODE_PICTURES = [  # (node, q_len, kv_len, picture) from docs/contract.md's rules and the node docstrings
    (maskc.Full(), 2, 5, "#####/#####"),
    (maskc.Empty(), 2, 5, "...../....."),
    (maskc.Causal(), 4, 4, "#.../##../###./####"),
    (maskc.Causal(), 2, 5, "#..../##..."),
    (maskc.Causal(align="bottom_right"), 2, 5, "####./#####"),
    (maskc.Causal(offset=-1), 3, 3, ".../#../##."),
    (maskc.Causal(align="bottom_right"), 3, 2, "../#./##"),  # more queries than keys: an empty row
    (maskc.Causal(offset=1, align="bottom_right"), 3, 2, "#./##/##"),
    (maskc.SlidingWindow(left=1), 4, 4, "#.../##../.##./..##"),
    (maskc.SlidingWindow(left=1, align="bottom_right"), 2, 5, "..##./...##"),
    (maskc.SlidingWindow(left=0, right=1), 3, 3, "##./.##/..#"),
    (maskc.SlidingWindow(left=None, right=1), 3, 4, "##../###./####"),
    (maskc.SlidingWindow(left=1, right=None), 3, 4, "####/####/.###"),
    (maskc.Chunked(size=2), 4, 4, "##../##../..##/..##"),
    (maskc.Chunked(size=2), 2, 5, "##.../##..."),
    (maskc.Prefix(length=1), 4, 4, "#.../#.../#.../#..."),
    (maskc.Prefix(length=2), 2, 5, "##.../##..."),
    (maskc.Range(q=(1, 3), kv=(0, 2)), 4, 4, "..../##../##../...."),
    (maskc.Range(q=(0, 1), kv=(3, 5)), 2, 5, "...##/....."),
    (maskc.Documents(lengths=[3, 1], inner=maskc.Causal()), 4, 4, "#.../##../###./...#"),
    (maskc.Documents(lengths=[1, 1], kv_lengths=[3, 2]), 2, 5, "###../...##"),
    (maskc.Documents(lengths=[2, 0, 1]), 4, 4, "##../##../..#./...."),  # zero-length document, padding
    (maskc.Documents(lengths=[2, 1], kv_lengths=[1, 3], inner=maskc.Causal(align="bottom_right")), 3, 4,
     "..../#.../.###"),
    (maskc.Documents(lengths=[3], inner=maskc.Documents(lengths=[1, 2])), 4, 4, "#.../.##./.##./...."),
    (maskc.Dense(values=[[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]]), 4, 4, "#..#/.#../..#./#..#"),
    (maskc.Predicate(fn=lambda i, j: (i + j) % 2 == 0), 4, 4, "#.#./.#.#/#.#./.#.#"),
    (maskc.Causal() & ~maskc.Prefix(length=1), 3, 3, ".../.#./.##"),
    (maskc.Chunked(size=2) | maskc.Prefix(length=1), 4, 4, "##../##../#.##/#.##"),
    (maskc.And(of=[]), 1, 2, "##"),
    # numbers past int64 arithmetic keep their meaning (no wrap-around)
    (maskc.Causal(offset=2**63 - 1), 2, 3, "###/###"),
    (maskc.Causal(offset=-2**70, align="bottom_right"), 2, 3, ".../..."),
    (maskc.SlidingWindow(left=2**70, right=2**63), 2, 3, "###/###"),
    (maskc.Chunked(size=2**64), 2, 3, "###/###"),
    (maskc.Prefix(length=2**64), 2, 3, "###/###"),
    (maskc.Documents(lengths=[2, 1], inner=maskc.Range(q=(1, 2**64), kv=(0, 2**64))), 3, 3, ".../##./..."),
    (maskc.Or(of=[]), 1, 2, ".."),
]


@pytest.mark.parametrize("node, q_len, kv_len, expected", NODE_PICTURES, ids=lambda x: repr(x)[:60])
def test_each_node_allows_exactly_its_documented_picture(node, q_len, kv_len, expected):
    spec = maskc.Spec(q_len=q_len, kv_len=kv_len, mask=node)
    assert picture(dense_mask(node, q_len, kv_len)) == expected  # the oracle reads the table the same way
    for block_size in (1, 2, (3, 2), 8):
        cm, _, kinds = compiled_and_oracle(spec, block_size)
        assert picture(cm.dense().numpy()) == expected
        np.testing.assert_array_equal(cm.block_kinds.numpy(), kinds)


# -- the case that started the project ----------------------------------------------------------


def test_document_causal_5_4_3_block_map_and_empties():
    spec = maskc.Spec(q_len=12, kv_len=12, mask=maskc.Documents(lengths=[5, 4, 3]) & maskc.Causal())
    cm = maskc.compile(spec, block_size=4)
    P, E = maskc.PARTIAL, maskc.EMPTY
    assert cm.block_kinds.tolist() == [[[P, E, E], [P, P, E], [E, P, P]]]
    assert cm.empty_rows.tolist() == [] and cm.empty_cols.tolist() == []
    assert cm.allowed_pairs() == 15 + 10 + 6
    tall = maskc.compile(spec, block_size=(6, 2))  # rows 0-5 hold documents 0 and 1
    assert tall.block_kinds.tolist() == [[[P, P, P, E, E, E], [E, E, P, P, P, P]]]


def test_yaml_text_compiles_like_the_python_spec():
    text = "q_len: 12\nkv_len: 12\nmask:\n  kind: and\n  of:\n    - {kind: documents, lengths: [5, 4, 3]}\n" \
           "    - {kind: causal}\n"
    from_text = maskc.compile(text, 4)
    from_python = maskc.compile(
        maskc.Spec(q_len=12, kv_len=12, mask=maskc.Documents(lengths=[5, 4, 3]) & maskc.Causal()), 4)
    assert torch.equal(from_text.block_kinds, from_python.block_kinds)


# -- heads ---------------------------------------------------------------------------------------


def test_per_head_masks_get_their_own_block_maps_and_empties():
    heads = [maskc.Causal(), maskc.Prefix(length=0), maskc.Range(q=(2, 4), kv=(0, 8))]
    spec = maskc.Spec(q_len=8, kv_len=8, mask=heads)
    cm = maskc.compile(spec, 4)
    assert cm.n_heads == 3 and cm.block_kinds.shape == (3, 2, 2)
    np.testing.assert_array_equal(cm.block_kinds.numpy(), block_kinds(spec_masks(spec), 4, 4))
    assert isinstance(cm.empty_rows, tuple) and len(cm.empty_rows) == 3
    assert cm.empty_rows[0].tolist() == [] and cm.empty_rows[1].tolist() == list(range(8))
    assert cm.empty_rows[2].tolist() == [0, 1, 4, 5, 6, 7] and cm.empty_cols[2].tolist() == []
    assert cm.empty_cols[1].tolist() == list(range(8))


def test_identical_heads_share_one_analysis_slot_even_when_written_differently():
    causal = maskc.Causal()
    spec = maskc.Spec(q_len=64, kv_len=64, mask=[causal, causal & maskc.Full(), maskc.Prefix(length=3), causal])
    cm = maskc.compile(spec, 16)
    assert cm.table.head_slot.tolist() == [0, 0, 1, 0]
    assert len(cm.block_maps) == 2 and cm.table.forward.full_ptr.shape[0] == 2
    shared = maskc.compile(maskc.Spec(q_len=64, kv_len=64, mask=causal), 16)
    for h in (0, 1, 3):
        assert torch.equal(cm.block_kinds[h], shared.block_kinds[0])


# -- what the compiler touches -------------------------------------------------------------------


def test_predicate_is_evaluated_only_on_tiles_the_rest_leaves_undecided():
    seen = []

    def odd_keys(i, j):
        seen.append(torch.broadcast_shapes(i.shape, j.shape).numel())
        return j % 2 == 1

    n, block = 4096, 64
    spec = maskc.Spec(q_len=n, kv_len=n, mask=maskc.Range(q=(0, 100), kv=(0, 100)) & maskc.Predicate(fn=odd_keys))
    cm = maskc.compile(spec, block)
    assert sum(seen) <= 4 * block * block  # the 2 x 2 tiles the range touches, not n * n
    assert cm.allowed_pairs() == 100 * 50
    assert cm.empty_rows.tolist() == list(range(100, n))


def test_block_size_must_be_a_positive_int_or_pair():
    spec = maskc.Spec(q_len=8, kv_len=8, mask=maskc.Causal())
    for bad in (0, -4, (4,), (4, 0), (4, 4, 4), 2.5, True, "16"):
        with pytest.raises((ValueError, TypeError), match="block_size"):
            maskc.compile(spec, bad)


def test_debug_hook_reports_every_pass_in_dependency_order():
    lines = []
    maskc.compile(maskc.Spec(q_len=8, kv_len=8, mask=maskc.Causal()), 4, debug=lines.append)
    names = [line.split()[1] for line in lines]
    assert names == ["simplify", "lower", "classify", "empty", "tables"]


# -- memory and scale ------------------------------------------------------------------------------


def test_nbytes_counts_tables_and_grows_with_tokens_not_tiles():
    def compiled(n):
        return maskc.compile(maskc.Spec(q_len=n, kv_len=n, mask=maskc.Causal()), 128)

    small, large = compiled(1 << 14), compiled(1 << 16)
    assert small.nbytes >= small.table.nbytes > 0
    assert large.nbytes < 6 * small.nbytes  # 4x the tokens, 16x the tiles
    assert large.table.nbytes < 5 * small.table.nbytes
    n_tiles = large.n_q_blocks * large.n_kv_blocks
    assert large.table.forward.full_runs.shape[0] <= large.n_q_blocks  # one FULL run per query block
    assert large.table.nbytes < n_tiles  # less than one byte per tile


def test_million_token_document_causal_compiles_quickly_and_small():
    n, block = 1 << 20, 128
    lengths = np.random.default_rng(0).integers(512, 16385, size=n // 512)  # documents of 512 to 16K tokens
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), n)].tolist()
    lengths.append(n - sum(lengths))
    spec = maskc.Spec(q_len=n, kv_len=n, mask=maskc.Documents(lengths=lengths) & maskc.Causal())
    maskc.compile(maskc.Spec(q_len=4096, kv_len=4096, mask=spec.mask.of[1]), block)  # warm imports
    start = time.perf_counter()
    cm = maskc.compile(spec, block)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"compile took {elapsed:.2f} s"  # the benchmark's target is 80 ms; this is a smoke bound
    n_q = cm.n_q_blocks
    assert cm.table.nbytes < 1 << 20 and cm.nbytes < 64 << 20  # vs n_q * n_q = 64M tiles
    assert cm.empty_rows.numel() == 0 and cm.empty_cols.numel() == 0
    assert cm.allowed_pairs() == sum(x * (x + 1) // 2 for x in lengths)
    # each query block's tiles: from the block of its first row's document start to its diagonal
    starts = np.concatenate([[0], np.cumsum(lengths)])
    for qb in np.random.default_rng(1).choice(n_q, 50, replace=False).tolist():
        first_row = qb * block
        doc_start = starts[np.searchsorted(starts, first_row, side="right") - 1]
        runs = cm.table.forward.runs_of(0, qb, True) + cm.table.forward.runs_of(0, qb, False)
        assert min(r[0] for r in runs) == doc_start // block
        assert max(r[1] for r in runs) == qb + 1


def _least_process_seconds(spec, block: int, repeats: int = 3) -> float:
    """The least CPU time of ``repeats`` compiles (after one): steadier than wall time on a shared machine."""
    maskc.compile(spec, block)
    times = []
    for _ in range(repeats):
        start = time.process_time()
        maskc.compile(spec, block)
        times.append(time.process_time() - start)
    return min(times)


@pytest.mark.parametrize("combine", ["or", "and"])
def test_compile_time_of_many_terms_grows_linearly_with_them(combine):
    def spec(n):  # n documents side by side, each reading the keys after its queries (issue 20's repro)
        terms = [maskc.Documents(lengths=[16], q_start=32 * k, kv_start=32 * k + 16, inner=maskc.Causal())
                 for k in range(n)]
        mask = maskc.Or(of=terms) if combine == "or" else maskc.And(of=[~x for x in terms])
        return maskc.Spec(q_len=(2 * n + 2) * 16, kv_len=(2 * n + 2) * 16, mask=mask)

    small, large = (_least_process_seconds(spec(n), 128) for n in (200, 800))
    # 4x the terms and tokens: about 4x the time when linear, 16x when quadratic (it was 22x)
    assert large < 8 * small, f"{1e3 * small:.1f} ms -> {1e3 * large:.1f} ms"


# -- what users look at ------------------------------------------------------------------------------


def test_show_prints_the_map_legend_counts_and_empty_ranges(capsys):
    spec = maskc.Spec(q_len=16, kv_len=16, mask=maskc.Documents(lengths=[5, 4, 3], inner=maskc.Causal(offset=-1)))
    text = maskc.compile(spec, 4).show()
    assert capsys.readouterr().out == text + "\n"
    lines = text.splitlines()
    assert [line.split()[-1] for line in lines if line.startswith("q")] == ["+...", "++..", ".++.", "...."]
    assert "# FULL" in text and "+ PARTIAL" in text and ". EMPTY" in text
    assert "0 full, 5 partial, 11 empty of 16" in text
    assert "7.42% of pairs allowed" in text  # 19 of 256 pairs
    assert "FLOPs skipped: 68.75%" in text  # 11 of 16 tiles
    assert "0, 5, 9, 12-15 (7 positions)" in text and "4, 8, 11-15 (7 positions)" in text


def test_show_pictures_one_head_and_pools_large_maps():
    spec = maskc.Spec(q_len=4096, kv_len=4096, mask=[maskc.Causal(), maskc.Empty()])
    cm = maskc.compile(spec, 16)
    printed = io.StringIO()
    text = cm.show(head=1, max_width=32, file=printed)
    assert printed.getvalue() == text + "\n"
    rows = [line for line in text.splitlines() if line.startswith("q")]
    assert len(rows) == 32 and all(set(r.split()[-1]) == {"."} for r in rows)
    assert "head 1 of 2" in text and "0-4095 (4096 positions)" in text


def test_plot_writes_a_png(tmp_path):
    spec = maskc.Spec(q_len=40, kv_len=40, mask=maskc.Documents(lengths=[10, 20]) & maskc.Causal())
    maskc.compile(spec, 8).plot(tmp_path / "map.png")
    assert (tmp_path / "map.png").read_bytes().startswith(b"\x89PNG")


# -- masks of hundreds of terms ----------------------------------------------------------------------


@settings(max_examples=30)
@given(st.integers(1, 40), st.integers(1, 40), block_sizes, st.data())
def test_or_and_and_of_hundreds_of_terms_match_oracle_exactly(q_len, kv_len, block_size, data):
    mask = data.draw(many_terms(q_len, kv_len))
    spec = maskc.Spec(q_len=q_len, kv_len=kv_len, mask=mask)
    cm, dense, expected = compiled_and_oracle(spec, block_size)
    np.testing.assert_array_equal(cm.block_kinds.numpy(), expected)
    np.testing.assert_array_equal(cm.dense().numpy(), dense[0])
    np.testing.assert_array_equal(cm.empty_rows.numpy(), np.flatnonzero(~dense[0].any(1)))
    np.testing.assert_array_equal(cm.empty_cols.numpy(), np.flatnonzero(~dense[0].any(0)))
    assert cm.allowed_pairs() == int(dense.sum())
    simple = cm.simplified.mask
    np.testing.assert_array_equal(dense_mask(simple, q_len, kv_len), dense[0])
    assert simplify(simple) == simple
