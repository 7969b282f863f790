"""Pass ``shard``: what we learn about a mask when its sequence is split over P ranks.

Context parallelism gives every rank an equal share of the tokens (the rest of
the model's work is per token, so shards must stay equal) and runs attention
as a ring: at step ``t`` rank ``r`` holds the keys and values of rank
``r - t`` and computes its queries against them. A ``ShardPlan`` says which
tokens each rank holds and, for every rank and step, the tile it computes,
how much work that tile is, and whether the K/V shard it holds must travel on.

The sequence is cut into chunks (near-equal, contiguous) and every rank owns
the same number of them; its shard is its chunks in sequence order:

* ``contiguous``: P chunks, rank ``r`` owns chunk ``r``;
* ``zigzag``: 2P chunks, rank ``r`` owns chunks ``r`` and ``2P - 1 - r``;
* ``balanced``: ``k P`` chunks for ``k`` = 1, 2, 4, ... and two starting
  layouts (striped: chunk ``c`` on rank ``c mod P``; folded: zigzag repeated),
  chunks swapped between ranks until the busiest rank's modeled time is within
  ``tolerance`` of the mean (``_balance``, then ``_even_tiles`` for the tiles'
  own cost); of the candidates balanced that well (or as well as any got), the
  one whose busiest sender sends the fewest K/V tokens wins.

Work is the exact number of allowed ``(query, key)`` pairs of every
``(query chunk, key chunk)`` pair (``pair_work``), counted from the per-row key
intervals of ``lower`` in time linear in the tokens: the mask is never
materialised. Time is modeled from the chunk pairs' FULL and PARTIAL blocks
(``block_cost``: a PARTIAL block costs more, its mask is applied pair by pair)
and a cost per tile (``TILE_COST_KEYS``), fitted to the kernels' measured
times. A shard travels round the ring only as far as the last rank that
needs it (``last_hop``): a document-causal mask needs few hops, a causal one
all of them. In the backward pass the K/V shards travel again, and the dK/dV
share of every tile with work goes straight to the shard's owner
(``returns_share``); tiles without work send none.

Every rank must hold the same plan; ``fingerprints`` (sha256 of the spec and
of the layout) let ``maskc.distributed`` compare them across ranks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

import numpy as np

from ..errors import SpecError
from ..ir import nodes as ir
from ..ir.spec import Spec
from ..partitioning import crop_spec, split_points
from . import intervals as iv
from .classify import classify
from .lower import Bounds, Lower
from .pipeline import Pass, run_pipeline
from .simplify import Simplify

STRATEGIES = ("contiguous", "zigzag", "balanced")

#: Elements of the mask evaluated at a time for ``Dense``/``Predicate`` heads.
EVAL_BATCH = 1 << 22

#: The cost model ``balanced`` evens out, in pairs: a FULL block of ``COST_BLOCK`` x ``COST_BLOCK``
#: costs its pairs, a PARTIAL one ``PARTIAL_COST`` times as much (its mask is applied pair by
#: pair), and each ring tile ``TILE_COST_KEYS`` keys for every query row of its rank (its launches
#: and the zeros it writes). Fitted on an H200 (bench/RESULTS.md, ``ring_rehearsal.py --tiles``,
#: 41 document-causal tiles of 16K x 16K): 1.05 ms per thousand FULL blocks, 2.69 ms per thousand
#: PARTIAL ones and 0.21 ms a tile, which put each rank's time within 3% of the measured one.
#: Fitted again over shard sizes of 16K, 32K and 128K (58 tiles, the sm_90 forward's run): 220,
#: 268 and 191 keys a query row, no trend with the size, so one constant; 224 would change no
#: plan's predicted balance by more than 0.5% (bench/RESULTS.md, ring rehearsal).
COST_BLOCK = 128
PARTIAL_COST = 2.5
TILE_COST_KEYS = 192


def _overlaps(q_chunk: np.ndarray, lo: np.ndarray, hi: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """``int64[C, C]``: per (query chunk, key chunk), how much of the intervals ``[lo, hi)`` of
    items in query chunk ``q_chunk`` lies inside the key chunk.

    The part of ``[lo, hi)`` inside key chunk ``b`` is ``F_b(hi) - F_b(lo)`` with
    ``F_b(x) = clip(x - starts[b], 0, len_b)``: all of chunk ``b`` when ``x`` lies
    in a later chunk, ``x - starts[b]`` when it lies in ``b``, none before. So
    every interval end adds (``hi``) or removes (``lo``) its offset inside its own
    chunk and one whole chunk for every chunk before it; summed per query chunk
    with ``bincount`` and a suffix sum, that is linear in the items.
    (``bincount`` sums in float64, exact while sums stay below 2**53, i.e. for
    sequences under 67M tokens.)
    """
    n = len(starts) - 1
    ends = np.concatenate([hi, lo])
    sign = np.concatenate([np.ones_like(hi), -np.ones_like(lo)])
    k_chunk = np.searchsorted(starts, ends, side="right") - 1  # the sequence's end is chunk n
    cell = np.concatenate([q_chunk, q_chunk]) * (n + 1) + k_chunk
    size = n * (n + 1)
    crossings = np.bincount(cell, weights=sign, minlength=size).reshape(n, n + 1)
    inside = np.bincount(cell, weights=sign * (ends - starts[k_chunk]), minlength=size).reshape(n, n + 1)
    later = np.cumsum(crossings[:, ::-1], axis=1)[:, ::-1]  # ends in chunk b or after it
    work = inside[:, :n] + np.diff(starts)[None, :] * later[:, 1:]
    return np.rint(work).astype(np.int64)


def pair_work(rows: iv.Rows, starts: np.ndarray) -> np.ndarray:
    """``int64[C, C]``: allowed pairs of every (query chunk, key chunk), from exact row intervals,
    in time linear in the rows (``_overlaps``)."""
    q_chunk = np.repeat(np.arange(len(starts) - 1, dtype=np.int64), np.diff(starts))
    return _overlaps(np.repeat(q_chunk, rows.lo.shape[1]), rows.lo.ravel(), rows.hi.ravel(), starts)


def block_cost(simplified: Spec, rows: dict, starts: np.ndarray) -> Optional[np.ndarray]:
    """``int64[C, C]``: the cost model's work (``PARTIAL_COST``) of every (query chunk, key chunk),
    from the heads' block maps, where every chunk boundary is a multiple of ``COST_BLOCK`` and
    every head's intervals are exact; ``None`` elsewhere (the pairs stand in)."""
    if np.any(starts % COST_BLOCK) or not all(bounds.exact for bounds in rows.values()):
        return None
    n, at = simplified.q_len, starts // COST_BLOCK
    per_mask = {}
    for mask, bounds in rows.items():
        blocks = classify(bounds, mask, n, n, COST_BLOCK, COST_BLOCK)
        full, partial = (_overlaps(np.searchsorted(at, runs.group, side="right") - 1, runs.lo, runs.hi, at)
                         for runs in (blocks.full, blocks.partial))
        per_mask[mask] = np.rint((full + PARTIAL_COST * partial) * COST_BLOCK ** 2).astype(np.int64)
    return sum(per_mask[m] for m in simplified.heads)


def _undecided_work(mask: ir.Mask, bounds: Bounds, starts: np.ndarray) -> np.ndarray:
    """``int64[C, C]``: allowed pairs among the keys the intervals leave undecided
    (``maybe`` but not ``sure``, under ``Dense``/``Predicate``), evaluated a batch of rows at a time."""
    n, seq_len = len(starts) - 1, int(starts[-1])
    undecided = iv.intersect(bounds.maybe, iv.complement(bounds.sure, seq_len))
    real = undecided.real()
    out = np.zeros((n, n), dtype=np.int64)
    per_batch = max(1, EVAL_BATCH // seq_len)
    for r0 in range(0, seq_len, per_batch):
        r1 = min(r0 + per_batch, seq_len)
        live = real[r0:r1]
        if not live.any():
            continue
        c0, c1 = int(undecided.lo[r0:r1][live].min()), int(undecided.hi[r0:r1][live].max())
        i = np.arange(r0, r1, dtype=np.int64)[:, None]
        j = np.arange(c0, c1, dtype=np.int64)[None, :]
        hits = iv.window(undecided, r0, r1, c0, c1) & mask.allowed(i, j, seq_len, seq_len)
        # per (query chunk, key chunk): reduceat at the chunk starts inside this batch
        qa, qb = np.searchsorted(starts, [r0, r1 - 1], side="right") - 1
        ka, kb = np.searchsorted(starts, [c0, c1 - 1], side="right") - 1
        q_cuts = np.maximum(starts[qa:qb + 1], r0) - r0
        k_cuts = np.maximum(starts[ka:kb + 1], c0) - c0
        counts = np.add.reduceat(np.add.reduceat(hits.astype(np.int64), q_cuts, axis=0), k_cuts, axis=1)
        out[qa:qb + 1, ka:kb + 1] += counts
    return out


def spec_pair_work(simplified: Spec, rows: dict, starts: np.ndarray) -> np.ndarray:
    """``int64[C, C]``: ``pair_work`` summed over the heads (each distinct head counted once)."""
    per_mask = {}
    for mask, bounds in rows.items():
        work = pair_work(bounds.sure, starts)
        per_mask[mask] = work if bounds.exact else work + _undecided_work(mask, bounds, starts)
    return sum(per_mask[m] for m in simplified.heads)


@dataclass(frozen=True)
class Tile:
    """What rank ``rank`` computes at ring step ``step``: its queries against the
    K/V shard of rank ``source``; ``work`` allowed pairs (0: skipped)."""

    rank: int
    step: int
    source: int
    work: int

    @property
    def empty(self) -> bool:
        return self.work == 0


@dataclass(frozen=True, eq=False)
class ShardPlan:
    """A sharding of ``spec``'s sequence over ``world_size`` ranks and its ring schedule.

    ``starts: int64[C + 1]`` are the chunk boundaries, ``owner: int64[C]`` the rank
    of each chunk, ``pair_work: int64[C, C]`` the allowed pairs of every (query
    chunk, key chunk), summed over heads. Rank ``r``'s shard is its chunks in
    sequence order; local position ``p`` of rank ``r`` is global ``positions(r)[p]``.
    """

    spec: Spec
    strategy: str
    world_size: int
    starts: np.ndarray
    owner: np.ndarray
    pair_work: np.ndarray = field(repr=False)
    #: the busiest rank's modeled compute time over the mean (``block_cost``, ``TILE_COST_KEYS``)
    time_imbalance: float = 1.0

    # -- the sharding ----------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return int(self.starts[-1])

    @property
    def n_chunks(self) -> int:
        return len(self.owner)

    def chunks_of(self, rank: int) -> np.ndarray:
        """Chunk indices of ``rank``, in sequence order."""
        return np.flatnonzero(self.owner == rank)

    @cached_property
    def shard_lengths(self) -> np.ndarray:
        """``int64[P]``: tokens held by each rank."""
        return np.bincount(self.owner, weights=np.diff(self.starts), minlength=self.world_size).astype(np.int64)

    def positions(self, rank: int) -> np.ndarray:
        """``int64[shard_lengths[rank]]``: the global positions of ``rank``'s tokens, in local order."""
        chunks = self.chunks_of(rank)
        return np.concatenate([np.arange(self.starts[c], self.starts[c + 1]) for c in chunks]).astype(np.int64)

    def shard(self, x, rank: int, dim: int = -2):
        """``rank``'s local shard of the full-sequence tensor ``x`` (sequence along ``dim``)."""
        import torch

        return x.index_select(dim, torch.from_numpy(self.positions(rank)).to(x.device))

    def unshard(self, shards, dim: int = -2):
        """The full-sequence tensor from every rank's shard (the inverse of ``shard``)."""
        import torch

        order = np.argsort(np.concatenate([self.positions(r) for r in range(self.world_size)]))
        return torch.cat(list(shards), dim=dim).index_select(dim, torch.from_numpy(order).to(shards[0].device))

    @cached_property
    def fingerprints(self) -> dict[str, str]:
        """sha256 (hex) of the plan's two halves, equal on every rank that built the same plan:
        ``spec`` (its canonical JSON; a spec holding a ``Predicate`` has none, and its allowed pairs
        per chunk pair stand in for it) and ``layout`` (strategy, world size, chunks and owners)."""
        try:
            spec = json.dumps(self.spec.to_data(), sort_keys=True)
        except SpecError:  # a Predicate's callable has no text form
            spec = json.dumps({"q_len": self.spec.q_len, "pairs_per_chunk_pair": self.pair_work.tolist()})
        layout = json.dumps({"strategy": self.strategy, "world_size": self.world_size,
                             "starts": self.starts.tolist(), "owner": self.owner.tolist()})
        return {name: hashlib.sha256(text.encode()).hexdigest() for name, text in (("spec", spec), ("layout", layout))}

    @property
    def fingerprint(self) -> str:
        """sha256 (hex) of the whole plan (spec, strategy, shard layout); computed once per plan."""
        return hashlib.sha256("/".join(self.fingerprints.values()).encode()).hexdigest()

    # -- the work --------------------------------------------------------------
    @cached_property
    def rank_work(self) -> np.ndarray:
        """``int64[P, P]``: allowed pairs of rank ``r``'s queries against rank ``s``'s keys."""
        out = np.zeros((self.world_size, self.world_size), dtype=np.int64)
        np.add.at(out, (self.owner[:, None], self.owner[None, :]), self.pair_work)
        return out

    @property
    def work(self) -> np.ndarray:
        """``int64[P]``: allowed pairs computed by each rank."""
        return self.rank_work.sum(axis=1)

    @property
    def imbalance(self) -> float:
        """Busiest rank's work over the mean (1.0 is perfect)."""
        mean = self.work.mean()
        return float(self.work.max() / mean) if mean else 1.0

    # -- the ring ----------------------------------------------------------------
    def source(self, rank: int, step: int) -> int:
        """The rank whose K/V shard ``rank`` holds at ``step``."""
        return (rank - step) % self.world_size

    @cached_property
    def last_hop(self) -> np.ndarray:
        """``int64[P]``: the last step at which shard ``s`` is needed (by rank ``s + t``); 0 if only by ``s``."""
        p = self.world_size
        hops = np.arange(p)
        # needed[s, t]: rank s + t computes something against shard s
        needed = self.rank_work[(np.arange(p)[:, None] + hops[None, :]) % p, np.arange(p)[:, None]] > 0
        return np.where(needed, hops[None, :], 0).max(axis=1)

    @property
    def n_steps(self) -> int:
        """Ring steps run: one past the farthest hop any shard makes."""
        return int(self.last_hop.max()) + 1

    def tile(self, rank: int, step: int) -> Tile:
        source = self.source(rank, step)
        return Tile(rank, step, source, int(self.rank_work[rank, source]))

    @cached_property
    def tiles(self) -> tuple[tuple[Tile, ...], ...]:
        """``tiles[rank][step]`` for the ``n_steps`` steps."""
        return tuple(tuple(self.tile(r, t) for t in range(self.n_steps)) for r in range(self.world_size))

    def forwards(self, rank: int, step: int) -> bool:
        """Whether ``rank`` sends the K/V shard it holds at ``step`` on to ``rank + 1``."""
        return step < int(self.last_hop[self.source(rank, step)])

    def receives(self, rank: int, step: int) -> bool:
        """Whether ``rank`` receives a K/V shard from ``rank - 1`` during ``step`` (for ``step + 1``)."""
        return self.forwards((rank - 1) % self.world_size, step)

    def returns_share(self, rank: int, step: int) -> bool:
        """Whether ``rank`` sends its dK/dV share of the tile of ``step`` to the K/V shard's owner
        (in the backward pass, at ``step + 1``): the tile has work and the shard is another rank's."""
        return 0 < step < self.n_steps and not self.tile(rank, step).empty

    def share_tokens(self, rank: int) -> int:
        """dK/dV tokens ``rank`` sends to the shards' owners in the backward pass."""
        return sum(int(self.shard_lengths[self.source(rank, t)]) for t in range(self.n_steps)
                   if self.returns_share(rank, t))

    def sent_tokens(self, rank: int) -> int:
        """K/V tokens ``rank`` sends in the forward pass."""
        return sum(int(self.shard_lengths[self.source(rank, t)]) for t in range(self.n_steps) if self.forwards(rank, t))

    def plain_ring_tokens(self, rank: int) -> int:
        """K/V tokens ``rank`` would send in a ring that forwards every shard P - 1 times."""
        return sum(int(self.shard_lengths[self.source(rank, t)]) for t in range(self.world_size - 1))

    # -- the tiles' masks --------------------------------------------------------
    def local_starts(self, rank: int) -> np.ndarray:
        """``int64[k]``: where each of ``rank``'s chunks starts in its local shard."""
        sizes = np.diff(self.starts)[self.chunks_of(rank)]
        return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)

    def tile_spec(self, rank: int, source: int) -> Spec:
        """The ``Spec`` of ``rank``'s queries against ``source``'s keys, in local shard coordinates.

        Each (query chunk ``a``, key chunk ``b``) pair with work is the global mask
        cropped to the window that puts ``a`` and ``b`` at their local offsets
        (the window starts ``offset`` before the chunk, which is never before 0
        since the chunks before it in the shard lie before it in the sequence),
        kept to the chunks' rows and keys by a ``Range`` when the shard has more
        than one chunk; the tile is the ``Or`` of those pieces.
        """
        n_q, n_kv = int(self.shard_lengths[rank]), int(self.shard_lengths[source])
        q_chunks, kv_chunks = self.chunks_of(rank), self.chunks_of(source)
        alone = len(q_chunks) == 1 and len(kv_chunks) == 1
        pieces: list[list[ir.Mask]] = [[] for _ in self.spec.heads]
        for a, oa in zip(q_chunks.tolist(), self.local_starts(rank).tolist()):
            for b, ob in zip(kv_chunks.tolist(), self.local_starts(source).tolist()):
                if self.pair_work[a, b] == 0:
                    continue
                q0, k0 = int(self.starts[a]) - oa, int(self.starts[b]) - ob
                window = crop_spec(self.spec, q0, q0 + n_q, k0, k0 + n_kv)
                keep = ir.Range(q=(oa, oa + int(self.starts[a + 1] - self.starts[a])),
                                kv=(ob, ob + int(self.starts[b + 1] - self.starts[b])))
                for h, mask in enumerate(window.heads):
                    pieces[h].append(mask if alone else keep & mask)
        heads = tuple(ir.Or(of=tuple(p)) if len(p) > 1 else p[0] if p else ir.Empty() for p in pieces)
        return Spec(q_len=n_q, kv_len=n_kv, mask=heads if isinstance(self.spec.mask, tuple) else heads[0])


# -- the strategies -----------------------------------------------------------------


def _contiguous(p: int) -> np.ndarray:
    return np.arange(p, dtype=np.int64)


def _zigzag(p: int) -> np.ndarray:
    c = np.arange(2 * p, dtype=np.int64)
    return np.where(c < p, c, 2 * p - 1 - c)


def _striped(p: int, k: int) -> np.ndarray:
    """Chunk ``c`` to rank ``c mod P``: a chunk's predecessor is one ring step back."""
    return np.arange(k * p, dtype=np.int64) % p


def _folded(p: int, k: int) -> np.ndarray:
    """Zigzag repeated: every 2P chunks, rank ``r`` owns the ``r``-th and ``(2P-1-r)``-th."""
    c = np.arange(k * p, dtype=np.int64) % (2 * p)
    return np.where(c < p, c, 2 * p - 1 - c)


def _balance(pair_work: np.ndarray, owner: np.ndarray, p: int, target: float) -> np.ndarray:
    """Swap chunks until the busiest rank's work is at most ``target`` or no swap lowers it.

    A swap of chunk ``a`` of the busiest rank ``r`` with chunk ``b`` of rank ``o``
    qualifies when both ranks end below ``r``'s load. Among those, the one that
    least lengthens the ring trips wins, then the one with the lowest result:
    ``reach[c, q]`` is how far (in ring steps) the farthest partner of chunk ``c``
    would be if ``c`` sat on rank ``q``, and a swap costs the change in ``reach``
    of the two chunks. Each swap lowers the sorted load vector, so the loop ends.
    Stopping at ``target`` rather than at the optimum keeps the trips short when
    a layout is already balanced enough.
    """
    owner = owner.copy()
    weights = pair_work.sum(axis=1).astype(np.float64)
    partners = (pair_work > 0).astype(np.int64)
    np.fill_diagonal(partners, 0)
    by_rank = np.eye(p, dtype=np.int64)[owner]
    attends = partners @ by_rank  # attends[c, s]: chunks of rank s that chunk c's queries attend
    attended = partners.T @ by_rank  # attended[c, q]: chunks of rank q whose queries attend chunk c
    ranks = np.arange(p)
    steps = (ranks[:, None] - ranks[None, :]) % p  # steps[q, s]: ring steps for shard s to reach rank q

    def reach(chunks, at):
        """Farthest trip of each chunk's pairs with the chunk on rank ``at`` (broadcast)."""
        chunks, at = np.broadcast_arrays(chunks, at)
        out_trip = ((attends[chunks] > 0) * steps[at]).max(axis=-1)
        in_trip = ((attended[chunks] > 0) * steps[:, at].T.reshape(at.shape + (p,))).max(axis=-1)
        return np.maximum(out_trip, in_trip)

    load = np.bincount(owner, weights=weights, minlength=p)
    for _ in range(64 * len(owner)):
        r = int(np.argmax(load))
        if load[r] <= target:
            break
        mine, others = np.flatnonzero(owner == r), np.flatnonzero(owner != r)
        moved = weights[mine][:, None] - weights[others][None, :]
        worst = np.maximum(load[r] - moved, load[owner[others]][None, :] + moved)
        better = worst < load[r]
        if not better.any():
            break
        theirs = owner[others]
        mine_at = reach(mine[:, None], ranks[None, :])
        longer = (mine_at[:, theirs] - mine_at[:, r][:, None]
                  + (reach(others, r) - reach(others, theirs))[None, :])
        i, j = np.unravel_index(int(np.argmin(np.where(better, longer * (load[r] + 1) + worst, np.inf))),
                                worst.shape)
        a, b, o = mine[i], others[j], theirs[j]
        load[r] -= moved[i, j]
        load[o] += moved[i, j]
        owner[a], owner[b] = o, r
        for c, old, new in ((a, r, o), (b, o, r)):
            attends[:, old] -= partners[:, c]
            attends[:, new] += partners[:, c]
            attended[:, old] -= partners[c, :]
            attended[:, new] += partners[c, :]
    return owner


def _times(ranks: np.ndarray, per_tile: int) -> np.ndarray:
    """Modeled time of each row of rank-pair costs (``[..., P]``: one rank's queries against every
    rank's keys): the costs and ``per_tile`` for each tile that has any."""
    return ranks.sum(axis=-1) + (ranks > 0).sum(axis=-1) * per_tile


def _rank_costs(cost: np.ndarray, owner: np.ndarray, p: int, per_tile: int) -> np.ndarray:
    """Each rank's modeled time under ``owner``."""
    by_rank = np.eye(p, dtype=np.int64)[owner]
    return _times(by_rank.T @ cost @ by_rank, per_tile)


def _even_tiles(cost: np.ndarray, owner: np.ndarray, p: int, per_tile: int, ratio: float) -> np.ndarray:
    """Swap chunks while the busiest rank's modeled time exceeds ``ratio`` times the mean and a swap
    lowers it: the cost of its chunk pairs (``cost``: the cost model's) and ``per_tile`` for each
    rank whose keys its queries attend.

    ``_balance`` evens out the chunk pairs' cost; ranks can still run 4 or 6 tiles for it. Every swap
    of a chunk ``a`` of the busiest rank ``r`` with a chunk ``b`` of rank ``o`` is scored at once:
    with ``E`` the one-hot owners, the rank-pair work ``W = E^T PW E`` becomes
    ``W + d g + h d^T + s d d^T`` for ``d = u_o - u_r``, ``g`` the work of ``a``'s queries minus
    ``b``'s against each rank's keys, ``h`` the same for their keys, and
    ``s = PW[a,a] - PW[a,b] - PW[b,a] + PW[b,b]``. So rows ``o`` and ``r`` change, and in every
    other row only columns ``o`` and ``r``, by ``+h`` and ``-h``: its total stays, its tiles may
    not. Swaps keep every rank's chunk count, and each accepted swap lowers the sorted cost
    vector, so the loop ends."""
    owner = owner.copy()
    work = cost.astype(np.int64)
    by_rank = np.eye(p, dtype=np.int64)[owner]
    queries = work @ by_rank  # queries[c, s]: pairs of chunk c's queries against rank s's keys
    keys = work.T @ by_rank  # keys[c, q]: pairs of rank q's queries against chunk c's keys
    ranks = by_rank.T @ queries  # ranks[q, s]: rank q's queries against rank s's keys
    for _ in range(8 * len(owner) if p > 1 else 0):
        now = _times(ranks, per_tile)
        r = int(np.argmax(now))
        if now[r] <= ratio * now.mean():
            break
        mine, others = np.flatnonzero(owner == r), np.flatnonzero(owner != r)
        a, b = np.repeat(mine, len(others)), np.tile(others, len(mine))
        o = owner[b]
        g = queries[a] - queries[b]
        h = keys[a] - keys[b]
        s = work[a, a] - work[a, b] - work[b, a] + work[b, b]
        n = np.arange(len(a))
        h_o, h_r = h[n, o], h[:, r]
        row_o = ranks[o] + g  # rows o and r after the swap
        row_o[n, o] += h_o + s
        row_o[:, r] -= h_o + s
        row_r = ranks[r][None, :] - g
        row_r[n, o] += h_r - s
        row_r[:, r] += s - h_r
        col_o = ranks[:, o].T + h  # columns o and r of the other rows
        col_r = ranks[:, r][None, :] - h
        new = now[None, :] + per_tile * ((col_o > 0).astype(np.int64) + (col_r > 0)
                                         - (ranks[:, o].T > 0) - (ranks[:, r] > 0)[None, :])
        new[n, o] = _times(row_o, per_tile)
        new[:, r] = _times(row_r, per_tile)
        busiest = new.max(axis=1)
        best = int(np.argmin(busiest))
        if busiest[best] >= now[r]:
            break
        a, b, o = a[best], b[best], o[best]
        ranks[:, o], ranks[:, r] = col_o[best], col_r[best]
        ranks[o], ranks[r] = row_o[best], row_r[best]
        owner[a], owner[b] = o, r
        moved = work[:, a] - work[:, b]
        queries[:, o] += moved
        queries[:, r] -= moved
        moved = work[a, :] - work[b, :]
        keys[:, o] += moved
        keys[:, r] -= moved
    return owner


def _candidates(strategy: str, p: int, seq_len: int, max_chunks_per_rank: int, min_chunk: int):
    """``(starts, owner layouts)`` to evaluate: one for contiguous/zigzag, several for balanced."""
    if strategy == "contiguous":
        return [(p, [_contiguous(p)])]
    if strategy == "zigzag":
        return [(2 * p, [_zigzag(p)])]
    out = [(p, [_contiguous(p)])]
    k = 2
    while k <= max_chunks_per_rank and seq_len >= k * p * min_chunk:
        out.append((k * p, [_striped(p, k), _folded(p, k)]))
        k *= 2
    return out


def _check(spec: Spec, world_size, strategy: str) -> None:
    if not isinstance(spec, Spec):
        raise TypeError(f"spec must be a maskc.Spec, got {type(spec).__name__}")
    if spec.q_len != spec.kv_len:
        raise ValueError(
            f"spec has q_len={spec.q_len} and kv_len={spec.kv_len}; context parallelism shards one sequence, "
            "so they must be equal"
        )
    if not isinstance(world_size, (int, np.integer)) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"{world_size=} must be a positive int")
    if strategy not in STRATEGIES:
        raise ValueError(f"{strategy=} must be one of {STRATEGIES}")
    least = 2 * world_size if strategy == "zigzag" else world_size
    if spec.q_len < least:
        raise ValueError(
            f"a sequence of {spec.q_len} tokens cannot be split into the {least} non-empty chunks that "
            f"strategy={strategy!r} needs for world_size={world_size}"
        )


def plan_shards(simplified: Spec, rows: dict, spec: Spec, world_size: int, strategy: str,
                max_chunks_per_rank: int = 16, min_chunk: int = 128, tolerance: float = 0.02) -> ShardPlan:
    """The ``ShardPlan`` of ``strategy`` from the lowered heads (``rows``: head -> ``Bounds``)."""
    candidates = [
        (split_points(n_chunks, spec.q_len), owners)  # near-equal chunks, as maskc.partition splits
        for n_chunks, owners in _candidates(strategy, world_size, spec.q_len, max_chunks_per_rank, min_chunk)
    ]
    # count once, on the pieces every candidate's chunks are made of, and add pieces up per candidate
    pieces = np.unique(np.concatenate([starts for starts, _ in candidates]))
    piece_work = spec_pair_work(simplified, rows, pieces)
    piece_cost = block_cost(simplified, rows, pieces)
    piece_cost = piece_work if piece_cost is None else piece_cost  # one model for every strategy's report
    per_tile = TILE_COST_KEYS * (spec.q_len // world_size) * len(simplified.heads)
    plans = []
    for starts, owners in candidates:
        first = np.searchsorted(pieces, starts[:-1])
        work, cost = (np.add.reduceat(np.add.reduceat(x, first, axis=0), first, axis=1)
                      for x in (piece_work, piece_cost))
        for owner in owners:
            if strategy == "balanced":
                owner = _balance(cost, owner, world_size, cost.sum() / world_size * (1 + tolerance))
                owner = _even_tiles(cost, owner, world_size, per_tile, 1 + tolerance / 2)
            times = _rank_costs(cost, owner, world_size, per_tile)
            plans.append(ShardPlan(spec, strategy, world_size, starts, owner, work,
                                   float(times.max() / times.mean()) if times.any() else 1.0))
    good_enough = max(min(plan.time_imbalance for plan in plans), 1 + tolerance)
    return min((plan for plan in plans if plan.time_imbalance <= good_enough),
               key=lambda plan: (max(plan.sent_tokens(r) for r in range(world_size)), plan.n_chunks,
                                 plan.time_imbalance))


@dataclass(frozen=True)
class Shard(Pass):
    """The ``ShardPlan`` of the spec for ``world_size`` ranks and ``strategy``."""

    name: str = "shard"
    needs: tuple = ("spec", "simplified", "rows", "world_size", "strategy")
    provides: tuple = ("shard_plan",)
    max_chunks_per_rank: int = 16
    min_chunk: int = 128
    tolerance: float = 0.02

    def run(self, state):
        return {"shard_plan": plan_shards(
            state["simplified"], state["rows"], state["spec"], state["world_size"], state["strategy"],
            self.max_chunks_per_rank, self.min_chunk, self.tolerance,
        )}


def shard_plan(spec: Spec, world_size: int, strategy: str = "balanced", *, max_chunks_per_rank: int = 16,
               min_chunk: int = 128, tolerance: float = 0.02, debug=None) -> ShardPlan:
    """Plan context parallelism of ``spec`` over ``world_size`` ranks.

    ``strategy`` is ``contiguous``, ``zigzag`` or ``balanced``. For ``balanced``,
    ranks own up to ``max_chunks_per_rank`` chunks of at least ``min_chunk``
    tokens; of the layouts whose busiest rank's modeled time is at most ``1 + tolerance``
    times the mean (or as close as the best layout found), the one whose
    busiest sender sends the fewest K/V tokens is chosen. Raises ``ValueError``
    for a sequence the strategy cannot split and for bad arguments.
    """
    _check(spec, world_size, strategy)
    for name, value, least in (("max_chunks_per_rank", max_chunks_per_rank, 1), ("min_chunk", min_chunk, 1),
                               ("tolerance", tolerance, 0)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name}={value!r} must be a number >= {least}")
    passes = (Simplify(), Lower(), Shard(max_chunks_per_rank=max_chunks_per_rank, min_chunk=min_chunk,
                                         tolerance=tolerance))
    state = run_pipeline(passes, {"spec": spec, "world_size": int(world_size), "strategy": strategy}, debug=debug)
    return state["shard_plan"]


__all__ = ["STRATEGIES", "ShardPlan", "Tile", "pair_work", "shard_plan"]
