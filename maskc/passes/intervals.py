"""Vectorised interval algebra, the arithmetic under the exact analysis.

Two shapes of data appear:

* ``Rows``: for each of ``R`` rows, a union of key intervals, stored as
  ``lo, hi: int64[R, m]``. Canonical form: in each row the intervals are
  sorted, disjoint and *non-adjacent* (``[0, 3)`` and ``[3, 5)`` are merged), and
  unused slots are ``lo == hi == 0`` after the real ones. Non-adjacency matters:
  a block fully covered by the union is then fully covered by one interval.
* grouped runs: flat ``(group, lo, hi)`` arrays sorted by group then ``lo``
  (the block map stores, per query block, runs of key blocks this way).

Everything is numpy on whole arrays; no Python loop runs per row or per tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

@dataclass(frozen=True)
class Rows:
    """Per-row unions of half-open intervals ``[lo, hi)`` (``int64[R, m]``). The arrays are
    never written once built, so forms may share them."""

    lo: np.ndarray
    hi: np.ndarray

    @property
    def n_rows(self) -> int:
        return self.lo.shape[0]

    def real(self) -> np.ndarray:
        return self.lo < self.hi

    def counts(self) -> np.ndarray:
        """Allowed keys per row (``int64[R]``)."""
        return (self.hi - self.lo).sum(axis=1)

    def take(self, rows: np.ndarray) -> "Rows":
        return Rows(self.lo[rows], self.hi[rows])


@dataclass(frozen=True)
class Runs:
    """Grouped runs: ``group[r]`` (a query or key block) and ``[lo[r], hi[r])``,
    sorted by group then ``lo``."""

    group: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    def __len__(self) -> int:
        return len(self.group)

    @property
    def tiles(self) -> int:
        return int((self.hi - self.lo).sum())

    def cells(self) -> tuple[np.ndarray, np.ndarray]:
        """Every cell of every run as ``(group, position)`` arrays."""
        n = self.hi - self.lo
        pos = np.repeat(self.lo - np.cumsum(n) + n, n) + np.arange(n.sum())
        return np.repeat(self.group, n), pos


def empty_rows(n: int) -> Rows:
    zero = np.zeros((n, 1), dtype=np.int64)
    return Rows(zero, zero)


def span(lo, hi, n: int) -> Rows:
    """One interval per row, clipped to nothing where ``lo >= hi`` (scalars or ``int64[n]``)."""
    lo = np.broadcast_to(np.asarray(lo, dtype=np.int64), (n,))[:, None]
    hi = np.broadcast_to(np.asarray(hi, dtype=np.int64), (n,))[:, None]
    return canonical(np.ascontiguousarray(lo), np.ascontiguousarray(hi))


def canonical(lo: np.ndarray, hi: np.ndarray) -> Rows:
    """The canonical union of arbitrary (overlapping, unsorted) intervals per row."""
    n, m = lo.shape
    if m > 1:
        return union(n, [(slice(None), Rows(lo, hi))])
    real = lo < hi
    if real.all():
        return Rows(lo, hi)
    return Rows(np.where(real, lo, 0), np.where(real, hi, 0))


def union(n: int, parts) -> Rows:
    """The canonical ``n``-row form of the union of ``parts``, ``(rows, form)`` pairs where
    ``form`` (``lo, hi: int64[r, m]``, any intervals, empty ones allowed, positions
    ``>= 0``) holds the intervals of rows ``rows`` (an ``int64[r]`` index or a slice).

    Every interval becomes a pair of keys ``row * stride + lo`` and ``row * stride + hi``
    (``stride`` past every position, so rows never mix); after one sort by start, an
    interval opens a new one of the result where it starts past the running maximum
    of the ends before it (``[0, 3)`` and ``[3, 5)`` join).
    """
    parts = [(at, form) for at, form in parts if form.lo.size]
    if not parts:
        return empty_rows(n)
    # past every position (n * stride stays far below 2**63 for any scope)
    stride = max(max(int(form.lo.max()), int(form.hi.max())) for _, form in parts) + 1
    size = sum(form.lo.size for _, form in parts)
    key, end = np.empty(size, dtype=np.int64), np.empty(size, dtype=np.int64)
    done = 0
    for at, form in parts:  # written in place: these arrays are the largest of a compile
        base = (np.arange(n, dtype=np.int64)[at] if isinstance(at, slice) else at)[:, None] * stride
        np.add(base, form.lo, out=key[done:done + form.lo.size].reshape(form.lo.shape))
        np.add(base, form.hi, out=end[done:done + form.hi.size].reshape(form.hi.shape))
        done += form.lo.size
    order = np.argsort(key, kind="stable")
    key = key[order]
    reach = np.maximum.accumulate(end[order], out=end)
    del order
    starts = np.ones(size, dtype=bool)
    np.greater(key[1:], reach[:-1], out=starts[1:])
    stops = np.ones(size, dtype=bool)  # where the next interval starts a new one
    stops[:-1] = starts[1:]
    lo, hi = key[starts], reach[stops]
    del key, reach, starts, stops  # freed before the result is built
    real = lo < hi  # an empty interval may open one of its own, which then holds nothing
    if not real.all():
        lo, hi = lo[real], hi[real]
    row = lo // stride
    base = row * stride
    lo -= base
    hi -= base
    count = np.bincount(row, minlength=n)
    width = max(int(count.max()), 1)
    at = np.arange(len(row), dtype=np.int64)
    at -= (np.cumsum(count) - count)[row]  # intervals before it in its row
    at += row * width
    out_lo = np.zeros(n * width, dtype=np.int64)
    out_hi = np.zeros(n * width, dtype=np.int64)
    out_lo[at] = lo
    out_hi[at] = hi
    return Rows(out_lo.reshape(n, width), out_hi.reshape(n, width))


def intersect(a: Rows, b: Rows) -> Rows:
    if a.lo.shape[1] == 1 and b.lo.shape[1] == 1:
        return canonical(np.maximum(a.lo, b.lo), np.minimum(a.hi, b.hi))
    lo = np.maximum(a.lo[:, :, None], b.lo[:, None, :]).reshape(a.n_rows, -1)
    hi = np.minimum(a.hi[:, :, None], b.hi[:, None, :]).reshape(a.n_rows, -1)
    return canonical(lo, hi)


def complement(a: Rows, width) -> Rows:
    """``[0, width) \\ a`` per row (``width`` a scalar or ``int64[R]``)."""
    width = np.broadcast_to(np.asarray(width, dtype=np.int64), (a.n_rows,))[:, None]
    real = a.real()
    lo = np.where(real, a.lo, width)
    hi = np.where(real, a.hi, width)
    gap_lo = np.concatenate([np.zeros_like(width), hi], axis=1)
    gap_hi = np.concatenate([lo, width], axis=1)
    return canonical(gap_lo, gap_hi)


def shift(a: Rows, by) -> Rows:
    by = np.broadcast_to(np.asarray(by, dtype=np.int64), (a.n_rows,))[:, None]
    real = a.real()
    if real.all():
        return Rows(a.lo + by, a.hi + by)
    return Rows(np.where(real, a.lo + by, 0), np.where(real, a.hi + by, 0))


def clip(a: Rows, width) -> Rows:
    """``a ∩ [0, width)`` per row."""
    width = np.broadcast_to(np.asarray(width, dtype=np.int64), (a.n_rows,))[:, None]
    return canonical(np.clip(a.lo, 0, width), np.clip(a.hi, 0, width))


def scatter(part: Rows, rows: np.ndarray, n: int) -> Rows:
    """Rows of ``part`` placed at ``rows`` of an otherwise empty ``n``-row form."""
    lo = np.zeros((n, part.lo.shape[1]), dtype=np.int64)
    hi = np.zeros_like(lo)
    lo[rows] = part.lo
    hi[rows] = part.hi
    return Rows(lo, hi)


def distinct_consecutive(columns: list[np.ndarray]) -> np.ndarray:
    """Indices of the rows that differ from the row before them in any of
    ``columns`` (arrays ``[R, c]`` sharing their first dimension)."""
    n = columns[0].shape[0]
    changed = np.ones(n, dtype=bool)
    if n > 1:
        later = changed[1:]
        later[:] = False
        step = np.empty(n - 1, dtype=bool)
        for c in columns:
            for k in range(c.shape[1]):  # column by column: a reduction over a short axis is slow
                later |= np.not_equal(c[1:, k], c[:-1, k], out=step)
    return np.flatnonzero(changed)


def sweep(sets, width: int, predicates):
    """Boolean combinations of grouped interval sets, one sweep for several outputs.

    ``sets`` is a list of ``(group, lo, hi)`` item arrays (items may overlap and
    repeat); ``predicates`` maps a name to a function of the per-set coverage
    counts (a list of arrays) that is true where the output holds. It must be
    false where every count is 0. Positions are ``0 <= x <= width``.
    Returns ``{name: Runs}``, maximal runs sorted by group then lo.
    """
    stride = width + 1
    keys, deltas = [], []
    for s, (g, lo, hi) in enumerate(sets):
        keep = lo < hi
        g, lo, hi = g[keep], lo[keep], hi[keep]
        keys += [g * stride + lo, g * stride + hi]
        d = np.zeros((len(sets), 2 * len(g)), dtype=np.int64)
        d[s, : len(g)] = 1
        d[s, len(g):] = -1
        deltas.append(d)
    keys = np.concatenate(keys)
    deltas = np.concatenate(deltas, axis=1) if deltas else np.zeros((len(sets), 0), dtype=np.int64)
    points, where = np.unique(keys, return_inverse=True)
    counts = [np.cumsum(np.bincount(where, weights=d, minlength=len(points))).astype(np.int64) for d in deltas]
    out = {}
    for name, predicate in predicates.items():
        on = predicate(counts)[:-1] if len(points) else np.zeros(0, dtype=bool)
        start = on.copy()
        start[1:] &= ~on[:-1]
        stop = on.copy()
        stop[:-1] &= ~on[1:]
        lo_key = points[:-1][start]
        hi_key = points[1:][stop]
        g = lo_key // stride
        out[name] = Runs(g, lo_key - g * stride, hi_key - g * stride)
    return out


def transpose_runs(runs: Runs, width: int) -> Runs:
    """Runs by group -> runs by position: cells ``(g, x)`` of ``runs`` become
    runs ``(x, [g0, g1))`` covering the same cells.

    Work grows with the changes between consecutive groups' runs, not with the
    number of cells: a column run starts where a cell is set and the cell above
    it is not, and ends where the reverse holds.
    """
    here = (runs.group, runs.lo, runs.hi)
    above = (runs.group + 1, runs.lo, runs.hi)  # each group's runs, seen from the next group
    edges = sweep([here, above], width, {
        "start": lambda c: (c[0] > 0) & (c[1] == 0),
        "stop": lambda c: (c[1] > 0) & (c[0] == 0),
    })

    def by_column(edge: Runs):
        row, col = edge.cells()
        order = np.lexsort((row, col))
        return col[order], row[order]

    col, first = by_column(edges["start"])
    _, last = by_column(edges["stop"])
    return Runs(col, first, last)


def window(rows: Rows, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """``bool[r1 - r0, c1 - c0]``: the allowed keys ``[c0, c1)`` of rows ``[r0, r1)``."""
    lo, hi = rows.lo[r0:r1, :, None], rows.hi[r0:r1, :, None]
    j = np.arange(c0, c1, dtype=np.int64)[None, None, :]
    return ((j >= lo) & (j < hi)).any(axis=1)
