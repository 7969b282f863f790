"""Pass ``lower``: each head's expression -> its exact per-query-row key intervals.

For every query row the allowed keys are a small union of intervals
(``intervals.Rows``). Structured nodes lower exactly in numpy, in time linear
in the rows. ``Dense`` and ``Predicate`` cannot be seen through, so the result
is a pair of bounds, ``sure ⊆ allowed ⊆ maybe``: an opaque node contributes
``sure = nothing, maybe = everything``, and ``Not`` swaps the two. Where the
expression has no opaque node the bounds coincide and the form is exact; where
they differ, ``classify`` evaluates the expression on those tiles only.

Inside ``Documents`` every row carries its own scope (its document's lengths),
so scope sizes are per-row arrays throughout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..ir import nodes as ir
from . import intervals as iv
from .pipeline import Pass


@dataclass(frozen=True)
class Bounds:
    """``sure ⊆ allowed ⊆ maybe`` per row; ``maybe is None`` means exact (``maybe == sure``)."""

    sure: iv.Rows
    maybe_: Optional[iv.Rows] = None

    @property
    def exact(self) -> bool:
        return self.maybe_ is None

    @property
    def maybe(self) -> iv.Rows:
        return self.sure if self.maybe_ is None else self.maybe_


@dataclass(frozen=True)
class RowScope:
    """The rows being lowered: local query index and the scope of each row."""

    i: np.ndarray
    q_len: np.ndarray
    kv_len: np.ndarray

    @property
    def n(self) -> int:
        return len(self.i)


def lower(mask: ir.Mask, rows: RowScope, memo: dict | None = None) -> Bounds:
    """``Bounds`` of ``mask`` on ``rows``, in the scope's local key coordinates."""
    memo = {} if memo is None else memo
    key = mask
    if key not in memo:
        memo[key] = _RULES[type(mask)](mask, rows, memo)
    return memo[key]


def _exact(rows: iv.Rows) -> Bounds:
    return Bounds(rows)


def _diagonal(align, rows: RowScope):
    return rows.i + (rows.kv_len - rows.q_len if align == "bottom_right" else 0)


def _causal(m: ir.Causal, rows: RowScope, memo) -> Bounds:
    return _exact(iv.span(0, np.minimum(_diagonal(m.align, rows) + m.offset + 1, rows.kv_len), rows.n))


def _window(m: ir.SlidingWindow, rows: RowScope, memo) -> Bounds:
    centre = _diagonal(m.align, rows)
    lo = 0 if m.left is None else np.maximum(centre - m.left, 0)
    hi = rows.kv_len if m.right is None else np.minimum(centre + m.right + 1, rows.kv_len)
    return _exact(iv.span(lo, hi, rows.n))


def _chunked(m: ir.Chunked, rows: RowScope, memo) -> Bounds:
    lo = rows.i // m.size * m.size
    return _exact(iv.span(lo, np.minimum(lo + m.size, rows.kv_len), rows.n))


def _prefix(m: ir.Prefix, rows: RowScope, memo) -> Bounds:
    return _exact(iv.span(0, np.minimum(m.length, rows.kv_len), rows.n))


def _range(m: ir.Range, rows: RowScope, memo) -> Bounds:
    (a, b), (c, d) = m.q, m.kv
    inside = (rows.i >= a) & (rows.i < b)
    return _exact(iv.span(c, np.where(inside, np.minimum(d, rows.kv_len), 0), rows.n))


def _documents(m: ir.Documents, rows: RowScope, memo) -> Bounds:
    q_start, k_start = m.starts()
    doc = np.searchsorted(q_start, rows.i, side="right") - 1
    inside = (doc >= 0) & (rows.i < q_start[-1])
    every = bool(inside.all())  # the common case: no padding rows, no copies
    at = slice(None) if every else np.flatnonzero(inside)
    doc = doc[at]
    lq = np.asarray(m.lengths, dtype=np.int64)[doc]
    lk = np.asarray(m.key_lengths, dtype=np.int64)[doc]
    local = RowScope(rows.i[at] - q_start[doc], lq, lk)
    inner = lower(m.inner, local, {})

    def place(form: iv.Rows) -> iv.Rows:
        shifted = iv.shift(form, k_start[doc])
        return shifted if every else iv.scatter(shifted, at, rows.n)

    if inner.exact:
        return _exact(place(inner.sure))
    return Bounds(place(inner.sure), place(inner.maybe))


def _opaque(m, rows: RowScope, memo) -> Bounds:
    return Bounds(iv.empty_rows(rows.n), iv.span(0, rows.kv_len, rows.n))


def _full(m, rows, memo):
    return _exact(iv.span(0, rows.kv_len, rows.n))


def _empty(m, rows, memo):
    return _exact(iv.empty_rows(rows.n))


def _fold(combine, identity):
    def rule(m, rows: RowScope, memo) -> Bounds:
        if not m.of:
            return identity(m, rows, memo)
        out = lower(m.of[0], rows, memo)
        for x in m.of[1:]:
            b = lower(x, rows, memo)
            sure = combine(out.sure, b.sure)
            out = Bounds(sure) if out.exact and b.exact else Bounds(sure, combine(out.maybe, b.maybe))
        return out

    return rule


def _not(m: ir.Not, rows: RowScope, memo) -> Bounds:
    b = lower(m.of, rows, memo)
    if b.exact:
        return _exact(iv.complement(b.sure, rows.kv_len))
    return Bounds(iv.complement(b.maybe, rows.kv_len), iv.complement(b.sure, rows.kv_len))


_RULES = {
    ir.Full: _full,
    ir.Empty: _empty,
    ir.Causal: _causal,
    ir.SlidingWindow: _window,
    ir.Chunked: _chunked,
    ir.Prefix: _prefix,
    ir.Range: _range,
    ir.Documents: _documents,
    ir.Dense: _opaque,
    ir.Predicate: _opaque,
    ir.And: _fold(iv.intersect, _full),
    ir.Or: _fold(iv.union, _empty),
    ir.Not: _not,
}


def lower_spec_head(mask: ir.Mask, q_len: int, kv_len: int) -> Bounds:
    """``Bounds`` of one head's expression over all ``q_len`` rows of the spec."""
    n = q_len
    rows = RowScope(np.arange(n, dtype=np.int64), np.full(n, q_len, dtype=np.int64), np.full(n, kv_len, dtype=np.int64))
    return lower(mask, rows)


@dataclass(frozen=True)
class Lower(Pass):
    """Per-row key intervals (``Bounds``) of every distinct head expression."""

    name: str = "lower"
    needs: tuple = ("simplified",)
    provides: tuple = ("rows",)

    def run(self, state):
        spec = state["simplified"]
        return {"rows": {m: lower_spec_head(m, spec.q_len, spec.kv_len) for m in dict.fromkeys(spec.heads)}}
