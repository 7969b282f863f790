"""The mask vocabulary: what may attend to what.

Every node is an immutable, hashable pydantic model with a ``kind`` tag, so a
mask is a small expression tree that compares and hashes by structure (the
passes use that to analyse identical sub-expressions once). ``&``, ``|`` and
``~`` build ``And``, ``Or`` and ``Not``; ``bool(mask)`` raises so that Python's
``and``/``or`` cannot silently pick one operand.

Coordinates: query ``i`` in ``[0, q_len)``, key ``j`` in ``[0, kv_len)`` of the
node's *scope*: the whole spec, or one document inside ``Documents``.

Each node states its rule and draws itself; in the pictures ``#`` is allowed and
``.`` is masked, queries go down and keys go across.

``allowed(i, j, q_len, kv_len)`` is each node's definition executed literally on
broadcast numpy arrays. The compiler never calls it on a whole
``q_len x kv_len`` grid: it is used on single tiles that the interval analysis
could not decide (``Dense``, ``Predicate``) and by ``CompiledMask.dense()``.
"""

from __future__ import annotations

import inspect
import operator
import reprlib
from typing import Annotated, Any, Callable, Literal, Optional, Union

import numpy as np
from annotated_types import Ge, Gt
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    WithJsonSchema,
    model_validator,
)

from ..errors import SpecError, TranslatingMeta

Align = Literal["top_left", "bottom_right"]

#: The most positions a spec may hold, ``q_len + kv_len < MAX_POSITIONS``: the
#: generated kernels index positions and their sums with int32 arithmetic.
MAX_POSITIONS = 1 << 30

#: Numbers of a node (offsets, window bounds, sizes, lengths, range ends) are
#: clamped to ``[-INDEX_LIMIT, INDEX_LIMIT]`` when the node is built: far past
#: any scope, so the meaning is unchanged, and every later int64 sum such as
#: ``i + s + offset`` (in the passes, crops and exports) cannot overflow.
INDEX_LIMIT = 1 << 61


def clamped(value: int) -> int:
    """``value`` clamped to ``[-INDEX_LIMIT, INDEX_LIMIT]`` (see ``INDEX_LIMIT``)."""
    return max(-INDEX_LIMIT, min(INDEX_LIMIT, value))


def integer(value: Any) -> int:
    """The value of an integer field: an ``int`` or an integer of numpy or torch
    (anything with ``__index__``). Booleans are not integers (``length: true`` is
    refused, not read as 1), and neither are strings or floats (``'12'``, ``12.0``)."""
    if not isinstance(value, (bool, np.bool_)):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise ValueError(f"must be an integer, got {reprlib.repr(value)} ({type(value).__name__})")


# (the bounds go inside, on ``int``, so that the JSON Schema states them)
Integer = Annotated[int, BeforeValidator(integer)]
Positive = Annotated[int, Gt(0), BeforeValidator(integer)]
NonNegative = Annotated[int, Ge(0), BeforeValidator(integer)]
Offset = Annotated[Integer, AfterValidator(clamped)]
Size = Annotated[Positive, AfterValidator(clamped)]
Count = Annotated[NonNegative, AfterValidator(clamped)]


#: Largest number of elements a ``Dense`` node (or ``CompiledMask.dense()``)
#: will hold; past it they refuse instead of exhausting memory.
MAX_DENSE_ELEMENTS = 1 << 28


def _kind_is_required(schema: dict) -> None:
    # ``kind`` has a default so that Python code need not write it, but a spec file must
    schema["required"] = ["kind", *[r for r in schema.get("required", []) if r != "kind"]]


class NodeMeta(TranslatingMeta):
    """Metaclass of the nodes: fields given by position are passed on by name, in the
    order of ``_positional_fields``. (Not an ``__init__``: pydantic would then call
    the class for every nested node it validates.)"""

    def __call__(cls, *fields: Any, **named: Any):
        names = _positional_fields(cls)
        if len(fields) > len(names):
            raise TypeError(f"{cls.__name__}() takes at most {len(names)} positional fields "
                            f"({', '.join(names) or 'none'}), got {len(fields)}")
        for name, value in zip(names, fields):
            if name in named:
                raise TypeError(f"{cls.__name__}() got {name!r} both by position and by name")
            named[name] = value
        return super().__call__(**named)


class Mask(BaseModel, metaclass=NodeMeta):
    """Base of every node. Not instantiated directly.

    A node takes its fields by name or by position, in the order of the
    contract's table (``Prefix(4)``, ``SlidingWindow(255, 0)``,
    ``Range((0, 4), (2, 8))``); ``kind`` only by name.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra=_kind_is_required)
    # what a node derives from its fields, computed once: a slot is not a field, so it is
    # neither compared, copied (``model_copy`` starts afresh), dumped nor pickled
    __slots__ = ("_hash",)

    def __hash__(self) -> int:
        # the passes key their tables by expressions; without the cache every lookup rehashes the tree
        try:
            return self._hash
        except AttributeError:
            object.__setattr__(self, "_hash", hash(tuple(self.__dict__.values())))
            return self._hash

    # -- building expressions -------------------------------------------------
    def __and__(self, other: "Mask") -> "And":
        return And(of=(self, _check_operand(other, "&")))

    def __or__(self, other: "Mask") -> "Or":
        return Or(of=(self, _check_operand(other, "|")))

    def __invert__(self) -> "Not":
        return Not(of=self)

    def __bool__(self) -> bool:
        raise TypeError(
            "a mask has no truth value: combine masks with &, | and ~, not and/or/not"
        )

    # -- meaning ---------------------------------------------------------------
    def allowed(self, i, j, q_len, kv_len) -> np.ndarray:
        """``bool`` array of ``allowed(i, j)`` in a scope of ``(q_len, kv_len)``.

        All four arguments broadcast (scope sizes may vary per element, as they
        do inside ``Documents``)."""
        raise NotImplementedError

    def check_scope(self, q_len: int, kv_len: int, path: str, in_document: bool = False) -> None:
        """Raise ``SpecError`` at ``path`` if this node does not fit its scope
        (``in_document``: the scope is one document of a ``Documents``)."""
        for name, child in self.children():
            child.check_scope(q_len, kv_len, f"{path}.{name}", in_document)

    def children(self) -> list[tuple[str, "Mask"]]:
        """``(field path, node)`` of the direct sub-expressions."""
        return []

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{k}={v!r}" for k, v in self.__dict__.items() if k != "kind" and v != type(self).model_fields[k].default
        )
        return f"{type(self).__name__}({fields})"

    __str__ = __repr__


def _check_operand(other: Any, op: str) -> Mask:
    if not isinstance(other, Mask):
        raise TypeError(f"cannot combine a mask with {type(other).__name__} using {op}")
    return other


def _shift(align: Align, q_len, kv_len):
    """The diagonal's shift ``s``: ``kv_len - q_len`` for bottom-right alignment."""
    return np.asarray(kv_len) - np.asarray(q_len) if align == "bottom_right" else 0


class Full(Mask):
    """Every query attends every key: ``allowed(i, j) = true``.

    4x4 ``####/####/####/####``; 2x5 ``#####/#####``.
    """

    kind: Literal["full"] = "full"

    def allowed(self, i, j, q_len, kv_len):
        return np.ones(np.broadcast_shapes(np.shape(i), np.shape(j)), dtype=bool)


class Empty(Mask):
    """Nothing is attended: ``allowed(i, j) = false``.

    4x4 ``..../..../..../....``; 2x5 ``...../.....``.
    """

    kind: Literal["empty"] = "empty"

    def allowed(self, i, j, q_len, kv_len):
        return np.zeros(np.broadcast_shapes(np.shape(i), np.shape(j)), dtype=bool)


class Causal(Mask):
    """``j <= i + offset + s``, ``s = kv_len - q_len`` if ``align="bottom_right"`` else 0.

    4x4, offset 0::

        #...
        ##..
        ###.
        ####

    2x5 (q_len 2, kv_len 5), top_left ``#..../##...``;
    bottom_right ``####./#####`` (the last query sees every key: decoding).
    """

    kind: Literal["causal"] = "causal"
    offset: Offset = 0
    align: Align = "top_left"

    def allowed(self, i, j, q_len, kv_len):
        return np.asarray(j) <= np.asarray(i) + self.offset + _shift(self.align, q_len, kv_len)


class SlidingWindow(Mask):
    """``i + s - left <= j <= i + s + right`` (``None`` is unbounded on that side).

    ``s = kv_len - q_len`` for ``align="bottom_right"``, else 0.

    4x4, left 1, right 0::

        #...
        ##..
        .##.
        ..##

    2x5, left 1, right 0, bottom_right ``..##./...##``.
    """

    kind: Literal["sliding_window"] = "sliding_window"
    left: Optional[Count]
    right: Optional[Count] = 0
    align: Align = "top_left"

    def allowed(self, i, j, q_len, kv_len):
        centre = np.asarray(i) + _shift(self.align, q_len, kv_len)
        j = np.asarray(j)
        ok = np.ones(np.broadcast_shapes(np.shape(centre), j.shape), dtype=bool)
        if self.left is not None:
            ok &= j >= centre - self.left
        if self.right is not None:
            ok &= j <= centre + self.right
        return ok


class Chunked(Mask):
    """``i // size == j // size``: attention inside fixed chunks of the scope.

    4x4, size 2::

        ##..
        ##..
        ..##
        ..##

    2x5, size 2 ``##.../##...``.
    """

    kind: Literal["chunked"] = "chunked"
    size: Size

    def allowed(self, i, j, q_len, kv_len):
        return np.asarray(i) // self.size == np.asarray(j) // self.size


class Prefix(Mask):
    """``j < length``: every query sees the first ``length`` keys (attention sinks,
    the prompt of a prefix LM).

    4x4, length 1 ``#.../#.../#.../#...``; 2x5, length 2 ``##.../##...``.
    """

    kind: Literal["prefix"] = "prefix"
    length: Count

    def allowed(self, i, j, q_len, kv_len):
        return np.broadcast_to(np.asarray(j) < self.length, np.broadcast_shapes(np.shape(i), np.shape(j)))


class Range(Mask):
    """``a <= i < b and c <= j < d`` for ``q=(a, b)``, ``kv=(c, d)`` (half-open).

    At the top of a spec the range must lie inside the scope; inside ``Documents``
    it is read literally in each document's coordinates (so it is clipped by
    smaller documents).

    4x4, q=(1, 3), kv=(0, 2)::

        ....
        ##..
        ##..
        ....

    2x5, q=(0, 1), kv=(3, 5) ``...##/.....``.
    """

    kind: Literal["range"] = "range"
    q: tuple[Count, Count]
    kv: tuple[Count, Count]

    @model_validator(mode="after")
    def _ordered(self):
        for name in ("q", "kv"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}={(lo, hi)} must have start <= end")
        return self

    def allowed(self, i, j, q_len, kv_len):
        i, j = np.asarray(i), np.asarray(j)
        return (self.q[0] <= i) & (i < self.q[1]) & (self.kv[0] <= j) & (j < self.kv[1])

    def check_scope(self, q_len, kv_len, path, in_document=False):
        if in_document:  # read literally in each document, clipped by smaller ones
            return
        if self.q[1] > q_len:
            raise SpecError(f"{path}.q", f"range {self.q} lies outside the {q_len} queries of its scope")
        if self.kv[1] > kv_len:
            raise SpecError(f"{path}.kv", f"range {self.kv} lies outside the {kv_len} keys of its scope")


class Documents(Mask):
    """Packed documents: ``i`` and ``j`` lie in the same document ``n`` and
    ``inner(i - Q_n, j - K_n)`` holds in that document's scope
    ``(lengths[n], kv_lengths[n])``, where ``Q_n``/``K_n`` are the documents'
    starts. Positions past the last document belong to none (padding).

    ``q_start``/``kv_start`` (default 0, an extension of the design's contract)
    place the first document's first query and key; positions before them
    belong to no document. ``maskc.partition`` uses them to express a tile
    that starts inside a packed sequence.

    4x4, lengths [3, 1], inner Causal()::

        #...
        ##..
        ###.
        ...#

    2x5, lengths [1, 1], kv_lengths [3, 2] (one query per document)
    ``###../...##``.
    """

    __slots__ = ("_starts",)

    kind: Literal["documents"] = "documents"
    lengths: tuple[NonNegative, ...]
    kv_lengths: Optional[tuple[NonNegative, ...]] = None
    inner: "MaskNode" = Field(default_factory=Full)
    q_start: NonNegative = 0
    kv_start: NonNegative = 0

    @model_validator(mode="after")
    def _same_count(self):
        if self.kv_lengths is not None and len(self.kv_lengths) != len(self.lengths):
            raise ValueError(
                f"kv_lengths has {len(self.kv_lengths)} entries but lengths has {len(self.lengths)}"
            )
        return self

    @property
    def key_lengths(self) -> tuple[int, ...]:
        return self.lengths if self.kv_lengths is None else self.kv_lengths

    def starts(self) -> tuple[np.ndarray, np.ndarray]:
        """Query and key start of every document (``int64[n_docs + 1]``, last = end; read-only,
        computed once)."""
        try:
            return self._starts
        except AttributeError:
            q = np.full(len(self.lengths) + 1, self.q_start, dtype=np.int64)
            k = np.full(len(self.lengths) + 1, self.kv_start, dtype=np.int64)
            q[1:] += np.cumsum(self.lengths, dtype=np.int64)
            k[1:] += np.cumsum(self.key_lengths, dtype=np.int64)
            q.flags.writeable = k.flags.writeable = False
            object.__setattr__(self, "_starts", (q, k))
            return self._starts

    def children(self):
        return [("inner", self.inner)]

    def check_scope(self, q_len, kv_len, path, in_document=False):
        q_end, kv_end = self.q_start + sum(self.lengths), self.kv_start + sum(self.key_lengths)
        if q_end > q_len:
            raise SpecError(f"{path}.lengths", f"documents end at query {q_end}, past the scope's {q_len}")
        if kv_end > kv_len:
            field = "lengths" if self.kv_lengths is None else "kv_lengths"
            raise SpecError(f"{path}.{field}", f"documents end at key {kv_end}, past the scope's {kv_len}")
        for lq, lk in sorted(set(zip(self.lengths, self.key_lengths))):
            self.inner.check_scope(lq, lk, f"{path}.inner", True)

    def document_of(self, i, j) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Document of each query and key (-1 for padding), and their starts."""
        q_start, k_start = self.starts()
        doc_i = np.searchsorted(q_start, i, side="right") - 1
        doc_j = np.searchsorted(k_start, j, side="right") - 1
        n = len(self.lengths)
        doc_i = np.where((doc_i >= 0) & (doc_i < n), doc_i, -1)
        doc_j = np.where((doc_j >= 0) & (doc_j < n), doc_j, -1)
        return doc_i, doc_j, q_start, k_start

    def allowed(self, i, j, q_len, kv_len):
        i, j = np.asarray(i), np.asarray(j)
        doc_i, doc_j, q_start, k_start = self.document_of(i, j)
        same = (doc_i == doc_j) & (doc_i >= 0)
        n = np.maximum(doc_i, 0)
        lq = np.asarray(self.lengths + (0,), dtype=np.int64)[n]
        lk = np.asarray(self.key_lengths + (0,), dtype=np.int64)[n]
        inner = self.inner.allowed(i - q_start[n], j - k_start[np.maximum(doc_j, 0)], lq, lk)
        return same & inner


def _to_bool_matrix(value: Any) -> "BoolMatrix":
    if isinstance(value, BoolMatrix):
        return value
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.ndim != 2:
        raise ValueError(f"values must be a 2-D [q_len, kv_len] array, got shape {array.shape}")
    if array.size > MAX_DENSE_ELEMENTS:
        raise ValueError(
            f"values has {array.size} elements, more than MAX_DENSE_ELEMENTS={MAX_DENSE_ELEMENTS}; "
            "describe the mask with structured nodes instead"
        )
    if array.dtype != bool:
        if not np.isin(array, (0, 1)).all():
            raise ValueError("values must be booleans (or 0/1)")
        array = array.astype(bool)
    return BoolMatrix(array)


class BoolMatrix:
    """An immutable, hashable boolean matrix (the payload of ``Dense``)."""

    __slots__ = ("array", "_hash")

    def __init__(self, array: np.ndarray):
        self.array = np.ascontiguousarray(array, dtype=bool)
        self.array.flags.writeable = False
        self._hash = hash((self.array.shape, np.packbits(self.array).tobytes()))

    @property
    def shape(self) -> tuple[int, int]:
        return self.array.shape

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return isinstance(other, BoolMatrix) and self.shape == other.shape and np.array_equal(self.array, other.array)

    def __repr__(self):
        return f"BoolMatrix(shape={self.shape})"


DenseValues = Annotated[
    BoolMatrix,
    PlainValidator(_to_bool_matrix),
    PlainSerializer(lambda m: m.array.astype(int).tolist(), return_type=list),
    WithJsonSchema({"type": "array", "items": {"type": "array", "items": {"type": ["boolean", "integer"]}}}),
]


class Dense(Mask):
    """``values[i, j]``: an explicit boolean ``[q_len, kv_len]`` array of the scope.

    The escape hatch for masks with no structure. The compiler evaluates it
    only on tiles that the rest of the expression leaves undecided.

    4x4 of ``[[1,0,0,1],[0,1,0,0],[0,0,1,0],[1,0,0,1]]``::

        #..#
        .#..
        ..#.
        #..#
    """

    kind: Literal["dense"] = "dense"
    values: DenseValues

    def allowed(self, i, j, q_len, kv_len):
        # Inside Documents, positions of other documents reach here with
        # coordinates outside this scope; they are masked by the caller.
        i, j = np.asarray(i), np.asarray(j)
        rows, cols = self.values.shape
        inside = (i >= 0) & (i < rows) & (j >= 0) & (j < cols)
        return inside & self.values.array[np.clip(i, 0, rows - 1), np.clip(j, 0, cols - 1)]

    def check_scope(self, q_len, kv_len, path, in_document=False):
        if self.values.shape != (q_len, kv_len):
            raise SpecError(
                f"{path}.values", f"has shape {self.values.shape} but its scope is {(q_len, kv_len)}"
            )


def _reject_serialising(_fn):
    raise ValueError("a Predicate holds a Python callable and cannot be written to YAML or JSON")


class Predicate(Mask):
    """``fn(i, j)`` for a Python callable on broadcast ``int64`` torch tensors
    that returns booleans (an integer result such as ``i - j`` is refused, not
    read as truthy).

    Python only, never serialised. The compiler calls it a tile at a time, on
    tiles that the rest of the expression leaves undecided, with the scope's
    local coordinates.

    4x4 of ``lambda i, j: (i + j) % 2 == 0``::

        #.#.
        .#.#
        #.#.
        .#.#
    """

    kind: Literal["predicate"] = "predicate"
    fn: Annotated[
        Callable[..., Any],
        PlainSerializer(_reject_serialising),
        WithJsonSchema({"description": "Python only; not serialisable"}),
    ]

    def allowed(self, i, j, q_len, kv_len):
        import torch

        i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
        out = self.fn(torch.from_numpy(i), torch.from_numpy(j))
        values = out.numpy() if hasattr(out, "numpy") else np.asarray(out)
        if values.dtype != bool:
            raise TypeError(f"a Predicate's fn must return booleans, got dtype {getattr(out, 'dtype', values.dtype)}: "
                            "compare instead (i - j >= 0, not i - j)")
        return np.broadcast_to(values, np.broadcast_shapes(i.shape, j.shape))


class And(Mask):
    """Every operand allows ``(i, j)``. ``And(of=[])`` is ``Full()``. Written ``a & b``."""

    kind: Literal["and"] = "and"
    of: tuple["MaskNode", ...]

    def children(self):
        return [(f"of[{n}]", x) for n, x in enumerate(self.of)]

    def allowed(self, i, j, q_len, kv_len):
        out = Full().allowed(i, j, q_len, kv_len)
        for x in self.of:
            out = out & x.allowed(i, j, q_len, kv_len)
        return out


class Or(Mask):
    """Some operand allows ``(i, j)``. ``Or(of=[])`` is ``Empty()``. Written ``a | b``."""

    kind: Literal["or"] = "or"
    of: tuple["MaskNode", ...]

    def children(self):
        return [(f"of[{n}]", x) for n, x in enumerate(self.of)]

    def allowed(self, i, j, q_len, kv_len):
        out = Empty().allowed(i, j, q_len, kv_len)
        for x in self.of:
            out = out | x.allowed(i, j, q_len, kv_len)
        return out


class Not(Mask):
    """The operand does not allow ``(i, j)``. Written ``~a``."""

    kind: Literal["not"] = "not"
    of: "MaskNode"

    def children(self):
        return [("of", self.of)]

    def allowed(self, i, j, q_len, kv_len):
        return ~self.of.allowed(i, j, q_len, kv_len)


MaskNode = Annotated[
    Union[Full, Empty, Causal, SlidingWindow, Chunked, Prefix, Range, Documents, Dense, Predicate, And, Or, Not],
    Field(discriminator="kind"),
]

NODE_TYPES: tuple[type[Mask], ...] = (
    Full, Empty, Causal, SlidingWindow, Chunked, Prefix, Range, Documents, Dense, Predicate, And, Or, Not,
)
#: ``kind`` tag -> node class.
NODE_KINDS: dict[str, type[Mask]] = {t.model_fields["kind"].default: t for t in NODE_TYPES}


def _positional_fields(node: type[Mask]) -> tuple[str, ...]:
    """The fields a node takes by position, in order: all but ``kind``."""
    return tuple(name for name in node.model_fields if name != "kind")


def _init_signature(node: type[Mask]) -> inspect.Signature:
    """``node``'s signature as ``NodeMeta`` reads it: fields by position or name, ``kind`` by name."""
    fields = inspect.signature(node).parameters
    return inspect.Signature(
        [fields[name].replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in _positional_fields(node)]
        + [fields["kind"].replace(kind=inspect.Parameter.KEYWORD_ONLY)]
    )


for _node in NODE_TYPES:
    _node.model_rebuild()
    _node.__signature__ = _init_signature(_node)


def walk(mask: Mask):
    """Every node of the expression, parents before children."""
    yield mask
    for _, child in mask.children():
        yield from walk(child)


def is_opaque(mask: Mask) -> bool:
    """True for nodes the interval analysis cannot see through (``Dense``, ``Predicate``)."""
    return isinstance(mask, (Dense, Predicate))
