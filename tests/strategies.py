"""Hypothesis strategies: random, valid mask expressions, specs and block sizes.

Every node kind appears, with the edge cases the compiler must get right:
offsets past either end, unbounded windows, zero-length documents, key lengths
unlike query lengths, padding before and after documents, documents nested in
documents, empty ``And``/``Or``. A node is drawn for a ``Scope``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from hypothesis import strategies as st

import maskc

MAX_LEN = 70

# Predicates are named functions so that failing examples print readably.
def checkerboard(i, j):
    return (i + j) % 2 == 0


def lower_triangle(i, j):
    return j <= i


def sparse_hash(i, j):
    return (i * 7 + j * 3) % 5 < 2


def nothing(i, j):
    return i < 0


PREDICATES = (checkerboard, lower_triangle, sparse_hash, nothing)
ALIGNS = st.sampled_from(["top_left", "bottom_right"])


# numbers past int64 arithmetic (i + offset would wrap): their meaning must not change
HUGE = st.sampled_from([2**62, 2**63 - 1, 2**70])


@dataclass(frozen=True)
class Options:
    """Which nodes and numbers may appear: ``Dense``, ``Predicate`` (not serialisable),
    and ``huge`` offsets, sizes and lengths far past any scope."""

    dense: bool = True
    predicates: bool = True
    huge: bool = False

    def offsets(self, kv_len: int):
        out = st.integers(-kv_len - 2, kv_len + 2) | st.integers(-3, 3)
        return out | HUGE | HUGE.map(lambda x: -x) if self.huge else out

    def counts(self, low: int, high: int):
        """Sizes and lengths in ``[low, high]``, or huge ones."""
        return st.integers(low, high) | HUGE if self.huge else st.integers(low, high)

    def bounds(self, kv_len: int):
        return st.none() | st.integers(0, 4) | self.counts(0, kv_len + 2)


def dense_values(q_len: int, kv_len: int):
    @st.composite
    def values(draw):
        seed = draw(st.integers(0, 2**32 - 1))
        density = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
        return np.random.default_rng(seed).random((q_len, kv_len)) < density

    return values()


def document_lengths(total: int, count: int):
    """``count`` lengths whose sum is at most ``total`` (mostly all of it), cut at
    random points; coinciding cuts give zero-length documents."""
    @st.composite
    def lengths(draw):
        used = draw(st.just(total) | st.integers(0, total))
        cuts = sorted(draw(st.lists(st.integers(0, used), min_size=count - 1, max_size=count - 1)))
        return np.diff([0, *cuts, used]).tolist()

    return lengths()


@dataclass(frozen=True)
class Scope:
    """Where an expression will be read: every scope has at least ``fits`` and at
    most ``reach`` ``(queries, keys)``; ``shape`` is their one shape, if they share one."""

    fits: tuple[int, int]
    reach: tuple[int, int]
    shape: Optional[tuple[int, int]]
    in_documents: bool = False  # a Range is read literally (and clipped), so it may reach past

    @staticmethod
    def of_spec(q_len: int, kv_len: int) -> "Scope":
        return Scope((q_len, kv_len), (q_len, kv_len), (q_len, kv_len))

    def documents(self, q_lengths, k_lengths) -> "Scope":
        shapes = set(zip(q_lengths, k_lengths))
        return Scope((min(q_lengths), min(k_lengths)), (max(q_lengths), max(k_lengths)),
                     shapes.pop() if len(shapes) == 1 else None, in_documents=True)


def leaves(scope: Scope, options: Options):
    """Nodes with no operand. A ``Range`` fits the spec, or is read literally (and
    clipped) in documents; ``Dense`` appears only where all scopes share a shape."""
    q_reach, kv_reach = scope.reach

    @st.composite
    def ranges(draw):
        a = draw(st.integers(0, q_reach))
        c = draw(st.integers(0, kv_reach))
        if scope.in_documents:
            b, d = draw(options.counts(a, q_reach + 2)), draw(options.counts(c, kv_reach + 2))
            return maskc.Range(q=(a, b), kv=(c, d))
        return maskc.Range(q=(a, draw(st.integers(a, q_reach))), kv=(c, draw(st.integers(c, kv_reach))))

    nodes = [
        st.just(maskc.Full()),
        st.just(maskc.Empty()),
        st.builds(maskc.Causal, offset=options.offsets(kv_reach), align=ALIGNS),
        st.builds(maskc.SlidingWindow, left=options.bounds(kv_reach), right=options.bounds(kv_reach), align=ALIGNS),
        st.builds(maskc.Chunked, size=st.integers(1, 12) | options.counts(1, MAX_LEN + 3)),
        st.builds(maskc.Prefix, length=options.counts(0, kv_reach + 3)),
        ranges(),
    ]
    if options.predicates:
        nodes.append(st.sampled_from(PREDICATES).map(lambda fn: maskc.Predicate(fn=fn)))
    if options.dense and scope.shape is not None and 0 not in scope.shape:
        nodes.append(dense_values(*scope.shape).map(lambda values: maskc.Dense(values=values)))
    return st.one_of(nodes)


def masks(scope: Scope, depth: int = 3, options: Options = Options()):
    """A random expression valid in ``scope``, at most ``depth`` operators deep."""
    base = leaves(scope, options)
    if depth == 0:
        return base
    sub = masks(scope, depth - 1, options)
    q_fits, kv_fits = scope.fits

    @st.composite
    def documents(draw):
        count = draw(st.integers(1, 6))
        q_lengths = draw(document_lengths(q_fits, count))
        kv_lengths = draw(st.none() | document_lengths(kv_fits, count))
        if kv_lengths is None and sum(q_lengths) > kv_fits:
            kv_lengths = draw(document_lengths(kv_fits, count))
        k_lengths = q_lengths if kv_lengths is None else kv_lengths
        q_start = draw(st.just(0) | st.integers(0, q_fits - sum(q_lengths)))
        kv_start = draw(st.just(0) | st.integers(0, kv_fits - sum(k_lengths)))
        inner = draw(masks(scope.documents(q_lengths, k_lengths), depth - 1, options))
        cut = draw(st.integers(0, count))
        if 0 < cut < count and draw(st.booleans()):  # the same documents, written as two groups
            return maskc.Documents(
                lengths=q_lengths[cut:], kv_lengths=k_lengths[cut:], inner=inner,
                q_start=q_start + sum(q_lengths[:cut]), kv_start=kv_start + sum(k_lengths[:cut]),
            ) | maskc.Documents(lengths=q_lengths[:cut], kv_lengths=k_lengths[:cut], inner=inner,
                                q_start=q_start, kv_start=kv_start)
        return maskc.Documents(lengths=q_lengths, kv_lengths=kv_lengths, inner=inner,
                               q_start=q_start, kv_start=kv_start)

    # a weighted choice by a composite: one_of would favour the branches with
    # the most distinct values (deep chains of Not)
    @st.composite
    def tree(draw):
        shape = draw(st.sampled_from(["leaf", "documents", "and", "leaf", "or", "documents", "and", "not"]))
        if shape == "leaf":
            return draw(base)
        if shape == "documents":
            return draw(documents())
        if shape == "not":
            return ~draw(sub)
        of = draw(st.lists(sub, max_size=3))
        return maskc.And(of=of) if shape == "and" else maskc.Or(of=of)

    return tree()


block_sizes = st.integers(1, 24) | st.tuples(st.integers(1, 24), st.integers(1, 24))


@st.composite
def specs(draw, max_len: int = MAX_LEN, max_heads: int = 4, depth: int = 3, dense: bool = True,
          predicates: bool = True, huge: bool = False):
    """A random ``Spec``: a head-shared mask, or per-head masks drawn from a small pool
    (so identical heads occur). ``dense``, ``predicates``, ``huge``: see ``Options``."""
    q_len = draw(st.integers(1, max_len))
    kv_len = draw(st.integers(1, max_len) | st.just(q_len))
    one = masks(Scope.of_spec(q_len, kv_len), depth, Options(dense, predicates, huge))
    if max_heads == 1 or draw(st.booleans()):
        return maskc.Spec(q_len=q_len, kv_len=kv_len, mask=draw(one))
    pool = draw(st.lists(one, min_size=1, max_size=3))
    heads = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=max_heads))
    return maskc.Spec(q_len=q_len, kv_len=kv_len, mask=heads)


def _cuts(rng, total: int, count: int) -> list[int]:
    """``count`` lengths summing to ``total``, cut at random points (zeros where cuts coincide)."""
    return np.diff([0, *np.sort(rng.integers(0, total + 1, count - 1)), total]).tolist()


@st.composite
def many_terms(draw, q_len: int, kv_len: int, options: Options = Options(dense=False)):
    """An ``Or`` of 100 to 300 small terms of a ``(q_len, kv_len)`` spec, or an ``And`` of their
    complements (so that it keeps holes). The terms: ranges; documents placed anywhere, with
    one of three ``inner``s; a packing cut into one-document pieces, in a random order among
    the rest (simplification joins them back); leaves cut to a range. Hypothesis draws the
    ``inner``s, the leaves and a seed; the seed places the hundreds of terms."""
    # inners for documents of any shape: Ranges read literally, no Dense
    inners = draw(st.lists(masks(Scope((0, 0), (q_len, kv_len), None, in_documents=True), 1, options),
                           min_size=3, max_size=3))
    pool = draw(st.lists(leaves(Scope.of_spec(q_len, kv_len), options), min_size=1, max_size=4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def part(total: int, widest: int) -> tuple[int, int]:
        start = int(rng.integers(0, total + 1))
        return start, int(rng.integers(start, min(total, start + widest) + 1))

    def small_range():
        return maskc.Range(q=part(q_len, 6), kv=part(kv_len, 6))

    def documents():
        count = int(rng.integers(1, 4))
        (q0, q1), (k0, k1) = part(q_len, 3 * count), part(kv_len, 3 * count)
        return maskc.Documents(lengths=_cuts(rng, q1 - q0, count), kv_lengths=_cuts(rng, k1 - k0, count),
                               q_start=q0, kv_start=k0, inner=inners[rng.integers(3)])

    count = int(rng.integers(1, min(q_len, kv_len) + 1))
    q_starts = np.cumsum([0, *_cuts(rng, q_len, count)]).tolist()
    k_starts = np.cumsum([0, *_cuts(rng, kv_len, count)]).tolist()
    terms = [maskc.Documents(lengths=[q1 - q0], kv_lengths=[k1 - k0], q_start=q0, kv_start=k0, inner=inners[0])
             for q0, q1, k0, k1 in zip(q_starts, q_starts[1:], k_starts, k_starts[1:])]
    for kind in rng.choice(["range", "documents", "documents", "cut"], int(rng.integers(100, 301)) - count):
        if kind == "range":
            terms.append(small_range())
        elif kind == "documents":
            terms.append(documents())
        else:
            terms.append(small_range() & pool[rng.integers(len(pool))])
    terms = [terms[k] for k in rng.permutation(len(terms))]
    if draw(st.booleans()):
        return maskc.Or(of=terms)
    return maskc.And(of=[~x for x in terms] + pool[: rng.integers(len(pool))])
