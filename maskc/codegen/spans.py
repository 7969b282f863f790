"""Spans: the PARTIAL-tile test of masks whose rows and columns each allow one interval.

Most masks people train with allow, in every query row, one contiguous run of
keys, and in every key column one contiguous run of queries: causal, sliding
windows, chunks, prefixes, packed documents, and their ring-attention tiles.
For those the kernels skip the generated predicate (``predicate.py``) and test
a PARTIAL tile against spans loaded once per program, on the program's own
axis, before its loops::

    forward, dQ (a program owns rows i):   allowed(i, j) = row_lo[i] <= j < row_hi[i]
    dK/dV (a program owns keys j):         allowed(i, j) = col_lo[j] <= i < col_hi[j]

        keys ->                 row_lo/row_hi of a document-causal row:
        x . . . . .             the keys from the start of its document
        x x . . . .             to the row itself; col_lo/col_hi of a key:
        . . x . . .             the queries from itself to the end of
        . . x x . .             its document
        . . x x x .

A PARTIAL step then costs two comparisons and no load, where the generated
predicate of documents gathers a document id per key at every step. The
spans are data (``int32[S, q_len]`` and ``int32[S, kv_len]``), so new
document lengths still reuse the compiled kernels.

Which masks qualify. Let row ``i`` allow ``[lo_i, hi_i)``. When ``lo`` and
``hi`` never decrease down the rows, the queries allowing key ``j`` are
``{i : lo_i <= j} ∩ {i : hi_i > j}``, a prefix of the rows intersected with
a suffix: one interval, ``[#{i : hi_i <= j}, #{i : lo_i <= j})``. An empty
row can be any ``[x, x)``; it takes the largest end of the rows above it,
which keeps both sequences non-decreasing whenever any choice does. Masks
with ``Dense``/``Predicate`` nodes (inexact bounds), rows of several
intervals or spans that move backwards keep the generated predicate.

Trimmed steps. A program smaller than its table block walks the block's
PARTIAL list, though some of the list's steps hold no allowed pair of its
own positions: the upper half of a diagonal block for the first rows, the
first keys of a window's oldest block for the last rows. Its spans cover at
most ``[min lo, max hi)``; ``partial_steps`` gives each program the steps of
its list that meet that hull, and the kernels walk only those::

    table block 128, programs of 64 rows, steps of 64 keys (diagonal block):
        rows  0-63:  x .      the second step holds nothing: trimmed
        rows 64-127: x x

At 128K tokens with blocks of 128 and 64 x 64 forward tiles this leaves
out about 6% of the forward's steps on documents of 512-4K tokens and on
a window of 1024 (the steps that remain hold 94% allowed pairs, 88% before).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..passes.lower import Bounds
from .block_lists import owners


@dataclass(frozen=True)
class Spans:
    """Per slot, the one interval of allowed keys of each row and of queries of each key."""

    row_lo: np.ndarray  # int32[S, q_len]
    row_hi: np.ndarray
    col_lo: np.ndarray  # int32[S, kv_len]
    col_hi: np.ndarray


def _slot_spans(bounds: Bounds, kv_len: int) -> Optional[tuple[np.ndarray, ...]]:
    if not bounds.exact:
        return None
    rows = bounds.sure
    if rows.real()[:, 1:].any():  # a row of two intervals or more
        return None
    lo, hi = rows.lo[:, 0], rows.hi[:, 0]
    empty = lo >= hi
    end_above = np.maximum.accumulate(np.where(empty, 0, hi))
    lo, hi = np.where(empty, end_above, lo), np.where(empty, end_above, hi)
    if (np.diff(lo) < 0).any() or (np.diff(hi) < 0).any():
        return None
    # #{i : lo_i <= j} for every key j, by counting the rows that start at each key
    starting = np.cumsum(np.bincount(lo, minlength=kv_len + 1))[:kv_len]
    ending = np.cumsum(np.bincount(hi, minlength=kv_len + 1))[:kv_len]
    return lo, hi, ending, starting


def partial_steps(ptr: np.ndarray, idx: np.ndarray, lo: np.ndarray, hi: np.ndarray, own_block: int,
                  entry_block: int, program: int, step: int) -> np.ndarray:
    """``int32[S, P, 2]``: per slot and program, the steps ``[first, end)`` of its PARTIAL list
    that meet the hull of its spans; empty where every position of the program is empty.

    ``ptr``, ``idx``: one direction's PARTIAL lists (``block_lists.py``: ``part_ptr``,
    ``part_idx``) of groups of ``own_block`` positions and entries of ``entry_block``; ``lo``,
    ``hi``: ``int[S, n]`` spans of the ``n`` positions on the programs' own axis; a program
    owns ``program`` positions and steps ``step`` entries at a time. Step ``k`` of the lists
    is sub-step ``k % (entry_block // step)`` of entry ``k // (entry_block // step)``, as
    the kernels number them."""
    n_slots, n = lo.shape
    subs = entry_block // step
    n_programs = -(-n // program)
    pad = ((0, 0), (0, n_programs * program - n))
    lo, hi = np.pad(lo, pad).astype(np.int64), np.pad(hi, pad).astype(np.int64)
    nonempty = (lo < hi).reshape(n_slots, n_programs, program)
    far = np.iinfo(np.int64).max // 4
    hull_lo = np.where(nonempty, lo.reshape(nonempty.shape), far).min(axis=2)
    hull_hi = np.where(nonempty, hi.reshape(nonempty.shape), 0).max(axis=2)

    # every step of every list as one ascending key: list * width + first entry position
    ptr = ptr.astype(np.int64)
    n_groups = ptr.shape[1] - 1
    entry_list = owners(ptr)
    width = (int(idx.max(initial=0)) + 2) * entry_block
    keys = ((entry_list * width + idx.astype(np.int64) * entry_block)[:, None]
            + np.arange(subs) * step).ravel()

    group = np.arange(n_programs) * program // own_block
    lists = np.arange(n_slots)[:, None] * n_groups + group[None, :]
    begin, stop = ptr[:, group] * subs, ptr[:, group + 1] * subs
    reach = np.clip(hull_lo - step + 1, 0, width)  # a step meets the hull when it ends past hull_lo
    first = np.clip(np.searchsorted(keys, lists * width + reach), begin, stop)
    end = np.clip(np.searchsorted(keys, lists * width + np.minimum(hull_hi, width)), first, stop)
    return np.stack([first, end], axis=-1).astype(np.int32)


def spans(cm) -> Optional[Spans]:
    """The spans of every slot of ``cm``, or ``None`` where any slot does not qualify."""
    per_slot = [_slot_spans(b, cm.kv_len) for b in cm.bounds]
    if any(s is None for s in per_slot):
        return None
    return Spans(*(np.stack(parts).astype(np.int32) for parts in zip(*per_slot)))
