"""Triton attention kernels specialised on a compiled mask, forward and backward.

The kernels walk per-tile block lists (``block_lists.py``, expanded once per
mask and device from the run tables of ``passes/tables.py``): each query block
(forward, dQ) or key block (dK/dV) has one list of FULL tiles and one of
PARTIAL tiles, and each list is walked by one software-pipelined loop of
kernel steps of ``BLOCK_N`` keys (``BLOCK_M`` queries for dK/dV). A step never
straddles a table block (``tuning.py`` says how tiles fit table blocks), and
the list it comes from is a ``tl.constexpr``:

* ``FULL``: every pair allowed and in range; no mask code, unchecked loads;
* ``PARTIAL``: where every row and key column of the mask allows one
  interval (``spans.py``: causal, windows, chunks, prefixes, documents, ring
  tiles), each pair is tested against spans loaded once per program before
  its loops; otherwise the generated predicate (``predicate.py``, passed to
  the kernels as a ``tl.constexpr`` function) decides it. Loads are
  bounds-checked only where the end of a sequence cuts a table block short
  (``CUT``); FULL tiles that it cuts short are listed here
  (``block_lists.py``). On sm_90 and later the forward and dQ steps copy
  their K/V tiles through TMA descriptors instead (``USE_TMA``,
  ``_load_step``), where the copy engine zero-fills past the ends.

EMPTY tiles are in no list and never visited. Where spans apply, a program
smaller than its table block skips the PARTIAL steps that its own spans do
not meet (``spans.partial_steps``: the empty half of a diagonal block), and
masks of short rows (``Plan.short_rows``) walk one list per program holding
FULL and PARTIAL tiles together (``ONE_LOOP``, kind ``EITHER``): a step is
masked only where the program's spans do not cover it all, and each program
starts one pipelined loop instead of two.

Grids. Forward and dQ: ``(programs, batch * q_heads)`` where program ``t``
owns ``BLOCK_M`` rows of query block ``order[slot, t // (BQ // BLOCK_M)]``:
only query blocks with work get a program, heaviest first where rows are
long (the last programs are then the shortest), in sequence order where
rows are short (``Plan.short_rows``: the programs running together then
read the keys of a few neighbouring documents or windows). The first grid
axis is the fast one, so the programs running at once mostly belong to one
head and stream the same keys through L2. Rows of blocks with no work are
filled with 0 (LSE ``-inf``) before the launch, and a mask with no allowed pair
launches nothing. dK/dV: ``(programs, batch * kv_heads)``, one program per
``BLOCK_N`` keys of the key blocks with work, in the same order as the query
blocks; it loops over the query heads sharing its key head (GQA/MQA), so
dK/dV need no atomics, and keys nobody attends get 0.

Numbers: scores are kept in base 2 (``qk_scale = scale * log2(e)``), the
stored LSE is natural. The dQ kernel runs first: each program computes, for
its rows, ``delta = rowsum(dO * O) - dLSE`` (``d lse_i / d s_ij = P_ij``) and
the LSE in base 2 with ``-inf`` (empty rows) turned into ``+inf`` so that their
``P`` is 0, and stores both for the dK/dV kernel. The rows it skips (blocks
with no work) are never read.

The op is registered with ``torch.library`` (``maskc::attention`` and its
backward) with fake implementations, so it runs under ``torch.compile``
without a graph break; eager calls skip that dispatch (``_EagerAttention``).
Under ``torch.compile`` the compiled mask travels to the op as an integer
handle. Its block lists, spans and mask arguments are device tensors built
once per mask and device (``Plan``).

Kernels are specialised on the mask's structure: the generated predicate's
text, whether spans apply and sequences are cut, the tile config and the
dtypes. Sequence lengths are not specialised (``do_not_specialize``) and
every mask number or per-token table is a tensor, so new document lengths
reuse the compiled kernels.
"""

from __future__ import annotations

import hashlib
import itertools
import linecache
import math
import weakref
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction
from triton.tools.tensor_descriptor import TensorDescriptor

from . import tuning
from .block_lists import BlockLists, expand, merged, nonempty
from .predicate import FUNCTION_NAME, mask_code
from .spans import partial_steps, spans

FULL = tl.constexpr(2)  # the tile kinds' values in ``CompiledMask.block_kinds``
PARTIAL = tl.constexpr(1)
EITHER = tl.constexpr(3)  # a list of FULL and PARTIAL tiles, told apart per step by the spans (one loop)
LOG2E = tl.constexpr(math.log2(math.e))
LN2 = tl.constexpr(math.log(2.0))


# -- helpers ------------------------------------------------------------------------
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
def _partial_steps(part_ptr, at, part_steps, slot, pos, n, STEPS: tl.constexpr, PROGRAM: tl.constexpr,
                   SPANS: tl.constexpr):
    """Steps ``[first, end)`` of a program's PARTIAL list: with spans, only those that meet the
    spans of its ``PROGRAM`` positions from ``pos`` (``spans.partial_steps``); else all of it."""
    if SPANS:
        trimmed = part_steps + (slot * tl.cdiv(n, PROGRAM) + pos // PROGRAM) * 2
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
def _allowed(i, j, moving, span_lo, span_hi, q_len, kv_len, mask_args, mask_data, patterns, pattern_at,
             partial_mask: tl.constexpr, SPANS: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr):
    """Allowed ``(i, j)`` on a PARTIAL tile (``i``, ``j`` broadcast to the tile's orientation):
    the positions along the loop, ``moving``, inside the spans of the program's own positions, or
    the generated predicate (``pattern_at`` points at the tile's bit pattern)."""
    if SPANS:
        return _inside(moving, span_lo, span_hi)
    else:
        return partial_mask(i, j, q_len, kv_len, mask_args, mask_data, patterns, tl.load(pattern_at), BQ, BK)


@triton.jit
def _whole(start, STEP: tl.constexpr, whole_lo, whole_hi):
    """A step of ``STEP`` positions from ``start`` that every span of the program covers
    (``whole_lo``: the largest start of its spans, ``whole_hi``: the smallest end)."""
    return (start >= whole_lo) & (start + STEP <= whole_hi)


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
def _query_program(head, head_slot, n_mask_heads, order, n_active, n_q_blocks, BQ: tl.constexpr,
                   BLOCK_M: tl.constexpr):
    """This program's slot, table query block (-1: no work) and first row."""
    SUBS: tl.constexpr = BQ // BLOCK_M
    slot = tl.load(head_slot + head % n_mask_heads)
    task = tl.program_id(0)
    active = task // SUBS < tl.load(n_active + slot)
    qb = tl.load(order + slot * n_q_blocks + task // SUBS, mask=active, other=-1)
    return slot, qb, qb * BQ + (task % SUBS) * BLOCK_M


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
    SUBS: tl.constexpr = BK // BLOCK_N
    CHECK: tl.constexpr = (KIND != FULL) & CUT  # bounds-checked loads
    start_n = _step_start(blocks, first, end, BK, BLOCK_N)
    for step in range(first, end):
        at_n = start_n
        offs_n = at_n + tl.arange(0, BLOCK_N)
        start_n = _step_start(blocks, step + 1, end, BK, BLOCK_N)
        k = _load_step(k_desc, k_base, b, kv_head, at_n, offs_n, kv_len, stride_kn, stride_kd, HEAD_D, BLOCK_D, CHECK,
                       TMA)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if KIND == FULL:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_ref = m_new
            p = tl.math.exp2(s * qk_scale - m_ref[:, None])
        elif KIND == PARTIAL:
            allowed = _allowed(offs_m[:, None], offs_n[None, :], offs_n[None, :], row_lo[:, None], row_hi[:, None],
                               q_len, kv_len, mask_args, mask_data, patterns, pattern_of + step // SUBS,
                               partial_mask, SPANS, BQ, BK)
            p, m_new, m_ref = _masked_softmax_step(tl.where(allowed, s * qk_scale, float("-inf")), m_i)
        else:  # EITHER: the spans mask the steps they do not cover (a branch, not a select per score)
            t = s * qk_scale
            if not _whole(at_n, BLOCK_N, whole_lo, whole_hi):
                t = tl.where(_inside(offs_n[None, :], row_lo[:, None], row_hi[:, None]), t, float("-inf"))
            p, m_new, m_ref = _masked_softmax_step(t, m_i)
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_step(v_desc, v_base, b, kv_head, at_n, offs_n, kv_len, stride_vn, stride_vd, HEAD_DV, BLOCK_DV,
                       CHECK, TMA)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["q_len", "kv_len"])
def _attn_fwd(Q, K, V, K_desc, V_desc, Out, Lse,
              stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
              n_heads, group, q_len, kv_len, qk_scale,
              head_slot, n_mask_heads, order, n_active, n_q_blocks,
              full_ptr, full_idx, part_ptr, part_idx, part_pattern, mask_args, args_width, mask_data, patterns,
              row_lo, row_hi, part_steps,
              partial_mask: tl.constexpr, SPANS: tl.constexpr, ONE_LOOP: tl.constexpr, CUT: tl.constexpr,
              BQ: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
              PRECISION: tl.constexpr, TMA: tl.constexpr):
    tl.static_assert(BQ % BLOCK_M == 0, "a program's rows must lie in one table query block")
    tl.static_assert(BK % BLOCK_N == 0, "a key step must lie in one table key block")
    bh = tl.program_id(1)
    b, h = bh // n_heads, bh % n_heads
    slot, qb, start_m = _query_program(h, head_slot, n_mask_heads, order, n_active, n_q_blocks, BQ, BLOCK_M)
    if (qb < 0) | (start_m >= q_len):
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    kv_head = h // group
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    mask_args += slot * args_width
    spans_at = slot.to(tl.int64) * q_len
    span_lo, span_hi = _spans_of(row_lo + spans_at, row_hi + spans_at, offs_m, q_len, SPANS)
    q = _load_tile(q_base, offs_m, q_len, stride_qm, stride_qd, HEAD_D, BLOCK_D, CUT)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    STEPS: tl.constexpr = BK // BLOCK_N  # kernel steps a listed key block
    at = slot * (n_q_blocks + 1) + qb
    if not ONE_LOOP:
        lo, hi = _list_span(full_ptr, at)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, offs_m, span_lo, span_hi, 0, 0, K_desc, V_desc, b, kv_head,
                                   k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, full_idx, part_pattern,
                                   lo * STEPS, hi * STEPS, q_len, kv_len, qk_scale, mask_args, mask_data, patterns,
                                   partial_mask, FULL, SPANS, CUT, BQ, BK, BLOCK_N, HEAD_D, BLOCK_D, HEAD_DV, BLOCK_DV,
                                   PRECISION, TMA)
    first, end = _partial_steps(part_ptr, at, part_steps, slot, start_m, q_len, STEPS, BLOCK_M, SPANS)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, offs_m, span_lo, span_hi, tl.max(span_lo, 0), tl.min(span_hi, 0),
                               K_desc, V_desc, b, kv_head, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                               part_idx, part_pattern, first, end, q_len, kv_len, qk_scale, mask_args, mask_data,
                               patterns, partial_mask, EITHER if ONE_LOOP else PARTIAL, SPANS, CUT, BQ, BK, BLOCK_N,
                               HEAD_D, BLOCK_D, HEAD_DV, BLOCK_DV, PRECISION, TMA)

    empty = l_i == 0.0  # rows with no allowed key: output 0, LSE -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    _store_tile(out_base, acc / l_safe[:, None], offs_m, q_len, stride_om, stride_od, HEAD_DV, BLOCK_DV)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    tl.store(Lse + bh.to(tl.int64) * q_len + offs_m, lse, mask=offs_m < q_len)


# -- backward -----------------------------------------------------------------------
@triton.jit
def _row_terms(o, do, Lse, dLse, Lse2, Delta, rows, in_range):
    """Per query row, for both backward kernels: ``delta = rowsum(dO * O) - dLSE`` and the LSE in
    base 2 (``+inf`` for empty rows, so that their ``P`` is 0); stored, and returned."""
    lse = tl.load(Lse + rows, mask=in_range, other=float("-inf"))
    finite = lse != float("-inf")
    d_lse = tl.where(finite, tl.load(dLse + rows, mask=in_range, other=0.0), 0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1) - d_lse
    lse2 = tl.where(finite, lse * LOG2E, float("inf"))
    tl.store(Delta + rows, delta, mask=in_range)
    tl.store(Lse2 + rows, lse2, mask=in_range)
    return lse2, delta


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, offs_m, row_lo, row_hi, whole_lo, whole_hi, k_desc, v_desc, b, kv_head, k_base,
              v_base, stride_kn, stride_kd, stride_vn, stride_vd, blocks, pattern_of, first, end, q_len, kv_len,
              qk_scale, mask_args, mask_data, patterns, partial_mask: tl.constexpr, KIND: tl.constexpr,
              SPANS: tl.constexpr, CUT: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, BLOCK_N: tl.constexpr,
              HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
              PRECISION: tl.constexpr, TMA: tl.constexpr):
    """``dQ += dS K`` over steps ``first`` to ``end`` of the key blocks ``blocks``, with
    ``dS = P * (dO V^T - delta)``."""
    SUBS: tl.constexpr = BK // BLOCK_N
    CHECK: tl.constexpr = (KIND != FULL) & CUT  # bounds-checked loads
    start_n = _step_start(blocks, first, end, BK, BLOCK_N)
    for step in range(first, end):
        at_n = start_n
        offs_n = at_n + tl.arange(0, BLOCK_N)
        start_n = _step_start(blocks, step + 1, end, BK, BLOCK_N)
        k = _load_step(k_desc, k_base, b, kv_head, at_n, offs_n, kv_len, stride_kn, stride_kd, HEAD_D, BLOCK_D, CHECK,
                       TMA)
        v = _load_step(v_desc, v_base, b, kv_head, at_n, offs_n, kv_len, stride_vn, stride_vd, HEAD_DV, BLOCK_DV,
                       CHECK, TMA)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        if KIND == PARTIAL:
            allowed = _allowed(offs_m[:, None], offs_n[None, :], offs_n[None, :], row_lo[:, None], row_hi[:, None],
                               q_len, kv_len, mask_args, mask_data, patterns, pattern_of + step // SUBS,
                               partial_mask, SPANS, BQ, BK)
            p = tl.where(allowed, p, 0.0)
        elif KIND == EITHER:
            if not _whole(at_n, BLOCK_N, whole_lo, whole_hi):
                p = tl.where(_inside(offs_n[None, :], row_lo[:, None], row_hi[:, None]), p, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=["q_len", "kv_len"])
def _attn_bwd_dq(Q, K, V, K_desc, V_desc, Out, dOut, Lse, dLse, Lse2, Delta, dQ,
                 stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
                 stride_dob, stride_doh, stride_dom, stride_dod, stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                 n_heads, group, q_len, kv_len, qk_scale, scale,
                 head_slot, n_mask_heads, order, n_active, n_q_blocks,
                 full_ptr, full_idx, part_ptr, part_idx, part_pattern, mask_args, args_width, mask_data, patterns,
                 row_lo, row_hi, part_steps,
                 partial_mask: tl.constexpr, SPANS: tl.constexpr, ONE_LOOP: tl.constexpr, CUT: tl.constexpr,
                 BQ: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
                 PRECISION: tl.constexpr, TMA: tl.constexpr):
    tl.static_assert(BQ % BLOCK_M == 0, "a program's rows must lie in one table query block")
    tl.static_assert(BK % BLOCK_N == 0, "a key step must lie in one table key block")
    bh = tl.program_id(1)
    b, h = bh // n_heads, bh % n_heads
    slot, qb, start_m = _query_program(h, head_slot, n_mask_heads, order, n_active, n_q_blocks, BQ, BLOCK_M)
    if (qb < 0) | (start_m >= q_len):
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    kv_head = h // group
    k_base = K + b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    mask_args += slot * args_width
    spans_at = slot.to(tl.int64) * q_len
    span_lo, span_hi = _spans_of(row_lo + spans_at, row_hi + spans_at, offs_m, q_len, SPANS)
    q = _load_tile(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, offs_m, q_len, stride_qm,
                   stride_qd, HEAD_D, BLOCK_D, CUT)
    do = _load_tile(dOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh, offs_m, q_len, stride_dom,
                    stride_dod, HEAD_DV, BLOCK_DV, CUT)
    o = _load_tile(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh, offs_m, q_len, stride_om,
                   stride_od, HEAD_DV, BLOCK_DV, CUT)
    lse2, delta = _row_terms(o, do, Lse, dLse, Lse2, Delta, bh.to(tl.int64) * q_len + offs_m, offs_m < q_len)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    STEPS: tl.constexpr = BK // BLOCK_N  # kernel steps a listed key block
    at = slot * (n_q_blocks + 1) + qb
    if not ONE_LOOP:
        lo, hi = _list_span(full_ptr, at)
        dq = _dq_tiles(dq, q, do, lse2, delta, offs_m, span_lo, span_hi, 0, 0, K_desc, V_desc, b, kv_head, k_base,
                       v_base, stride_kn, stride_kd, stride_vn, stride_vd, full_idx, part_pattern, lo * STEPS,
                       hi * STEPS, q_len, kv_len, qk_scale, mask_args, mask_data, patterns, partial_mask, FULL, SPANS,
                       CUT, BQ, BK, BLOCK_N, HEAD_D, BLOCK_D, HEAD_DV, BLOCK_DV, PRECISION, TMA)
    first, end = _partial_steps(part_ptr, at, part_steps, slot, start_m, q_len, STEPS, BLOCK_M, SPANS)
    dq = _dq_tiles(dq, q, do, lse2, delta, offs_m, span_lo, span_hi, tl.max(span_lo, 0), tl.min(span_hi, 0),
                   K_desc, V_desc, b, kv_head, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, part_idx,
                   part_pattern, first, end, q_len, kv_len, qk_scale, mask_args, mask_data, patterns, partial_mask,
                   EITHER if ONE_LOOP else PARTIAL, SPANS, CUT, BQ, BK, BLOCK_N, HEAD_D, BLOCK_D, HEAD_DV, BLOCK_DV,
                   PRECISION, TMA)
    _store_tile(dQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh, dq * scale, offs_m, q_len,
                stride_dqm, stride_dqd, HEAD_D, BLOCK_D)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, offs_n, col_lo, col_hi, whole_lo, whole_hi, q_desc, do_desc, b, h, q_base, do_base,
                lse2_base, delta_base, stride_qm, stride_qd, stride_dom, stride_dod, blocks, pattern_of, first, end,
                q_len, kv_len, qk_scale, mask_args, mask_data, patterns, partial_mask: tl.constexpr, KIND: tl.constexpr,
                SPANS: tl.constexpr, CUT: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr,
                HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
                PRECISION: tl.constexpr, TMA: tl.constexpr):
    """``dV += P^T dO`` and ``dK += dS^T Q`` over steps ``first`` to ``end`` of the query blocks
    ``blocks``, in the transposed orientation (keys down, queries across). Queries past the end
    load as zero with ``lse2 = +inf``, so their ``P`` is 0 even before the predicate says so."""
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
        p_t = tl.math.exp2(s_t * qk_scale - lse2[None, :])
        if KIND == PARTIAL:
            allowed = _allowed(offs_m[None, :], offs_n[:, None], offs_m[None, :], col_lo[:, None], col_hi[:, None],
                               q_len, kv_len, mask_args, mask_data, patterns, pattern_of + step // SUBS,
                               partial_mask, SPANS, BQ, BK)
            p_t = tl.where(allowed, p_t, 0.0)
        elif KIND == EITHER:
            if not _whole(at_m, BLOCK_M, whole_lo, whole_hi):
                p_t = tl.where(_inside(offs_m[None, :], col_lo[:, None], col_hi[:, None]), p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["q_len", "kv_len"])
def _attn_bwd_dkdv(Q, K, V, dOut, Q_desc, dO_desc, Lse2, Delta, dK, dV,
                   stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
                   stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                   n_heads, n_kv_heads, group, q_len, kv_len, qk_scale, scale,
                   head_slot, n_mask_heads, kv_order, n_kv_blocks,
                   full_ptr, full_idx, part_ptr, part_idx, part_pattern, mask_args, args_width, mask_data, patterns,
                   col_lo, col_hi, part_steps,
                   partial_mask: tl.constexpr, SPANS: tl.constexpr, ONE_LOOP: tl.constexpr, CUT: tl.constexpr,
                   BQ: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
                   PRECISION: tl.constexpr, TMA: tl.constexpr):
    tl.static_assert(BK % BLOCK_N == 0, "a program's keys must lie in one table key block")
    tl.static_assert(BQ % BLOCK_M == 0, "a query step must lie in one table query block")
    SUBS: tl.constexpr = BK // BLOCK_N
    STEPS: tl.constexpr = BQ // BLOCK_M  # kernel steps a listed query block
    bh = tl.program_id(1)
    b, kv_head = bh // n_kv_heads, bh % n_kv_heads
    task = tl.program_id(0)
    kb = tl.load(kv_order + task // SUBS)
    start_n = kb * BK + (task % SUBS) * BLOCK_N
    if start_n >= kv_len:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(K + b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh, offs_n, kv_len, stride_kn,
                   stride_kd, HEAD_D, BLOCK_D, CUT)
    v = _load_tile(V + b.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh, offs_n, kv_len, stride_vn,
                   stride_vd, HEAD_DV, BLOCK_DV, CUT)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(group):  # the query heads that share this key head
        h = kv_head * group + g
        slot = tl.load(head_slot + h % n_mask_heads)
        slot_args = mask_args + slot * args_width
        spans_at = slot.to(tl.int64) * kv_len
        span_lo, span_hi = _spans_of(col_lo + spans_at, col_hi + spans_at, offs_n, kv_len, SPANS)
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = dOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        row_base = (b * n_heads + h).to(tl.int64) * q_len
        at = slot * (n_kv_blocks + 1) + kb
        if not ONE_LOOP:
            lo, hi = _list_span(full_ptr, at)
            dk, dv = _dkdv_tiles(dk, dv, k, v, offs_n, span_lo, span_hi, 0, 0, Q_desc, dO_desc, b, h, q_base, do_base,
                                 Lse2 + row_base, Delta + row_base, stride_qm, stride_qd, stride_dom, stride_dod,
                                 full_idx, part_pattern, lo * STEPS, hi * STEPS, q_len, kv_len, qk_scale, slot_args,
                                 mask_data, patterns, partial_mask, FULL, SPANS, CUT, BQ, BK, BLOCK_M, HEAD_D, BLOCK_D,
                                 HEAD_DV, BLOCK_DV, PRECISION, TMA)
        first, end = _partial_steps(part_ptr, at, part_steps, slot, start_n, kv_len, STEPS, BLOCK_N, SPANS)
        dk, dv = _dkdv_tiles(dk, dv, k, v, offs_n, span_lo, span_hi, tl.max(span_lo, 0), tl.min(span_hi, 0), Q_desc,
                             dO_desc, b, h, q_base, do_base, Lse2 + row_base, Delta + row_base, stride_qm,
                             stride_qd, stride_dom, stride_dod, part_idx, part_pattern, first, end, q_len, kv_len,
                             qk_scale, slot_args, mask_data, patterns, partial_mask, EITHER if ONE_LOOP else PARTIAL,
                             SPANS, CUT, BQ, BK, BLOCK_M, HEAD_D, BLOCK_D, HEAD_DV, BLOCK_DV, PRECISION, TMA)
    _store_tile(dK + b.to(tl.int64) * stride_dkb + kv_head.to(tl.int64) * stride_dkh, dk * scale, offs_n, kv_len,
                stride_dkn, stride_dkd, HEAD_D, BLOCK_D)
    _store_tile(dV + b.to(tl.int64) * stride_dvb + kv_head.to(tl.int64) * stride_dvh, dv, offs_n, kv_len,
                stride_dvn, stride_dvd, HEAD_DV, BLOCK_DV)


# -- host side: per-mask plan -------------------------------------------------------------
_INTERPRETED = isinstance(_attn_fwd, InterpretedFunction)


def interpreting() -> bool:
    """True when these kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _INTERPRETED


#: PARTIAL tiles of masks that qualify (``spans.py``) test spans loaded once per program; False
#: makes every mask run its generated predicate (the tests and bench/gpu_bench.py run both).
USE_SPANS = True

#: Masks with spans and short rows walk one list per program, FULL and PARTIAL tiles together,
#: and test a step only where the program's spans do not cover it (``block_lists.merged``): one
#: pipeline start a program instead of two. False: two loops, as for every other mask (long rows
#: keep them: one loop spilled more registers in the backward, bench/RESULTS.md).
ONE_LOOP = True

_predicates: dict[str, Callable] = {}


def _predicate(source: str):
    """The ``@triton.jit`` predicate for ``source``, compiled once per distinct text (structure)."""
    if source not in _predicates:
        digest = hashlib.sha1(source.encode()).hexdigest()[:16]
        filename = f"maskc_generated/{FUNCTION_NAME}_{digest}.py"
        # Triton reads a function's source through inspect/linecache
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        namespace = {"triton": triton, "tl": tl, "__name__": f"maskc_generated_{digest}"}
        exec(compile(source, filename, "exec"), namespace)  # the text comes from predicate.py, not from user input
        python_fn = namespace[FUNCTION_NAME].fn  # run it the way the kernels that call it run
        _predicates[source] = InterpretedFunction(python_fn) if interpreting() else JITFunction(python_fn)
    return _predicates[source]


@dataclass(frozen=True)
class Plan:
    """What the launches of one compiled mask on one device need, built once."""

    source: str
    spans: bool  # PARTIAL tiles test the spans below instead of calling the generated predicate
    one_loop: bool  # spans and short rows: one list per group (ONE_LOOP)
    row_lo: torch.Tensor  # int32[S, q_len] with spans, else one unused zero; the same for the next three
    row_hi: torch.Tensor
    col_lo: torch.Tensor  # int32[S, kv_len]
    col_hi: torch.Tensor
    cut: bool  # the end of the sequence cuts a table block short: PARTIAL tiles check bounds
    head_slot: torch.Tensor  # int32[H_mask]
    forward: BlockLists  # per query block: its FULL and PARTIAL key blocks
    backward: BlockLists  # per key block: its FULL and PARTIAL query blocks
    q_order: torch.Tensor  # int32[S, nQ]: query blocks with work first, per slot (module docstring: order)
    n_active_q: torch.Tensor  # int32[S]: query blocks with work, per slot
    max_active_q: int
    queries_covered: bool  # every query block of every slot has work: outputs need no zero fill
    short_rows: bool  # query blocks with work hold fewer than tuning.SHORT_ROWS tiles on average
    kv_order: torch.Tensor  # int32[n]: key blocks with work (any slot), ordered like q_order
    keys_covered: bool
    mask_args: torch.Tensor  # int32[S, A]
    mask_data: torch.Tensor  # int32[N]
    patterns: torch.Tensor  # uint8[P, BQ, BK]
    # (direction, program, step) -> int32[S, programs, 2], the trimmed PARTIAL steps (_partial_steps_of)
    trimmed: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def predicate(self):
        return _predicate(self.source)


def _build_plan(cm, device: torch.device) -> Plan:
    code = mask_code(cm)
    table = cm.table
    fwd_work = table.forward.work.numpy()
    n_active_q = (fwd_work > 0).sum(axis=1)
    kv_work = table.backward.work.numpy().sum(axis=0)
    short_rows = bool(fwd_work.sum() < tuning.SHORT_ROWS * max(int(n_active_q.sum()), 1))
    if short_rows:  # in sequence order, blocks with work first (bench/RESULTS.md: window 376 against 343 TFLOP/s)
        q_order = torch.from_numpy(np.argsort(fwd_work == 0, axis=1, kind="stable").astype(np.int32))
        kv_order = np.flatnonzero(kv_work > 0)
    else:
        q_order = table.forward.order
        kv_order = np.argsort(-kv_work, kind="stable")[: int((kv_work > 0).sum())]
    bq, bk = cm.block_size

    def ragged(length: int, block: int) -> int:
        return length // block if length % block else -1

    found = spans(cm) if USE_SPANS else None
    unused = torch.zeros(1, dtype=torch.int32, device=device)

    def span(name: str) -> torch.Tensor:
        return unused if found is None else torch.from_numpy(getattr(found, name)).to(device)

    one_loop = found is not None and short_rows and ONE_LOOP

    def lists(direction, ragged_entry: int) -> BlockLists:
        found_lists = expand(direction, ragged_entry)
        return (merged(found_lists) if one_loop else found_lists).to(device)

    return Plan(
        source=code.source,
        spans=found is not None,
        one_loop=one_loop,
        row_lo=span("row_lo"),
        row_hi=span("row_hi"),
        col_lo=span("col_lo"),
        col_hi=span("col_hi"),
        cut=ragged(cm.q_len, bq) >= 0 or ragged(cm.kv_len, bk) >= 0,
        head_slot=table.head_slot.to(device),
        forward=lists(table.forward, ragged(cm.kv_len, bk)),
        backward=lists(table.backward, ragged(cm.q_len, bq)),
        q_order=q_order.contiguous().to(device),
        n_active_q=torch.from_numpy(n_active_q.astype(np.int32)).to(device),
        max_active_q=int(n_active_q.max(initial=0)),
        queries_covered=bool((n_active_q == cm.n_q_blocks).all()),
        short_rows=short_rows,
        kv_order=nonempty(torch.from_numpy(kv_order.astype(np.int32)).to(device)),
        keys_covered=len(kv_order) == cm.n_kv_blocks,
        mask_args=torch.from_numpy(code.args).to(device),
        mask_data=torch.from_numpy(code.data).to(device),
        patterns=nonempty(table.patterns.to(torch.uint8).contiguous().to(device)),
    )


_plans: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def plan_for(cm, device: torch.device) -> Plan:
    per_device = _plans.setdefault(cm, {})
    if device not in per_device:
        per_device[device] = _build_plan(cm, device)
    return per_device[device]


def _partial_steps_of(cm, plan: Plan, direction: str, config: tuning.TileConfig) -> torch.Tensor:
    """With spans, each program's PARTIAL steps that meet its spans (``spans.partial_steps``), on
    the device, for ``direction`` (``"forward"``: programs of ``block_m`` rows stepping
    ``block_n`` keys, for the forward and dQ; ``"backward"``: ``block_n`` keys stepping
    ``block_m`` rows); built once per plan and tiles. Without spans, unused."""
    if not plan.spans:
        return plan.row_lo
    forward = direction == "forward"
    program, step = (config.block_m, config.block_n) if forward else (config.block_n, config.block_m)
    key = (direction, program, step)
    if key not in plan.trimmed:
        bq, bk = cm.block_size
        lists = plan.forward if forward else plan.backward
        lo, hi = (plan.row_lo, plan.row_hi) if forward else (plan.col_lo, plan.col_hi)
        found = partial_steps(lists.part_ptr.cpu().numpy(), lists.part_idx.cpu().numpy(), lo.cpu().numpy(),
                              hi.cpu().numpy(), bq if forward else bk, bk if forward else bq, program, step)
        plan.trimmed[key] = torch.from_numpy(found).to(lo.device)
    return plan.trimmed[key]


def kernel_source(cm) -> str:
    """The generated Triton code of ``cm``: its PARTIAL-tile predicate, with where it runs."""
    if USE_SPANS and spans(cm) is not None:
        where = (
            "# Every row and key column of this mask allows one interval, so the kernels test PARTIAL\n"
            "# tiles against spans loaded once per program (maskc/codegen/spans.py):\n"
            "#     forward, dQ: row_lo[i] <= j < row_hi[i];   dK/dV: col_lo[j] <= i < col_hi[j]\n"
            "# and run this predicate only with triton_attention.USE_SPANS = False.\n"
        )
    else:
        where = (
            "# called on PARTIAL tiles by _attn_fwd, _attn_bwd_dq and _attn_bwd_dkdv\n"
            "# (maskc/codegen/triton_attention.py); FULL tiles run without it, EMPTY tiles never run.\n"
        )
    header = f"# maskc: generated predicate for {cm!r}\n{where}import triton\nimport triton.language as tl\n\n\n"
    return header + mask_code(cm).source


# -- launches -------------------------------------------------------------------------
def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 only applies to float32 operands


_fitted: dict[tuple, tuning.TileConfig] = {}


def _run(kernel: str, cm, plan: Plan, q, v, launch: Callable[[tuning.TileConfig], None]) -> None:
    """``launch`` with the kernel's tile config, or the next smaller one while the GPU lacks the
    shared memory it needs (masks with bit patterns pipeline one more tile); the config that
    fits is remembered per kernel, device, dtype, head dims, table blocks, mask structure and row
    length (``Plan.short_rows``)."""
    bq, bk = cm.block_size
    key = (kernel, q.device, q.dtype, q.shape[-1], v.shape[-1], cm.block_size, plan.source, plan.spans, plan.one_loop,
           plan.cut, plan.short_rows)
    if key in _fitted:
        launch(_fitted[key])
        return

    def bench(config: tuning.TileConfig) -> float:
        return triton.testing.do_bench(lambda: launch(config), warmup=5, rep=25)

    config = tuning.config_for(kernel, q.device, q.dtype, q.shape[-1], bq, bk, plan.short_rows, bench=bench)
    while True:
        try:
            launch(config)
        except OutOfResources:  # raised before the kernel runs: nothing was written
            config = tuning.smaller(config)
            if config is None:
                raise
            continue
        _fitted[key] = config
        return


def _output(shape, dtype, device, covered: bool, fill: float = 0.0) -> torch.Tensor:
    """A kernel output; pre-filled (0, or -inf for the LSE) where the programs do not cover
    every row: blocks with no work get no program."""
    if covered:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, fill, dtype=dtype, device=device)


#: The kernels whose loop steps copy their K/V (forward, dQ) or Q/dO (dK/dV) tiles with the tensor
#: memory accelerator (``_load_step``) on GPUs that have one (sm_90 and later), where the tensors
#: allow a descriptor. dK/dV loads with pointers: with TMA it measured 1-3% slower (bench/RESULTS.md).
USE_TMA = frozenset({"forward", "dq"})


def _tma(kernel: str, *tensors: torch.Tensor) -> bool:
    """Whether ``kernel`` copies its step tiles of ``tensors`` with TMA: it is in ``USE_TMA``, the
    GPU is sm_90 or later (or Triton's interpreter runs the kernels: it runs descriptors too), and
    a descriptor can describe each tensor (unit last stride, 16-byte aligned base and other
    strides: the copy engine's rules)."""
    if kernel not in USE_TMA:
        return False
    if not interpreting() and torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
        return False
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0
               and all(st > 0 and st * t.element_size() % 16 == 0 for st in _strides(t)[:-1]) for t in tensors)


def _strides(t: torch.Tensor) -> list[int]:
    """``t``'s strides, with those of dimensions of size 1 (no index moves along them, and torch
    leaves them arbitrary) set past the whole tensor, a stride the copy engine accepts."""
    extent = max(size * stride for size, stride in zip(t.shape, t.stride()))
    return [stride if size > 1 else extent for size, stride in zip(t.shape, t.stride())]


def _descriptor(t: torch.Tensor, rows: int, tma: bool):
    """A descriptor of ``t[batch, heads, rows, cols]`` for tiles of ``rows`` rows (``_load_step``),
    or ``t`` itself where the kernels load with pointers (``tma`` False: the argument is unused)."""
    if not tma:
        return t
    return TensorDescriptor(t, list(t.shape), _strides(t), [1, 1, rows, tuning.head_bucket(t.shape[-1])])


def _shared(cm, plan: Plan, q, v) -> dict:
    """Constexpr and table arguments common to the three attention kernels."""
    bq, bk = cm.block_size
    return dict(
        partial_mask=plan.predicate, SPANS=plan.spans, ONE_LOOP=plan.one_loop, CUT=plan.cut, BQ=bq, BK=bk,
        HEAD_D=q.shape[-1], BLOCK_D=tuning.head_bucket(q.shape[-1]), HEAD_DV=v.shape[-1],
        BLOCK_DV=tuning.head_bucket(v.shape[-1]), PRECISION=_precision(q.dtype),
    )


def _forward(cm, q, k, v, scale: float):
    if scale < 0:  # the kernel needs scale >= 0 (see _fwd_tiles); softmax(scale * q k^T) is unchanged
        q, scale = -q, -scale
    plan = plan_for(cm, q.device)
    batch, n_heads, q_len, _ = q.shape
    out = _output(q.shape[:-1] + (v.shape[-1],), q.dtype, q.device, plan.queries_covered)
    lse = _output(q.shape[:-1], torch.float32, q.device, plan.queries_covered, fill=-math.inf)
    if plan.max_active_q == 0:
        return out, lse
    lists = plan.forward
    tma = _tma("forward", k, v)

    def launch(config: tuning.TileConfig) -> None:
        grid = (plan.max_active_q * (cm.block_size[0] // config.block_m), batch * n_heads)
        _attn_fwd[grid](
            q, k, v, _descriptor(k, config.block_n, tma), _descriptor(v, config.block_n, tma), out, lse,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            n_heads, n_heads // k.shape[1], q_len, cm.kv_len, scale * LOG2E.value,
            plan.head_slot, len(plan.head_slot), plan.q_order, plan.n_active_q, cm.n_q_blocks,
            lists.full_ptr, lists.full_idx, lists.part_ptr, lists.part_idx, lists.part_pattern,
            plan.mask_args, plan.mask_args.shape[1], plan.mask_data, plan.patterns, plan.row_lo, plan.row_hi,
            _partial_steps_of(cm, plan, "forward", config), BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            num_warps=config.num_warps, num_stages=config.num_stages, TMA=tma, **_shared(cm, plan, q, v),
        )

    _run("forward", cm, plan, q, v, launch)
    return out, lse


def _backward(cm, q, k, v, out, lse, d_out, d_lse, scale: float):
    plan = plan_for(cm, q.device)
    batch, n_heads, q_len, _ = q.shape
    n_kv_heads = k.shape[1]
    dq = _output(q.shape, q.dtype, q.device, plan.queries_covered)
    dk = _output(k.shape, k.dtype, k.device, plan.keys_covered)
    dv = _output(v.shape, v.dtype, v.device, plan.keys_covered)
    if plan.max_active_q == 0:
        return dq, dk, dv
    lse2 = torch.empty_like(lse)  # written by the dQ kernel for the rows with work, read by dK/dV
    delta = torch.empty_like(lse)
    d_lse = d_lse.to(torch.float32).contiguous()
    qk_scale = scale * LOG2E.value
    shared = _shared(cm, plan, q, v)
    fwd, bwd = plan.forward, plan.backward
    kv_tma, q_tma = _tma("dq", k, v), _tma("dkdv", q, d_out)

    def launch_dq(config: tuning.TileConfig) -> None:
        grid = (plan.max_active_q * (cm.block_size[0] // config.block_m), batch * n_heads)
        _attn_bwd_dq[grid](
            q, k, v, _descriptor(k, config.block_n, kv_tma), _descriptor(v, config.block_n, kv_tma), out, d_out, lse,
            d_lse, lse2, delta, dq, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *d_out.stride(), *dq.stride(),
            n_heads, n_heads // n_kv_heads, q_len, cm.kv_len, qk_scale, scale,
            plan.head_slot, len(plan.head_slot), plan.q_order, plan.n_active_q, cm.n_q_blocks,
            fwd.full_ptr, fwd.full_idx, fwd.part_ptr, fwd.part_idx, fwd.part_pattern,
            plan.mask_args, plan.mask_args.shape[1], plan.mask_data, plan.patterns, plan.row_lo, plan.row_hi,
            _partial_steps_of(cm, plan, "forward", config), BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            num_warps=config.num_warps, num_stages=config.num_stages, TMA=kv_tma, **shared,
        )

    def launch_dkdv(config: tuning.TileConfig) -> None:
        grid = (len(plan.kv_order) * (cm.block_size[1] // config.block_n), batch * n_kv_heads)
        _attn_bwd_dkdv[grid](
            q, k, v, d_out, _descriptor(q, config.block_m, q_tma), _descriptor(d_out, config.block_m, q_tma), lse2,
            delta, dk, dv, *q.stride(), *k.stride(), *v.stride(), *d_out.stride(), *dk.stride(), *dv.stride(),
            n_heads, n_kv_heads, n_heads // n_kv_heads, q_len, cm.kv_len, qk_scale, scale,
            plan.head_slot, len(plan.head_slot), plan.kv_order, cm.n_kv_blocks,
            bwd.full_ptr, bwd.full_idx, bwd.part_ptr, bwd.part_idx, bwd.part_pattern,
            plan.mask_args, plan.mask_args.shape[1], plan.mask_data, plan.patterns, plan.col_lo, plan.col_hi,
            _partial_steps_of(cm, plan, "backward", config), BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            num_warps=config.num_warps, num_stages=config.num_stages, TMA=q_tma, **shared,
        )

    _run("dq", cm, plan, q, v, launch_dq)  # first: it computes the row terms dK/dV reads
    _run("dkdv", cm, plan, q, v, launch_dkdv)
    return dq, dk, dv


# -- torch.library op and autograd ------------------------------------------------------
_masks: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
_handles: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_next_handle = itertools.count()


@torch.compiler.assume_constant_result
def _handle(cm) -> int:
    """A stable integer naming ``cm`` for the op (a constant in compiled graphs)."""
    if cm not in _handles:
        _handles[cm] = next(_next_handle)
        _masks[_handles[cm]] = cm
    return _handles[cm]


def _mask(handle: int):
    cm = _masks.get(handle)
    if cm is None:
        raise RuntimeError(f"maskc: the compiled mask {handle} of this attention call was freed")
    return cm


@torch.library.custom_op("maskc::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: int,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(_mask(mask), q, k, v, scale)


@_attention_op.register_fake
def _(q, k, v, mask, scale):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],)), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("maskc::attention_backward", mutates_args=())
def _attention_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           lse: torch.Tensor, d_out: torch.Tensor, d_lse: torch.Tensor, mask: int,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(_mask(mask), q, k, v, out, lse, d_out, d_lse, scale)


@_attention_backward_op.register_fake
def _(q, k, v, out, lse, d_out, d_lse, mask, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.mask, ctx.scale = mask, scale
    # the registry holds compiled masks weakly: the graph keeps this one alive until its
    # backward has run (``maskc.compile(spec)(q, k, v).sum().backward()`` frees it otherwise)
    ctx.compiled_mask = _mask(mask)


def _attention_grad(ctx, d_out, d_lse):
    q, k, v, out, lse = ctx.saved_tensors
    d_out = torch.zeros_like(out) if d_out is None else d_out
    d_lse = torch.zeros_like(lse) if d_lse is None else d_lse
    dq, dk, dv = _attention_backward_op(q, k, v, out, lse, d_out, d_lse, ctx.mask, ctx.scale)
    return dq, dk, dv, None, None


_attention_op.register_autograd(_attention_grad, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The op outside ``torch.compile``: the same forward and backward without the
    ``torch.library`` dispatch, which costs the host about 0.1-0.3 ms a call on an H100 machine,
    as much as the kernels of a short-row mask of 8K tokens take (bench/RESULTS.md)."""

    @staticmethod
    def forward(ctx, q, k, v, cm, scale):
        out, lse = _forward(cm, q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.compiled_mask, ctx.scale = cm, scale
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(ctx.compiled_mask, q, k, v, out, lse, d_out, d_lse, ctx.scale)
        return dq, dk, dv, None, None


def triton_attention(cm, q, k, v, scale: float):
    """``(out, lse)`` of attention under ``cm`` by the Triton kernels; differentiable. Under
    ``torch.compile`` it is the registered op ``maskc::attention``, so graphs do not break.

    Arguments are checked by ``launch.check_inputs`` and ``launch.check_triton_inputs``."""
    if torch.compiler.is_compiling():
        return _attention_op(q, k, v, _handle(cm), scale)
    return _EagerAttention.apply(q, k, v, cm, scale)


def triton_backward(cm, q, k, v, out, lse, d_out, d_lse, scale: float):
    """``(dq, dk, dv)`` by the Triton kernels from a forward's ``out`` and ``lse`` (no recompute)."""
    d_lse = torch.zeros_like(lse, dtype=torch.float32) if d_lse is None else d_lse
    return _backward(cm, q, k, v, out.to(q.dtype), lse.to(torch.float32), d_out.to(q.dtype), d_lse, scale)
