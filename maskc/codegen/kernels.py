"""Triton attention kernels specialised on a compiled mask: forward, dQ and dK/dV.

In the order of Triton's fused-attention tutorial: helpers, the forward, the
backward. The host side is ``plan.py`` (what the kernels read) and
``launch.py`` (how they are called). Masks of few query rows of long reach
(decoding) run their forward through ``decode.py`` instead, and on sm_90 GPUs
most forwards run ``hopper.py``'s Gluon kernel; both reuse the helpers here.

What a kernel reads. Every table of the mask is a section of one packed
``int32`` tensor ``T`` (``plan.py``: ``T[1 + 4 * section]`` is where a section starts),
and the bit patterns of ``Dense``/``Predicate`` masks are one ``uint8``
tensor. Each query block (forward, dQ) or key block (dK/dV) has one list of
FULL tiles and one of PARTIAL tiles (``block_lists.py``), and each list is
walked by one software-pipelined loop of kernel steps of ``BLOCK_N`` keys
(``BLOCK_M`` queries for dK/dV). A step never straddles a table block
(``tuning.py`` says how tiles fit table blocks), and the list it comes from is
a ``tl.constexpr``:

* ``FULL``: every pair allowed and in range; no mask code, unchecked loads;
* ``PARTIAL``: where every row and key column of the mask allows one
  interval (``spans.py``: causal, windows, chunks, prefixes, documents, ring
  tiles), each pair is tested against spans loaded once per program before
  its loops; otherwise the generated predicate (``predicate.py``, passed to
  the kernels as a ``tl.constexpr`` function) decides it. Loads are
  bounds-checked only where the end of a sequence cuts a table block short
  (``CUT``); FULL tiles that it cuts short are listed here
  (``block_lists.py``). On sm_90 and later the forward and dQ steps copy
  their K/V tiles through TMA descriptors instead (``TMA``, ``_load_step``),
  where the copy engine zero-fills past the ends.

EMPTY tiles are in no list and never visited. Where spans apply, a program
smaller than its table block skips the PARTIAL steps that its own spans do
not meet (``spans.partial_steps``, section ``TRIM``: the empty half of a
diagonal block), and masks of short rows walk one list per program holding
FULL and PARTIAL tiles together (``ONE_LOOP``, kind ``EITHER``): a step is
masked only where the program's spans do not cover it all, and each program
starts one pipelined loop instead of two. One helper, ``_masked``, applies
the mask of a step in all three loops.

Grids. Forward and dQ: ``(n_q_blocks * BQ // BLOCK_M, batch * q_heads)``;
program ``t`` owns ``BLOCK_M`` rows of query block ``Q_ORDER[slot, t // (BQ //
BLOCK_M)]``: heaviest first where rows are long (the last programs are then
the shortest), in sequence order where rows are short (the programs running
together then read the keys of a few neighbouring documents or windows),
blocks with no tile last. Those find their lists empty (``_listed``) and write
out 0 and LSE ``-inf`` (dQ 0) without reading anything else: a ring tile is
mostly such blocks. The first grid axis is the fast one, so the programs running
at once mostly belong to one head and stream the same keys through L2. dK/dV:
``(n_kv_blocks * BK // BLOCK_N, batch * kv_heads)``, one program per
``BLOCK_N`` keys in ``KV_ORDER``; it loops over the query heads sharing its key
head (GQA/MQA), so dK/dV need no atomics, and keys nobody attends get 0.

Numbers: scores are kept in base 2 (``qk_scale = scale * log2(e)``), the
stored LSE is natural. The dQ kernel runs first: each program computes, for
its rows, ``delta = rowsum(dO * O) - dLSE`` (``d lse_i / d s_ij = P_ij``) and
the LSE in base 2 with ``-inf`` (empty rows) turned into ``+inf`` so that their
``P`` is 0, and stores both for the dK/dV kernel.

Kernels are specialised on the mask's structure (``plan.Structure``): the
generated predicate's text, whether spans apply and sequences are cut, the
tile config and the dtypes. Sequence lengths are not specialised
(``do_not_specialize``) and every mask number or per-token table is data, so
new document lengths reuse the compiled kernels.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from .plan import Section

FULL = tl.constexpr(2)  # the tile kinds' values in ``CompiledMask.block_kinds``
PARTIAL = tl.constexpr(1)
EITHER = tl.constexpr(3)  # a list of FULL and PARTIAL tiles, told apart per step by the spans (one loop)
LOG2E = tl.constexpr(math.log2(math.e))
LN2 = tl.constexpr(math.log(2.0))

HEAD_SLOT = tl.constexpr(int(Section.HEAD_SLOT))
Q_ORDER = tl.constexpr(int(Section.Q_ORDER))
KV_ORDER = tl.constexpr(int(Section.KV_ORDER))
FWD_FULL_PTR = tl.constexpr(int(Section.FWD_FULL_PTR))
FWD_FULL_IDX = tl.constexpr(int(Section.FWD_FULL_IDX))
FWD_PART_PTR = tl.constexpr(int(Section.FWD_PART_PTR))
FWD_PART_IDX = tl.constexpr(int(Section.FWD_PART_IDX))
FWD_PART_PATTERN = tl.constexpr(int(Section.FWD_PART_PATTERN))
BWD_FULL_PTR = tl.constexpr(int(Section.BWD_FULL_PTR))
BWD_FULL_IDX = tl.constexpr(int(Section.BWD_FULL_IDX))
BWD_PART_PTR = tl.constexpr(int(Section.BWD_PART_PTR))
BWD_PART_IDX = tl.constexpr(int(Section.BWD_PART_IDX))
BWD_PART_PATTERN = tl.constexpr(int(Section.BWD_PART_PATTERN))
MASK_ARGS = tl.constexpr(int(Section.MASK_ARGS))
MASK_DATA = tl.constexpr(int(Section.MASK_DATA))
ROW_LO = tl.constexpr(int(Section.ROW_LO))
ROW_HI = tl.constexpr(int(Section.ROW_HI))
COL_LO = tl.constexpr(int(Section.COL_LO))
COL_HI = tl.constexpr(int(Section.COL_HI))


# -- helpers ------------------------------------------------------------------------
@triton.jit
def spans_only(i, j, q_len, kv_len, args, data, patterns, pattern, BQ: tl.constexpr, BK: tl.constexpr):
    """The ``partial_mask`` of masks whose PARTIAL tiles test spans: never called. One function
    for all of them, so that masks of different structures but spans share compiled kernels
    (the ring tiles of one plan have many structures)."""
    return (i >= 0) & (j >= 0)


@triton.jit
def _section(T, SECTION: tl.constexpr):
    """Where section ``SECTION`` of the packed tables ``T`` starts (``plan.pack``)."""
    return T + tl.load(T + 1 + 4 * SECTION)


@triton.jit
def _load_tile(base, rows, n_rows, stride_row, stride_col, N_COLS: tl.constexpr, BLOCK_COLS: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """``base[rows, :N_COLS]`` as ``[len(rows), BLOCK_COLS]``, zero past the ends."""
    cols = tl.arange(0, BLOCK_COLS)
    ptrs = base + rows[:, None] * stride_row + cols[None, :] * stride_col
    if CHECK_ROWS:
        return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < N_COLS), other=0.0)
    elif BLOCK_COLS != N_COLS:
        return tl.load(ptrs, mask=cols[None, :] < N_COLS, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _store_tile(base, value, rows, n_rows, stride_row, stride_col, N_COLS: tl.constexpr,
                BLOCK_COLS: tl.constexpr):
    cols = tl.arange(0, BLOCK_COLS)
    ptrs = base + rows[:, None] * stride_row + cols[None, :] * stride_col
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=(rows[:, None] < n_rows) & (cols[None, :] < N_COLS))


@triton.jit
def _store_zeros(base, rows, n_rows, stride_row, stride_col, N_COLS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                 BLOCK_COLS: tl.constexpr):
    """Zeros in the rows of a program with nothing to compute."""
    _store_tile(base, tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32), rows, n_rows, stride_row, stride_col,
                N_COLS, BLOCK_COLS)


@triton.jit
def _load_step(desc, base, b, h, start, rows, n_rows, stride_row, stride_col, N_COLS: tl.constexpr,
               BLOCK_COLS: tl.constexpr, CHECK: tl.constexpr, TMA: tl.constexpr):
    """A loop step's tile, rows ``rows`` (from ``start``) of head ``(b, h)``: copied by the tensor
    memory accelerator through the descriptor ``desc`` of the whole ``[batch, heads, rows, cols]``
    tensor (rows and columns past its ends read as zero), else loaded from ``base``."""
    if TMA:
        return desc.load([b, h, start, 0]).reshape(rows.shape[0], BLOCK_COLS)
    else:
        return _load_tile(base, rows, n_rows, stride_row, stride_col, N_COLS, BLOCK_COLS, CHECK)


@triton.jit
def _list_span(ptr, at):
    """``[lo, hi)``: where one group's list lies in its index array."""
    return tl.load(ptr + at), tl.load(ptr + at + 1)


@triton.jit
def _listed(full_ptr, part_ptr, at, ONE_LOOP: tl.constexpr):
    """How many tiles a block's lists hold, before any trimming (0: an EMPTY row or column of
    blocks, whose programs only write zeros)."""
    lo, hi = _list_span(part_ptr, at)
    if ONE_LOOP:
        return hi - lo
    else:
        full_lo, full_hi = _list_span(full_ptr, at)
        return hi - lo + full_hi - full_lo


@triton.jit
def _partial_steps(T, part_ptr, at, slot, pos, n, STEPS: tl.constexpr, PROGRAM: tl.constexpr, TRIM: tl.constexpr):
    """Steps ``[first, end)`` of a program's PARTIAL list: with trimmed steps (header entry
    ``TRIM >= 0``), only those that meet the spans of its ``PROGRAM`` positions from ``pos``
    (``spans.partial_steps``); else all of it."""
    if TRIM >= 0:
        trimmed = _section(T, TRIM) + (slot * tl.cdiv(n, PROGRAM) + pos // PROGRAM) * 2
        return tl.load(trimmed), tl.load(trimmed + 1)
    else:
        lo, hi = _list_span(part_ptr, at)
        return lo * STEPS, hi * STEPS


@triton.jit
def _spans_of(lo_ptr, hi_ptr, pos, n, SPANS: tl.constexpr):
    """The spans ``[lo, hi)`` of positions ``pos`` on a program's own axis (``spans.py``), empty
    past ``n``; without spans, ``pos`` twice (not read)."""
    if SPANS:
        inside = pos < n
        return tl.load(lo_ptr + pos, mask=inside, other=0), tl.load(hi_ptr + pos, mask=inside, other=0)
    else:
        return pos, pos


@triton.jit
def _inside(moving, span_lo, span_hi):
    """The positions along the loop, ``moving``, that lie inside the spans of the program's own."""
    return (moving >= span_lo) & (moving < span_hi)


@triton.jit
def _whole(start, STEP: tl.constexpr, whole_lo, whole_hi):
    """A step of ``STEP`` positions from ``start`` that every span of the program covers
    (``whole_lo``: the largest start of its spans, ``whole_hi``: the smallest end)."""
    return (start >= whole_lo) & (start + STEP <= whole_hi)


@triton.jit
def _masked(x, fill, i, j, moving, at, span_lo, span_hi, whole_lo, whole_hi, q_len, kv_len, mask_args, mask_data,
            patterns, pattern_at, partial_mask: tl.constexpr, KIND: tl.constexpr, SPANS: tl.constexpr,
            STEP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr):
    """``x``, a step's tile of scores or probabilities, with ``fill`` where the pair ``(i, j)`` is
    not allowed (``i``, ``j`` broadcast to the tile's orientation; ``moving`` is the one of them
    along the loop, from ``at``). PARTIAL: the spans of the program's own positions, or the
    generated predicate (``pattern_at`` points at the tile's bit pattern). EITHER: the spans,
    behind a branch, only where they do not cover the whole step. FULL: ``x`` itself."""
    if KIND == PARTIAL:
        if SPANS:
            allowed = _inside(moving, span_lo, span_hi)
        else:
            allowed = partial_mask(i, j, q_len, kv_len, mask_args, mask_data, patterns, tl.load(pattern_at), BQ, BK)
        x = tl.where(allowed, x, fill)
    elif KIND == EITHER:
        if not _whole(at, STEP, whole_lo, whole_hi):
            x = tl.where(_inside(moving, span_lo, span_hi), x, fill)
    return x


@triton.jit
def _masked_softmax_step(t, m_i):
    """``(p, new row maximum, reference)`` of one online-softmax step over scaled scores ``t``
    that are ``-inf`` where not allowed: a row with nothing allowed so far keeps ``m = -inf``
    and exponentiates against 0 instead."""
    m_new = tl.maximum(m_i, tl.max(t, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    return tl.math.exp2(t - m_ref[:, None]), m_new, m_ref


@triton.jit
def _step_start(blocks, step, end, TABLE_BLOCK: tl.constexpr, STEP: tl.constexpr):
    """First position of kernel step ``step`` of a list (0 past ``end``): ``TABLE_BLOCK // STEP``
    steps a listed block. The loops compute it one step ahead and carry it, so that the loads of
    a step depend on no load of the same step and the pipeliner can issue them
    ``num_stages - 1`` steps early (with the index loaded in the step, only one)."""
    SUBS: tl.constexpr = TABLE_BLOCK // STEP
    block = tl.load(blocks + step // SUBS, mask=step < end, other=0)
    return tl.multiple_of(block * TABLE_BLOCK + (step % SUBS) * STEP, STEP)


@triton.jit
def _key_step(blocks, step, end, start_n, pattern_of, k_desc, k_base, b, kv_head, kv_len, stride_kn, stride_kd,
              HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BK: tl.constexpr, BLOCK_N: tl.constexpr,
              CHECK: tl.constexpr, TMA: tl.constexpr):
    """The start of a forward or dQ loop step whose first key is ``start_n``: that key, the step's
    keys, where the next step starts, the step's K tile and its table block's bit-pattern entry."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    next_n = _step_start(blocks, step + 1, end, BK, BLOCK_N)
    k = _load_step(k_desc, k_base, b, kv_head, start_n, offs_n, kv_len, stride_kn, stride_kd, HEAD_D, BLOCK_D, CHECK,
                   TMA)
    return start_n, offs_n, next_n, k, pattern_of + step // (BK // BLOCK_N)


@triton.jit
def _query_program(T, head, task, n_q_blocks, N_MASK_HEADS: tl.constexpr, BQ: tl.constexpr, BLOCK_M: tl.constexpr):
    """The slot, table query block and first row of ``head``'s program ``task`` (forward and dQ:
    the grid's first axis, or the tile a persistent program took)."""
    SUBS: tl.constexpr = BQ // BLOCK_M
    slot = tl.load(_section(T, HEAD_SLOT) + head % N_MASK_HEADS)
    qb = tl.load(_section(T, Q_ORDER) + slot * n_q_blocks + task // SUBS)
    return slot, qb, qb * BQ + (task % SUBS) * BLOCK_M


@triton.jit
def _key_program(T, task, BK: tl.constexpr, BLOCK_N: tl.constexpr):
    """The table key block (``KV_ORDER``) and first key of dK/dV program ``task`` (the grid's
    first axis, or the tile a persistent program took)."""
    SUBS: tl.constexpr = BK // BLOCK_N
    kb = tl.load(_section(T, KV_ORDER) + task // SUBS)
    return kb, kb * BK + (task % SUBS) * BLOCK_N


@triton.jit
def _group_listed(T, kb, kv_head, group, n_kv_blocks, N_MASK_HEADS: tl.constexpr, ONE_LOOP: tl.constexpr):
    """How many tiles key block ``kb``'s dK/dV lists hold for the query heads sharing ``kv_head``
    (0: keys nobody attends, whose K and V need not be read)."""
    head_slot = _section(T, HEAD_SLOT)
    full_ptr = _section(T, BWD_FULL_PTR)
    part_ptr = _section(T, BWD_PART_PTR)
    listed = _listed(full_ptr, part_ptr, tl.load(head_slot + (kv_head * group) % N_MASK_HEADS) * (n_kv_blocks + 1)
                     + kb, ONE_LOOP)
    for g in range(1, group):
        listed += _listed(full_ptr, part_ptr, tl.load(head_slot + (kv_head * group + g) % N_MASK_HEADS) *
                          (n_kv_blocks + 1) + kb, ONE_LOOP)
    return listed


@triton.jit
def _query_lists(T, FULL_PTR: tl.constexpr, FULL_IDX: tl.constexpr, PART_PTR: tl.constexpr,
                 PART_IDX: tl.constexpr, PART_PATTERN: tl.constexpr):
    """One direction's block lists in the packed tables (``block_lists.py``)."""
    return (_section(T, FULL_PTR), _section(T, FULL_IDX), _section(T, PART_PTR), _section(T, PART_IDX),
            _section(T, PART_PATTERN))


@triton.jit
def _query_rows(T, K, V, stride_kb, stride_kh, stride_vb, stride_vh, n_heads, group, q_len, n_q_blocks,
                N_MASK_HEADS: tl.constexpr, ARGS_WIDTH: tl.constexpr, SPANS: tl.constexpr, ONE_LOOP: tl.constexpr,
                BQ: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """What a forward or dQ program starts from: its batch and head (``bh``, ``b``, ``h``), slot,
    first row and rows, its key head's K/V, its slot's numbers and data for the predicate, its
    rows' spans, ``at``, its query block's entry in the forward block lists, those lists, and how
    many tiles they hold for it (0 past the end of the sequence too: such a program only writes
    zeros, which its row mask drops there)."""
    tl.static_assert(BQ % BLOCK_M == 0, "a program's rows must lie in one table query block")
    tl.static_assert(BK % BLOCK_N == 0, "a key step must lie in one table key block")
    bh = tl.program_id(1)
    b, h = bh // n_heads, bh % n_heads
    slot, qb, start_m = _query_program(T, h, tl.program_id(0), n_q_blocks, N_MASK_HEADS, BQ, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    kv_head = h // group
    k_base = K + b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    spans_at = slot.to(tl.int64) * q_len
    span_lo, span_hi = _spans_of(_section(T, ROW_LO) + spans_at, _section(T, ROW_HI) + spans_at, offs_m, q_len,
                                 SPANS)
    at = slot * (n_q_blocks + 1) + qb
    full_ptr, full_idx, part_ptr, part_idx, part_pattern = _query_lists(T, FWD_FULL_PTR, FWD_FULL_IDX, FWD_PART_PTR,
                                                                        FWD_PART_IDX, FWD_PART_PATTERN)
    listed = tl.where(start_m < q_len, _listed(full_ptr, part_ptr, at, ONE_LOOP), 0)
    return (bh, b, h, slot, start_m, offs_m, kv_head, k_base, v_base, _section(T, MASK_ARGS) + slot * ARGS_WIDTH,
            _section(T, MASK_DATA), span_lo, span_hi, at, full_ptr, full_idx, part_ptr, part_idx, part_pattern,
            listed)


# -- forward ------------------------------------------------------------------------
@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, offs_m, row_lo, row_hi, whole_lo, whole_hi, k_desc, v_desc, b, kv_head, k_base,
               v_base, stride_kn, stride_kd, stride_vn, stride_vd, blocks, pattern_of, first, end, q_len, kv_len,
               qk_scale, mask_args, mask_data, patterns, partial_mask: tl.constexpr, KIND: tl.constexpr,
               SPANS: tl.constexpr, CUT: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, BLOCK_N: tl.constexpr,
               HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
               PRECISION: tl.constexpr, TMA: tl.constexpr):
    """Online softmax over steps ``first`` to ``end`` of the key blocks ``blocks`` (``BLOCK_N``
    keys a step, ``BK // BLOCK_N`` steps a block). ``qk_scale >= 0``: FULL tiles scale each
    row's maximum, and their scores in one FMA."""
    CHECK: tl.constexpr = (KIND != FULL) & CUT  # bounds-checked loads
    start_n = _step_start(blocks, first, end, BK, BLOCK_N)
    for step in range(first, end):
        at_n, offs_n, start_n, k, pattern = _key_step(blocks, step, end, start_n, pattern_of, k_desc, k_base, b, kv_head,
                                                      kv_len, stride_kn, stride_kd, HEAD_D, BLOCK_D, BK, BLOCK_N,
                                                      CHECK, TMA)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if KIND == FULL:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_ref = m_new
            p = tl.math.exp2(s * qk_scale - m_ref[:, None])
        else:
            t = _masked(s * qk_scale, float("-inf"), offs_m[:, None], offs_n[None, :], offs_n[None, :], at_n,
                        row_lo[:, None], row_hi[:, None], whole_lo, whole_hi, q_len, kv_len, mask_args, mask_data,
                        patterns, pattern, partial_mask, KIND, SPANS, BLOCK_N, BQ, BK)
            p, m_new, m_ref = _masked_softmax_step(t, m_i)
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_step(v_desc, v_base, b, kv_head, at_n, offs_n, kv_len, stride_vn, stride_vd, HEAD_DV, BLOCK_DV,
                       CHECK, TMA)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["q_len", "kv_len"])
def _attn_fwd(Q, K, V, K_desc, V_desc, Out, Lse, T, patterns,
              stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
              n_heads, group, q_len, kv_len, n_q_blocks, qk_scale,
              partial_mask: tl.constexpr, SPANS: tl.constexpr, ONE_LOOP: tl.constexpr, CUT: tl.constexpr,
              TRIM: tl.constexpr, N_MASK_HEADS: tl.constexpr, ARGS_WIDTH: tl.constexpr,
              BQ: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
              PRECISION: tl.constexpr, TMA: tl.constexpr):
    (bh, b, h, slot, start_m, offs_m, kv_head, k_base, v_base, mask_args, mask_data, span_lo, span_hi, at, full_ptr,
     full_idx, part_ptr, part_idx, part_pattern, listed) = _query_rows(
        T, K, V, stride_kb, stride_kh, stride_vb, stride_vh, n_heads, group, q_len, n_q_blocks, N_MASK_HEADS,
        ARGS_WIDTH, SPANS, ONE_LOOP, BQ, BK, BLOCK_M, BLOCK_N)
    out_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    if listed == 0:  # nothing to read (ring tiles have many such blocks)
        _store_zeros(out_base, offs_m, q_len, stride_om, stride_od, HEAD_DV, BLOCK_M, BLOCK_DV)
        tl.store(Lse + bh.to(tl.int64) * q_len + offs_m, tl.full([BLOCK_M], float("-inf"), tl.float32),
                 mask=offs_m < q_len)
        return
    q = _load_tile(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, offs_m, q_len, stride_qm,
                   stride_qd, HEAD_D, BLOCK_D, CUT)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    STEPS: tl.constexpr = BK // BLOCK_N  # kernel steps a listed key block
    if not ONE_LOOP:
        lo, hi = _list_span(full_ptr, at)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, offs_m, span_lo, span_hi, 0, 0, K_desc, V_desc, b, kv_head,
                                   k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, full_idx, part_pattern,
                                   lo * STEPS, hi * STEPS, q_len, kv_len, qk_scale, mask_args, mask_data, patterns,
                                   partial_mask, FULL, SPANS, CUT, BQ, BK, BLOCK_N, HEAD_D, BLOCK_D, HEAD_DV, BLOCK_DV,
                                   PRECISION, TMA)
    first, end = _partial_steps(T, part_ptr, at, slot, start_m, q_len, STEPS, BLOCK_M, TRIM)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, offs_m, span_lo, span_hi, tl.max(span_lo, 0), tl.min(span_hi, 0),
                               K_desc, V_desc, b, kv_head, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                               part_idx, part_pattern, first, end, q_len, kv_len, qk_scale, mask_args, mask_data,
                               patterns, partial_mask, EITHER if ONE_LOOP else PARTIAL, SPANS, CUT, BQ, BK, BLOCK_N,
                               HEAD_D, BLOCK_D, HEAD_DV, BLOCK_DV, PRECISION, TMA)

    empty = l_i == 0.0  # rows with no allowed key (and blocks with no tile): output 0, LSE -inf
    l_safe = tl.where(empty, 1.0, l_i)
    _store_tile(out_base, acc / l_safe[:, None], offs_m, q_len, stride_om, stride_od, HEAD_DV, BLOCK_DV)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    tl.store(Lse + bh.to(tl.int64) * q_len + offs_m, lse, mask=offs_m < q_len)


# -- backward -----------------------------------------------------------------------
@triton.jit
def _row_terms(o, do, Lse, dLse, Lse2, Delta, rows, in_range):
    """Per query row, for both backward kernels: ``delta = rowsum(dO * O) - dLSE`` (``dLse`` is
    ``None`` where no gradient flows into the LSE, as in most training steps) and the LSE in base 2
    (``+inf`` for empty rows, so that their ``P`` is 0); stored, and returned."""
    lse = tl.load(Lse + rows, mask=in_range, other=float("-inf"))
    finite = lse != float("-inf")
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if dLse is not None:
        delta -= tl.where(finite, tl.load(dLse + rows, mask=in_range, other=0.0), 0.0)
    lse2 = tl.where(finite, lse * LOG2E, float("inf"))
    tl.store(Delta + rows, delta, mask=in_range)
    tl.store(Lse2 + rows, lse2, mask=in_range)
    return lse2, delta


@triton.jit(do_not_specialize=["q_len"])
def _attn_bwd_rows(Out, dOut, Lse, dLse, Lse2, Delta, dQ, stride_ob, stride_oh, stride_om, stride_od, stride_dob,
                   stride_doh, stride_dom, stride_dod, stride_dqb, stride_dqh, stride_dqm, stride_dqd, n_heads, q_len,
                   BLOCK_M: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr,
                   BLOCK_DV: tl.constexpr, ZERO_DQ: tl.constexpr):
    """The row terms (``_row_terms``) of ``BLOCK_M`` rows of one head, where no dQ kernel computes
    them: for the dK/dV kernel that adds dQ itself (``DQ``); with ``ZERO_DQ`` the rows of the
    float32 dQ it adds into are zeroed too (ring attention's sum keeps what it holds)."""
    bh = tl.program_id(1)
    b, h = bh // n_heads, bh % n_heads
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _load_tile(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh, offs_m, q_len, stride_om,
                   stride_od, HEAD_DV, BLOCK_DV, True)
    do = _load_tile(dOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh, offs_m, q_len, stride_dom,
                    stride_dod, HEAD_DV, BLOCK_DV, True)
    _row_terms(o, do, Lse, dLse, Lse2, Delta, bh.to(tl.int64) * q_len + offs_m, offs_m < q_len)
    if ZERO_DQ:
        _store_zeros(dQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh, offs_m, q_len, stride_dqm,
                     stride_dqd, HEAD_D, BLOCK_M, BLOCK_D)


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, offs_m, row_lo, row_hi, whole_lo, whole_hi, k_desc, v_desc, b, kv_head, k_base,
              v_base, stride_kn, stride_kd, stride_vn, stride_vd, blocks, pattern_of, first, end, q_len, kv_len,
              qk_scale, mask_args, mask_data, patterns, partial_mask: tl.constexpr, KIND: tl.constexpr,
              SPANS: tl.constexpr, CUT: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, BLOCK_N: tl.constexpr,
              HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
              PRECISION: tl.constexpr, TMA: tl.constexpr):
    """``dQ += dS K`` over steps ``first`` to ``end`` of the key blocks ``blocks``, with
    ``dS = P * (dO V^T - delta)``."""
    CHECK: tl.constexpr = (KIND != FULL) & CUT  # bounds-checked loads
    start_n = _step_start(blocks, first, end, BK, BLOCK_N)
    for step in range(first, end):
        at_n, offs_n, start_n, k, pattern = _key_step(blocks, step, end, start_n, pattern_of, k_desc, k_base, b, kv_head,
                                                      kv_len, stride_kn, stride_kd, HEAD_D, BLOCK_D, BK, BLOCK_N,
                                                      CHECK, TMA)
        v = _load_step(v_desc, v_base, b, kv_head, at_n, offs_n, kv_len, stride_vn, stride_vd, HEAD_DV, BLOCK_DV,
                       CHECK, TMA)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        p = _masked(tl.math.exp2(s * qk_scale - lse2[:, None]), 0.0, offs_m[:, None], offs_n[None, :],
                    offs_n[None, :], at_n, row_lo[:, None], row_hi[:, None], whole_lo, whole_hi, q_len, kv_len,
                    mask_args, mask_data, patterns, pattern, partial_mask, KIND, SPANS, BLOCK_N,
                    BQ, BK)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=["q_len", "kv_len"])
def _attn_bwd_dq(Q, K, V, K_desc, V_desc, Out, dOut, Lse, dLse, Lse2, Delta, dQ, T, patterns,
                 stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
                 stride_dob, stride_doh, stride_dom, stride_dod, stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                 n_heads, group, q_len, kv_len, n_q_blocks, qk_scale, scale,
                 partial_mask: tl.constexpr, SPANS: tl.constexpr, ONE_LOOP: tl.constexpr, CUT: tl.constexpr,
                 TRIM: tl.constexpr, N_MASK_HEADS: tl.constexpr, ARGS_WIDTH: tl.constexpr,
                 BQ: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
                 PRECISION: tl.constexpr, TMA: tl.constexpr, ADD_DQ: tl.constexpr):
    (bh, b, h, slot, start_m, offs_m, kv_head, k_base, v_base, mask_args, mask_data, span_lo, span_hi, at, full_ptr,
     full_idx, part_ptr, part_idx, part_pattern, listed) = _query_rows(
        T, K, V, stride_kb, stride_kh, stride_vb, stride_vh, n_heads, group, q_len, n_q_blocks, N_MASK_HEADS,
        ARGS_WIDTH, SPANS, ONE_LOOP, BQ, BK, BLOCK_M, BLOCK_N)
    dq_base = dQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
    if listed == 0:  # rows no dK/dV program visits: no row terms either
        if not ADD_DQ:  # a sum of dQ keeps what it holds
            _store_zeros(dq_base, offs_m, q_len, stride_dqm, stride_dqd, HEAD_D, BLOCK_M, BLOCK_D)
        return
    q = _load_tile(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, offs_m, q_len, stride_qm,
                   stride_qd, HEAD_D, BLOCK_D, CUT)
    do = _load_tile(dOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh, offs_m, q_len, stride_dom,
                    stride_dod, HEAD_DV, BLOCK_DV, CUT)
    o = _load_tile(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh, offs_m, q_len, stride_om,
                   stride_od, HEAD_DV, BLOCK_DV, CUT)
    lse2, delta = _row_terms(o, do, Lse, dLse, Lse2, Delta, bh.to(tl.int64) * q_len + offs_m, offs_m < q_len)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    STEPS: tl.constexpr = BK // BLOCK_N  # kernel steps a listed key block
    if not ONE_LOOP:
        lo, hi = _list_span(full_ptr, at)
        dq = _dq_tiles(dq, q, do, lse2, delta, offs_m, span_lo, span_hi, 0, 0, K_desc, V_desc, b, kv_head, k_base,
                       v_base, stride_kn, stride_kd, stride_vn, stride_vd, full_idx, part_pattern, lo * STEPS,
                       hi * STEPS, q_len, kv_len, qk_scale, mask_args, mask_data, patterns, partial_mask, FULL, SPANS,
                       CUT, BQ, BK, BLOCK_N, HEAD_D, BLOCK_D, HEAD_DV, BLOCK_DV, PRECISION, TMA)
    first, end = _partial_steps(T, part_ptr, at, slot, start_m, q_len, STEPS, BLOCK_M, TRIM)
    dq = _dq_tiles(dq, q, do, lse2, delta, offs_m, span_lo, span_hi, tl.max(span_lo, 0), tl.min(span_hi, 0),
                   K_desc, V_desc, b, kv_head, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, part_idx,
                   part_pattern, first, end, q_len, kv_len, qk_scale, mask_args, mask_data, patterns, partial_mask,
                   EITHER if ONE_LOOP else PARTIAL, SPANS, CUT, BQ, BK, BLOCK_N, HEAD_D, BLOCK_D, HEAD_DV, BLOCK_DV,
                   PRECISION, TMA)
    dq = dq * scale
    if ADD_DQ:
        dq += _load_tile(dq_base, offs_m, q_len, stride_dqm, stride_dqd, HEAD_D, BLOCK_D, True)
    _store_tile(dq_base, dq, offs_m, q_len, stride_dqm, stride_dqd, HEAD_D, BLOCK_D)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, offs_n, col_lo, col_hi, whole_lo, whole_hi, q_desc, do_desc, b, h, q_base, do_base,
                lse2_base, delta_base, dq_base, stride_qm, stride_qd, stride_dom, stride_dod, stride_dqm, stride_dqd,
                blocks, pattern_of, first, end, q_len, kv_len, qk_scale, scale, mask_args, mask_data, patterns,
                partial_mask: tl.constexpr, KIND: tl.constexpr, SPANS: tl.constexpr, CUT: tl.constexpr,
                BQ: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
                HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
                DQ: tl.constexpr):
    """``dV += P^T dO`` and ``dK += dS^T Q`` over steps ``first`` to ``end`` of the query blocks
    ``blocks``, in the transposed orientation (keys down, queries across). Queries past the end
    load as zero with ``lse2 = +inf``, so their ``P`` is 0 even before the predicate says so.
    With ``DQ`` each step also adds its ``dQ = dS K`` (times ``scale``) into the float32 sum at
    ``dq_base``, with atomics: the order of the additions varies from run to run."""
    SUBS: tl.constexpr = BQ // BLOCK_M
    CHECK: tl.constexpr = (KIND != FULL) & CUT  # bounds-checked loads
    start_m = _step_start(blocks, first, end, BQ, BLOCK_M)
    for step in range(first, end):
        at_m = start_m
        offs_m = at_m + tl.arange(0, BLOCK_M)
        start_m = _step_start(blocks, step + 1, end, BQ, BLOCK_M)
        q = _load_step(q_desc, q_base, b, h, at_m, offs_m, q_len, stride_qm, stride_qd, HEAD_D, BLOCK_D, CHECK, TMA)
        do = _load_step(do_desc, do_base, b, h, at_m, offs_m, q_len, stride_dom, stride_dod, HEAD_DV, BLOCK_DV, CHECK,
                        TMA)
        if CHECK:
            lse2 = tl.load(lse2_base + offs_m, mask=offs_m < q_len, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=offs_m < q_len, other=0.0)
        else:
            lse2 = tl.load(lse2_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        p_t = _masked(tl.math.exp2(s_t * qk_scale - lse2[None, :]), 0.0, offs_m[None, :], offs_n[:, None],
                      offs_m[None, :], at_m, col_lo[:, None], col_hi[:, None], whole_lo, whole_hi, q_len, kv_len,
                      mask_args, mask_data, patterns, pattern_of + step // SUBS, partial_mask, KIND, SPANS, BLOCK_M,
                      BQ, BK)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds_t, q, dk, input_precision=PRECISION)
        if DQ:
            dq = tl.dot(tl.trans(ds_t), k, input_precision=PRECISION) * scale
            cols = tl.arange(0, BLOCK_D)
            tl.atomic_add(dq_base + offs_m[:, None].to(tl.int64) * stride_dqm + cols[None, :] * stride_dqd, dq,
                          mask=(offs_m[:, None] < q_len) & (cols[None, :] < HEAD_D), sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=["q_len", "kv_len"])
def _attn_bwd_dkdv(Q, K, V, dOut, Q_desc, dO_desc, Lse2, Delta, dK, dV, dQ, T, patterns,
                   stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
                   stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                   stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                   n_heads, n_kv_heads, group, q_len, kv_len, n_kv_blocks, qk_scale, scale,
                   partial_mask: tl.constexpr, SPANS: tl.constexpr, ONE_LOOP: tl.constexpr, CUT: tl.constexpr,
                   TRIM: tl.constexpr, N_MASK_HEADS: tl.constexpr, ARGS_WIDTH: tl.constexpr,
                   BQ: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
                   PRECISION: tl.constexpr, TMA: tl.constexpr, DQ: tl.constexpr):
    tl.static_assert(BK % BLOCK_N == 0, "a program's keys must lie in one table key block")
    tl.static_assert(BQ % BLOCK_M == 0, "a query step must lie in one table query block")
    STEPS: tl.constexpr = BQ // BLOCK_M  # kernel steps a listed query block
    bh = tl.program_id(1)
    b, kv_head = bh // n_kv_heads, bh % n_kv_heads
    kb, start_n = _key_program(T, tl.program_id(0), BK, BLOCK_N)
    if start_n >= kv_len:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    head_slot = _section(T, HEAD_SLOT)
    full_ptr, full_idx, part_ptr, part_idx, part_pattern = _query_lists(T, BWD_FULL_PTR, BWD_FULL_IDX, BWD_PART_PTR,
                                                                        BWD_PART_IDX, BWD_PART_PATTERN)
    dk_base = dK + b.to(tl.int64) * stride_dkb + kv_head.to(tl.int64) * stride_dkh
    dv_base = dV + b.to(tl.int64) * stride_dvb + kv_head.to(tl.int64) * stride_dvh
    if _group_listed(T, kb, kv_head, group, n_kv_blocks, N_MASK_HEADS, ONE_LOOP) == 0:  # keys nobody attends: zeros
        _store_zeros(dk_base, offs_n, kv_len, stride_dkn, stride_dkd, HEAD_D, BLOCK_N, BLOCK_D)
        _store_zeros(dv_base, offs_n, kv_len, stride_dvn, stride_dvd, HEAD_DV, BLOCK_N, BLOCK_DV)
        return
    k = _load_tile(K + b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh, offs_n, kv_len, stride_kn,
                   stride_kd, HEAD_D, BLOCK_D, CUT)
    v = _load_tile(V + b.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh, offs_n, kv_len, stride_vn,
                   stride_vd, HEAD_DV, BLOCK_DV, CUT)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(group):  # the query heads that share this key head
        h = kv_head * group + g
        slot = tl.load(head_slot + h % N_MASK_HEADS)
        slot_args = _section(T, MASK_ARGS) + slot * ARGS_WIDTH
        spans_at = slot.to(tl.int64) * kv_len
        span_lo, span_hi = _spans_of(_section(T, COL_LO) + spans_at, _section(T, COL_HI) + spans_at, offs_n, kv_len,
                                     SPANS)
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = dOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        dq_base = dQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
        row_base = (b * n_heads + h).to(tl.int64) * q_len
        at = slot * (n_kv_blocks + 1) + kb
        if not ONE_LOOP:
            lo, hi = _list_span(full_ptr, at)
            dk, dv = _dkdv_tiles(dk, dv, k, v, offs_n, span_lo, span_hi, 0, 0, Q_desc, dO_desc, b, h, q_base, do_base,
                                 Lse2 + row_base, Delta + row_base, dq_base, stride_qm, stride_qd, stride_dom,
                                 stride_dod, stride_dqm, stride_dqd, full_idx, part_pattern, lo * STEPS, hi * STEPS,
                                 q_len, kv_len, qk_scale, scale, slot_args, _section(T, MASK_DATA), patterns,
                                 partial_mask, FULL, SPANS, CUT, BQ, BK, BLOCK_M, HEAD_D, BLOCK_D, HEAD_DV, BLOCK_DV,
                                 PRECISION, TMA, DQ)
        first, end = _partial_steps(T, part_ptr, at, slot, start_n, kv_len, STEPS, BLOCK_N, TRIM)
        dk, dv = _dkdv_tiles(dk, dv, k, v, offs_n, span_lo, span_hi, tl.max(span_lo, 0), tl.min(span_hi, 0), Q_desc,
                             dO_desc, b, h, q_base, do_base, Lse2 + row_base, Delta + row_base, dq_base, stride_qm,
                             stride_qd, stride_dom, stride_dod, stride_dqm, stride_dqd, part_idx, part_pattern, first,
                             end, q_len, kv_len, qk_scale, scale, slot_args, _section(T, MASK_DATA), patterns,
                             partial_mask, EITHER if ONE_LOOP else PARTIAL, SPANS, CUT, BQ, BK, BLOCK_M, HEAD_D,
                             BLOCK_D, HEAD_DV, BLOCK_DV, PRECISION, TMA, DQ)
    _store_tile(dk_base, dk * scale, offs_n, kv_len, stride_dkn, stride_dkd, HEAD_D, BLOCK_D)
    _store_tile(dv_base, dv, offs_n, kv_len, stride_dvn, stride_dvd, HEAD_DV, BLOCK_DV)
