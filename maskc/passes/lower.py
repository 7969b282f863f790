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

An ``Or`` lowers each operand only on the rows it reaches, ``Range`` operands
all at once and ``Documents`` of one ``inner`` all at once, and merges them in
one sort: an ``Or`` of many small terms costs the rows they reach, not
``terms * rows``.
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

    def map(self, f) -> "Bounds":
        """``f`` (``Rows -> Rows``) applied to both bounds."""
        return Bounds(f(self.sure), None if self.exact else f(self.maybe_))


@dataclass(frozen=True)
class RowScope:
    """The rows being lowered: local query index and the scope of each row."""

    i: np.ndarray
    q_len: np.ndarray
    kv_len: np.ndarray

    @property
    def n(self) -> int:
        return len(self.i)

    def take(self, at) -> "RowScope":
        return RowScope(self.i[at], self.q_len[at], self.kv_len[at])


def lower(mask: ir.Mask, rows: RowScope, memo: dict) -> Bounds:
    """``Bounds`` of ``mask`` on ``rows``, in the scope's local key coordinates. ``memo`` keeps
    the results, on these rows, of the expressions it has a key for (``repeated``); lowering
    on other rows takes ``dict.fromkeys(memo)``."""
    out = memo.get(mask)
    if out is None:
        out = _RULES[type(mask)](mask, rows, memo)
        if mask in memo:
            memo[mask] = out
    return out


def repeated(mask: ir.Mask) -> dict:
    """A memo for ``lower`` with a key for every sub-expression met more than once in ``mask``
    (equal ones are one): those are lowered once, and nothing else is kept while the rest is
    lowered (the result of every node of a wide expression would be hundreds of MB)."""
    seen, memo, stack = set(), {}, [mask]
    while stack:
        x = stack.pop()
        if x in seen:
            memo[x] = None
        else:
            seen.add(x)
            stack += [child for _, child in x.children()]
    return memo


def _exact(rows: iv.Rows) -> Bounds:
    return Bounds(rows)


def _diagonal(align, rows: RowScope, offset: int):
    """``i + s + offset`` per row (``s = kv_len - q_len`` for ``bottom_right``)."""
    return rows.i + (rows.kv_len - rows.q_len + offset if align == "bottom_right" else offset)


def _causal(m: ir.Causal, rows: RowScope, memo) -> Bounds:
    return _exact(iv.span(0, np.minimum(_diagonal(m.align, rows, m.offset + 1), rows.kv_len), rows.n))


def _window(m: ir.SlidingWindow, rows: RowScope, memo) -> Bounds:
    lo = 0 if m.left is None else np.maximum(_diagonal(m.align, rows, -m.left), 0)
    hi = rows.kv_len if m.right is None else np.minimum(_diagonal(m.align, rows, m.right + 1), rows.kv_len)
    return _exact(iv.span(lo, hi, rows.n))


def _chunked(m: ir.Chunked, rows: RowScope, memo) -> Bounds:
    lo = rows.i // m.size * m.size
    return _exact(iv.span(lo, np.minimum(lo + m.size, rows.kv_len), rows.n))


def _prefix(m: ir.Prefix, rows: RowScope, memo) -> Bounds:
    return _exact(iv.span(0, np.minimum(m.length, rows.kv_len), rows.n))


def _range(m: ir.Range, rows: RowScope, memo) -> Bounds:
    return _placed(rows.n, *_ranges_in([m], rows))


def _documents(m: ir.Documents, rows: RowScope, memo) -> Bounds:
    return _placed(rows.n, *_documents_in([m], rows, memo))


def _ascending(x: np.ndarray) -> bool:
    return bool((x[1:] >= x[:-1]).all())


def _pairs(rows: RowScope, q0: np.ndarray, q1: np.ndarray):
    """Every pair of a row and a ``t`` with ``q0[t] <= rows.i[row] < q1[t]`` (``q0 <= q1``),
    grouped by ``t``: the pairs' ``rows`` index (an ``int64[P]`` array, or a slice where
    they are one run of rows) and ``count: int64[len(q0)]``, the pairs of each ``t`` (so
    ``np.repeat(x, count)`` reads ``x[t]`` per pair). One binary search per ``t`` in the
    sorted rows: the work grows with the pairs, not with ``len(q0) * rows.n``."""
    i, order = rows.i, None
    if not _ascending(i):
        order = np.argsort(i, kind="stable")
        i = i[order]
    first = np.searchsorted(i, q0)
    count = np.searchsorted(i, q1) - first
    skip = first - (np.cumsum(count) - count)  # rows passed over before t's first pair
    if len(skip) and (skip == skip[0]).all():  # the pairs are one run of rows
        run = slice(int(skip[0]), int(skip[0] + count.sum()))
        return (run if order is None else order[run]), count
    r = np.arange(count.sum()) + np.repeat(skip, count)
    return (r if order is None else order[r]), count


def _placed(n: int, r, bounds: Bounds) -> Bounds:
    """``bounds`` of the rows ``r`` (each at most once) as the ``n``-row form."""
    if isinstance(r, slice) and r == slice(0, n):
        return bounds
    return bounds.map(lambda form: iv.scatter(form, r, n))


def _ranges_in(ranges: list[ir.Range], rows: RowScope):
    """``Range`` nodes on ``rows``: the ``rows`` index of each pair of a row and a range
    that holds it (see ``_pairs``) and the pairs' exact ``Bounds``."""
    a, b, c, d = np.array([(*x.q, *x.kv) for x in ranges], dtype=np.int64).T
    r, count = _pairs(rows, a, b)
    hi = np.minimum(np.repeat(d, count), rows.kv_len[r])
    return r, _exact(iv.span(np.repeat(c, count), hi, len(hi)))


def _documents_in(documents: list[ir.Documents], rows: RowScope, memo: dict):
    """``Documents`` nodes with one ``inner`` on ``rows``, their documents taken together
    (they may overlap): the ``rows`` index of each pair of a row and a document that
    holds it (see ``_pairs``) and the pairs' ``Bounds`` in the scope's keys."""
    starts = [d.starts() for d in documents]
    q0 = np.concatenate([q[:-1] for q, _ in starts])
    k0 = np.concatenate([k[:-1] for _, k in starts])
    lq = np.array([n for d in documents for n in d.lengths], dtype=np.int64)
    lk = np.array([n for d in documents for n in d.key_lengths], dtype=np.int64)
    r, count = _pairs(rows, q0, q0 + lq)
    start = np.repeat(k0, count)
    inner = documents[0].inner
    if isinstance(inner, ir.Full):  # every key of the document
        return r, _exact(iv.span(start, np.repeat(k0 + lk, count), len(start)))
    local = _in_documents(inner, rows.i[r] - np.repeat(q0, count), count, lq, lk, dict.fromkeys(memo))
    return r, local.map(lambda form: iv.shift(form, start))


def _in_documents(inner: ir.Mask, i: np.ndarray, count: np.ndarray, lq: np.ndarray, lk: np.ndarray,
                  memo: dict) -> Bounds:
    """``Bounds`` of ``inner`` on the local rows ``i``, the first ``count[0]`` in a document of
    shape ``(lq[0], lk[0])``, the next ``count[1]`` in one of ``(lq[1], lk[1])``, and so on.

    What ``inner`` allows in a row depends only on the row and its document's
    shape. Where shapes repeat (the rows of a canvas, documents of one length),
    ``inner`` is lowered once on every row of each distinct shape and each row
    is read from there.
    """
    if 0 < len(lq) <= len(i):
        shape, shape_of = np.unique(lq * (lk.max() + 1) + lk, return_index=True, return_inverse=True)[1:]
        q_lengths, k_lengths = lq[shape], lk[shape]
        if 2 * q_lengths.sum() <= len(i):
            first = np.cumsum(q_lengths) - q_lengths  # where each shape's rows start
            shared = RowScope(np.arange(q_lengths.sum()) - np.repeat(first, q_lengths),
                              np.repeat(q_lengths, q_lengths), np.repeat(k_lengths, q_lengths))
            at = np.repeat(first[shape_of.reshape(-1)], count) + i
            return lower(inner, shared, memo).map(lambda form: form.take(at))
    return lower(inner, RowScope(i, np.repeat(lq, count), np.repeat(lk, count)), memo)


def _opaque(m, rows: RowScope, memo) -> Bounds:
    return Bounds(iv.empty_rows(rows.n), iv.span(0, rows.kv_len, rows.n))


def _full(m, rows, memo):
    return _exact(iv.span(0, rows.kv_len, rows.n))


def _empty(m, rows, memo):
    return _exact(iv.empty_rows(rows.n))


def _rows_reached(mask: ir.Mask) -> tuple[int, int]:
    """Local query rows ``[a, b)`` (``a <= b``) outside which ``mask`` allows nothing, in any scope."""
    if isinstance(mask, ir.Empty):
        return 0, 0
    if isinstance(mask, ir.Range):
        return mask.q
    if isinstance(mask, ir.Documents):
        return mask.q_start, mask.q_start + sum(mask.lengths)
    if isinstance(mask, (ir.And, ir.Or)) and mask.of:
        a, b = zip(*(_rows_reached(x) for x in mask.of))
        if isinstance(mask, ir.And):
            return max(a), max(max(a), min(b))
        return min(a), max(b)
    return (0, 0) if isinstance(mask, ir.Or) else (0, ir.INDEX_LIMIT)


def _reached(mask: ir.Mask, rows: RowScope, ordered: bool):
    """The ``rows`` that ``mask`` may allow a key in (a slice where ``rows.i`` is ``ordered``,
    ascending, else an index array) and how many they are."""
    a, b = _rows_reached(mask)
    if ordered:
        first, end = np.searchsorted(rows.i, (a, b)).tolist()
        return slice(first, end), end - first
    at = np.flatnonzero((rows.i >= a) & (rows.i < b))
    return at, len(at)


def _intersect(m: ir.And, rows: RowScope, memo) -> Bounds:
    at, n_at = _reached(m, rows, _ascending(rows.i))
    if n_at == 0:
        return _empty(m, rows, memo)
    if n_at < rows.n:  # lowered on the rows every operand reaches
        return _placed(rows.n, at, lower(m, rows.take(at), dict.fromkeys(memo)))
    if not m.of:
        return _full(m, rows, memo)
    out = lower(m.of[0], rows, memo)
    for x in m.of[1:]:
        b = lower(x, rows, memo)
        sure = iv.intersect(out.sure, b.sure)
        out = Bounds(sure) if out.exact and b.exact else Bounds(sure, iv.intersect(out.maybe, b.maybe))
    return out


def _union(m: ir.Or, rows: RowScope, memo) -> Bounds:
    """The operands on the rows they reach, merged in one sort: the work grows
    with the rows each operand reaches, not with ``operands * rows``. ``Range``
    operands are lowered together, and so are ``Documents`` of one ``inner``."""
    ranges, documents, parts = [], {}, []
    ordered = _ascending(rows.i)
    for x in m.of:
        if isinstance(x, ir.Range):
            ranges.append(x)
        elif isinstance(x, ir.Documents):
            documents.setdefault(x.inner, []).append(x)
        else:
            at, n_at = _reached(x, rows, ordered)
            if n_at == rows.n:
                parts.append((slice(None), lower(x, rows, memo)))
            elif n_at:
                parts.append((at, lower(x, rows.take(at), dict.fromkeys(memo))))
    if ranges:
        parts.append(_ranges_in(ranges, rows))
    parts += [_documents_in(group, rows, memo) for group in documents.values()]
    sure = iv.union(rows.n, [(at, b.sure) for at, b in parts])
    if all(b.exact for _, b in parts):
        return _exact(sure)
    return Bounds(sure, iv.union(rows.n, [(at, b.maybe) for at, b in parts]))


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
    ir.And: _intersect,
    ir.Or: _union,
    ir.Not: _not,
}


def lower_spec_head(mask: ir.Mask, q_len: int, kv_len: int) -> Bounds:
    """``Bounds`` of one head's expression over all ``q_len`` rows of the spec."""
    n = q_len
    rows = RowScope(np.arange(n, dtype=np.int64), np.broadcast_to(np.int64(q_len), (n,)),
                    np.broadcast_to(np.int64(kv_len), (n,)))
    return lower(mask, rows, repeated(mask))


@dataclass(frozen=True)
class Lower(Pass):
    """Per-row key intervals (``Bounds``) of every distinct head expression."""

    name: str = "lower"
    needs: tuple = ("simplified",)
    provides: tuple = ("rows",)

    def run(self, state):
        spec = state["simplified"]
        return {"rows": {m: lower_spec_head(m, spec.q_len, spec.kv_len) for m in dict.fromkeys(spec.heads)}}
