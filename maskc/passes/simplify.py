"""Pass ``simplify``: rewrite each head's expression into an equivalent, smaller one.

Rules are a table of ``(node type, rewrite)``; a rewrite returns a new node or
``None`` when it does not apply. Children are simplified first, then the rules
run on the node until none fires. Every rule is an identity of the node
definitions, so the result allows exactly the same pairs; the property tests
check that on random trees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ..ir import nodes as ir
from ..ir.spec import Spec
from .pipeline import Pass

Rewrite = Callable[[ir.Mask], Optional[ir.Mask]]


def _flatten(m):  # And(a, And(b, c)) == And(a, b, c); same for Or
    if any(type(x) is type(m) for x in m.of):
        return type(m)(of=tuple(y for x in m.of for y in (x.of if type(x) is type(m) else (x,))))
    return None


def _drop_identity(m):  # And(Full, x) == x; Or(Empty, x) == x
    unit = ir.Full if isinstance(m, ir.And) else ir.Empty
    kept = tuple(x for x in m.of if not isinstance(x, unit))
    return type(m)(of=kept) if len(kept) != len(m.of) else None


def _absorb(m):  # And(Empty, x) == Empty; Or(Full, x) == Full
    zero = ir.Empty if isinstance(m, ir.And) else ir.Full
    return zero() if any(isinstance(x, zero) for x in m.of) else None


def _dedupe(m):  # And(x, x) == x (idempotence)
    kept = tuple(dict.fromkeys(m.of))
    return type(m)(of=kept) if len(kept) != len(m.of) else None


def _trivial(m):  # And() == Full, Or() == Empty, And(x) == x
    if not m.of:
        return ir.Full() if isinstance(m, ir.And) else ir.Empty()
    return m.of[0] if len(m.of) == 1 else None


def _contradiction(m):  # And(x, Not(x)) == Empty; Or(x, Not(x)) == Full
    negated = {x.of for x in m.of if isinstance(x, ir.Not)}
    if any(x in negated for x in m.of):
        return ir.Empty() if isinstance(m, ir.And) else ir.Full()
    return None


def _band(x) -> Optional[tuple[str, Optional[int], Optional[int]]]:
    """``(align, left, right)`` of the band ``i+s-left <= j <= i+s+right`` a node is, if any."""
    if isinstance(x, ir.Causal):
        return x.align, None, x.offset
    if isinstance(x, ir.SlidingWindow):
        return x.align, x.left, x.right
    return None


def _tighter(a, b):
    return b if a is None else a if b is None else min(a, b)


def _band_nodes(align, left, right) -> tuple[ir.Mask, ...]:
    if left is not None and right is not None and right < -left:
        return (ir.Empty(),)
    if left is None:
        return (ir.Full(),) if right is None else (ir.Causal(offset=right, align=align),)
    if right is None or right >= 0:
        return (ir.SlidingWindow(left=left, right=right, align=align),)
    return (ir.SlidingWindow(left=left, right=None, align=align), ir.Causal(offset=right, align=align))


def _merge_bands(m):  # windows and causal with one alignment intersect into one band
    if not isinstance(m, ir.And):
        return None
    bands = {}
    for x in m.of:
        b = _band(x)
        if b is not None:
            bands.setdefault(b[0], []).append(b)
    if all(len(v) < 2 for v in bands.values()):
        return None
    rest = tuple(x for x in m.of if _band(x) is None)
    merged = []
    for align, group in bands.items():
        left = right = None
        for _, lft, rgt in group:
            left, right = _tighter(left, lft), _tighter(right, rgt)
        merged += _band_nodes(align, left, right)
    result = ir.And(of=rest + tuple(merged))
    return result if result != m else None


def _merge_ranges(m):  # Range ∩ Range is a Range; Range ∩ Prefix clips its keys
    ranges = [x for x in m.of if isinstance(x, ir.Range)]
    prefixes = [x for x in m.of if isinstance(x, ir.Prefix)]
    if len(ranges) + len(prefixes) < 2 or not ranges:
        return None
    q0 = max(r.q[0] for r in ranges)
    q1 = min(r.q[1] for r in ranges)
    k0 = max(r.kv[0] for r in ranges)
    k1 = min([r.kv[1] for r in ranges] + [p.length for p in prefixes])
    merged = ir.Range(q=(q0, max(q0, q1)), kv=(k0, max(k0, k1)))
    rest = tuple(x for x in m.of if not isinstance(x, (ir.Range, ir.Prefix)))
    return ir.And(of=rest + (merged,))


def _merge_prefixes(m):  # Prefix(a) ∩ Prefix(b) == Prefix(min); ∪ == Prefix(max)
    prefixes = [x for x in m.of if isinstance(x, ir.Prefix)]
    if len(prefixes) < 2:
        return None
    pick = min if isinstance(m, ir.And) else max
    rest = tuple(x for x in m.of if not isinstance(x, ir.Prefix))
    return type(m)(of=rest + (ir.Prefix(length=pick(p.length for p in prefixes)),))


def _join_documents(m):  # documents placed back to back with one inner are one Documents
    # every chain at once, found through an index of where documents start: linear in the operands
    docs = [x for x in m.of if isinstance(x, ir.Documents)]
    if len(docs) < 2:
        return None
    free = {}  # (inner, q_start, kv_start) -> the documents starting there not yet joined, last first
    for x in reversed(docs):
        free.setdefault((x.inner, x.q_start, x.kv_start), []).append(x)
    after = {}  # id(a) -> the b joined after a
    taken = set()  # ids of the documents joined after another
    for a in docs:
        end = (a.inner, a.q_start + sum(a.lengths), a.kv_start + sum(a.key_lengths))
        # a chain moves forward in queries or keys, so it never loops; one holding no position
        # (folded to Empty) would not
        if end[1:] != (a.q_start, a.kv_start) and free.get(end):
            b = free[end].pop()
            after[id(a)] = b
            taken.add(id(b))
    if not after:
        return None
    of = []
    for x in m.of:
        if id(x) in taken:
            continue
        if not isinstance(x, ir.Documents):
            of.append(x)
            continue
        chain = [x]
        while id(chain[-1]) in after:
            chain.append(after[id(chain[-1])])
        of.append(x if len(chain) == 1 else x.model_copy(update={
            "lengths": tuple(n for c in chain for n in c.lengths),
            "kv_lengths": None if all(c.kv_lengths is None for c in chain) else tuple(
                n for c in chain for n in c.key_lengths),
        }))
    return ir.Or(of=tuple(of))


def _gather_negations(m):  # And(~a, ~b, x) == And(~Or(a, b), x); Or(~a, ~b, x) == Or(~And(a, b), x)
    negated = [x.of for x in m.of if isinstance(x, ir.Not)]
    if len(negated) < 2:
        return None
    dual = ir.Or if isinstance(m, ir.And) else ir.And
    rest = tuple(x for x in m.of if not isinstance(x, ir.Not))
    return type(m)(of=rest + (ir.Not(of=dual(of=tuple(negated))),))


def _double_negation(m):  # ~~x == x
    return m.of.of if isinstance(m.of, ir.Not) else None


def _negate_constant(m):  # ~Full == Empty, ~Empty == Full
    if isinstance(m.of, ir.Full):
        return ir.Empty()
    if isinstance(m.of, ir.Empty):
        return ir.Full()
    return None


def _empty_range(m):  # a range with no rows or no keys allows nothing
    return ir.Empty() if m.q[0] >= m.q[1] or m.kv[0] >= m.kv[1] else None


def _empty_prefix(m):  # j < 0 never holds
    return ir.Empty() if m.length == 0 else None


def _unbounded_window(m):  # no bound on either side: every key
    return ir.Full() if m.left is None and m.right is None else None


def _empty_documents(m):  # no document, or nothing allowed inside any
    if isinstance(m.inner, ir.Empty) or not any(m.lengths) or not any(m.key_lengths):
        return ir.Empty()
    return None


RULES: list[tuple[type, Rewrite]] = [
    (ir.And, _flatten),
    (ir.Or, _flatten),
    (ir.And, _absorb),
    (ir.Or, _absorb),
    (ir.And, _drop_identity),
    (ir.Or, _drop_identity),
    (ir.And, _dedupe),
    (ir.Or, _dedupe),
    (ir.And, _contradiction),
    (ir.Or, _contradiction),
    (ir.And, _merge_bands),
    (ir.And, _merge_ranges),
    (ir.And, _merge_prefixes),
    (ir.Or, _merge_prefixes),
    (ir.Or, _join_documents),
    (ir.And, _gather_negations),
    (ir.Or, _gather_negations),
    (ir.And, _trivial),
    (ir.Or, _trivial),
    (ir.Not, _double_negation),
    (ir.Not, _negate_constant),
    (ir.Range, _empty_range),
    (ir.Prefix, _empty_prefix),
    (ir.SlidingWindow, _unbounded_window),
    (ir.Documents, _empty_documents),
]


_RULES_OF: dict[type, list[Rewrite]] = {}  # RULES by node type, in order
for _type, _rewrite in RULES:
    _RULES_OF.setdefault(_type, []).append(_rewrite)


def _with_children(m: ir.Mask, memo: dict) -> ir.Mask:
    if isinstance(m, (ir.And, ir.Or)):
        of = tuple(simplify(x, memo) for x in m.of)
        return m if of == m.of else type(m)(of=of)
    if isinstance(m, ir.Not):
        of = simplify(m.of, memo)
        return m if of == m.of else ir.Not(of=of)
    if isinstance(m, ir.Documents):
        inner = simplify(m.inner, memo)
        return m if inner == m.inner else m.model_copy(update={"inner": inner})
    return m


def simplify(mask: ir.Mask, memo: dict | None = None) -> ir.Mask:
    """An equivalent expression with the rewrite ``RULES`` applied to a fixpoint.

    ``memo`` maps every expression met, and every result, to its result: a rewrite
    that keeps most operands (joining two of a hundred) simplifies only the new ones.
    """
    memo = {} if memo is None else memo
    if mask in memo:
        return memo[mask]
    out = _with_children(mask, memo)
    changed = True
    while changed:
        changed = False
        for rewrite in _RULES_OF.get(type(out), ()):
            new = rewrite(out)
            if new is not None:
                out = _with_children(new, memo)
                changed = True
                break
    memo[mask] = memo[out] = out
    return out


def simplify_spec(spec: Spec) -> Spec:
    """``spec`` with every head simplified; identical heads share one expression object."""
    memo: dict = {}
    heads = tuple(simplify(m, memo) for m in spec.heads)
    mask = heads if isinstance(spec.mask, tuple) else heads[0]
    return spec.model_copy(update={"mask": mask})


@dataclass(frozen=True)
class Simplify(Pass):
    name: str = "simplify"
    needs: tuple = ("spec",)
    provides: tuple = ("simplified",)

    def run(self, state):
        return {"simplified": simplify_spec(state["spec"])}
