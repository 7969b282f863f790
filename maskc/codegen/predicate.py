"""IR -> Triton source of the mask predicate that the kernels run on PARTIAL tiles.

One ``@triton.jit`` function is generated per compiled mask, from its
simplified per-slot expressions (``CompiledMask.slot_masks``)::

    def partial_mask(i, j, q_len, kv_len, args, data, patterns, pattern, BQ, BK) -> bool tensor

``i`` (query positions) and ``j`` (key positions) are int32 tensors that
broadcast against each other: ``[BLOCK_M, 1]`` and ``[1, BLOCK_N]`` in the
forward and dQ kernels, ``[1, BLOCK_M]`` and ``[BLOCK_N, 1]`` in the dK/dV
kernel, so the result has the orientation of the caller's score tile. It is
false outside ``[0, q_len) x [0, kv_len)``.

The source depends on the mask's *structure* only. Every number (offsets,
window sizes, chunk sizes, ranges, where a table starts) is read from ``args``
(this slot's row of an ``int32[S, A]`` tensor) and per-token data (document
ids and local positions) from ``data`` (flat ``int32``). Two masks that differ
only in their numbers, say documents of new lengths at every training step,
generate the same text and therefore share compiled kernels.

Slots holding ``Dense``/``Predicate`` nodes have no generated arithmetic: their
PARTIAL tiles read the precomputed bit tile ``patterns[pattern]`` (``pattern``
is -1 for a FULL tile cut short by the end of the sequence, see
``block_lists.py``). When a mask's slots (per-head masks) have several
structures, the function dispatches on ``args[0]``, the slot's structure index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..ir import nodes as ir
from ..ir.nodes import MAX_POSITIONS

#: Slots with bit patterns: pattern -1 is a FULL tile that the end of the sequence cuts
#: short (``block_lists.py``), where only the bounds decide.
PATTERN_BODY = (
    "in_range = (i < q_len) & (j < kv_len)",
    "bits = tl.load(patterns + pattern.to(tl.int64) * (BQ * BK) + (i % BQ) * BK + (j % BK),"
    " mask=tl.where(pattern >= 0, in_range, False), other=1)",
    "allowed = (bits != 0) & in_range",
)


def _once(make: Callable):
    """``make()`` on the first call, its result afterwards: code is emitted only where used."""
    cache = []

    def get():
        if not cache:
            cache.append(make())
        return cache[0]

    return get


@dataclass(eq=False)
class Scope:
    """Where a node is evaluated: its coordinates ``i()``, ``j()`` and sizes ``sizes()``
    (variable names, emitted on first use) and the largest ``(q_len, kv_len)`` it takes."""

    i: Callable[[], str]
    j: Callable[[], str]
    sizes: Callable[[], tuple[str, str]]
    extent: tuple[int, int]


@dataclass
class _Emitter:
    """Writes one slot's body: code lines, the numbers they read, the data they index."""

    limit: int  # numbers are clamped to [-limit, limit]: the same meaning on the scope, no int32 overflow
    data_base: int  # where this slot's data starts in the flat ``data`` tensor
    lines: list[str] = field(default_factory=list)
    numbers: list[int] = field(default_factory=list)
    data: list[np.ndarray] = field(default_factory=list)
    memo: dict = field(default_factory=dict)

    def var(self, expr: str) -> str:
        name = f"v{len(self.lines)}"
        self.lines.append(f"{name} = {expr}")
        return name

    def number(self, value: int) -> str:
        """A mask parameter, read from ``args``; clamping keeps its meaning on the scope."""
        return self._arg(int(np.clip(value, -self.limit, self.limit)))

    def table(self, values: np.ndarray) -> str:
        """A per-token int32 table in ``data``; returns the variable holding its offset."""
        offset = self.data_base + sum(len(d) for d in self.data)
        self.data.append(np.asarray(values, dtype=np.int32))
        return self._arg(offset)

    def _arg(self, value: int) -> str:
        self.numbers.append(value)
        return self.var(f"tl.load(args + {len(self.numbers)})")  # args[0] is the structure index

    def gather(self, values: np.ndarray, at: str, missing: int) -> str:
        """``values[at]`` for an index tensor ``at`` (``missing`` outside the table)."""
        start = self.table(values)
        inside = f"({at} >= 0) & ({at} < {self._arg(len(values))})"
        return self.var(f"tl.load(data + {start} + {at}, mask={inside}, other={missing})")

    def emit(self, mask: ir.Mask, scope: Scope) -> str:
        """Variable name (or ``"True"``/``"False"``) of ``mask`` evaluated on ``scope``."""
        key = (mask, scope)
        if key not in self.memo:
            rule = _RULES.get(type(mask))
            if rule is None:
                raise TypeError(f"no Triton code for {type(mask).__name__}; opaque slots use bit patterns")
            self.memo[key] = rule(self, mask, scope)
        return self.memo[key]


def _diagonal(em: _Emitter, align: str, scope: Scope, offset: int | None) -> str:
    """``i + s + offset`` with ``s`` the scope's ``kv_len - q_len`` for bottom-right alignment."""
    terms = [scope.i()]
    if offset is not None:
        terms.append(em.number(offset))
    if align == "bottom_right":
        q_len, kv_len = scope.sizes()
        terms.append(f"({kv_len} - {q_len})")
    return " + ".join(terms)


def _causal(em, m: ir.Causal, scope):
    return em.var(f"{scope.j()} <= {_diagonal(em, m.align, scope, m.offset)}")


def _window(em, m: ir.SlidingWindow, scope):
    centre = em.var(_diagonal(em, m.align, scope, None))
    terms = []
    if m.left is not None:
        terms.append(f"({scope.j()} >= {centre} - {em.number(m.left)})")
    if m.right is not None:
        terms.append(f"({scope.j()} <= {centre} + {em.number(m.right)})")
    return em.var(" & ".join(terms))


def _chunked(em, m: ir.Chunked, scope):
    size = em.number(m.size)
    return em.var(f"({scope.i()} // {size}) == ({scope.j()} // {size})")


def _prefix(em, m: ir.Prefix, scope):
    return em.var(f"{scope.j()} < {em.number(m.length)}")


def _range(em, m: ir.Range, scope):
    a, b, c, d = (em.number(x) for x in (*m.q, *m.kv))
    return em.var(f"({scope.i()} >= {a}) & ({scope.i()} < {b}) & ({scope.j()} >= {c}) & ({scope.j()} < {d})")


def _documents(em, m: ir.Documents, scope):
    """Same document (per-token ids) and ``inner`` in that document's local coordinates."""
    q_start, k_start = m.starts()
    n_q, n_k = scope.extent
    doc_of_q = np.searchsorted(q_start, np.arange(n_q), side="right") - 1
    doc_of_k = np.searchsorted(k_start, np.arange(n_k), side="right") - 1
    last = len(m.lengths) - 1
    q_doc, k_doc = np.clip(doc_of_q, 0, last), np.clip(doc_of_k, 0, last)
    lengths = np.asarray(m.lengths, dtype=np.int64)[q_doc]
    key_lengths = np.asarray(m.key_lengths, dtype=np.int64)[q_doc]
    inner = Scope(
        i=_once(lambda: em.gather(np.arange(n_q) - q_start[q_doc], scope.i(), 0)),
        j=_once(lambda: em.gather(np.arange(n_k) - k_start[k_doc], scope.j(), 0)),
        # the row's document scope, read only where the inner node needs it
        sizes=_once(lambda: (em.gather(lengths, scope.i(), 0), em.gather(key_lengths, scope.i(), 0))),
        extent=(max(m.lengths), max(m.key_lengths)),
    )
    inner_allowed = em.emit(m.inner, inner)
    if inner_allowed == "False":
        return "False"
    # positions in no document (before q_start/kv_start, or past the last one) are -1 on
    # the query side and -2 on the key side, so they never match
    q_id = em.gather(np.where((doc_of_q >= 0) & (doc_of_q <= last), doc_of_q, -1), scope.i(), -1)
    k_id = em.gather(np.where((doc_of_k >= 0) & (doc_of_k <= last), doc_of_k, -2), scope.j(), -2)
    return _and(em, [em.var(f"{q_id} == {k_id}"), inner_allowed])


def _and(em, parts: list[str]) -> str:
    if "False" in parts:
        return "False"
    parts = [p for p in parts if p != "True"]
    if len(parts) < 2:
        return parts[0] if parts else "True"
    return em.var(" & ".join(f"({p})" for p in parts))


def _or(em, parts: list[str]) -> str:
    if "True" in parts:
        return "True"
    parts = [p for p in parts if p != "False"]
    if len(parts) < 2:
        return parts[0] if parts else "False"
    return em.var(" | ".join(f"({p})" for p in parts))


def _not(em, m: ir.Not, scope):
    inner = em.emit(m.of, scope)
    return {"True": "False", "False": "True"}.get(inner) or em.var(f"~{inner}")


_RULES = {
    ir.Full: lambda em, m, scope: "True",
    ir.Empty: lambda em, m, scope: "False",
    ir.Causal: _causal,
    ir.SlidingWindow: _window,
    ir.Chunked: _chunked,
    ir.Prefix: _prefix,
    ir.Range: _range,
    ir.Documents: _documents,
    ir.And: lambda em, m, scope: _and(em, [em.emit(x, scope) for x in m.of]),
    ir.Or: lambda em, m, scope: _or(em, [em.emit(x, scope) for x in m.of]),
    ir.Not: _not,
}


@dataclass(frozen=True)
class SlotCode:
    """One slot's generated body and the numbers and data it reads."""

    body: tuple[str, ...]
    numbers: tuple[int, ...]
    data: tuple[np.ndarray, ...]


def slot_code(mask: ir.Mask, q_len: int, kv_len: int, data_base: int) -> SlotCode:
    """The body computing ``allowed`` for one structured slot (no ``Dense``/``Predicate``)."""
    em = _Emitter(limit=q_len + kv_len + 1, data_base=data_base)
    scope = Scope(lambda: "i", lambda: "j", lambda: ("q_len", "kv_len"), (q_len, kv_len))
    result = em.emit(mask, scope)
    in_range = "(i < q_len) & (j < kv_len)"
    if result == "True":
        final = in_range
    elif result == "False":
        final = "(i < 0) & (j < 0)"
    else:
        final = f"{result} & {in_range}"
    return SlotCode(tuple(em.lines) + (f"allowed = {final}",), tuple(em.numbers), tuple(em.data))


@dataclass(frozen=True)
class MaskCode:
    """The generated predicate of a compiled mask and its runtime operands.

    ``source``: the Triton function text (depends on structure only);
    ``args: int32[S, A]``: per slot, its structure index then its numbers;
    ``data: int32[N]``: every slot's per-token tables, concatenated.
    """

    source: str
    args: np.ndarray
    data: np.ndarray


FUNCTION_NAME = "partial_mask"
_HEADER = f'''@triton.jit
def {FUNCTION_NAME}(i, j, q_len, kv_len, args, data, patterns, pattern, BQ: tl.constexpr, BK: tl.constexpr):
    """Allowed (i, j) on a PARTIAL tile; i, j broadcast int32 positions (generated by maskc)."""'''


def mask_code(cm) -> MaskCode:
    """Generate the predicate of ``cm`` and gather its numbers and data per slot."""
    total = cm.q_len + cm.kv_len
    if total >= MAX_POSITIONS:
        raise ValueError(f"q_len + kv_len = {total} must be < {MAX_POSITIONS} for the Triton kernels")
    bodies: dict[tuple[str, ...], int] = {}
    per_slot: list[tuple[int, SlotCode]] = []
    data_base = 0
    for mask, block_map in zip(cm.slot_masks, cm.block_maps):
        if block_map.patterns is not None:
            code = SlotCode(PATTERN_BODY, (), ())
        else:
            code = slot_code(mask, cm.q_len, cm.kv_len, data_base)
        data_base += sum(len(d) for d in code.data)
        per_slot.append((bodies.setdefault(code.body, len(bodies)), code))

    width = 1 + max(len(code.numbers) for _, code in per_slot)
    args = np.zeros((len(per_slot), width), dtype=np.int32)
    for slot, (structure, code) in enumerate(per_slot):
        args[slot, 0] = structure
        args[slot, 1:1 + len(code.numbers)] = code.numbers
    chunks = [d for _, code in per_slot for d in code.data]
    if data_base >= 1 << 31:
        raise ValueError(f"the mask's per-token tables hold {data_base} entries, more than int32 indexing allows")
    data = np.concatenate(chunks).astype(np.int32) if chunks else np.zeros(1, dtype=np.int32)

    lines = [_HEADER]
    if len(bodies) == 1:
        lines += [f"    {line}" for line in next(iter(bodies))]
    else:
        lines.append("    structure = tl.load(args)")
        for n, body in enumerate(bodies):
            keyword = "if" if n == 0 else "elif" if n < len(bodies) - 1 else "else"
            lines.append(f"    {keyword} structure == {n}:" if keyword != "else" else "    else:")
            lines += [f"        {line}" for line in body]
    lines.append("    return allowed")
    return MaskCode("\n".join(lines) + "\n", args, data)
