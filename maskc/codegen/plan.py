"""The launch plan of a compiled mask on one device: one packed table and its structure.

Everything the kernels read about a mask lives in **one** ``int32`` tensor,
``tables``, and its bit patterns in one ``uint8`` tensor, ``patterns``; what
selects and specialises the kernels lives in ``Structure``, a small frozen
record of constants. The split is what lets the op run unchanged under
``torch.compile`` and CUDA graphs while the mask changes at every step:

* the two tensors are ordinary inputs of the op (``maskc::attention``): a
  compiled graph takes them like ``q``, ``k``, ``v``, and a CUDA graph copies
  a new mask's tables into its static inputs;
* the structure is a string argument of the op, a constant of the graph.
  Two masks of one structure (documents of new lengths, a window of another
  size) give equal strings, so they share graphs and compiled kernels;
* the tensors' lengths are rounded up to a power of two, so that masks of one
  structure mostly share one length, and a graph specialised on it (or made
  dynamic after the first change) takes the next mask without recompiling.

``tables`` layout (``pack``): a header (the number of sections, then per
section where it starts and its shape), then each section, every one starting
on a 16-entry boundary (aligned vector loads). ``S`` is the number of slots
(distinct head masks), ``nQ``/``nK`` the table blocks::

    HEAD_SLOT      int32[H_mask]      head -> slot
    Q_ORDER        int32[S, nQ]       query blocks in launch order (module
                                      ``kernels``: heaviest first, or sequence
                                      order for short rows), every block once
    KV_ORDER       int32[nK]          key blocks in launch order, every block once
    FWD_*, BWD_*   block lists        ``block_lists.py``: FULL_PTR, FULL_IDX,
                                      PART_PTR, PART_IDX, PART_PATTERN
    MASK_ARGS      int32[S, A]        the generated predicate's numbers
    MASK_DATA      int32[N]           its per-token tables
    ROW_LO/ROW_HI  int32[S, q_len]    spans (``spans.py``), where the mask has them
    COL_LO/COL_HI  int32[S, kv_len]
    DECODE_*       the decode kernel's work list (``decode_work.py``), where
                   ``structure.decode``; else empty
    then, per ``structure.trims`` entry ``(direction, program, step)``, the
    trimmed PARTIAL steps ``int32[S, programs, 2]`` (``spans.partial_steps``)

Every query block and key block has a program, those with no tile too: their
lists are empty, so they write out 0, LSE ``-inf`` and zero gradients, and no
output needs filling before a launch. A mask that allows nothing launches
nothing (``Structure.empty``).

The decode path. Masks of few query rows with long reach (decoding, chunked
prefill) run their forward through the decode kernel (``decode.py``) where
``decode_work.decode_work`` finds them fit: one head-shared exact mask, query
blocks of several row groups, and programs that read at most
``tuning.DECODE_READS_FACTOR`` times the key blocks the main forward reads
(counted as if every query head had its own KV head; with GQA decode reads
each block once per KV head). The backward runs the main kernels, whose
sections every plan holds. The decode grids are sized by
``decode_items``/``decode_groups``, the work list's counts rounded up
(``rounded_up``), so that masks of one structure mostly share them; programs
past the real counts return at once.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import asdict, dataclass
from functools import cached_property, lru_cache

import numpy as np
import torch

from . import tuning
from .block_lists import BlockLists, expand, merged
from .decode_work import decode_work
from .predicate import mask_code
from .spans import partial_steps, spans

#: PARTIAL tiles of masks that qualify (``spans.py``) test spans loaded once per program; False
#: makes every mask run its generated predicate (the tests and bench/gpu_bench.py run both).
USE_SPANS = True

#: Masks with spans and short rows walk one list per program, FULL and PARTIAL tiles together,
#: and test a step only where the program's spans do not cover it (``block_lists.merged``): one
#: pipeline start a program instead of two. False: two loops, as for every other mask (long rows
#: keep them: one loop spilled more registers in the backward, bench/RESULTS.md).
ONE_LOOP = True


class Section(enum.IntEnum):
    """The sections of ``tables``, in order (``pack``)."""

    HEAD_SLOT = 0
    Q_ORDER = 1
    KV_ORDER = 2
    FWD_FULL_PTR = 3
    FWD_FULL_IDX = 4
    FWD_PART_PTR = 5
    FWD_PART_IDX = 6
    FWD_PART_PATTERN = 7
    BWD_FULL_PTR = 8
    BWD_FULL_IDX = 9
    BWD_PART_PTR = 10
    BWD_PART_IDX = 11
    BWD_PART_PATTERN = 12
    MASK_ARGS = 13
    MASK_DATA = 14
    ROW_LO = 15
    ROW_HI = 16
    COL_LO = 17
    COL_HI = 18
    DECODE_COUNTS = 19
    DECODE_GROUP_ROWS = 20
    DECODE_GROUP_ITEMS = 21
    DECODE_ITEMS = 22
    DECODE_BLOCKS = 23
    DECODE_SPANS = 24
    DECODE_ORDER = 25


#: the first trimmed-steps section; section ``TRIMMED + n`` is ``structure.trims[n]``
TRIMMED = len(Section)
_ALIGN = 16  # entries: each section starts on a 64-byte boundary
_MIN_CAPACITY = 1024


@dataclass(frozen=True)
class Structure:
    """What selects and specialises the kernels of a plan: equal for masks that differ only in
    their numbers (document lengths, window sizes), so that they share compiled kernels and
    compiled graphs. ``key`` is its text, the op's ``structure`` argument."""

    q_len: int
    kv_len: int
    block_q: int
    block_kv: int
    n_mask_heads: int  # entries of HEAD_SLOT: 1, or one per query head
    n_slots: int  # S: distinct head masks
    args_width: int  # A: numbers per slot of MASK_ARGS
    source: str  # digest of the generated predicate's text (``predicate_source`` has the text)
    spans: bool  # PARTIAL tiles test spans instead of calling the predicate
    one_loop: bool  # spans and short rows: FULL and PARTIAL tiles in one list (ONE_LOOP)
    cut: bool  # the end of a sequence cuts a table block short: PARTIAL tiles check bounds
    short_rows: bool  # query blocks hold fewer than tuning.SHORT_ROWS tiles on average
    empty: bool  # no allowed pair: nothing to launch
    trims: tuple  # ((direction, program, step), ...): the trimmed steps sections, in order
    decode: bool  # the forward runs the decode kernel (decode.py) over the DECODE_* sections
    decode_rows: int  # decode: rows of a group's spans (a power of two); else 0
    decode_items: int  # decode: programs a KV head, at least the work list's items; else 0
    decode_groups: int  # decode: merge programs a KV head, at least its row groups; else 0

    @property
    def n_q_blocks(self) -> int:
        return -(-self.q_len // self.block_q)

    @property
    def n_kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_kv)

    @cached_property
    def key(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    def trim(self, direction: str, program: int, step: int) -> int:
        """The section of the trimmed steps for programs of ``program`` positions stepping
        ``step`` at a time, or -1 where the plan has none (the kernels then walk every step)."""
        key = (direction, program, step)
        return TRIMMED + self.trims.index(key) if key in self.trims else -1


@lru_cache(maxsize=None)
def structure_of(key: str) -> Structure:
    """The ``Structure`` whose ``key`` is ``key`` (the op receives the text)."""
    fields = json.loads(key)
    fields["trims"] = tuple(tuple(t) for t in fields["trims"])
    return Structure(**fields)


_sources: dict[str, str] = {}


def predicate_source(digest: str) -> str:
    """The generated predicate text whose digest a ``Structure`` names."""
    try:
        return _sources[digest]
    except KeyError:
        raise RuntimeError(f"maskc: no generated predicate {digest} in this process; compile the mask "
                           "(maskc.compile) in the process that runs it") from None


@dataclass(frozen=True, eq=False)
class Plan:
    """What the launches of one compiled mask on one device read (layout: module docstring)."""

    tables: torch.Tensor  # int32[capacity]
    patterns: torch.Tensor  # uint8[capacity]: the bit patterns [P, BQ, BK], flattened
    structure: Structure
    key: str  # structure.key, a plain attribute for torch.compile to read

    def section(self, section: int) -> np.ndarray:
        """A section of ``tables`` in its shape (inspection and tests; copies to the host)."""
        return unpack(self.tables.cpu().numpy())[section]

    def orders(self) -> tuple[np.ndarray, np.ndarray]:
        """The launch orders ``int32[S, nQ]`` of query blocks and ``int32[nK]`` of key blocks."""
        return self.section(Section.Q_ORDER), self.section(Section.KV_ORDER)

    def block_lists(self, direction: str) -> BlockLists:
        """One direction's block lists (``"forward"`` or ``"backward"``), read back from the tables."""
        first = Section.FWD_FULL_PTR if direction == "forward" else Section.BWD_FULL_PTR
        return BlockLists(*(torch.from_numpy(self.section(first + n)) for n in range(5)))

    def trimmed(self, direction: str, program: int, step: int) -> np.ndarray:
        """``int32[S, programs, 2]``: the trimmed PARTIAL steps of programs of ``program`` positions
        stepping ``step`` at a time (``spans.partial_steps``)."""
        return self.section(self.structure.trim(direction, program, step))


def capacity(n: int) -> int:
    """``n`` rounded up to a power of two (at least ``_MIN_CAPACITY``): the length of a packed
    buffer, so that masks of one structure mostly share it."""
    return max(_MIN_CAPACITY, 1 << (n - 1).bit_length())


_ENTRY = 4  # header entries per section: where it starts and up to three dimensions (-1: none)


def pack(sections: list[np.ndarray], dtype) -> np.ndarray:
    """``sections`` in one buffer of ``dtype``: the header (their count, then per section its
    start and shape), then each section, aligned; its length a power of two (``capacity``).
    ``tables[1 + 4 * n]`` is where section ``n`` starts (the kernels read that alone)."""
    starts, at = [], -(-(1 + _ENTRY * len(sections)) // _ALIGN) * _ALIGN
    for s in sections:
        starts.append(at)
        at += -(-max(s.size, 1) // _ALIGN) * _ALIGN
    if at >= 1 << 31:
        raise ValueError(f"the mask's launch tables hold {at} entries, more than int32 offsets allow")
    packed = np.zeros(capacity(at), dtype=dtype)
    packed[0] = len(sections)
    for n, (start, s) in enumerate(zip(starts, sections)):
        if s.ndim > _ENTRY - 1:
            raise ValueError(f"section {n} has {s.ndim} dimensions; a packed section has at most {_ENTRY - 1}")
        packed[1 + _ENTRY * n: 1 + _ENTRY * (n + 1)] = [start, *s.shape, *[-1] * (_ENTRY - 1 - s.ndim)]
        packed[start: start + s.size] = s.ravel()
    return packed


def unpack(packed: np.ndarray) -> list[np.ndarray]:
    """The sections of a ``pack``ed buffer (views), in their shapes."""
    out = []
    for n in range(int(packed[0])):
        start, *dims = packed[1 + _ENTRY * n: 1 + _ENTRY * (n + 1)].tolist()
        shape = tuple(d for d in dims if d >= 0)
        out.append(packed[start: start + int(np.prod(shape, dtype=np.int64))].reshape(shape))
    return out


def _orders(table, short_rows: bool) -> tuple[np.ndarray, np.ndarray]:
    """Launch orders of query blocks (per slot) and key blocks; blocks with work first."""
    fwd_work = table.forward.work.numpy()
    kv_work = table.backward.work.numpy().sum(axis=0)
    if short_rows:  # in sequence order, blocks with work first (bench/RESULTS.md: window 376 against 343 TFLOP/s)
        q_order = np.argsort(fwd_work == 0, axis=1, kind="stable")
        kv_order = np.argsort(kv_work == 0, kind="stable")
    else:  # heaviest first
        q_order = table.forward.order.numpy()
        kv_order = np.argsort(-kv_work, kind="stable")
    return q_order, kv_order


def rounded_up(n: int) -> int:
    """``n`` rounded up to four significant bits (at most 1/8 more): a grid size that masks of one
    structure mostly share."""
    step = 1 << max(n.bit_length() - 4, 0)
    return -(-n // step) * step


def build_plan(cm, device: torch.device) -> Plan:
    """The plan of ``cm`` on ``device``: numpy on the host, then one copy per tensor."""
    code = mask_code(cm)
    digest = hashlib.sha1(code.source.encode()).hexdigest()[:16]
    _sources[digest] = code.source
    table = cm.table
    bq, bk = cm.block_size
    fwd_work = table.forward.work.numpy()
    n_active = int((fwd_work > 0).sum())
    short_rows = bool(fwd_work.sum() < tuning.SHORT_ROWS * max(n_active, 1))
    found = spans(cm) if USE_SPANS else None
    one_loop = found is not None and short_rows and ONE_LOOP

    def ragged(length: int, block: int) -> int:
        return length // block if length % block else -1

    def lists(direction, ragged_entry: int) -> BlockLists:
        found_lists = expand(direction, ragged_entry)
        return merged(found_lists) if one_loop else found_lists

    forward = lists(table.forward, ragged(cm.kv_len, bk))
    backward = lists(table.backward, ragged(cm.q_len, bq))
    q_order, kv_order = _orders(table, short_rows)
    no_spans = np.zeros(0, dtype=np.int32)
    work = None if n_active == 0 else decode_work(cm, tuning.DECODE_READS_FACTOR * int(fwd_work.sum()))
    decode = (work.counts, work.group_rows, work.group_items, work.items, work.blocks, work.spans,
              work.order) if work else ()
    sections = [table.head_slot.numpy(), q_order, kv_order,
                *(x.numpy() for d in (forward, backward) for x in (d.full_ptr, d.full_idx, d.part_ptr,
                                                                   d.part_idx, d.part_pattern)),
                code.args, code.data,
                *((found.row_lo, found.row_hi, found.col_lo, found.col_hi) if found else (no_spans,) * 4),
                *(decode or (no_spans,) * 7)]
    trims = tuning.tile_pairs(device, bq, bk, short_rows) if found is not None else ()
    for direction, program, step in trims:
        lists_, lo, hi, own, entry = ((forward, found.row_lo, found.row_hi, bq, bk) if direction == "forward"
                                      else (backward, found.col_lo, found.col_hi, bk, bq))
        sections.append(partial_steps(lists_.part_ptr.numpy(), lists_.part_idx.numpy(), lo, hi, own, entry,
                                      program, step))
    structure = Structure(
        q_len=cm.q_len, kv_len=cm.kv_len, block_q=bq, block_kv=bk, n_mask_heads=len(table.head_slot),
        n_slots=len(cm.slot_masks),
        args_width=int(code.args.shape[1]), source=digest, spans=found is not None, one_loop=one_loop,
        cut=ragged(cm.q_len, bq) >= 0 or ragged(cm.kv_len, bk) >= 0, short_rows=short_rows,
        empty=n_active == 0, trims=tuple(trims), decode=work is not None,
        decode_rows=work.rows if work else 0, decode_items=rounded_up(len(work.items)) if work else 0,
        decode_groups=rounded_up(len(work.group_rows)) if work else 0)
    return Plan(torch.from_numpy(pack(sections, np.int32)).to(device), padded_bytes(table.patterns, device),
                structure, structure.key)


def padded_bytes(patterns: torch.Tensor, device) -> torch.Tensor:
    """The bit patterns ``bool[P, BQ, BK]`` as flat bytes on ``device``, their length rounded up
    like the tables' (``capacity``)."""
    flat = patterns.to(torch.uint8).contiguous().view(-1)
    padded = torch.zeros(capacity(max(flat.numel(), 1)) if flat.numel() else _ALIGN, dtype=torch.uint8)
    padded[: flat.numel()] = flat
    return padded.to(device)


def kernel_source(cm) -> str:
    """The generated Triton code of ``cm``: its PARTIAL-tile predicate, with where it runs."""
    if USE_SPANS and spans(cm) is not None:
        where = (
            "# Every row and key column of this mask allows one interval, so the kernels test PARTIAL\n"
            "# tiles against spans loaded once per program (maskc/codegen/spans.py):\n"
            "#     forward, dQ: row_lo[i] <= j < row_hi[i];   dK/dV: col_lo[j] <= i < col_hi[j]\n"
            "# and run this predicate only with maskc.codegen.plan.USE_SPANS = False.\n"
        )
    else:
        where = (
            "# called on PARTIAL tiles by _attn_fwd, _attn_bwd_dq and _attn_bwd_dkdv\n"
            "# (maskc/codegen/kernels.py); FULL tiles run without it, EMPTY tiles never run.\n"
        )
    header = f"# maskc: generated predicate for {cm!r}\n{where}import triton\nimport triton.language as tl\n\n\n"
    return header + mask_code(cm).source
