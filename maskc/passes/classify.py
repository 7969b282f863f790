"""Pass ``classify``: every ``(q_block, kv_block)`` tile EMPTY, PARTIAL or FULL, exactly.

From each row's key intervals (``lower``):

* a row *touches* key block ``b`` if one of its intervals meets it, and
  *fills* it if one interval covers all of its in-range keys (canonical rows
  are non-adjacent, so two intervals never fill a block together);
* a tile is FULL when every row of its query block fills it, EMPTY when no row
  touches it, PARTIAL otherwise.

Per query block that is a union (touched) and an intersection (filled) of
per-row block intervals. Consecutive rows mostly repeat the same block
intervals, so they are deduplicated first and the rest is one sorted sweep
(``intervals.sweep``): the work grows with the rows and the runs of tiles,
never with ``q_blocks * kv_blocks``.

Where the bounds are not exact (``Dense``, ``Predicate``), tiles that meet
``maybe \\ sure`` are *undecided*: the whole expression is evaluated on them, in
batches of about ``EVAL_BATCH`` elements, and they are classified from that.
Every PARTIAL tile of such a head keeps its bit pattern (deduplicated) for the
kernels.

The result for one head is a ``BlockMap``: runs ``(q_block, [kv0, kv1))`` of
FULL and of PARTIAL tiles, sorted by query block then key block.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..ir import nodes as ir
from . import intervals as iv
from .intervals import Runs
from .lower import Bounds
from .pipeline import Pass

#: Elements evaluated per batch of undecided tiles.
EVAL_BATCH = 1 << 22


@dataclass(frozen=True)
class BlockMap:
    """One head's classified tiles.

    ``full``/``partial``: runs by query block. For heads with opaque nodes,
    ``patterns: bool[P, block_q, block_kv]`` holds each distinct PARTIAL tile
    and ``partial`` lists single tiles with ``pattern_of[r]`` their pattern.
    ``row_hits``/``col_hits``: positions found allowed inside undecided tiles.
    """

    n_q_blocks: int
    n_kv_blocks: int
    full: Runs
    partial: Runs
    patterns: Optional[np.ndarray] = None
    pattern_of: Optional[np.ndarray] = None
    row_hits: Optional[np.ndarray] = None
    col_hits: Optional[np.ndarray] = None


def _ceil_div(x: np.ndarray, b: int) -> np.ndarray:
    out = x + (b - 1)
    out //= b
    return out


def _touched(rows: iv.Rows, bk: int):
    """Per interval, the key blocks it touches (``[0, 0)`` for unused slots)."""
    return rows.lo // bk, _ceil_div(rows.hi, bk)


def _filled(rows: iv.Rows, kv_len: int, bk: int, n_kv: int):
    """Per interval, the key blocks it fills, sorted per row; ``[n_kv, n_kv)`` where it fills none."""
    lo = _ceil_div(rows.lo, bk)
    hi = rows.hi // bk
    if kv_len % bk:  # the last block is cut short: an interval reaching the end fills it
        hi[rows.hi >= kv_len] = n_kv
    none = lo >= hi
    lo[none] = n_kv
    hi[none] = n_kv
    # canonical rows are sorted with padding last; the moved ones must go last too
    if lo.shape[1] > 1 and not (lo[:, 1:] >= lo[:, :-1]).all():
        order = np.argsort(lo, axis=1, kind="stable")
        lo, hi = np.take_along_axis(lo, order, 1), np.take_along_axis(hi, order, 1)
    return lo, hi


def _gaps(fill_lo, fill_hi, n_kv: int):
    """Per row, the key blocks between its sorted filled runs (some empty: harmless)."""
    zero = np.zeros((fill_lo.shape[0], 1), dtype=np.int64)
    end = np.full((fill_lo.shape[0], 1), n_kv, dtype=np.int64)
    return np.concatenate([zero, fill_hi], axis=1), np.concatenate([fill_lo, end], axis=1)


def _items(group, lo, hi):
    m = lo.shape[1]
    return np.repeat(group, m), lo.ravel(), hi.ravel()


def classify(bounds: Bounds, mask: ir.Mask, q_len: int, kv_len: int, bq: int, bk: int) -> BlockMap:
    n_q, n_kv = -(-q_len // bq), -(-kv_len // bk)
    columns = [*_touched(bounds.maybe, bk), *_filled(bounds.sure, kv_len, bk, n_kv)]
    if not bounds.exact:
        columns += _touched(iv.intersect(bounds.maybe, iv.complement(bounds.sure, kv_len)), bk)
    block = np.arange(q_len, dtype=np.int64) // bq
    keep = iv.distinct_consecutive([block[:, None]] + columns)
    block = block[keep]
    columns = [c[keep] for c in columns]
    columns[2:4] = _gaps(columns[2], columns[3], n_kv)
    sets = [
        _items(block, columns[0], columns[1]),
        _items(block, columns[2], columns[3]),
        (np.arange(n_q, dtype=np.int64), np.zeros(n_q, dtype=np.int64), np.full(n_q, n_kv, dtype=np.int64)),
    ]
    if bounds.exact:
        out = iv.sweep(sets, n_kv, {
            "full": lambda c: (c[2] > 0) & (c[1] == 0),
            "partial": lambda c: (c[0] > 0) & (c[1] > 0),
        })
        return BlockMap(n_q, n_kv, out["full"], out["partial"])

    sets.append(_items(block, columns[4], columns[5]))
    out = iv.sweep(sets, n_kv, {
        "full": lambda c: (c[2] > 0) & (c[1] == 0),
        "partial": lambda c: (c[0] > 0) & (c[1] > 0) & (c[3] == 0),
        "undecided": lambda c: c[3] > 0,
    })
    return _decide(out, bounds, mask, q_len, kv_len, bq, bk, n_q, n_kv)


def _tile_indices(qb, kb, q_len, kv_len, bq, bk):
    i = qb[:, None] * bq + np.arange(bq)[None, :]
    j = kb[:, None] * bk + np.arange(bk)[None, :]
    return i, j, i < q_len, j < kv_len


def _evaluated_batches(mask, qb, kb, q_len, kv_len, bq, bk):
    """Per batch of about ``EVAL_BATCH`` elements of the tiles ``(qb[t], kb[t])``: the tiles'
    ``slice``, ``bool[b, bq, bk]`` of the expression on them (out-of-range positions False)
    and their ``_tile_indices``."""
    per_batch = max(1, EVAL_BATCH // (bq * bk))
    start, shown = time.perf_counter(), False
    for s in range(0, len(qb), per_batch):
        at = slice(s, s + per_batch)
        i, j, i_ok, j_ok = _tile_indices(qb[at], kb[at], q_len, kv_len, bq, bk)
        ii = np.minimum(i, q_len - 1)[:, :, None]
        jj = np.minimum(j, kv_len - 1)[:, None, :]
        yield at, mask.allowed(ii, jj, q_len, kv_len) & i_ok[:, :, None] & j_ok[:, None, :], (i, j, i_ok, j_ok)
        if time.perf_counter() - start > 2.0 and sys.stderr.isatty():
            shown = True
            print(f"\r[maskc] evaluating undecided tiles {min(s + per_batch, len(qb))}/{len(qb)}",
                  end="", file=sys.stderr, flush=True)
    if shown:
        print(file=sys.stderr)


def _rows_tiles(rows: iv.Rows, qb, kb, q_len, kv_len, bq, bk) -> np.ndarray:
    """``bool[T, bq, bk]`` of tiles read from exact row intervals."""
    out = np.zeros((len(qb), bq, bk), dtype=bool)
    for t, (q, k) in enumerate(zip(qb.tolist(), kb.tolist())):
        r1, c1 = min((q + 1) * bq, q_len), min((k + 1) * bk, kv_len)
        out[t, : r1 - q * bq, : c1 - k * bk] = iv.window(rows, q * bq, r1, k * bk, c1)
    return out


def _packed(tiles: np.ndarray) -> np.ndarray:
    """``uint8[T, ceil(bq * bk / 8)]``: the bits of ``bool[T, bq, bk]`` tiles, packed."""
    t, bq, bk = tiles.shape
    return np.packbits(tiles.reshape(t, bq * bk), axis=1)


def _decide(out, bounds, mask, q_len, kv_len, bq, bk, n_q, n_kv) -> BlockMap:
    """The undecided tiles evaluated a batch at a time; only the bits of PARTIAL ones are kept
    (packed), so memory grows with the PARTIAL tiles, not with the undecided ones."""
    uq, uk = out["undecided"].cells()
    row_hit, col_hit = np.zeros(q_len, dtype=bool), np.zeros(kv_len, dtype=bool)
    fq, fk = out["full"].cells()
    pq, pk = out["partial"].cells()
    full_q, full_k, part_q, part_k = [fq], [fk], [pq], [pk]
    bits = [_packed(_rows_tiles(bounds.sure, pq, pk, q_len, kv_len, bq, bk))]
    for at, values, (i, j, i_ok, j_ok) in _evaluated_batches(mask, uq, uk, q_len, kv_len, bq, bk):
        row_hit[i[values.any(axis=2) & i_ok]] = True
        col_hit[j[values.any(axis=1) & j_ok]] = True
        hits = values.sum(axis=(1, 2))
        now_full = hits == i_ok.sum(1) * j_ok.sum(1)
        now_partial = (hits > 0) & ~now_full
        full_q.append(uq[at][now_full])
        full_k.append(uk[at][now_full])
        part_q.append(uq[at][now_partial])
        part_k.append(uk[at][now_partial])
        bits.append(_packed(values[now_partial]))
    tiles_q, tiles_k, packed = np.concatenate(part_q), np.concatenate(part_k), np.concatenate(bits)
    order = np.lexsort((tiles_k, tiles_q))
    tiles_q, tiles_k, packed = tiles_q[order], tiles_k[order], packed[order]
    distinct, pattern_of = np.unique(packed, axis=0, return_inverse=True)
    patterns = np.unpackbits(distinct, axis=1, count=bq * bk).astype(bool).reshape(-1, bq, bk)

    fq, fk = np.concatenate(full_q), np.concatenate(full_k)
    full = iv.sweep([(fq, fk, fk + 1)], n_kv, {"full": lambda c: c[0] > 0})["full"]
    return BlockMap(
        n_q, n_kv, full, Runs(tiles_q, tiles_k, tiles_k + 1),
        patterns=patterns, pattern_of=pattern_of.reshape(-1).astype(np.int64),
        row_hits=np.flatnonzero(row_hit), col_hits=np.flatnonzero(col_hit),
    )


@dataclass(frozen=True)
class Classify(Pass):
    """``BlockMap`` of every distinct head expression."""

    name: str = "classify"
    needs: tuple = ("simplified", "rows", "block_size")
    provides: tuple = ("block_maps",)

    def run(self, state):
        spec, (bq, bk) = state["simplified"], state["block_size"]
        return {"block_maps": {
            m: classify(b, m, spec.q_len, spec.kv_len, bq, bk) for m, b in state["rows"].items()
        }}
