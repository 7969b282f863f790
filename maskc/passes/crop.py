"""Pass-level transform ``crop``: a mask restricted to a window, in the window's coordinates.

``crop(mask, scope, window)`` returns an expression ``c`` over the window's own
scope ``(q1 - q0, kv1 - kv0)`` with ``c(i, j) == mask(i + q0, j + kv0)``. It is
written in the IR, node by node (no dense slicing), so a tile of a 1M-token
spec is as cheap to build and compile as the spec itself. The rules:

* ``Causal``/``SlidingWindow``: the diagonal moves by ``s + q0 - kv0``; the
  result is a top-left ``Causal``, a window, or ``Causal & ~Causal`` for a band
  a ``SlidingWindow`` cannot hold (its bounds must be >= 0);
* ``Prefix``, ``Range``: shifted and clipped; ``Dense``: sliced;
  ``Predicate``: its callable is shifted (``Shifted``);
* ``Chunked``: the chunks meeting the window become ``Documents``;
* ``Documents``: documents wholly inside the window keep their ``inner``
  (``q_start``/``kv_start`` place them); a document cut by the window becomes
  its own one-document ``Documents`` whose ``inner`` is cropped recursively;
* ``And``/``Or``/``Not`` crop their operands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..ir import nodes as ir


@dataclass(frozen=True)
class Window:
    """Rows ``[q0, q1)`` and keys ``[kv0, kv1)`` of a scope ``(q_len, kv_len)``."""

    q_len: int
    kv_len: int
    q0: int
    q1: int
    kv0: int
    kv1: int

    @property
    def diagonal_shift(self) -> int:
        """How far the diagonal ``j == i`` moves in window coordinates."""
        return self.q0 - self.kv0


@dataclass(frozen=True)
class Shifted:
    """``fn(i + di, j + dj)``: a ``Predicate``'s callable seen from a window."""

    fn: Callable[..., Any]
    di: int
    dj: int

    def __call__(self, i, j):
        return self.fn(i + self.di, j + self.dj)


def _band(align, left, right, w: Window) -> ir.Mask:
    """``i + d - left <= j <= i + d + right`` in window coordinates (``None``: unbounded)."""
    d = (w.kv_len - w.q_len if align == "bottom_right" else 0) + w.diagonal_shift
    if left is None:
        return ir.Full() if right is None else ir.Causal(offset=d + right)
    lower = ir.Not(of=ir.Causal(offset=d - left - 1))  # j >= i + d - left
    if right is None:
        return lower
    if left - d >= 0 and right + d >= 0:
        return ir.SlidingWindow(left=left - d, right=right + d)
    return ir.And(of=(ir.Causal(offset=d + right), lower))


def _clip(lo: int, hi: int, start: int, size: int) -> tuple[int, int]:
    lo, hi = min(max(lo - start, 0), size), min(max(hi - start, 0), size)
    return lo, max(lo, hi)


def _documents_from(q_bounds: np.ndarray, kv_bounds: np.ndarray, inner: ir.Mask, w: Window) -> ir.Mask:
    """Consecutive documents (boundaries in scope coordinates) seen through the window."""
    q_lo = np.clip(q_bounds[:-1], w.q0, w.q1)
    q_hi = np.clip(q_bounds[1:], w.q0, w.q1)
    k_lo = np.clip(kv_bounds[:-1], w.kv0, w.kv1)
    k_hi = np.clip(kv_bounds[1:], w.kv0, w.kv1)
    meets = np.flatnonzero((q_hi > q_lo) & (k_hi > k_lo))
    if len(meets) == 0:
        return ir.Empty()
    first, last = int(meets[0]), int(meets[-1])
    whole = (q_lo == q_bounds[:-1]) & (q_hi == q_bounds[1:]) & (k_lo == kv_bounds[:-1]) & (k_hi == kv_bounds[1:])

    def group(a: int, b: int, inner_of: ir.Mask) -> ir.Mask:
        return ir.Documents(
            lengths=tuple((q_hi[a:b] - q_lo[a:b]).tolist()),
            kv_lengths=tuple((k_hi[a:b] - k_lo[a:b]).tolist()),
            inner=inner_of,
            q_start=int(q_lo[a] - w.q0),
            kv_start=int(k_lo[a] - w.kv0),
        )

    def cut(n: int) -> ir.Mask:
        doc_window = Window(
            int(q_bounds[n + 1] - q_bounds[n]), int(kv_bounds[n + 1] - kv_bounds[n]),
            int(q_lo[n] - q_bounds[n]), int(q_hi[n] - q_bounds[n]),
            int(k_lo[n] - kv_bounds[n]), int(k_hi[n] - kv_bounds[n]),
        )
        return group(n, n + 1, crop(inner, doc_window))

    parts = []
    a, b = first, last + 1
    if not whole[a]:
        parts.append(cut(a))
        a += 1
    tail = None
    if b > a and not whole[b - 1]:
        tail = cut(b - 1)
        b -= 1
    if b > a:
        parts.append(group(a, b, inner))
    if tail is not None:
        parts.append(tail)
    return parts[0] if len(parts) == 1 else ir.Or(of=tuple(parts))


def _chunk_bounds(size: int, length: int, n_chunks: int) -> np.ndarray:
    return np.minimum(np.arange(n_chunks + 1, dtype=np.int64) * size, length)


def _crop_documents(m: ir.Documents, w: Window) -> ir.Mask:
    q_bounds, kv_bounds = m.starts()
    return _documents_from(q_bounds, kv_bounds, m.inner, w)


def _crop_chunked(m: ir.Chunked, w: Window) -> ir.Mask:
    if w.q0 == w.kv0 and w.q0 % m.size == 0:
        return m
    n = -(-max(w.q_len, w.kv_len) // m.size)
    return _documents_from(_chunk_bounds(m.size, w.q_len, n), _chunk_bounds(m.size, w.kv_len, n), ir.Full(), w)


def _crop_predicate(m: ir.Predicate, w: Window) -> ir.Mask:
    fn = m.fn
    if isinstance(fn, Shifted):
        return ir.Predicate(fn=Shifted(fn.fn, fn.di + w.q0, fn.dj + w.kv0))
    return ir.Predicate(fn=Shifted(fn, w.q0, w.kv0))


def _crop_range(m: ir.Range, w: Window) -> ir.Mask:
    return ir.Range(q=_clip(*m.q, w.q0, w.q1 - w.q0), kv=_clip(*m.kv, w.kv0, w.kv1 - w.kv0))


_RULES: dict[type, Callable[[Any, Window], ir.Mask]] = {
    ir.Full: lambda m, w: m,
    ir.Empty: lambda m, w: m,
    ir.Causal: lambda m, w: _band(m.align, None, m.offset, w),
    ir.SlidingWindow: lambda m, w: _band(m.align, m.left, m.right, w),
    ir.Chunked: _crop_chunked,
    ir.Prefix: lambda m, w: ir.Prefix(length=min(max(m.length - w.kv0, 0), w.kv1 - w.kv0)),
    ir.Range: _crop_range,
    ir.Documents: _crop_documents,
    ir.Dense: lambda m, w: ir.Dense(values=m.values.array[w.q0:w.q1, w.kv0:w.kv1]),
    ir.Predicate: _crop_predicate,
    ir.And: lambda m, w: ir.And(of=tuple(crop(x, w) for x in m.of)),
    ir.Or: lambda m, w: ir.Or(of=tuple(crop(x, w) for x in m.of)),
    ir.Not: lambda m, w: ir.Not(of=crop(m.of, w)),
}


def crop(mask: ir.Mask, window: Window) -> ir.Mask:
    """``mask`` seen through ``window``, in the window's local coordinates."""
    return _RULES[type(mask)](mask, window)
