"""The sm_90 fast path of the forward: a warp-specialized Gluon kernel.

On Hopper two engines work asynchronously beside the warps: the tensor memory
accelerator (TMA) copies tiles from global to shared memory, and ``wgmma``
multiplies from shared memory or registers into registers without stalling the
warps that issued it. Plain Triton schedules them for us, in one instruction
stream. This kernel, written in Gluon (``triton.experimental.gluon``), schedules
them itself, as FlashAttention-3 does:

* a **load partition** of one warp walks the program's block lists and copies
  Q once, then each step's K and V tiles into a ring of ``STAGES`` buffers.
  Each buffer has a *ready* barrier that the copy engine completes and an
  *empty* barrier that the consumers release; K and V have their own, so that
  K's buffer is free again as soon as ``S = Q K^T`` has read it;
* two **consumer partitions** of one warpgroup each take half the rows
  (``PINGPONG``): they read the same K/V buffers (an *empty* barrier waits for
  both), and while one runs its softmax the other's products keep the tensor
  cores busy (no barrier orders their turns: the warp schedulers interleave
  them). Each also overlaps its own work: it issues step ``j``'s ``S = Q K^T``,
  then step ``j - 1``'s ``O += P V``, waits for the first only (``wgmma``
  completes in order) and runs step ``j``'s softmax while ``P V`` is still on
  the tensor cores (``OVERLAP``; without it each product is waited for at
  once).

::

    load warp     | Q | K0 V0 | K1 V1 | K2 ...       (TMA, STAGES buffers ahead)
    warpgroup 0   |     S0 softmax0 | S1, O += P0 V0 | softmax1 | S2, O += P1 V1 ...
    warpgroup 1   |         S0 softmax0 | S1, O += P0 V0 | softmax1 | ...

What each choice bought is measured in bench/RESULTS.md ("sm_90 fast path"):
at head dim 128 on an H200, the overlap 1-3%, ping-pong 10-25%, a third K/V
stage nothing.

What it reads is what ``kernels.py`` reads (``plan.py``): the packed tables
``T``, one program per ``BLOCK_M`` rows of query block ``Q_ORDER[slot, ...]``,
its FULL list walked without a mask, then its PARTIAL list (trimmed where the
plan has a ``TRIM`` section for these tiles) tested against the rows' spans;
with ``ONE_LOOP``, one list whose steps are tested where the spans do not
cover them. The scalar helpers that walk the lists are ``kernels.py``'s own.
EMPTY tiles are in no list and never copied. Rows and keys past the ends read
as zero (the copy engine fills them), rows past the end are not stored (the
copy engine clips the output), and a row with nothing allowed gets output 0
and LSE ``-inf``, never NaN.

What it covers (``launch.sm90_unsupported`` and ``CompiledMask.kernel_paths``
say why not, and the Triton forward runs instead): an sm_90 GPU, 16-bit inputs, equal Q/K and V head dims of 64, 128
or 256, masks whose PARTIAL tiles test spans (no generated predicate, no bit
patterns), table blocks that the tiles divide, tensors a TMA descriptor can
describe, and problems of at least ``launch.TMA_MIN_PAIRS`` pairs (below that
the host's descriptors cost more than the kernel saves). ``MASKC_GLUON=0``
turns it off. The backward runs the Triton kernels.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from . import kernels

#: head dim -> (BLOCK_M, BLOCK_N, STAGES). The consumers hold O (their rows x D, float32) and
#: two steps of scores and probabilities in registers: at D 256 the key step halves. Shared
#: memory: Q plus ``STAGES`` K and V tiles (D 128: 32 + 2 * 2 * 32 KB); a third stage measured
#: no faster.
CONFIGS = {64: (128, 128, 3), 128: (128, 128, 2), 256: (128, 64, 2)}

#: Registers a thread of the load warp keeps (it walks lists and issues copies); the consumers
#: get the rest of the multiprocessor's.
LOAD_REGS = gl.constexpr(32)
#: With ``PINGPONG``, registers a thread of the second consumer warpgroup keeps (the first, the
#: default partition, gets what is left: 240, see ``MAX_REGS``).
CONSUMER_REGS = gl.constexpr(232)
#: The kernel's register limit: registers are handed out by warpgroup, and the consumers' two
#: (one of 8 warps without ``PINGPONG``) and the load warp's group, 12 warps, share the
#: multiprocessor's 64K: 65536 / (12 * 32) = 170, rounded down to a multiple of 8. The
#: consumers then get (12 * 168 - 4 * 32 - 4 * 232) / 4 = 240 and 232.
MAX_REGS = 168

#: Run the forward's overlapped schedule (module docstring); ``False`` waits for each product.
OVERLAP = True
#: Split a program's rows over two consumer partitions of one warpgroup each (FlashAttention-3's
#: ping-pong): while one runs its softmax the other's products keep the tensor cores busy.
PINGPONG = True


# Triton 3.9 renamed the TMA copies (the old names raise there); 3.6 has only the old ones.
_tma_load = getattr(tma, "async_load", tma.async_copy_global_to_shared)
_tma_store = getattr(tma, "async_store", tma.async_copy_shared_to_global)

_GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}


def descriptor(t: torch.Tensor, strides: list[int], rows: int) -> TensorDescriptor:
    """A TMA descriptor of ``t[batch, heads, rows, cols]`` (``strides``: ``launch.strides``) for
    tiles of ``rows`` rows of one head, swizzled as ``wgmma`` reads them."""
    block = [1, 1, rows, t.shape[-1]]
    layout = gl.NVMMASharedLayout.get_default_for(block, _GL_DTYPES[t.dtype])
    return TensorDescriptor(t, list(t.shape), strides, block, layout)


# -- kernel ---------------------------------------------------------------------------------
@gluon.jit
def _step_key(i, n_full, full_idx, full_first, part_idx, part_first, part_end, BK: gl.constexpr,
              BLOCK_N: gl.constexpr):
    """The first key of a program's step ``i``: its FULL steps come first, then its PARTIAL."""
    start = 0
    if i < n_full:
        start = kernels._step_start(full_idx, full_first + i, full_first + n_full, BK, BLOCK_N)
    else:
        start = kernels._step_start(part_idx, part_first + i - n_full, part_end, BK, BLOCK_N)
    return start


@gluon.jit
def _fwd_load(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, b, h,
              kv_head, start_m, full_idx, full_first, n_full, part_idx, part_first, part_end, n_steps,
              BK: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """The load partition: Q (one buffer per consumer partition), then K and V
    of every step, ``STAGES`` buffers ahead."""
    HALVES: gl.constexpr = q_smem.shape[0]
    ROWS: gl.constexpr = q_desc.block_type.shape[2]
    if n_steps > 0:
        mbarrier.expect(q_bar, HALVES * q_desc.block_type.nbytes)
        for half in gl.static_range(HALVES):
            _tma_load(q_desc, [b, h, start_m + half * ROWS, 0], q_bar, q_smem.index(half))
    for i in range(n_steps):
        start_n = _step_key(i, n_full, full_idx, full_first, part_idx, part_first, part_end, BK, BLOCK_N)
        stage = i % STAGES
        phase = (i // STAGES) & 1
        mbarrier.wait(k_empty.index(stage), phase ^ 1)  # barriers start as if a phase had completed
        mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
        _tma_load(k_desc, [b, kv_head, start_n, 0], k_ready.index(stage), k_smem.index(stage))
        mbarrier.wait(v_empty.index(stage), phase ^ 1)
        mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
        _tma_load(v_desc, [b, kv_head, start_n, 0], v_ready.index(stage), v_smem.index(stage))


@gluon.jit
def _softmax_step(s, m_i, l_i, i, n_full, start_n, row_lo, row_hi, whole_lo, whole_hi, qk_scale,
                  ONE_LOOP: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
    """One online-softmax step of scores ``s``: masked by the rows' spans in PARTIAL steps (with
    ``ONE_LOOP``, in steps the spans do not cover); returns ``p``, the new maximum, the new row
    sums and the factor that rescales what was accumulated. A row with nothing allowed so far
    keeps ``m = -inf`` and exponentiates against 0."""
    t = s * qk_scale
    masked = i >= n_full
    if ONE_LOOP:
        masked = not kernels._whole(start_n, BLOCK_N, whole_lo, whole_hi)
    if masked:
        cols = start_n + gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout))
        t = gl.where(kernels._inside(cols[None, :], row_lo[:, None], row_hi[:, None]), t, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(t, 1))
    m_ref = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(t - m_ref[:, None])
    alpha = gl.exp2(m_i - m_ref)
    return p, m_new, l_i * alpha + gl.sum(p, 1), alpha


@gluon.jit
def _fwd_consume(q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, o_desc, Lse, b, h, bh,
                 start_m, q_len, span_lo_ptr, span_hi_ptr, full_idx, full_first, n_full, part_idx, part_first,
                 part_end, n_steps, qk_scale, ONE_LOOP: gl.constexpr, BK: gl.constexpr, BLOCK_M: gl.constexpr,
                 BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, STAGES: gl.constexpr, OVERLAP: gl.constexpr,
                 num_warps: gl.constexpr):
    """The consumer partition: the online softmax over the program's steps, then O and LSE."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    rows_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    dtype: gl.constexpr = q_smem.dtype
    q = q_smem.reshape([BLOCK_M, HEAD_D])  # BLOCK_M: this partition's rows

    rows = start_m + gl.arange(0, BLOCK_M, rows_layout)
    in_rows = rows < q_len
    row_lo = gl.load(span_lo_ptr + rows, mask=in_rows, other=0)
    row_hi = gl.load(span_hi_ptr + rows, mask=in_rows, other=0)
    whole_lo = gl.max(row_lo, 0)  # ONE_LOOP: a step inside every row's span needs no mask
    whole_hi = gl.min(row_hi, 0)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, rows_layout)
    l_i = gl.zeros([BLOCK_M], gl.float32, rows_layout)
    acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)

    if n_steps > 0:
        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_ready.index(0), 0)
        s = warpgroup_mma(q, k_smem.index(0).reshape([BLOCK_N, HEAD_D]).permute((1, 0)), s_zero, use_acc=False)
        mbarrier.arrive(k_empty.index(0), count=1)
        start_n = _step_key(0, n_full, full_idx, full_first, part_idx, part_first, part_end, BK, BLOCK_N)
        p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, 0, n_full, start_n, row_lo, row_hi, whole_lo, whole_hi,
                                           qk_scale, ONE_LOOP, BLOCK_N, s_layout)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        for i in range(1, n_steps):
            stage = i % STAGES
            prev = (i - 1) % STAGES
            mbarrier.wait(k_ready.index(stage), (i // STAGES) & 1)
            k = k_smem.index(stage).reshape([BLOCK_N, HEAD_D]).permute((1, 0))
            v = v_smem.index(prev).reshape([BLOCK_N, HEAD_D])
            start_n = _step_key(i, n_full, full_idx, full_first, part_idx, part_first, part_end, BK, BLOCK_N)
            if OVERLAP:  # S_i, then O += P_{i-1} V_{i-1}; softmax_i runs while the second does
                s = warpgroup_mma(q, k, s_zero, use_acc=False, is_async=True)
                mbarrier.wait(v_ready.index(prev), ((i - 1) // STAGES) & 1)
                acc = warpgroup_mma(p_op, v, acc, is_async=True)
                s = warpgroup_mma_wait(1, deps=(s, ))
                mbarrier.arrive(k_empty.index(stage), count=1)
                p, m_i, l_i, alpha_i = _softmax_step(s, m_i, l_i, i, n_full, start_n, row_lo, row_hi, whole_lo,
                                                     whole_hi, qk_scale, ONE_LOOP, BLOCK_N, s_layout)
                acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
            else:  # O += P_{i-1} V_{i-1}, then S_i, each waited for
                mbarrier.wait(v_ready.index(prev), ((i - 1) // STAGES) & 1)
                acc = warpgroup_mma(p_op, v, acc)
                s = warpgroup_mma(q, k, s_zero, use_acc=False)
                mbarrier.arrive(k_empty.index(stage), count=1)
                p, m_i, l_i, alpha_i = _softmax_step(s, m_i, l_i, i, n_full, start_n, row_lo, row_hi, whole_lo,
                                                     whole_hi, qk_scale, ONE_LOOP, BLOCK_N, s_layout)
            mbarrier.arrive(v_empty.index(prev), count=1)
            acc = acc * gl.convert_layout(alpha_i, gl.SliceLayout(1, o_layout))[:, None]
            p_op = gl.convert_layout(p.to(dtype), p_layout)
        last = (n_steps - 1) % STAGES
        mbarrier.wait(v_ready.index(last), ((n_steps - 1) // STAGES) & 1)
        acc = warpgroup_mma(p_op, v_smem.index(last).reshape([BLOCK_N, HEAD_D]), acc)
        mbarrier.arrive(v_empty.index(last), count=1)

    empty = l_i == 0.0  # rows with no allowed key (and programs with no step): output 0, LSE -inf
    l_safe = gl.where(empty, 1.0, l_i)
    gl.store(Lse + bh.to(gl.int64) * q_len + rows, gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe)) *
                                                               kernels.LN2), mask=in_rows)
    out = acc / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None]
    q.store(out.to(dtype))  # Q's buffer is free: every product that read it has completed
    fence_async_shared()
    _tma_store(o_desc, [b, h, start_m, 0], q_smem)  # rows past the end are clipped
    tma.store_wait(0)


@gluon.jit(do_not_specialize=["q_len", "kv_len"])
def _attn_fwd_sm90(q_desc, k_desc, v_desc, o_desc, Lse, T, n_heads, group, q_len, kv_len, n_q_blocks, qk_scale,
                   ONE_LOOP: gl.constexpr, TRIM: gl.constexpr, N_MASK_HEADS: gl.constexpr, BQ: gl.constexpr,
                   BK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
                   STAGES: gl.constexpr, OVERLAP: gl.constexpr, PINGPONG: gl.constexpr, num_warps: gl.constexpr):
    gl.static_assert(BQ % BLOCK_M == 0, "a program's rows must lie in one table query block")
    gl.static_assert(BK % BLOCK_N == 0, "a key step must lie in one table key block")
    bh = gl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    slot, qb, start_m = kernels._query_program(T, h, n_q_blocks, N_MASK_HEADS, BQ, BLOCK_M)
    at = slot * (n_q_blocks + 1) + qb
    full_ptr, full_idx, part_ptr, part_idx, part_pattern = kernels._query_lists(
        T, kernels.FWD_FULL_PTR, kernels.FWD_FULL_IDX, kernels.FWD_PART_PTR, kernels.FWD_PART_IDX,
        kernels.FWD_PART_PATTERN)
    STEPS: gl.constexpr = BK // BLOCK_N  # kernel steps a listed key block
    full_first = 0
    n_full = 0
    if not ONE_LOOP:
        lo, hi = kernels._list_span(full_ptr, at)
        full_first = lo * STEPS
        n_full = (hi - lo) * STEPS
    part_first, part_end = kernels._partial_steps(T, part_ptr, at, slot, start_m, q_len, STEPS, BLOCK_M, TRIM)
    n_steps = n_full + part_end - part_first
    if start_m >= q_len:
        n_steps = 0
    spans_at = slot.to(gl.int64) * q_len

    dtype: gl.constexpr = q_desc.dtype
    HALVES: gl.constexpr = 2 if PINGPONG else 1  # consumer partitions, each with its own rows and Q buffer
    ROWS: gl.constexpr = BLOCK_M // HALVES
    gl.static_assert(q_desc.block_type.shape[2] == ROWS, "Q and O are copied in tiles of a partition's rows")
    q_smem = gl.allocate_shared_memory(dtype, [HALVES] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(k_empty.index(s), count=HALVES)  # released by every consumer partition
        mbarrier.init(v_ready.index(s), count=1)
        mbarrier.init(v_empty.index(s), count=HALVES)

    row_lo = kernels._section(T, kernels.ROW_LO) + spans_at
    row_hi = kernels._section(T, kernels.ROW_HI) + spans_at
    if PINGPONG:  # two warpgroups of 64 rows on the same K/V: one's softmax runs beside the other's products
        gl.warp_specialize([
            (_fwd_consume, (q_smem.index(0), k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, o_desc, Lse,
                            b, h, bh, start_m, q_len, row_lo, row_hi, full_idx, full_first, n_full, part_idx,
                            part_first, part_end, n_steps, qk_scale, ONE_LOOP, BK, ROWS, BLOCK_N, HEAD_D, STAGES,
                            OVERLAP, ROWS // 16)),
            (_fwd_consume, (q_smem.index(1), k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, o_desc, Lse,
                            b, h, bh, start_m + ROWS, q_len, row_lo, row_hi, full_idx, full_first, n_full, part_idx,
                            part_first, part_end, n_steps, qk_scale, ONE_LOOP, BK, ROWS, BLOCK_N, HEAD_D, STAGES,
                            OVERLAP, ROWS // 16)),
            (_fwd_load, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                         b, h, h // group, start_m, full_idx, full_first, n_full, part_idx, part_first, part_end,
                         n_steps, BK, BLOCK_N, STAGES)),  # constexprs stay constexprs only written in place
        ], [ROWS // 16, 1], [CONSUMER_REGS, LOAD_REGS])
    else:
        gl.warp_specialize([
            (_fwd_consume, (q_smem.index(0), k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, o_desc, Lse,
                            b, h, bh, start_m, q_len, row_lo, row_hi, full_idx, full_first, n_full, part_idx,
                            part_first, part_end, n_steps, qk_scale, ONE_LOOP, BK, BLOCK_M, BLOCK_N, HEAD_D, STAGES,
                            OVERLAP, num_warps)),
            (_fwd_load, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                         b, h, h // group, start_m, full_idx, full_first, n_full, part_idx, part_first, part_end,
                         n_steps, BK, BLOCK_N, STAGES)),  # constexprs stay constexprs only written in place
        ], [1], [LOAD_REGS])
