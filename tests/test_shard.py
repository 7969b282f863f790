"""The context-parallel planner (``maskc.passes.shard``) against the brute-force oracle,
and its strategies, ring schedule, report and errors. No processes are spawned here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import maskc
from maskc.distributed import plan_report
from maskc.passes.shard import STRATEGIES, shard_plan
import oracle
from strategies import Scope, masks

XFORMERS_995 = maskc.Spec(q_len=12, kv_len=12, mask=maskc.Documents(lengths=[5, 4, 3]) & maskc.Causal())


@st.composite
def square_specs(draw, max_len: int = 48):
    """A random ``Spec`` with ``q_len == kv_len`` (one sequence), head-shared or per head."""
    n = draw(st.integers(2, max_len))
    one = masks(Scope.of_spec(n, n), depth=2)
    mask = draw(one) if draw(st.booleans()) else draw(st.lists(one, min_size=1, max_size=3))
    return maskc.Spec(q_len=n, kv_len=n, mask=mask)


def document_lengths(total: int, low: int, high: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(rng.integers(low, high + 1)))
    lengths[-1] -= sum(lengths) - total
    return lengths


@settings(max_examples=40)
@given(spec=square_specs(), world_size=st.integers(1, 4), strategy=st.sampled_from(STRATEGIES))
def test_work_and_every_tile_match_the_oracle(spec, world_size, strategy):
    if spec.q_len < 2 * world_size:
        world_size = 1
    plan = shard_plan(spec, world_size, strategy, min_chunk=1, max_chunks_per_rank=4)
    whole = oracle.spec_masks(spec)
    chunks = plan.starts[:-1]
    pairs = np.add.reduceat(np.add.reduceat(whole.sum(0).astype(np.int64), chunks, axis=0), chunks, axis=1)
    np.testing.assert_array_equal(plan.pair_work, pairs)
    assert sorted(np.concatenate([plan.positions(r) for r in range(world_size)]).tolist()) == list(range(spec.q_len))
    for r in range(world_size):
        for s in range(world_size):
            tile = plan.tile_spec(r, s)
            expected = whole[:, plan.positions(r)][:, :, plan.positions(s)]
            np.testing.assert_array_equal(oracle.spec_masks(tile), expected)
            assert plan.rank_work[r, s] == expected.sum()


def test_contiguous_and_zigzag_layouts():
    spec = maskc.Spec(q_len=64, kv_len=64, mask=maskc.Causal())
    contiguous = shard_plan(spec, 4, "contiguous")
    assert contiguous.owner.tolist() == [0, 1, 2, 3]
    assert contiguous.positions(1).tolist() == list(range(16, 32))
    zigzag = shard_plan(spec, 4, "zigzag")
    assert zigzag.owner.tolist() == [0, 1, 2, 3, 3, 2, 1, 0]
    assert zigzag.positions(0).tolist() == list(range(0, 8)) + list(range(56, 64))
    assert zigzag.imbalance == pytest.approx(1.0, abs=0.01)
    x = torch.arange(64.0).view(1, 1, 64, 1)
    np.testing.assert_array_equal(zigzag.unshard([zigzag.shard(x, r) for r in range(4)]), x)


def test_contiguous_causal_is_as_unbalanced_as_expected_and_sends_less():
    p = 8
    plan = shard_plan(maskc.Spec(q_len=8192, kv_len=8192, mask=maskc.Causal()), p, "contiguous")
    assert plan.imbalance == pytest.approx((2 * p - 1) / p, rel=0.01)
    # shard s is needed by the ranks after it only: it stops at the last rank
    assert plan.last_hop.tolist() == [p - 1 - s for s in range(p)]
    assert plan.sent_tokens(p - 1) < plan.plain_ring_tokens(p - 1)


@pytest.mark.parametrize("p", [4, 8])
def test_balanced_meets_the_target_on_causal_and_document_causal(p):
    n = 1 << 17
    for mask in (maskc.Causal(), maskc.Documents(lengths=document_lengths(n, 512, 16384)) & maskc.Causal()):
        plan = shard_plan(maskc.Spec(q_len=n, kv_len=n, mask=mask), p, "balanced")
        assert plan.time_imbalance <= 1.05  # what it evens out: modeled time, not pairs
        assert plan.imbalance <= 1.1
        assert len(set(plan.shard_lengths.tolist())) == 1  # every rank the same tokens
        assert plan.work.sum() == plan.pair_work.sum()


def test_document_causal_shards_travel_only_as_far_as_needed():
    n, p = 1 << 16, 8
    spec = maskc.Spec(q_len=n, kv_len=n, mask=maskc.Documents(lengths=document_lengths(n, 256, 2048)) & maskc.Causal())
    for strategy in ("contiguous", "balanced"):
        plan = shard_plan(spec, p, strategy)
        assert all(plan.sent_tokens(r) < plan.plain_ring_tokens(r) for r in range(p)), strategy
    contiguous = shard_plan(spec, p, "contiguous")
    assert contiguous.n_steps == 2 and contiguous.last_hop.max() == 1


def test_the_995_split_has_empty_tiles_rows_and_columns():
    plan = shard_plan(XFORMERS_995, 3, "contiguous")
    assert plan.tile(2, 2).source == 0 and plan.tile(2, 2).empty  # rows 8-11 against keys 0-3
    assert plan.last_hop.tolist() == [1, 1, 0]
    below = maskc.compile(plan.tile_spec(1, 0))  # rows 4-7 against keys 0-3: only row 4 (document 0)
    assert below.empty_rows.tolist() == [1, 2, 3] and below.empty_cols.tolist() == []
    corner = maskc.compile(plan.tile_spec(2, 1))  # rows 8-11 against keys 4-7: only row 8 (document 1)
    assert corner.empty_rows.tolist() == [1, 2, 3] and corner.empty_cols.tolist() == [0]


def test_tiles_run_skipped_and_hops_agree():
    plan = shard_plan(XFORMERS_995, 3, "zigzag")
    for r in range(3):
        for t in range(plan.n_steps):
            tile = plan.tile(r, t)
            assert tile.source == (r - t) % 3
            assert tile.work == plan.rank_work[r, tile.source]
            assert plan.receives((r + 1) % 3, t) == plan.forwards(r, t)
            if not tile.empty:
                assert t <= plan.last_hop[tile.source]


def test_dense_and_predicate_masks_are_counted_exactly():
    values = np.random.default_rng(3).random((30, 30)) < 0.3
    spec = maskc.Spec(q_len=30, kv_len=30, mask=[maskc.Dense(values=values) & maskc.Causal(),
                                                  maskc.Predicate(fn=lambda i, j: (i * 7 + j) % 4 == 0)])
    plan = shard_plan(spec, 3, "balanced", min_chunk=1)
    whole = oracle.spec_masks(spec).sum(0)
    assert plan.work.sum() == whole.sum()
    assert plan.rank_work[1, 2] == whole[np.ix_(plan.positions(1), plan.positions(2))].sum()


def test_report_and_picture(tmp_path):
    text = plan_report(XFORMERS_995, 3, None, png=tmp_path / "grid.png")
    for strategy in STRATEGIES:
        assert f"{strategy}:" in text
    assert "busiest/mean" in text and "plain ring" in text
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("make, message", [
    (lambda: shard_plan(maskc.Spec(q_len=5, kv_len=5, mask=maskc.Causal()), 3, "zigzag"), "cannot be split"),
    (lambda: shard_plan(maskc.Spec(q_len=4, kv_len=6, mask=maskc.Full()), 2), "kv_len=6"),
    (lambda: shard_plan(XFORMERS_995, 0), "world_size=0"),
    (lambda: shard_plan(XFORMERS_995, 2, "round_robin"), "strategy='round_robin'"),
])
def test_bad_plans_raise_value_error_naming_the_argument(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_fingerprints_tell_specs_and_layouts_apart():
    def plan(lengths, strategy="contiguous", mask=maskc.Causal()):
        return shard_plan(maskc.Spec(q_len=1024, kv_len=1024, mask=maskc.Documents(lengths=lengths) & mask), 2,
                          strategy)

    one, again = plan([300, 500, 224]), plan([300, 500, 224])
    assert one is not again and one.fingerprint == again.fingerprint  # stable: rebuilt, equal
    desynced = plan([400, 400, 224])  # same shards, other documents
    assert desynced.fingerprints["layout"] == one.fingerprints["layout"]
    assert desynced.fingerprints["spec"] != one.fingerprints["spec"]
    zigzag = plan([300, 500, 224], "zigzag")
    assert zigzag.fingerprints["spec"] == one.fingerprints["spec"]
    assert zigzag.fingerprints["layout"] != one.fingerprints["layout"]
    # a Predicate has no text form: its allowed pairs per chunk pair stand in for it
    every_other = plan([300, 500, 224], mask=maskc.Predicate(fn=lambda i, j: (i + j) % 2 == 0))
    assert every_other.fingerprint == plan([300, 500, 224], mask=maskc.Predicate(fn=lambda i, j: (i + j) % 2 == 0)
                                           ).fingerprint != one.fingerprint


def test_block_cost_counts_each_chunk_pairs_full_and_partial_blocks():
    """``block_cost`` (the balancer's model) against the compiled mask's own block map."""
    from maskc.passes import shard
    from maskc.passes.lower import lower_spec_head

    n, block = 2048, shard.COST_BLOCK
    spec = maskc.Spec(q_len=n, kv_len=n, mask=maskc.Documents(lengths=[300, 900, 848]) & maskc.Causal())
    starts = np.array([0, 512, 1024, 1536, 2048])
    rows = {m: lower_spec_head(m, n, n) for m in spec.heads}
    got = shard.block_cost(spec, rows, starts)
    kinds = maskc.compile(spec, block_size=block).block_kinds[0].numpy()
    at = starts // block
    for a in range(4):
        for b in range(4):
            cell = kinds[at[a]:at[a + 1], at[b]:at[b + 1]]
            want = ((cell == maskc.FULL).sum() + shard.PARTIAL_COST * (cell == maskc.PARTIAL).sum()) * block ** 2
            assert got[a, b] == want, (a, b)
    assert shard.block_cost(spec, rows, np.array([0, 1000, 2048])) is None  # chunks not on block boundaries


def test_even_tiles_makes_the_swaps_a_brute_force_search_makes():
    """``_even_tiles`` scores every swap at once with rank-pair updates; a search that recomputes
    each swapped layout's modeled times from scratch must take the same swaps."""
    from maskc.passes import shard

    def brute(work, owner, p, per_tile):
        owner = owner.copy()
        for _ in range(8 * len(owner)):
            now = shard._rank_costs(work, owner, p, per_tile)
            r = int(np.argmax(now))
            best = None
            for a in np.flatnonzero(owner == r):
                for b in np.flatnonzero(owner != r):
                    swapped = owner.copy()
                    swapped[a], swapped[b] = owner[b], r
                    busiest = shard._rank_costs(work, swapped, p, per_tile).max()
                    if best is None or busiest < best[0]:
                        best = (busiest, swapped)
            if best[0] >= now[r]:
                break
            owner = best[1]
        return owner

    rng = np.random.default_rng(3)
    for trial in range(5):
        p, per_rank = 4, 4
        n = p * per_rank
        work = rng.integers(1, 60, (n, n)) * (rng.random((n, n)) < 0.35)
        owner = np.arange(n) % p
        got = shard._even_tiles(work, owner, p, per_tile=30, ratio=1.0)
        assert got.tolist() == brute(work, owner, p, 30).tolist(), trial
        assert np.bincount(got, minlength=p).tolist() == [per_rank] * p
        assert shard._rank_costs(work, got, p, 30).max() <= shard._rank_costs(work, owner, p, 30).max()
