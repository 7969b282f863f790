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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..passes.lower import Bounds


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


def spans(cm) -> Optional[Spans]:
    """The spans of every slot of ``cm``, or ``None`` where any slot does not qualify."""
    per_slot = [_slot_spans(b, cm.kv_len) for b in cm.bounds]
    if any(s is None for s in per_slot):
        return None
    return Spans(*(np.stack(parts).astype(np.int32) for parts in zip(*per_slot)))
