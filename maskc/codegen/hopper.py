"""The sm_90 fast path: warp-specialized Gluon kernels for the forward, dQ and dK/dV.

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
  cores busy (by default no barrier orders their turns: the warp schedulers
  interleave them; ``TURNS`` orders them). Each also overlaps its own work: it issues step ``j``'s ``S = Q K^T``,
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

A program of few steps (a window, short documents) spends a good part of its time where
nothing overlaps: before its first product its warps read its lists from the tables (a chain of
dependent loads), then wait for Q and the first K; after its last, it writes O. The persistent
forward (``_attn_fwd_sm90_persistent``, ``PERSISTENT``, off until a GPU run measures it) runs a
program per multiprocessor that takes these programs' tiles in rounds: its load warp reads the
next tile's lists and copies its Q into a second buffer (where shared memory has room for one:
head dims 64 and 128) while the consumers still work on the tile before, and hands them the
tile in a record in shared memory; the K/V ring runs on from tile to tile. The dQ kernel has
the same variant (``_attn_bwd_dq_sm90_persistent``, ``DQ_PERSISTENT``), whose load warp copies
each next tile's Q and dO, and so has dK/dV (``_attn_bwd_dkdv_sm90_persistent``,
``DKDV_PERSISTENT``), whose load warp copies the next tile's K and V into a second buffer pair
and hands the consumers each query head's lists in a ring of two records.

The dQ kernel (``_attn_bwd_dq_sm90``, opt-in with dK/dV: ``MASKC_GLUON_BACKWARD=1``) walks the
forward's lists with the forward's schedule: its load warp copies the rows' Q and dO once, then
K and V per step; each consumer first reads its rows of O and stores its rows' LSE in base 2
and ``delta = rowsum(dO * O) - dLSE`` (the dK/dV kernel reads them), then per step computes
``S = Q K^T`` and ``dP = dO V^T``, ``P`` from the LSE, ``dS = P (dP - delta)`` and ``dQ += dS
K``. Step ``i`` issues its two products, then step ``i - 1``'s ``dQ``, which runs under step
``i``'s elementwise work (``DQ_OVERLAP``); two warpgroups of 64 rows take turns
(``DQ_PINGPONG``). dQ stays in registers and is stored once, with plain stores, since ring
attention adds it into a float32 sum (``ADD_DQ``).

Both backward kernels, like the forward, leave no product in flight from one iteration of
their loop to the next: where one was (the first dK/dV kernel issued the next step's products
before waiting for this step's), ptxas serialized every ``wgmma`` of the kernel (its log:
"wgmma.mma_async instructions are serialized"), and ``tests/test_compile_sm90.py`` checks
that it does not.

The dK/dV kernel (``_attn_bwd_dkdv_sm90``, opt-in: ``MASKC_GLUON_BACKWARD=1``) reads the same
tables in the other direction: one program per ``BLOCK_N`` keys of ``KV_ORDER``, walking the query
blocks listed for its key block, for every query head sharing its key head. Its load warp copies K
and V once, then each step's Q, dO and the rows' LSE (base 2) and delta that the dQ kernel (either)
stores, one after another into ``STAGES`` buffers. Its consumers hold dK and dV in registers over
the whole loop and, per step, compute ``S^T = K Q^T`` and ``dP^T = V dO^T`` (keys down), ``P^T``
from the LSE (masked by the keys' spans on PARTIAL steps), ``dV += P^T dO`` and ``dK += dS^T Q``
with P and dS as register operands (at head dim 256 a program's 64 keys are shared by two
warpgroups side by side, each holding half of dK and dV's columns); step ``i`` issues its two
products, then step ``i - 1``'s ``dV`` and ``dK`` (``DKDV_OVERLAP``). No atomics: every key has one
writer. Its first version measured slower than the Triton dK/dV kernel (bench/RESULTS.md), with its
``wgmma`` serialized; this one and the dQ kernel are not yet measured, hence opt-in.

What it covers (``launch.sm90_unsupported`` and ``CompiledMask.kernel_paths`` say why not, and the
Triton kernel runs instead): an sm_90 GPU, 16-bit inputs, equal Q/K and V head dims of 64, 128 or
256 (dK/dV: ``q_len`` a multiple of 4, for 16-byte aligned row-term copies), masks whose PARTIAL
tiles test spans (no generated predicate, no bit patterns), table blocks that the tiles divide,
tensors a TMA descriptor can describe, and problems of at least ``launch.TMA_MIN_PAIRS`` pairs
(below that the host's descriptors cost more than the kernel saves). ``MASKC_GLUON=0`` turns it
off. """

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

from . import kernels, tuning

#: head dim -> (BLOCK_M, BLOCK_N, STAGES) of the forward, dK/dV and dQ kernels: ``tuning.py``
#: keeps them (with why), so that the plan trims the PARTIAL steps of these tiles too.
CONFIGS = tuning.SM90_FORWARD
DKDV_CONFIGS = tuning.SM90_DKDV
DQ_CONFIGS = tuning.SM90_DQ

#: The dK/dV kernel's schedule: step ``i``'s ``S^T`` and ``dP^T`` issued before step ``i - 1``'s
#: ``dV`` and ``dK`` (``DKDV_OVERLAP``); a program's 128 keys split over two consumer partitions of
#: one warpgroup that take turns on the tensor cores (``DKDV_PINGPONG``; programs of 64 keys, as
#: at head dim 256, have one partition of two warpgroups side by side). With the first schedule,
#: whose ``wgmma`` ptxas serialized, one partition of both warpgroups measured 12% faster
#: (bench/RESULTS.md); both are to be measured again.
DKDV_OVERLAP = True
DKDV_PINGPONG = True
#: The dQ kernel's schedule, as the forward's: two consumer partitions of one warpgroup's rows
#: each (``DQ_PINGPONG``), step ``i``'s ``S`` and ``dP`` issued before step ``i - 1``'s ``dQ``
#: (``DQ_OVERLAP``).
DQ_OVERLAP = True
DQ_PINGPONG = True
#: Run the dQ kernel as a persistent kernel (``_attn_bwd_dq_sm90_persistent``), as ``PERSISTENT``
#: does the forward. Off until a GPU run measures it ("sm90 dQ persistent").
DQ_PERSISTENT = False
#: Run the dK/dV kernel as a persistent kernel (``_attn_bwd_dkdv_sm90_persistent``): its load
#: warp copies the next tile's K and V into a second buffer pair while the consumers finish the
#: tile before. Off until a GPU run measures it ("sm90 dK/dV persistent").
DKDV_PERSISTENT = False

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
#: Steps without a mask fold the scale into one FMA a score (``_softmax_step``), as
#: FlashAttention-3 does: 64 fewer instructions a step and thread of the softmax at tiles of
#: 128 x 128. Off until a GPU run measures it (bench/hopper_bench.py, "sm90 FMA softmax").
FMA_SOFTMAX = False
#: Run the forward as a persistent kernel (``_attn_fwd_sm90_persistent``): a program per
#: multiprocessor, whose load warp reads the next tile's lists and copies its Q while the
#: consumers finish the tile before. Off until a GPU run measures it ("sm90 persistent").
PERSISTENT = False
#: With ``PINGPONG`` and ``OVERLAP``, the two partitions issue each step's products in turns
#: (``_fwd_consume``), as FlashAttention-3 orders its warpgroups; without, the warp schedulers
#: interleave them as they come. Off until a GPU run measures it ("sm90 turns").
TURNS = False


# Triton 3.9 renamed the TMA copies (the old names raise there); 3.6 has only the old ones.
_tma_load = getattr(tma, "async_load", tma.async_copy_global_to_shared)
_tma_store = getattr(tma, "async_store", tma.async_copy_shared_to_global)
# and the barrier of a partition's threads (3.6 has only ``thread_barrier``)
_partition_barrier = getattr(gl, "barrier", None) or gl.thread_barrier

_GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}


def descriptor(t: torch.Tensor, strides: list[int], rows: int) -> TensorDescriptor:
    """A TMA descriptor of ``t[batch, heads, rows, cols]`` (``strides``: ``launch.strides``) for
    tiles of ``rows`` rows of one head, swizzled as ``wgmma`` reads them; of a flat float32 row
    term (the backward's LSE and delta, ``t[batch * heads * rows]``) for ``rows`` at a time."""
    if t.dim() == 1:
        block = [rows]
        return TensorDescriptor(t, list(t.shape), [1], block, gl.NVMMASharedLayout.get_default_for(block, gl.float32))
    block = [1, 1, rows, t.shape[-1]]
    layout = gl.NVMMASharedLayout.get_default_for(block, _GL_DTYPES[t.dtype])
    return TensorDescriptor(t, list(t.shape), strides, block, layout)


# -- shared by the kernels ------------------------------------------------------------------
@gluon.jit
def _barriers(n: gl.constexpr, count: gl.constexpr):
    """A ring of ``n`` mbarriers, each completing a phase after ``count`` arrivals (or a copy's
    expected bytes)."""
    bars = gl.allocate_shared_memory(gl.int64, [n, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(n):
        mbarrier.init(bars.index(i), count=count)
    return bars


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
def _program_steps(T, slot, block, n_blocks, pos, n, FORWARD: gl.constexpr, ONE_LOOP: gl.constexpr,
                   TRIM: gl.constexpr, TABLE_BLOCK: gl.constexpr, STEP: gl.constexpr, PROGRAM: gl.constexpr):
    """The steps of a program of ``PROGRAM`` positions from ``pos`` (of ``n``), in table block
    ``block`` (of ``n_blocks``) of slot ``slot``, over the forward's lists (``FORWARD``: key steps
    of ``STEP`` in blocks of ``TABLE_BLOCK``) or dK/dV's (query steps): its FULL list's first step
    and count, its PARTIAL list's (trimmed) steps, and both index arrays."""
    if FORWARD:
        full_ptr, full_idx, part_ptr, part_idx, part_pattern = kernels._query_lists(
            T, kernels.FWD_FULL_PTR, kernels.FWD_FULL_IDX, kernels.FWD_PART_PTR, kernels.FWD_PART_IDX,
            kernels.FWD_PART_PATTERN)
    else:
        full_ptr, full_idx, part_ptr, part_idx, part_pattern = kernels._query_lists(
            T, kernels.BWD_FULL_PTR, kernels.BWD_FULL_IDX, kernels.BWD_PART_PTR, kernels.BWD_PART_IDX,
            kernels.BWD_PART_PATTERN)
    at = slot * (n_blocks + 1) + block
    STEPS: gl.constexpr = TABLE_BLOCK // STEP  # kernel steps a listed block
    full_first = 0
    n_full = 0
    if not ONE_LOOP:
        lo, hi = kernels._list_span(full_ptr, at)
        full_first = lo * STEPS
        n_full = (hi - lo) * STEPS
    part_first, part_end = kernels._partial_steps(T, part_ptr, at, slot, pos, n, STEPS, PROGRAM, TRIM)
    return full_idx, full_first, n_full, part_idx, part_first, part_end


@gluon.constexpr_function
def _mma_layouts(num_warps, rows, cols, head_d):
    """The register layouts of a consumer of ``num_warps`` warps over ``rows`` rows: ``wgmma``
    results of ``cols`` columns (scores), of ``head_d`` columns (accumulated over the loop), and
    the second's left operand (probabilities or score gradients, from registers). A warpgroup's
    ``wgmma`` takes 64 rows: warpgroups beyond ``rows / 64`` sit side by side, each with its share
    of the columns (and all of the left operand, which ``convert_layout`` then shares out)."""
    down = min(num_warps, rows // 16)
    across = num_warps // down
    scores = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[down, across],
                                       instr_shape=[16, cols // across, 16])
    acc = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[down, across],
                                    instr_shape=[16, head_d // across, 16])
    return scores, acc, gl.DotOperandLayout(operand_index=0, parent=acc, k_width=2)


@gluon.jit
def _spans(lo_ptr, hi_ptr, pos, n):
    """The spans ``[lo, hi)`` of positions ``pos`` (empty past ``n``), and the largest start and
    the smallest end among them: a step inside those lies in every span (``_step_masked``)."""
    lo, hi = kernels._spans_of(lo_ptr, hi_ptr, pos, n, True)
    return lo, hi, gl.max(lo, 0), gl.min(hi, 0)


@gluon.jit
def _step_masked(i, n_full, start, whole_lo, whole_hi, ONE_LOOP: gl.constexpr, STEP: gl.constexpr):
    """Whether step ``i`` (``STEP`` positions from ``start``) needs a mask: a PARTIAL one
    (``i >= n_full``), or with ``ONE_LOOP`` one that the spans do not all cover whole."""
    masked = i >= n_full
    if ONE_LOOP:
        masked = not kernels._whole(start, STEP, whole_lo, whole_hi)
    return masked


@gluon.jit
def _mask_step(x, fill, i, n_full, start, lo, hi, whole_lo, whole_hi, ONE_LOOP: gl.constexpr, STEP: gl.constexpr,
               layout: gl.constexpr):
    """``x`` (rows down, the step's ``STEP`` positions from ``start`` across) with ``fill`` where a
    position lies outside its row's span ``[lo, hi)``, on the steps that need a mask
    (``_step_masked``)."""
    if _step_masked(i, n_full, start, whole_lo, whole_hi, ONE_LOOP, STEP):
        across = start + gl.arange(0, STEP, gl.SliceLayout(0, layout))
        x = gl.where(kernels._inside(across[None, :], lo[:, None], hi[:, None]), x, fill)
    return x


@gluon.jit
def _kv_load(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, b, kv_head, full_idx, full_first,
             n_full, part_idx, part_first, part_end, n_steps, base, BK: gl.constexpr, BLOCK_N: gl.constexpr,
             STAGES: gl.constexpr):
    """A load partition's loop over a query program's steps (forward, dQ): the step's K and V,
    each into a ring of ``STAGES`` buffers once the consumers have released it. ``base``: the
    steps the ring took before this program's (earlier tiles of a persistent program)."""
    for i in range(n_steps):
        start_n = _step_key(i, n_full, full_idx, full_first, part_idx, part_first, part_end, BK, BLOCK_N)
        stage = (base + i) % STAGES
        phase = ((base + i) // STAGES) & 1
        mbarrier.wait(k_empty.index(stage), phase ^ 1)  # barriers start as if a phase had completed
        mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
        _tma_load(k_desc, [b, kv_head, start_n, 0], k_ready.index(stage), k_smem.index(stage))
        mbarrier.wait(v_empty.index(stage), phase ^ 1)
        mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
        _tma_load(v_desc, [b, kv_head, start_n, 0], v_ready.index(stage), v_smem.index(stage))


@gluon.jit
def _query_program_steps(T, task, bh, n_heads, q_len, n_q_blocks, ONE_LOOP: gl.constexpr, TRIM: gl.constexpr,
                         N_MASK_HEADS: gl.constexpr, BQ: gl.constexpr, BK: gl.constexpr, BLOCK_M: gl.constexpr,
                         BLOCK_N: gl.constexpr):
    """What forward or dQ program ``task`` of batch and head ``bh`` starts from: its batch and head
    (``b``, ``h``), first row, slot and steps (``_program_steps``; none where it starts past the
    end)."""
    gl.static_assert(BQ % BLOCK_M == 0, "a program's rows must lie in one table query block")
    gl.static_assert(BK % BLOCK_N == 0, "a key step must lie in one table key block")
    b = bh // n_heads
    h = bh % n_heads
    slot, qb, start_m = kernels._query_program(T, h, task, n_q_blocks, N_MASK_HEADS, BQ, BLOCK_M)
    full_idx, full_first, n_full, part_idx, part_first, part_end = _program_steps(
        T, slot, qb, n_q_blocks, start_m, q_len, True, ONE_LOOP, TRIM, BK, BLOCK_N, BLOCK_M)
    n_steps = n_full + part_end - part_first
    if start_m >= q_len:
        n_steps = 0
    return b, h, start_m, slot, full_idx, full_first, n_full, part_idx, part_first, part_end, n_steps


@gluon.jit
def _slot_spans(lo, hi, slot, n):
    """Where the spans of ``slot`` start in the span sections from ``lo`` and ``hi`` (``n``
    positions a slot). Persistent programs read the sections' starts once, before their tiles,
    so that no tile waits for those loads."""
    spans_at = slot.to(gl.int64) * n
    return lo + spans_at, hi + spans_at


@gluon.jit
def _row_spans(T, slot, q_len):
    """Where the row spans of ``slot`` start: the lows and the highs."""
    return _slot_spans(kernels._section(T, kernels.ROW_LO), kernels._section(T, kernels.ROW_HI), slot, q_len)


@gluon.jit
def _kv_ring(k_desc, v_desc, STAGES: gl.constexpr, CONSUMERS: gl.constexpr):
    """A query program's K and V buffers, ``STAGES`` of each, with their *ready* barriers (the
    copy engine completes them) and *empty* barriers (every one of ``CONSUMERS`` partitions
    releases them)."""
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    return (k_smem, v_smem, _barriers(STAGES, 1), _barriers(STAGES, CONSUMERS), _barriers(STAGES, 1),
            _barriers(STAGES, CONSUMERS))


@gluon.jit
def _rows_load(q_desc, do_desc, q_smem, do_smem, bar, first, b, h, start_m, copy, HALVES: gl.constexpr):
    """A query program's Q, and its dO where ``do_desc`` is given (dQ; ``None`` in the forward),
    into buffers ``first`` to ``first + HALVES`` (one per consumer partition), completing ``bar``;
    where ``copy`` is false (a forward program with no step, a dQ program past the end) nothing
    is copied and ``bar`` only completes (the forward's consumers write zeros, through Q's
    buffer)."""
    ROWS: gl.constexpr = q_desc.block_type.shape[2]
    if copy:
        if do_desc is None:
            mbarrier.expect(bar, HALVES * q_desc.block_type.nbytes)
        else:
            mbarrier.expect(bar, HALVES * (q_desc.block_type.nbytes + do_desc.block_type.nbytes))
        for half in gl.static_range(HALVES):
            _tma_load(q_desc, [b, h, start_m + half * ROWS, 0], bar, q_smem.index(first + half))
            if do_desc is not None:
                _tma_load(do_desc, [b, h, start_m + half * ROWS, 0], bar, do_smem.index(first + half))
    else:
        mbarrier.arrive(bar, count=1)


# -- persistent programs --------------------------------------------------------------------
#: Fields of a record (``_record``), in which a persistent program's load warp hands its consumers
#: what they need of the next tile (in dK/dV, of the next query head's lists).
RECORD = gl.constexpr(8)


@gluon.constexpr_function
def _record_layout(num_warps):
    """A record in registers: every thread holds all of it (the fields are read in-thread)."""
    return gl.BlockedLayout([RECORD], [32], [num_warps], [0])


@gluon.jit
def _record(f0, f1, f2, f3, f4, f5, f6, f7, num_warps: gl.constexpr):
    """A record of eight fields (``_take_record`` gives them back): what a consumer needs of a
    tile, which the tables give only through a chain of dependent loads that the load warp runs
    while the consumers work. Query programs (``_tiles_load``): batch and head, first row, slot,
    FULL list start and count, PARTIAL steps, steps; dK/dV: ``_dkdv_load_tiles``."""
    at = gl.arange(0, RECORD, _record_layout(num_warps))
    return (gl.where(at == 0, f0, 0) + gl.where(at == 1, f1, 0) + gl.where(at == 2, f2, 0) +
            gl.where(at == 3, f3, 0) + gl.where(at == 4, f4, 0) + gl.where(at == 5, f5, 0) + gl.where(at == 6, f6, 0) +
            gl.where(at == 7, f7, 0))


@gluon.jit
def _field(record, at, n: gl.constexpr):
    """Field ``n`` of a record in registers (``at``: its positions)."""
    return gl.sum(gl.where(at == n, record, 0), 0)


@gluon.jit
def _take_record(records, ready, taken, num_warps: gl.constexpr):
    """The buffer of the ``taken``-th record a consumer takes from the ring ``records`` (one a
    tile, or in dK/dV a query head), once its ``ready`` barrier says it is there, and its fields
    in ``_record``'s order."""
    buffer = taken % records.shape[0]
    mbarrier.wait(ready.index(buffer), (taken // records.shape[0]) & 1)
    record = records.index(buffer).load(_record_layout(num_warps))
    at = gl.arange(0, RECORD, _record_layout(num_warps))
    return (buffer, _field(record, at, 0), _field(record, at, 1), _field(record, at, 2), _field(record, at, 3),
            _field(record, at, 4), _field(record, at, 5), _field(record, at, 6), _field(record, at, 7))


@gluon.jit
def _round_tile(r):
    """The tile a persistent program takes in round ``r``: the programs take a round's tiles in
    turn, forwards in even rounds and backwards in odd ones, so that tiles coming heaviest first
    (``Q_ORDER`` or ``KV_ORDER``, every head's first block before any head's second) even out over
    the rounds."""
    n = gl.num_programs(0)
    p = gl.program_id(0)
    if r % 2 == 1:
        p = n - 1 - p
    return r * n + p


@gluon.jit
def _tiles_load(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, records, rows_ready, rows_empty,
                k_ready, k_empty, v_ready, v_empty, T, n_heads, group, q_len, n_q_blocks, n_bh, n_tiles,
                ONE_LOOP: gl.constexpr, TRIM: gl.constexpr, N_MASK_HEADS: gl.constexpr, BQ: gl.constexpr,
                BK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """The load partition of a persistent query program (the forward; dQ with ``do_desc``): per
    tile, its lists, then (once the consumers have freed a row buffer) its record and rows
    (``_rows_load``), then its K and V steps into the ring, whose count carries on from tile to
    tile (``base``)."""
    Q_BUFFERS: gl.constexpr = records.shape[0]
    HALVES: gl.constexpr = q_smem.shape[0] // Q_BUFFERS
    base = 0
    taken = 0
    for r in range(gl.cdiv(n_tiles, gl.num_programs(0))):
        tile = _round_tile(r)
        if tile < n_tiles:
            bh = tile % n_bh
            b, h, start_m, slot, full_idx, full_first, n_full, part_idx, part_first, part_end, n_steps = \
                _query_program_steps(T, tile // n_bh, bh, n_heads, q_len, n_q_blocks, ONE_LOOP, TRIM, N_MASK_HEADS,
                                     BQ, BK, BLOCK_M, BLOCK_N)
            copy = n_steps > 0
            if do_desc is not None:  # every row gets its row terms, even one whose program has no step
                copy = start_m < q_len
            buffer = taken % Q_BUFFERS
            mbarrier.wait(rows_empty.index(buffer), ((taken // Q_BUFFERS) & 1) ^ 1)  # starts as if a phase completed
            records.index(buffer).store(_record(bh, start_m, slot, full_first, n_full, part_first, part_end,
                                                n_steps, 1))
            _partition_barrier()  # the record is written before the rows' barrier says it is there
            _rows_load(q_desc, do_desc, q_smem, do_smem, rows_ready.index(buffer), buffer * HALVES, b, h, start_m,
                       copy, HALVES)
            _kv_load(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, b, h // group, full_idx,
                     full_first, n_full, part_idx, part_first, part_end, n_steps, base, BK, BLOCK_N, STAGES)
            base += n_steps
            taken += 1


# -- forward --------------------------------------------------------------------------------
@gluon.jit
def _fwd_load(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, b, h,
              kv_head, start_m, full_idx, full_first, n_full, part_idx, part_first, part_end, n_steps,
              BK: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """The load partition: Q (one buffer per consumer partition), then K and V
    of every step, ``STAGES`` buffers ahead."""
    _rows_load(q_desc, None, q_smem, None, q_bar, 0, b, h, start_m, n_steps > 0, q_smem.shape[0])
    _kv_load(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, b, kv_head, full_idx, full_first,
             n_full, part_idx, part_first, part_end, n_steps, 0, BK, BLOCK_N, STAGES)


@gluon.jit
def _softmax_step(s, m_i, l_i, i, n_full, start_n, row_lo, row_hi, whole_lo, whole_hi, qk_scale,
                  ONE_LOOP: gl.constexpr, BLOCK_N: gl.constexpr, FMA: gl.constexpr, s_layout: gl.constexpr):
    """One online-softmax step of scores ``s``: masked by the rows' spans in PARTIAL steps (with
    ``ONE_LOOP``, in steps the spans do not cover); returns ``p``, the new maximum, the new row
    sums and the factor that rescales what was accumulated. A row with nothing allowed so far
    keeps ``m = -inf`` and exponentiates against 0. With ``FMA`` a step without a mask takes
    the maximum of the raw scores and scales it (``qk_scale >= 0``), and ``p = exp2(s *
    qk_scale - m)`` is one FMA a score instead of a multiply and a subtraction."""
    if FMA and not _step_masked(i, n_full, start_n, whole_lo, whole_hi, ONE_LOOP, BLOCK_N):
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)  # finite: every score of the step is allowed
        m_ref = m_new
        p = gl.exp2(s * qk_scale - m_ref[:, None])
    else:
        t = _mask_step(s * qk_scale, float("-inf"), i, n_full, start_n, row_lo, row_hi, whole_lo, whole_hi,
                       ONE_LOOP, BLOCK_N, s_layout)
        m_new = gl.maximum(m_i, gl.max(t, 1))
        m_ref = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(t - m_ref[:, None])
    alpha = gl.exp2(m_i - m_ref)
    return p, m_new, l_i * alpha + gl.sum(p, 1), alpha


@gluon.jit
def _fwd_tile(q_smem, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, o_desc, Lse, b, h, bh, start_m, q_len,
              span_lo_ptr, span_hi_ptr, full_idx, full_first, n_full, part_idx, part_first, part_end, n_steps, base,
              turn_base, qk_scale, ONE_LOOP: gl.constexpr, BK: gl.constexpr, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, STAGES: gl.constexpr, OVERLAP: gl.constexpr,
              FMA: gl.constexpr, turns, ME: gl.constexpr, TURNS: gl.constexpr, num_warps: gl.constexpr):
    """A consumer partition's work on one program's rows, whose Q is in ``q_smem``: the online
    softmax over the program's steps, then O (through Q's buffer, which is free again when this
    returns) and LSE. ``base``: the steps the K/V ring took before this program's (earlier tiles
    of a persistent program); ``turn_base``: the turns taken before. With ``TURNS`` (and
    ``OVERLAP``) the partitions issue each step's products in turns: partition ``ME`` waits for
    its barrier of ``turns`` before issuing and then completes the other's, so that one's softmax
    runs while the other's products run (FlashAttention-3's warp-scheduler barriers)."""
    s_layout: gl.constexpr = _mma_layouts(num_warps, BLOCK_M, BLOCK_N, HEAD_D)[0]
    o_layout: gl.constexpr = _mma_layouts(num_warps, BLOCK_M, BLOCK_N, HEAD_D)[1]
    p_layout: gl.constexpr = _mma_layouts(num_warps, BLOCK_M, BLOCK_N, HEAD_D)[2]
    rows_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    dtype: gl.constexpr = q_smem.dtype
    q = q_smem.reshape([BLOCK_M, HEAD_D])  # BLOCK_M: this partition's rows

    rows = start_m + gl.arange(0, BLOCK_M, rows_layout)
    in_rows = rows < q_len
    row_lo, row_hi, whole_lo, whole_hi = _spans(span_lo_ptr, span_hi_ptr, rows, q_len)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, rows_layout)
    l_i = gl.zeros([BLOCK_M], gl.float32, rows_layout)
    acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)

    if n_steps > 0:
        first = base % STAGES
        mbarrier.wait(k_ready.index(first), (base // STAGES) & 1)
        s = warpgroup_mma(q, k_smem.index(first).reshape([BLOCK_N, HEAD_D]).permute((1, 0)), s_zero, use_acc=False)
        mbarrier.arrive(k_empty.index(first), count=1)
        start_n = _step_key(0, n_full, full_idx, full_first, part_idx, part_first, part_end, BK, BLOCK_N)
        p, m_i, l_i, _ = _softmax_step(s, m_i, l_i, 0, n_full, start_n, row_lo, row_hi, whole_lo, whole_hi,
                                       qk_scale, ONE_LOOP, BLOCK_N, FMA, s_layout)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        for i in range(1, n_steps):
            stage = (base + i) % STAGES
            prev = (base + i - 1) % STAGES
            mbarrier.wait(k_ready.index(stage), ((base + i) // STAGES) & 1)
            k = k_smem.index(stage).reshape([BLOCK_N, HEAD_D]).permute((1, 0))
            v = v_smem.index(prev).reshape([BLOCK_N, HEAD_D])
            start_n = _step_key(i, n_full, full_idx, full_first, part_idx, part_first, part_end, BK, BLOCK_N)
            if OVERLAP:  # S_i, then O += P_{i-1} V_{i-1}; softmax_i runs while the second does
                if TURNS:  # the first partition's first wait passes: a barrier starts as if a phase had completed
                    mbarrier.wait(turns.index(ME), ((turn_base + i - 1) & 1) ^ (ME ^ 1))
                s = warpgroup_mma(q, k, s_zero, use_acc=False, is_async=True)
                mbarrier.wait(v_ready.index(prev), ((base + i - 1) // STAGES) & 1)
                acc = warpgroup_mma(p_op, v, acc, is_async=True)
                if TURNS:
                    mbarrier.arrive(turns.index(ME ^ 1), count=1)
                s = warpgroup_mma_wait(1, deps=(s, ))
                mbarrier.arrive(k_empty.index(stage), count=1)
                p, m_i, l_i, alpha_i = _softmax_step(s, m_i, l_i, i, n_full, start_n, row_lo, row_hi, whole_lo,
                                                     whole_hi, qk_scale, ONE_LOOP, BLOCK_N, FMA, s_layout)
                acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
            else:  # O += P_{i-1} V_{i-1}, then S_i, each waited for
                mbarrier.wait(v_ready.index(prev), ((base + i - 1) // STAGES) & 1)
                acc = warpgroup_mma(p_op, v, acc)
                s = warpgroup_mma(q, k, s_zero, use_acc=False)
                mbarrier.arrive(k_empty.index(stage), count=1)
                p, m_i, l_i, alpha_i = _softmax_step(s, m_i, l_i, i, n_full, start_n, row_lo, row_hi, whole_lo,
                                                     whole_hi, qk_scale, ONE_LOOP, BLOCK_N, FMA, s_layout)
            mbarrier.arrive(v_empty.index(prev), count=1)
            acc = acc * gl.convert_layout(alpha_i, gl.SliceLayout(1, o_layout))[:, None]
            p_op = gl.convert_layout(p.to(dtype), p_layout)
        last = (base + n_steps - 1) % STAGES
        mbarrier.wait(v_ready.index(last), ((base + n_steps - 1) // STAGES) & 1)
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


@gluon.jit
def _fwd_consume(q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, o_desc, Lse, b, h, bh, start_m,
                 q_len, span_lo_ptr, span_hi_ptr, full_idx, full_first, n_full, part_idx, part_first, part_end,
                 n_steps, qk_scale, ONE_LOOP: gl.constexpr, BK: gl.constexpr, BLOCK_M: gl.constexpr,
                 BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, STAGES: gl.constexpr, OVERLAP: gl.constexpr,
                 FMA: gl.constexpr, turns, ME: gl.constexpr, TURNS: gl.constexpr, num_warps: gl.constexpr):
    """A consumer partition of a program of one tile: its Q, then its work (``_fwd_tile``)."""
    mbarrier.wait(q_bar, 0)
    _fwd_tile(q_smem, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, o_desc, Lse, b, h, bh, start_m, q_len,
              span_lo_ptr, span_hi_ptr, full_idx, full_first, n_full, part_idx, part_first, part_end, n_steps, 0, 0,
              qk_scale, ONE_LOOP, BK, BLOCK_M, BLOCK_N, HEAD_D, STAGES, OVERLAP, FMA, turns, ME, TURNS, num_warps)


@gluon.jit(do_not_specialize=["q_len", "kv_len"])
def _attn_fwd_sm90(q_desc, k_desc, v_desc, o_desc, Lse, T, n_heads, group, q_len, kv_len, n_q_blocks, qk_scale,
                   ONE_LOOP: gl.constexpr, TRIM: gl.constexpr, N_MASK_HEADS: gl.constexpr, BQ: gl.constexpr,
                   BK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
                   STAGES: gl.constexpr, OVERLAP: gl.constexpr, PINGPONG: gl.constexpr, FMA: gl.constexpr,
                   TURNS: gl.constexpr, num_warps: gl.constexpr):
    bh = gl.program_id(1)
    b, h, start_m, slot, full_idx, full_first, n_full, part_idx, part_first, part_end, n_steps = _query_program_steps(
        T, gl.program_id(0), bh, n_heads, q_len, n_q_blocks, ONE_LOOP, TRIM, N_MASK_HEADS, BQ, BK, BLOCK_M, BLOCK_N)
    row_lo, row_hi = _row_spans(T, slot, q_len)

    dtype: gl.constexpr = q_desc.dtype
    HALVES: gl.constexpr = 2 if PINGPONG else 1  # consumer partitions, each with its own rows and Q buffer
    ROWS: gl.constexpr = BLOCK_M // HALVES
    gl.static_assert(q_desc.block_type.shape[2] == ROWS, "Q and O are copied in tiles of a partition's rows")
    q_smem = gl.allocate_shared_memory(dtype, [HALVES] + q_desc.block_type.shape, q_desc.layout)
    q_bar = _barriers(1, 1).index(0)
    k_smem, v_smem, k_ready, k_empty, v_ready, v_empty = _kv_ring(k_desc, v_desc, STAGES, HALVES)
    turns = _barriers(2, 1)  # with TURNS: each partition's turn to issue its products
    if PINGPONG:  # two warpgroups of 64 rows on the same K/V: one's softmax runs beside the other's products
        gl.warp_specialize([
            (_fwd_consume, (q_smem.index(0), k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, o_desc, Lse,
                            b, h, bh, start_m, q_len, row_lo, row_hi, full_idx, full_first, n_full, part_idx,
                            part_first, part_end, n_steps, qk_scale, ONE_LOOP, BK, ROWS, BLOCK_N, HEAD_D, STAGES,
                            OVERLAP, FMA, turns, 0, TURNS, ROWS // 16)),
            (_fwd_consume, (q_smem.index(1), k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, o_desc, Lse,
                            b, h, bh, start_m + ROWS, q_len, row_lo, row_hi, full_idx, full_first, n_full, part_idx,
                            part_first, part_end, n_steps, qk_scale, ONE_LOOP, BK, ROWS, BLOCK_N, HEAD_D, STAGES,
                            OVERLAP, FMA, turns, 1, TURNS, ROWS // 16)),
            (_fwd_load, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                         b, h, h // group, start_m, full_idx, full_first, n_full, part_idx, part_first, part_end,
                         n_steps, BK, BLOCK_N, STAGES)),  # constexprs stay constexprs only written in place
        ], [ROWS // 16, 1], [CONSUMER_REGS, LOAD_REGS])
    else:
        gl.warp_specialize([
            (_fwd_consume, (q_smem.index(0), k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, o_desc, Lse,
                            b, h, bh, start_m, q_len, row_lo, row_hi, full_idx, full_first, n_full, part_idx,
                            part_first, part_end, n_steps, qk_scale, ONE_LOOP, BK, BLOCK_M, BLOCK_N, HEAD_D, STAGES,
                            OVERLAP, FMA, turns, 0, False, num_warps)),
            (_fwd_load, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                         b, h, h // group, start_m, full_idx, full_first, n_full, part_idx, part_first, part_end,
                         n_steps, BK, BLOCK_N, STAGES)),  # constexprs stay constexprs only written in place
        ], [1], [LOAD_REGS])


@gluon.jit
def _fwd_consume_tiles(q_smem, k_smem, v_smem, records, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, o_desc,
                       Lse, T, n_heads, q_len, n_tiles, qk_scale, ONE_LOOP: gl.constexpr, BK: gl.constexpr,
                       ROWS: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, STAGES: gl.constexpr,
                       OVERLAP: gl.constexpr, FMA: gl.constexpr, turns, ME: gl.constexpr, TURNS: gl.constexpr,
                       num_warps: gl.constexpr):
    """A persistent consumer partition (rows ``ME * ROWS`` on of each tile): per tile, waits for
    its Q and record, works on it (``_fwd_tile``) and frees its Q buffer."""
    Q_BUFFERS: gl.constexpr = records.shape[0]
    HALVES: gl.constexpr = q_smem.shape[0] // Q_BUFFERS
    full_idx = kernels._section(T, kernels.FWD_FULL_IDX)
    part_idx = kernels._section(T, kernels.FWD_PART_IDX)
    lo = kernels._section(T, kernels.ROW_LO)
    hi = kernels._section(T, kernels.ROW_HI)
    base = 0
    turn_base = 0
    taken = 0
    for r in range(gl.cdiv(n_tiles, gl.num_programs(0))):
        if _round_tile(r) < n_tiles:
            buffer, bh, start_m, slot, full_first, n_full, part_first, part_end, n_steps = _take_record(
                records, q_ready, taken, num_warps)
            row_lo, row_hi = _slot_spans(lo, hi, slot, q_len)
            _fwd_tile(q_smem.index(buffer * HALVES + ME), k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, o_desc,
                      Lse, bh // n_heads, bh % n_heads, bh, start_m + ME * ROWS, q_len, row_lo, row_hi, full_idx,
                      full_first, n_full, part_idx, part_first, part_end, n_steps, base, turn_base, qk_scale,
                      ONE_LOOP, BK, ROWS, BLOCK_N, HEAD_D, STAGES, OVERLAP, FMA, turns, ME, TURNS, num_warps)
            mbarrier.arrive(q_empty.index(buffer), count=1)
            base += n_steps
            turn_base += gl.maximum(n_steps - 1, 0)
            taken += 1


@gluon.jit(do_not_specialize=["q_len", "kv_len"])
def _attn_fwd_sm90_persistent(q_desc, k_desc, v_desc, o_desc, Lse, T, n_heads, group, q_len, kv_len, n_q_blocks,
                              n_bh, qk_scale, ONE_LOOP: gl.constexpr, TRIM: gl.constexpr, N_MASK_HEADS: gl.constexpr,
                              BQ: gl.constexpr, BK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                              HEAD_D: gl.constexpr, STAGES: gl.constexpr, Q_BUFFERS: gl.constexpr,
                              OVERLAP: gl.constexpr, PINGPONG: gl.constexpr, FMA: gl.constexpr, TURNS: gl.constexpr,
                              num_warps: gl.constexpr):
    """The forward as a persistent kernel (``PERSISTENT``): a program per multiprocessor takes
    the ``_attn_fwd_sm90`` programs' tiles in rounds (``_round_tile``). Its load warp reads a
    tile's lists and copies its Q (into one of ``Q_BUFFERS``) while the consumers still work on
    the tile before, so that neither the tables' chain of loads nor Q's copy stands between
    two tiles; it hands the consumers the tile through a record in shared memory."""
    dtype: gl.constexpr = q_desc.dtype
    HALVES: gl.constexpr = 2 if PINGPONG else 1  # consumer partitions, each with its own rows and Q buffers
    ROWS: gl.constexpr = BLOCK_M // HALVES
    gl.static_assert(q_desc.block_type.shape[2] == ROWS, "Q and O are copied in tiles of a partition's rows")
    n_tiles = n_q_blocks * (BQ // BLOCK_M) * n_bh
    q_smem = gl.allocate_shared_memory(dtype, [Q_BUFFERS * HALVES] + q_desc.block_type.shape, q_desc.layout)
    records = gl.allocate_shared_memory(gl.int32, [Q_BUFFERS, RECORD], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    q_ready = _barriers(Q_BUFFERS, 1)
    q_empty = _barriers(Q_BUFFERS, HALVES)
    k_smem, v_smem, k_ready, k_empty, v_ready, v_empty = _kv_ring(k_desc, v_desc, STAGES, HALVES)
    turns = _barriers(2, 1)  # with TURNS: each partition's turn to issue its products
    if PINGPONG:
        gl.warp_specialize([
            (_fwd_consume_tiles, (q_smem, k_smem, v_smem, records, q_ready, q_empty, k_ready, k_empty, v_ready,
                                  v_empty, o_desc, Lse, T, n_heads, q_len, n_tiles, qk_scale, ONE_LOOP, BK, ROWS,
                                  BLOCK_N, HEAD_D, STAGES, OVERLAP, FMA, turns, 0, TURNS, ROWS // 16)),
            (_fwd_consume_tiles, (q_smem, k_smem, v_smem, records, q_ready, q_empty, k_ready, k_empty, v_ready,
                                  v_empty, o_desc, Lse, T, n_heads, q_len, n_tiles, qk_scale, ONE_LOOP, BK, ROWS,
                                  BLOCK_N, HEAD_D, STAGES, OVERLAP, FMA, turns, 1, TURNS, ROWS // 16)),
            (_tiles_load, (q_desc, None, k_desc, v_desc, q_smem, None, k_smem, v_smem, records, q_ready, q_empty,
                           k_ready, k_empty, v_ready, v_empty, T, n_heads, group, q_len, n_q_blocks, n_bh, n_tiles,
                           ONE_LOOP, TRIM, N_MASK_HEADS, BQ, BK, BLOCK_M, BLOCK_N, STAGES)),
        ], [ROWS // 16, 1], [CONSUMER_REGS, LOAD_REGS])
    else:
        gl.warp_specialize([
            (_fwd_consume_tiles, (q_smem, k_smem, v_smem, records, q_ready, q_empty, k_ready, k_empty, v_ready,
                                  v_empty, o_desc, Lse, T, n_heads, q_len, n_tiles, qk_scale, ONE_LOOP, BK, ROWS,
                                  BLOCK_N, HEAD_D, STAGES, OVERLAP, FMA, turns, 0, False, num_warps)),
            (_tiles_load, (q_desc, None, k_desc, v_desc, q_smem, None, k_smem, v_smem, records, q_ready, q_empty,
                           k_ready, k_empty, v_ready, v_empty, T, n_heads, group, q_len, n_q_blocks, n_bh, n_tiles,
                           ONE_LOOP, TRIM, N_MASK_HEADS, BQ, BK, BLOCK_M, BLOCK_N, STAGES)),
        ], [1], [LOAD_REGS])


# -- dQ -------------------------------------------------------------------------------------
@gluon.jit
def _dq_load(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, rows_bar, k_ready, k_empty, v_ready,
             v_empty, b, h, kv_head, start_m, q_len, full_idx, full_first, n_full, part_idx, part_first, part_end,
             n_steps, BK: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """The load partition: Q and dO of the program's rows (one buffer each per consumer
    partition), then K and V of every step, ``STAGES`` buffers ahead."""
    # every row gets its row terms, even one whose program has no step
    _rows_load(q_desc, do_desc, q_smem, do_smem, rows_bar, 0, b, h, start_m, start_m < q_len, q_smem.shape[0])
    _kv_load(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, b, kv_head, full_idx, full_first,
             n_full, part_idx, part_first, part_end, n_steps, 0, BK, BLOCK_N, STAGES)


@gluon.jit
def _dq_products(q, do, k_smem, v_smem, k_ready, v_ready, ring, s_zero, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
                 STAGES: gl.constexpr):
    """Issue a step's ``S = Q K^T`` and ``dP = dO V^T`` once its K and V are in (the ring's step
    ``ring``)."""
    stage = ring % STAGES
    phase = (ring // STAGES) & 1
    mbarrier.wait(k_ready.index(stage), phase)
    s = warpgroup_mma(q, k_smem.index(stage).reshape([BLOCK_N, HEAD_D]).permute((1, 0)), s_zero, use_acc=False,
                      is_async=True)
    mbarrier.wait(v_ready.index(stage), phase)
    dp = warpgroup_mma(do, v_smem.index(stage).reshape([BLOCK_N, HEAD_D]).permute((1, 0)), s_zero, use_acc=False,
                       is_async=True)
    return s, dp


@gluon.jit
def _dq_ds(s, dp, lse2, delta, v_empty, i, ring, n_full, start_n, lo, hi, whole_lo, whole_hi, qk_scale,
           dtype: gl.constexpr, STAGES: gl.constexpr, ONE_LOOP: gl.constexpr, BLOCK_N: gl.constexpr,
           PENDING: gl.constexpr, s_layout: gl.constexpr, ds_layout: gl.constexpr):
    """Step ``i``'s (the ring's step ``ring``) ``dS = P (dP - delta)`` from its issued ``S`` and
    ``dP``, with ``PENDING`` products issued after them still running: ``P`` from the rows' LSE
    (``+inf`` on empty rows: ``P = 0``), masked where the step needs it, while ``dP`` runs; V's
    buffer is released once ``dP`` is in."""
    s = warpgroup_mma_wait(PENDING + 1, deps=(s, ))
    p = gl.exp2(s * qk_scale - lse2[:, None])
    p = _mask_step(p, 0.0, i, n_full, start_n, lo, hi, whole_lo, whole_hi, ONE_LOOP, BLOCK_N, s_layout)
    dp = warpgroup_mma_wait(PENDING, deps=(dp, ))
    mbarrier.arrive(v_empty.index(ring % STAGES), count=1)
    return gl.convert_layout((p * (dp - delta[:, None])).to(dtype), ds_layout)


@gluon.jit
def _dq_tile(q_smem, do_smem, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, o_base, stride_om, stride_od, Lse,
             dLse, Lse2, Delta, dq_base, stride_dqm, stride_dqd, bh, program_m, start_m, q_len, row_lo, row_hi,
             full_idx, full_first, n_full, part_idx, part_first, part_end, n_steps, base, qk_scale, scale,
             ONE_LOOP: gl.constexpr, BK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
             HEAD_D: gl.constexpr, STAGES: gl.constexpr, OVERLAP: gl.constexpr, ADD_DQ: gl.constexpr,
             num_warps: gl.constexpr):
    """A consumer partition's work on ``BLOCK_M`` rows from ``start_m`` (of the program's from
    ``program_m``), whose Q and dO are in ``q_smem`` and ``do_smem``: the rows' LSE in base 2 and
    ``delta = rowsum(dO * O) - dLSE``, stored for the dK/dV kernel; then per step ``S = Q K^T`` and
    ``dP = dO V^T``, ``P`` from the LSE (masked by the rows' spans where the step needs it), ``dS =
    P (dP - delta)`` and ``dQ += dS K`` with dS from registers. With ``OVERLAP`` step ``i`` issues
    its ``S`` and ``dP``, then step ``i - 1``'s ``dQ += dS K``, which runs under step ``i``'s
    elementwise work; as in the forward, nothing is in flight from one iteration of the loop to the
    next (ptxas serializes ``wgmma`` otherwise). dQ (times ``scale``; with ``ADD_DQ`` added to what
    ``dQ`` holds, where the program has steps) is stored with the rows past the end left out.
    ``base``: the steps the K/V ring took before this program's (earlier tiles of a persistent
    program)."""
    s_layout: gl.constexpr = _mma_layouts(num_warps, BLOCK_M, BLOCK_N, HEAD_D)[0]
    dq_layout: gl.constexpr = _mma_layouts(num_warps, BLOCK_M, BLOCK_N, HEAD_D)[1]
    ds_layout: gl.constexpr = _mma_layouts(num_warps, BLOCK_M, BLOCK_N, HEAD_D)[2]
    rows_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    dtype: gl.constexpr = q_smem.dtype
    q = q_smem.reshape([BLOCK_M, HEAD_D])
    do = do_smem.reshape([BLOCK_M, HEAD_D])

    rows = start_m + gl.arange(0, BLOCK_M, rows_layout)
    lo, hi, whole_lo, whole_hi = _spans(row_lo, row_hi, rows, q_len)
    dq = gl.zeros([BLOCK_M, HEAD_D], gl.float32, dq_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    if program_m < q_len:
        # O (read once, for delta: no buffer of its own) and dO in 16-byte segments of rows, their
        # row terms then moved to the scores' rows
        o_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        o_rows = start_m + gl.arange(0, BLOCK_M, gl.SliceLayout(1, o_layout))
        o_cols = gl.arange(0, HEAD_D, gl.SliceLayout(0, o_layout))
        o_in = o_rows < q_len
        o = gl.load(o_base + o_rows[:, None].to(gl.int64) * stride_om + o_cols[None, :] * stride_od,
                    mask=o_in[:, None], other=0.0)
        lse2, delta = kernels._row_terms(o, do.load(o_layout), Lse, dLse, Lse2, Delta,
                                         bh.to(gl.int64) * q_len + o_rows, o_in)
        lse2 = gl.convert_layout(lse2, rows_layout)
        delta = gl.convert_layout(delta, rows_layout)
        if n_steps > 0:
            s, dp = _dq_products(q, do, k_smem, v_smem, k_ready, v_ready, base, s_zero, BLOCK_N, HEAD_D, STAGES)
            start_n = _step_key(0, n_full, full_idx, full_first, part_idx, part_first, part_end, BK, BLOCK_N)
            ds = _dq_ds(s, dp, lse2, delta, v_empty, 0, base, n_full, start_n, lo, hi, whole_lo, whole_hi, qk_scale,
                        dtype, STAGES, ONE_LOOP, BLOCK_N, 0, s_layout, ds_layout)
            for i in range(1, n_steps):
                prev = (base + i - 1) % STAGES
                k_prev = k_smem.index(prev).reshape([BLOCK_N, HEAD_D])
                if not OVERLAP:  # dQ += dS_{i-1} K_{i-1}, waited for before step i starts
                    dq = warpgroup_mma(ds, k_prev, dq)
                    mbarrier.arrive(k_empty.index(prev), count=1)
                s, dp = _dq_products(q, do, k_smem, v_smem, k_ready, v_ready, base + i, s_zero, BLOCK_N, HEAD_D,
                                     STAGES)
                start_n = _step_key(i, n_full, full_idx, full_first, part_idx, part_first, part_end, BK, BLOCK_N)
                if OVERLAP:  # S_i, dP_i, then dQ += dS_{i-1} K_{i-1}, which runs under dS_i's work
                    dq = warpgroup_mma(ds, k_prev, dq, is_async=True)
                    ds_i = _dq_ds(s, dp, lse2, delta, v_empty, i, base + i, n_full, start_n, lo, hi, whole_lo,
                                  whole_hi, qk_scale, dtype, STAGES, ONE_LOOP, BLOCK_N, 1, s_layout, ds_layout)
                    dq, ds = warpgroup_mma_wait(0, deps=(dq, ds))
                    mbarrier.arrive(k_empty.index(prev), count=1)
                    ds = ds_i
                else:
                    ds = _dq_ds(s, dp, lse2, delta, v_empty, i, base + i, n_full, start_n, lo, hi, whole_lo, whole_hi,
                                qk_scale, dtype, STAGES, ONE_LOOP, BLOCK_N, 0, s_layout, ds_layout)
            last = (base + n_steps - 1) % STAGES
            dq = warpgroup_mma(ds, k_smem.index(last).reshape([BLOCK_N, HEAD_D]), dq)
            mbarrier.arrive(k_empty.index(last), count=1)

    dq_rows = start_m + gl.arange(0, BLOCK_M, gl.SliceLayout(1, dq_layout))
    cols = gl.arange(0, HEAD_D, gl.SliceLayout(0, dq_layout))
    at = dq_base + dq_rows[:, None].to(gl.int64) * stride_dqm + cols[None, :] * stride_dqd
    stored = (dq_rows < q_len)[:, None]
    dq = dq * scale
    if ADD_DQ:  # a float32 sum over ring tiles: the rows of a program with no step are not touched
        if n_steps > 0:
            gl.store(at, dq + gl.load(at, mask=stored, other=0.0), mask=stored)
    else:
        gl.store(at, dq.to(dq_base.dtype.element_ty), mask=stored)


@gluon.jit
def _dq_consume(q_smem, do_smem, k_smem, v_smem, rows_bar, k_ready, k_empty, v_ready, v_empty, o_base, stride_om,
                stride_od, Lse, dLse, Lse2, Delta, dq_base, stride_dqm, stride_dqd, bh, program_m, start_m, q_len,
                row_lo, row_hi, full_idx, full_first, n_full, part_idx, part_first, part_end, n_steps, qk_scale, scale,
                ONE_LOOP: gl.constexpr, BK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                HEAD_D: gl.constexpr, STAGES: gl.constexpr, OVERLAP: gl.constexpr, ADD_DQ: gl.constexpr,
                num_warps: gl.constexpr):
    """A consumer partition of a dQ program of one tile: its rows' Q and dO, then its work
    (``_dq_tile``)."""
    mbarrier.wait(rows_bar, 0)
    _dq_tile(q_smem, do_smem, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, o_base, stride_om, stride_od, Lse,
             dLse, Lse2, Delta, dq_base, stride_dqm, stride_dqd, bh, program_m, start_m, q_len, row_lo, row_hi,
             full_idx, full_first, n_full, part_idx, part_first, part_end, n_steps, 0, qk_scale, scale, ONE_LOOP, BK,
             BLOCK_M, BLOCK_N, HEAD_D, STAGES, OVERLAP, ADD_DQ, num_warps)


@gluon.jit(do_not_specialize=["q_len", "kv_len"])
def _attn_bwd_dq_sm90(q_desc, do_desc, k_desc, v_desc, Out, Lse, dLse, Lse2, Delta, dQ, T, stride_ob, stride_oh,
                      stride_om, stride_od, stride_dqb, stride_dqh, stride_dqm, stride_dqd, n_heads, group, q_len,
                      kv_len, n_q_blocks, qk_scale, scale,
                      ONE_LOOP: gl.constexpr, TRIM: gl.constexpr, N_MASK_HEADS: gl.constexpr, BQ: gl.constexpr,
                      BK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
                      STAGES: gl.constexpr, OVERLAP: gl.constexpr, PINGPONG: gl.constexpr, ADD_DQ: gl.constexpr,
                      num_warps: gl.constexpr):
    bh = gl.program_id(1)
    b, h, start_m, slot, full_idx, full_first, n_full, part_idx, part_first, part_end, n_steps = _query_program_steps(
        T, gl.program_id(0), bh, n_heads, q_len, n_q_blocks, ONE_LOOP, TRIM, N_MASK_HEADS, BQ, BK, BLOCK_M, BLOCK_N)
    row_lo, row_hi = _row_spans(T, slot, q_len)
    o_base = Out + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
    dq_base = dQ + b.to(gl.int64) * stride_dqb + h.to(gl.int64) * stride_dqh

    dtype: gl.constexpr = q_desc.dtype
    HALVES: gl.constexpr = 2 if PINGPONG else 1  # consumer partitions, each with its own rows
    ROWS: gl.constexpr = BLOCK_M // HALVES
    gl.static_assert(q_desc.block_type.shape[2] == ROWS, "Q and dO are copied in tiles of a partition's rows")
    q_smem = gl.allocate_shared_memory(dtype, [HALVES] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [HALVES] + do_desc.block_type.shape, do_desc.layout)
    rows_bar = _barriers(1, 1).index(0)
    k_smem, v_smem, k_ready, k_empty, v_ready, v_empty = _kv_ring(k_desc, v_desc, STAGES, HALVES)
    if PINGPONG:  # two warpgroups of 64 rows on the same K/V: one's elementwise work beside the other's products
        gl.warp_specialize([
            (_dq_consume, (q_smem.index(0), do_smem.index(0), k_smem, v_smem, rows_bar, k_ready, k_empty,
                           v_ready, v_empty, o_base, stride_om, stride_od, Lse, dLse, Lse2, Delta, dq_base,
                           stride_dqm, stride_dqd, bh, start_m, start_m, q_len, row_lo, row_hi, full_idx,
                           full_first, n_full, part_idx, part_first, part_end, n_steps, qk_scale, scale, ONE_LOOP,
                           BK, ROWS, BLOCK_N, HEAD_D, STAGES, OVERLAP, ADD_DQ, ROWS // 16)),
            (_dq_consume, (q_smem.index(1), do_smem.index(1), k_smem, v_smem, rows_bar, k_ready, k_empty,
                           v_ready, v_empty, o_base, stride_om, stride_od, Lse, dLse, Lse2, Delta, dq_base,
                           stride_dqm, stride_dqd, bh, start_m, start_m + ROWS, q_len, row_lo, row_hi, full_idx,
                           full_first, n_full, part_idx, part_first, part_end, n_steps, qk_scale, scale, ONE_LOOP,
                           BK, ROWS, BLOCK_N, HEAD_D, STAGES, OVERLAP, ADD_DQ, ROWS // 16)),
            (_dq_load, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, rows_bar, k_ready, k_empty,
                        v_ready, v_empty, b, h, h // group, start_m, q_len, full_idx, full_first, n_full, part_idx,
                        part_first, part_end, n_steps, BK, BLOCK_N,
                        STAGES)),  # constexprs stay constexprs only written in place
        ], [ROWS // 16, 1], [CONSUMER_REGS, LOAD_REGS])
    else:
        gl.warp_specialize([
            (_dq_consume, (q_smem.index(0), do_smem.index(0), k_smem, v_smem, rows_bar, k_ready, k_empty,
                           v_ready, v_empty, o_base, stride_om, stride_od, Lse, dLse, Lse2, Delta, dq_base,
                           stride_dqm, stride_dqd, bh, start_m, start_m, q_len, row_lo, row_hi, full_idx,
                           full_first, n_full, part_idx, part_first, part_end, n_steps, qk_scale, scale, ONE_LOOP,
                           BK, BLOCK_M, BLOCK_N, HEAD_D, STAGES, OVERLAP, ADD_DQ, num_warps)),
            (_dq_load, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, rows_bar, k_ready, k_empty,
                        v_ready, v_empty, b, h, h // group, start_m, q_len, full_idx, full_first, n_full, part_idx,
                        part_first, part_end, n_steps, BK, BLOCK_N,
                        STAGES)),  # constexprs stay constexprs only written in place
        ], [1], [LOAD_REGS])


@gluon.jit
def _dq_consume_tiles(q_smem, do_smem, k_smem, v_smem, records, rows_ready, rows_empty, k_ready, k_empty, v_ready,
                      v_empty, Out, stride_ob, stride_oh, stride_om, stride_od, Lse, dLse, Lse2, Delta, dQ, stride_dqb,
                      stride_dqh, stride_dqm, stride_dqd, T, n_heads, q_len, n_tiles, qk_scale, scale,
                      ONE_LOOP: gl.constexpr, BK: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
                      HEAD_D: gl.constexpr, STAGES: gl.constexpr, OVERLAP: gl.constexpr, ADD_DQ: gl.constexpr,
                      ME: gl.constexpr, num_warps: gl.constexpr):
    """A persistent dQ consumer partition (rows ``ME * ROWS`` on of each tile): per tile, waits
    for its Q, dO and record, works on it (``_dq_tile``) and frees its row buffers."""
    Q_BUFFERS: gl.constexpr = records.shape[0]
    HALVES: gl.constexpr = q_smem.shape[0] // Q_BUFFERS
    full_idx = kernels._section(T, kernels.FWD_FULL_IDX)
    part_idx = kernels._section(T, kernels.FWD_PART_IDX)
    lo = kernels._section(T, kernels.ROW_LO)
    hi = kernels._section(T, kernels.ROW_HI)
    base = 0
    taken = 0
    for r in range(gl.cdiv(n_tiles, gl.num_programs(0))):
        if _round_tile(r) < n_tiles:
            buffer, bh, program_m, slot, full_first, n_full, part_first, part_end, n_steps = _take_record(
                records, rows_ready, taken, num_warps)
            b = (bh // n_heads).to(gl.int64)
            h = (bh % n_heads).to(gl.int64)
            row_lo, row_hi = _slot_spans(lo, hi, slot, q_len)
            _dq_tile(q_smem.index(buffer * HALVES + ME), do_smem.index(buffer * HALVES + ME), k_smem, v_smem, k_ready,
                     k_empty, v_ready, v_empty, Out + b * stride_ob + h * stride_oh, stride_om, stride_od, Lse, dLse,
                     Lse2, Delta, dQ + b * stride_dqb + h * stride_dqh, stride_dqm, stride_dqd, bh, program_m,
                     program_m + ME * ROWS, q_len, row_lo, row_hi, full_idx, full_first, n_full, part_idx, part_first,
                     part_end, n_steps, base, qk_scale, scale, ONE_LOOP, BK, ROWS, BLOCK_N, HEAD_D, STAGES, OVERLAP,
                     ADD_DQ, num_warps)
            mbarrier.arrive(rows_empty.index(buffer), count=1)
            base += n_steps
            taken += 1


@gluon.jit(do_not_specialize=["q_len", "kv_len"])
def _attn_bwd_dq_sm90_persistent(q_desc, do_desc, k_desc, v_desc, Out, Lse, dLse, Lse2, Delta, dQ, T, stride_ob,
                                 stride_oh, stride_om, stride_od, stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                                 n_heads, group, q_len, kv_len, n_q_blocks, n_bh, qk_scale, scale,
                                 ONE_LOOP: gl.constexpr, TRIM: gl.constexpr, N_MASK_HEADS: gl.constexpr,
                                 BQ: gl.constexpr, BK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                                 HEAD_D: gl.constexpr, STAGES: gl.constexpr, Q_BUFFERS: gl.constexpr,
                                 OVERLAP: gl.constexpr, PINGPONG: gl.constexpr, ADD_DQ: gl.constexpr,
                                 num_warps: gl.constexpr):
    """The dQ kernel as a persistent kernel (``DQ_PERSISTENT``), as the forward's
    (``_attn_fwd_sm90_persistent``): its load warp reads the next tile's lists and copies its Q
    and dO (into one of ``Q_BUFFERS`` pairs) while the consumers work on the tile before."""
    dtype: gl.constexpr = q_desc.dtype
    HALVES: gl.constexpr = 2 if PINGPONG else 1  # consumer partitions, each with its own rows and buffers
    ROWS: gl.constexpr = BLOCK_M // HALVES
    gl.static_assert(q_desc.block_type.shape[2] == ROWS, "Q and dO are copied in tiles of a partition's rows")
    n_tiles = n_q_blocks * (BQ // BLOCK_M) * n_bh
    q_smem = gl.allocate_shared_memory(dtype, [Q_BUFFERS * HALVES] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [Q_BUFFERS * HALVES] + do_desc.block_type.shape, do_desc.layout)
    records = gl.allocate_shared_memory(gl.int32, [Q_BUFFERS, RECORD], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    rows_ready = _barriers(Q_BUFFERS, 1)
    rows_empty = _barriers(Q_BUFFERS, HALVES)
    k_smem, v_smem, k_ready, k_empty, v_ready, v_empty = _kv_ring(k_desc, v_desc, STAGES, HALVES)
    if PINGPONG:
        gl.warp_specialize([
            (_dq_consume_tiles, (q_smem, do_smem, k_smem, v_smem, records, rows_ready, rows_empty, k_ready, k_empty,
                                 v_ready, v_empty, Out, stride_ob, stride_oh, stride_om, stride_od, Lse, dLse, Lse2,
                                 Delta, dQ, stride_dqb, stride_dqh, stride_dqm, stride_dqd, T, n_heads, q_len,
                                 n_tiles, qk_scale, scale, ONE_LOOP, BK, ROWS, BLOCK_N, HEAD_D, STAGES, OVERLAP,
                                 ADD_DQ, 0, ROWS // 16)),
            (_dq_consume_tiles, (q_smem, do_smem, k_smem, v_smem, records, rows_ready, rows_empty, k_ready, k_empty,
                                 v_ready, v_empty, Out, stride_ob, stride_oh, stride_om, stride_od, Lse, dLse, Lse2,
                                 Delta, dQ, stride_dqb, stride_dqh, stride_dqm, stride_dqd, T, n_heads, q_len,
                                 n_tiles, qk_scale, scale, ONE_LOOP, BK, ROWS, BLOCK_N, HEAD_D, STAGES, OVERLAP,
                                 ADD_DQ, 1, ROWS // 16)),
            (_tiles_load, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, records, rows_ready,
                           rows_empty, k_ready, k_empty, v_ready, v_empty, T, n_heads, group, q_len, n_q_blocks, n_bh,
                           n_tiles, ONE_LOOP, TRIM, N_MASK_HEADS, BQ, BK, BLOCK_M, BLOCK_N, STAGES)),
        ], [ROWS // 16, 1], [CONSUMER_REGS, LOAD_REGS])
    else:
        gl.warp_specialize([
            (_dq_consume_tiles, (q_smem, do_smem, k_smem, v_smem, records, rows_ready, rows_empty, k_ready, k_empty,
                                 v_ready, v_empty, Out, stride_ob, stride_oh, stride_om, stride_od, Lse, dLse, Lse2,
                                 Delta, dQ, stride_dqb, stride_dqh, stride_dqm, stride_dqd, T, n_heads, q_len,
                                 n_tiles, qk_scale, scale, ONE_LOOP, BK, ROWS, BLOCK_N, HEAD_D, STAGES, OVERLAP,
                                 ADD_DQ, 0, num_warps)),
            (_tiles_load, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, records, rows_ready,
                           rows_empty, k_ready, k_empty, v_ready, v_empty, T, n_heads, group, q_len, n_q_blocks, n_bh,
                           n_tiles, ONE_LOOP, TRIM, N_MASK_HEADS, BQ, BK, BLOCK_M, BLOCK_N, STAGES)),
        ], [1], [LOAD_REGS])


# -- dK/dV ----------------------------------------------------------------------------------
@gluon.jit
def _dkdv_kv_load(k_desc, v_desc, k_smem, v_smem, bar, first, b, kv_head, start_n, copy, HALVES: gl.constexpr):
    """A dK/dV program's K and V into buffers ``first`` to ``first + HALVES`` of each (one per
    consumer partition), completing ``bar``; where ``copy`` is false (keys nobody attends, keys
    past the end) nothing is copied and ``bar`` only completes."""
    ROWS: gl.constexpr = k_desc.block_type.shape[2]
    if copy:
        mbarrier.expect(bar, HALVES * (k_desc.block_type.nbytes + v_desc.block_type.nbytes))
        for half in gl.static_range(HALVES):
            _tma_load(k_desc, [b, kv_head, start_n + half * ROWS, 0], bar, k_smem.index(first + half))
            _tma_load(v_desc, [b, kv_head, start_n + half * ROWS, 0], bar, v_smem.index(first + half))
    else:
        mbarrier.arrive(bar, count=1)


@gluon.jit
def _dkdv_head_steps(T, slot, kb, n_kv_blocks, start_n, kv_len, listed, ONE_LOOP: gl.constexpr, TRIM: gl.constexpr,
                     BQ: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """A dK/dV program's query steps for one query head of slot ``slot`` (``_program_steps``),
    and how many there are (none where the program's key head has no tile: ``listed`` 0)."""
    full_idx, full_first, n_full, part_idx, part_first, part_end = _program_steps(
        T, slot, kb, n_kv_blocks, start_n, kv_len, False, ONE_LOOP, TRIM, BQ, BLOCK_M, BLOCK_N)
    n_steps = n_full + part_end - part_first
    if listed == 0:
        n_steps = 0
    return full_idx, full_first, n_full, part_idx, part_first, part_end, n_steps


@gluon.jit
def _dkdv_head_load(q_desc, do_desc, lse_desc, delta_desc, q_smem, do_smem, lse_smem, delta_smem, ready, empty, b, h,
                    n_heads, q_len, full_idx, full_first, n_full, part_idx, part_first, part_end, n_steps, it,
                    BQ: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
    """Q, dO and the rows' LSE and delta of query head ``h``'s steps into the ring, from its
    position ``it``, ``STAGES`` buffers ahead. Rows past the end of a head read the next head's
    LSE and delta: every step that holds such rows is masked (the plan lists it PARTIAL), so
    their ``P`` is 0."""
    for i in range(n_steps):
        start_m = _step_key(i, n_full, full_idx, full_first, part_idx, part_first, part_end, BQ, BLOCK_M)
        stage = (it + i) % STAGES
        mbarrier.wait(empty.index(stage), (((it + i) // STAGES) & 1) ^ 1)  # starts as if a phase completed
        mbarrier.expect(ready.index(stage), q_desc.block_type.nbytes + do_desc.block_type.nbytes +
                        lse_desc.block_type.nbytes + delta_desc.block_type.nbytes)
        _tma_load(q_desc, [b, h, start_m, 0], ready.index(stage), q_smem.index(stage))
        _tma_load(do_desc, [b, h, start_m, 0], ready.index(stage), do_smem.index(stage))
        row = (b * n_heads + h) * q_len + start_m
        _tma_load(lse_desc, [row], ready.index(stage), lse_smem.index(stage))
        _tma_load(delta_desc, [row], ready.index(stage), delta_smem.index(stage))


@gluon.jit
def _dkdv_load(q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, q_smem, do_smem, k_smem, v_smem, lse_smem,
               delta_smem, kv_bar, ready, empty, T, b, kv_head, group, n_heads, kb, start_n, q_len, kv_len,
               n_kv_blocks, listed, N_MASK_HEADS: gl.constexpr, ONE_LOOP: gl.constexpr, TRIM: gl.constexpr,
               BQ: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """The load partition: K and V once (one tile per consumer partition), then the steps of
    every query head sharing the key head (``_dkdv_head_load``)."""
    _dkdv_kv_load(k_desc, v_desc, k_smem, v_smem, kv_bar, 0, b, kv_head, start_n, listed > 0, k_smem.shape[0])
    head_slot = kernels._section(T, kernels.HEAD_SLOT)
    it = 0
    for g in range(group):
        h = kv_head * group + g
        full_idx, full_first, n_full, part_idx, part_first, part_end, n_steps = _dkdv_head_steps(
            T, gl.load(head_slot + h % N_MASK_HEADS), kb, n_kv_blocks, start_n, kv_len, listed, ONE_LOOP, TRIM, BQ,
            BLOCK_M, BLOCK_N)
        _dkdv_head_load(q_desc, do_desc, lse_desc, delta_desc, q_smem, do_smem, lse_smem, delta_smem, ready, empty, b,
                        h, n_heads, q_len, full_idx, full_first, n_full, part_idx, part_first, part_end, n_steps, it,
                        BQ, BLOCK_M, STAGES)
        it += n_steps


@gluon.jit
def _dkdv_products(k, v, q_smem, do_smem, ready, it, st_zero, BLOCK_M: gl.constexpr, HEAD_D: gl.constexpr,
                   STAGES: gl.constexpr):
    """Issue step ``it``'s ``S^T = K Q^T`` and ``dP^T = V dO^T`` once its Q and dO are in."""
    stage = it % STAGES
    mbarrier.wait(ready.index(stage), (it // STAGES) & 1)
    s_t = warpgroup_mma(k, q_smem.index(stage).reshape([BLOCK_M, HEAD_D]).permute((1, 0)), st_zero, use_acc=False,
                        is_async=True)
    dp_t = warpgroup_mma(v, do_smem.index(stage).reshape([BLOCK_M, HEAD_D]).permute((1, 0)), st_zero,
                         use_acc=False, is_async=True)
    return s_t, dp_t


@gluon.jit
def _dkdv_pds(s_t, dp_t, lse_smem, delta_smem, it, i, n_full, start_m, col_lo, col_hi, whole_lo, whole_hi, qk_scale,
              dtype: gl.constexpr, STAGES: gl.constexpr, ONE_LOOP: gl.constexpr, BLOCK_M: gl.constexpr,
              PENDING: gl.constexpr, st_layout: gl.constexpr, op_layout: gl.constexpr):
    """Step ``i`` (``it`` of the program)'s ``P^T`` and ``dS^T = P^T (dP^T - delta)`` as ``wgmma``
    operands, from its issued ``S^T`` and ``dP^T`` with ``PENDING`` products issued after them
    still running: ``P^T`` from the rows' LSE (``+inf`` on empty rows: ``P = 0``), masked by the
    keys' spans where the step needs it (every step with rows past the end does), while ``dP^T``
    runs."""
    queries_layout: gl.constexpr = gl.SliceLayout(0, st_layout)
    stage = it % STAGES
    s_t = warpgroup_mma_wait(PENDING + 1, deps=(s_t, ))
    lse2 = lse_smem.index(stage).load(queries_layout)
    p_t = gl.exp2(s_t * qk_scale - lse2[None, :])
    p_t = _mask_step(p_t, 0.0, i, n_full, start_m, col_lo, col_hi, whole_lo, whole_hi, ONE_LOOP, BLOCK_M, st_layout)
    dp_t = warpgroup_mma_wait(PENDING, deps=(dp_t, ))
    delta = delta_smem.index(stage).load(queries_layout)
    return (gl.convert_layout(p_t.to(dtype), op_layout),
            gl.convert_layout((p_t * (dp_t - delta[None, :])).to(dtype), op_layout))


@gluon.jit
def _dkdv_head(k, v, q_smem, do_smem, lse_smem, delta_smem, ready, empty, dk, dv, it, full_idx, full_first, n_full,
               part_idx, part_first, part_end, n_steps, col_lo, col_hi, whole_lo, whole_hi, qk_scale,
               ONE_LOOP: gl.constexpr, BQ: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_D: gl.constexpr,
               STAGES: gl.constexpr, OVERLAP: gl.constexpr, st_layout: gl.constexpr, op_layout: gl.constexpr):
    """``dk`` and ``dv`` of a consumer partition's keys (``k``, ``v``; masked by their spans
    ``col_lo``/``col_hi``) plus one query head's steps, from the ring's position ``it``: per step
    ``S^T = K Q^T`` and ``dP^T = V dO^T``, ``P^T`` from the saved LSE, ``dS^T = P^T (dP^T -
    delta)``, ``dV += P^T dO`` and ``dK += dS^T Q``. With ``OVERLAP`` step ``i`` issues its
    ``S^T`` and ``dP^T``, then step ``i - 1``'s ``dV`` and ``dK`` products, which run under step
    ``i``'s elementwise work; nothing is in flight from one iteration of the loop to the next
    (ptxas serializes ``wgmma`` otherwise)."""
    dtype: gl.constexpr = q_smem.dtype
    ROWS: gl.constexpr = k.shape[0]
    st_zero = gl.zeros([ROWS, BLOCK_M], gl.float32, st_layout)
    if n_steps > 0:
        s_t, dp_t = _dkdv_products(k, v, q_smem, do_smem, ready, it, st_zero, BLOCK_M, HEAD_D, STAGES)
        start_m = _step_key(0, n_full, full_idx, full_first, part_idx, part_first, part_end, BQ, BLOCK_M)
        p_op, ds_op = _dkdv_pds(s_t, dp_t, lse_smem, delta_smem, it, 0, n_full, start_m, col_lo, col_hi, whole_lo,
                                whole_hi, qk_scale, dtype, STAGES, ONE_LOOP, BLOCK_M, 0, st_layout, op_layout)
        for i in range(1, n_steps):
            prev = (it + i - 1) % STAGES
            q_prev = q_smem.index(prev).reshape([BLOCK_M, HEAD_D])
            do_prev = do_smem.index(prev).reshape([BLOCK_M, HEAD_D])
            if not OVERLAP:  # dV and dK of step i - 1, waited for before step i starts
                dv = warpgroup_mma(p_op, do_prev, dv)
                dk = warpgroup_mma(ds_op, q_prev, dk)
                mbarrier.arrive(empty.index(prev), count=1)
            s_t, dp_t = _dkdv_products(k, v, q_smem, do_smem, ready, it + i, st_zero, BLOCK_M, HEAD_D, STAGES)
            start_m = _step_key(i, n_full, full_idx, full_first, part_idx, part_first, part_end, BQ, BLOCK_M)
            if OVERLAP:  # S^T_i, dP^T_i, then dV and dK of step i - 1, under step i's work
                dv = warpgroup_mma(p_op, do_prev, dv, is_async=True)
                dk = warpgroup_mma(ds_op, q_prev, dk, is_async=True)
                p_i, ds_i = _dkdv_pds(s_t, dp_t, lse_smem, delta_smem, it + i, i, n_full, start_m, col_lo, col_hi,
                                      whole_lo, whole_hi, qk_scale, dtype, STAGES, ONE_LOOP, BLOCK_M, 2, st_layout,
                                      op_layout)
                dv, dk, p_op, ds_op = warpgroup_mma_wait(0, deps=(dv, dk, p_op, ds_op))
                mbarrier.arrive(empty.index(prev), count=1)
                p_op = p_i
                ds_op = ds_i
            else:
                p_op, ds_op = _dkdv_pds(s_t, dp_t, lse_smem, delta_smem, it + i, i, n_full, start_m, col_lo, col_hi,
                                        whole_lo, whole_hi, qk_scale, dtype, STAGES, ONE_LOOP, BLOCK_M, 0, st_layout,
                                        op_layout)
        last = (it + n_steps - 1) % STAGES
        dv = warpgroup_mma(p_op, do_smem.index(last).reshape([BLOCK_M, HEAD_D]), dv)
        dk = warpgroup_mma(ds_op, q_smem.index(last).reshape([BLOCK_M, HEAD_D]), dk)
        mbarrier.arrive(empty.index(last), count=1)
    return dk, dv


@gluon.jit
def _key_spans(col_lo, col_hi, slot, keys, kv_len):
    """The spans of ``keys`` under slot ``slot`` (the column span sections start at ``col_lo`` and
    ``col_hi``), and the largest start and smallest end (``_spans``)."""
    lo, hi = _slot_spans(col_lo, col_hi, slot, kv_len)
    return _spans(lo, hi, keys, kv_len)


@gluon.jit
def _dkdv_store(k_smem, v_smem, dk, dv, dk_desc, dv_desc, b, kv_head, keys_at, scale):
    """dK (times ``scale``) and dV of a consumer partition's keys from ``keys_at``, copied out
    through its K and V buffers (free: every product that read them has completed); keys past
    the end are clipped."""
    dtype: gl.constexpr = k_smem.dtype
    k_smem.reshape(dk.shape).store((dk * scale).to(dtype))
    v_smem.reshape(dv.shape).store(dv.to(dtype))
    fence_async_shared()
    _tma_store(dk_desc, [b, kv_head, keys_at, 0], k_smem)
    _tma_store(dv_desc, [b, kv_head, keys_at, 0], v_smem)
    tma.store_wait(0)


@gluon.jit
def _dkdv_consume(q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem, kv_bar, ready, empty, dk_desc, dv_desc, T,
                  b, kv_head, group, kb, start_n, keys_at, kv_len, n_kv_blocks, listed, qk_scale, scale,
                  N_MASK_HEADS: gl.constexpr, ONE_LOOP: gl.constexpr, TRIM: gl.constexpr, BQ: gl.constexpr,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, ROWS: gl.constexpr, HEAD_D: gl.constexpr,
                  STAGES: gl.constexpr, OVERLAP: gl.constexpr, num_warps: gl.constexpr):
    """A consumer partition, ``ROWS`` keys (from ``keys_at``, its K/V buffers ``k_smem`` and
    ``v_smem``) down and a step's queries across: dK and dV over the steps of every query head
    sharing the key head (``_dkdv_head``), in registers until the program's last step."""
    st_layout: gl.constexpr = _mma_layouts(num_warps, ROWS, BLOCK_M, HEAD_D)[0]
    acc_layout: gl.constexpr = _mma_layouts(num_warps, ROWS, BLOCK_M, HEAD_D)[1]
    op_layout: gl.constexpr = _mma_layouts(num_warps, ROWS, BLOCK_M, HEAD_D)[2]
    k = k_smem.reshape([ROWS, HEAD_D])
    v = v_smem.reshape([ROWS, HEAD_D])
    keys = keys_at + gl.arange(0, ROWS, gl.SliceLayout(1, st_layout))
    dk = gl.zeros([ROWS, HEAD_D], gl.float32, acc_layout)
    dv = gl.zeros([ROWS, HEAD_D], gl.float32, acc_layout)
    mbarrier.wait(kv_bar, 0)
    head_slot = kernels._section(T, kernels.HEAD_SLOT)
    col_lo = kernels._section(T, kernels.COL_LO)
    col_hi = kernels._section(T, kernels.COL_HI)
    it = 0  # the program's steps so far, over the heads: the ring's position
    for g in range(group):  # the query heads that share this key head
        slot = gl.load(head_slot + (kv_head * group + g) % N_MASK_HEADS)
        full_idx, full_first, n_full, part_idx, part_first, part_end, n_steps = _dkdv_head_steps(
            T, slot, kb, n_kv_blocks, start_n, kv_len, listed, ONE_LOOP, TRIM, BQ, BLOCK_M, BLOCK_N)
        lo, hi, whole_lo, whole_hi = _key_spans(col_lo, col_hi, slot, keys, kv_len)
        dk, dv = _dkdv_head(k, v, q_smem, do_smem, lse_smem, delta_smem, ready, empty, dk, dv, it, full_idx,
                            full_first, n_full, part_idx, part_first, part_end, n_steps, lo, hi, whole_lo,
                            whole_hi, qk_scale, ONE_LOOP, BQ, BLOCK_M, HEAD_D, STAGES, OVERLAP, st_layout, op_layout)
        it += n_steps
    _dkdv_store(k_smem, v_smem, dk, dv, dk_desc, dv_desc, b, kv_head, keys_at, scale)


@gluon.jit(do_not_specialize=["q_len", "kv_len"])
def _attn_bwd_dkdv_sm90(q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc, lse_desc, delta_desc, T, n_heads, n_kv_heads,
                        group, q_len, kv_len, n_kv_blocks, qk_scale, scale, ONE_LOOP: gl.constexpr,
                        TRIM: gl.constexpr, N_MASK_HEADS: gl.constexpr, BQ: gl.constexpr, BK: gl.constexpr,
                        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, STAGES: gl.constexpr,
                        OVERLAP: gl.constexpr, PINGPONG: gl.constexpr, num_warps: gl.constexpr):
    gl.static_assert(BK % BLOCK_N == 0, "a program's keys must lie in one table key block")
    gl.static_assert(BQ % BLOCK_M == 0, "a query step must lie in one table query block")
    bh = gl.program_id(1)
    b = bh // n_kv_heads
    kv_head = bh % n_kv_heads
    kb, start_n = kernels._key_program(T, gl.program_id(0), BK, BLOCK_N)
    listed = kernels._group_listed(T, kb, kv_head, group, n_kv_blocks, N_MASK_HEADS, ONE_LOOP)  # 0: K/V never read
    if start_n >= kv_len:
        listed = 0

    dtype: gl.constexpr = q_desc.dtype
    HALVES: gl.constexpr = 2 if PINGPONG else 1  # consumer partitions, each with its own keys
    ROWS: gl.constexpr = BLOCK_N // HALVES
    gl.static_assert(k_desc.block_type.shape[2] == ROWS, "K, V, dK and dV are copied in a partition's keys")
    q_smem = gl.allocate_shared_memory(dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [HALVES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [HALVES] + v_desc.block_type.shape, v_desc.layout)
    lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES] + lse_desc.block_type.shape, lse_desc.layout)
    delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES] + delta_desc.block_type.shape, delta_desc.layout)
    kv_bar = _barriers(1, 1).index(0)
    ready = _barriers(STAGES, 1)
    empty = _barriers(STAGES, HALVES)  # released by every consumer partition

    if PINGPONG:  # two warpgroups of 64 keys on the same Q/dO: one's elementwise work beside the other's products
        gl.warp_specialize([
            (_dkdv_consume, (q_smem, do_smem, k_smem.index(0), v_smem.index(0), lse_smem, delta_smem, kv_bar, ready,
                             empty, dk_desc, dv_desc, T, b, kv_head, group, kb, start_n, start_n, kv_len,
                             n_kv_blocks, listed, qk_scale, scale, N_MASK_HEADS, ONE_LOOP, TRIM, BQ, BLOCK_M,
                             BLOCK_N, ROWS, HEAD_D, STAGES, OVERLAP, ROWS // 16)),
            (_dkdv_consume, (q_smem, do_smem, k_smem.index(1), v_smem.index(1), lse_smem, delta_smem, kv_bar, ready,
                             empty, dk_desc, dv_desc, T, b, kv_head, group, kb, start_n, start_n + ROWS,
                             kv_len, n_kv_blocks, listed, qk_scale, scale, N_MASK_HEADS, ONE_LOOP, TRIM, BQ, BLOCK_M,
                             BLOCK_N, ROWS, HEAD_D, STAGES, OVERLAP, ROWS // 16)),
            (_dkdv_load, (q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, q_smem, do_smem, k_smem, v_smem,
                          lse_smem, delta_smem, kv_bar, ready, empty, T, b, kv_head, group, n_heads, kb, start_n,
                          q_len, kv_len, n_kv_blocks, listed, N_MASK_HEADS, ONE_LOOP, TRIM,
                          BQ, BLOCK_M, BLOCK_N, STAGES)),  # constexprs stay constexprs only written in place
        ], [ROWS // 16, 1], [CONSUMER_REGS, LOAD_REGS])
    else:
        gl.warp_specialize([
            (_dkdv_consume, (q_smem, do_smem, k_smem.index(0), v_smem.index(0), lse_smem, delta_smem, kv_bar, ready,
                             empty, dk_desc, dv_desc, T, b, kv_head, group, kb, start_n, start_n, kv_len,
                             n_kv_blocks, listed, qk_scale, scale, N_MASK_HEADS, ONE_LOOP, TRIM, BQ, BLOCK_M,
                             BLOCK_N, ROWS, HEAD_D, STAGES, OVERLAP, num_warps)),
            (_dkdv_load, (q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, q_smem, do_smem, k_smem, v_smem,
                          lse_smem, delta_smem, kv_bar, ready, empty, T, b, kv_head, group, n_heads, kb, start_n,
                          q_len, kv_len, n_kv_blocks, listed, N_MASK_HEADS, ONE_LOOP, TRIM,
                          BQ, BLOCK_M, BLOCK_N, STAGES)),  # constexprs stay constexprs only written in place
        ], [1], [LOAD_REGS])


@gluon.jit
def _dkdv_load_tiles(q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, q_smem, do_smem, k_smem, v_smem, lse_smem,
                     delta_smem, records, kv_ready, kv_empty, head_ready, head_empty, ready, empty, T, n_heads,
                     n_kv_heads, group, q_len, kv_len, n_kv_blocks, n_bkv, n_tiles, N_MASK_HEADS: gl.constexpr,
                     ONE_LOOP: gl.constexpr, TRIM: gl.constexpr, BQ: gl.constexpr, BK: gl.constexpr,
                     BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """The persistent dK/dV load partition: per tile (a key program of one batch and key head),
    its K and V into a free buffer pair, then per query head sharing the key head a record
    (``_record``: first key, slot, FULL list start and count, PARTIAL steps, steps) in a ring of
    its own and the head's steps (``_dkdv_head_load``) into the Q/dO ring, whose position
    carries on from tile to tile."""
    KV_BUFFERS: gl.constexpr = kv_ready.shape[0]
    HALVES: gl.constexpr = k_smem.shape[0] // KV_BUFFERS
    RECORDS: gl.constexpr = records.shape[0]
    head_slot = kernels._section(T, kernels.HEAD_SLOT)
    it = 0
    taken = 0
    heads = 0
    for r in range(gl.cdiv(n_tiles, gl.num_programs(0))):
        tile = _round_tile(r)
        if tile < n_tiles:
            bkv = tile % n_bkv
            b = bkv // n_kv_heads
            kv_head = bkv % n_kv_heads
            kb, start_n = kernels._key_program(T, tile // n_bkv, BK, BLOCK_N)
            listed = kernels._group_listed(T, kb, kv_head, group, n_kv_blocks, N_MASK_HEADS, ONE_LOOP)
            if start_n >= kv_len:
                listed = 0
            buffer = taken % KV_BUFFERS
            mbarrier.wait(kv_empty.index(buffer), ((taken // KV_BUFFERS) & 1) ^ 1)  # starts as if a phase completed
            _dkdv_kv_load(k_desc, v_desc, k_smem, v_smem, kv_ready.index(buffer), buffer * HALVES, b, kv_head, start_n,
                          listed > 0, HALVES)
            for g in range(group):
                h = kv_head * group + g
                slot = gl.load(head_slot + h % N_MASK_HEADS)
                full_idx, full_first, n_full, part_idx, part_first, part_end, n_steps = _dkdv_head_steps(
                    T, slot, kb, n_kv_blocks, start_n, kv_len, listed, ONE_LOOP, TRIM, BQ, BLOCK_M, BLOCK_N)
                at = heads % RECORDS
                mbarrier.wait(head_empty.index(at), ((heads // RECORDS) & 1) ^ 1)
                records.index(at).store(_record(start_n, slot, full_first, n_full, part_first, part_end, n_steps, 0, 1))
                _partition_barrier()  # the record is written before its barrier says it is there
                mbarrier.arrive(head_ready.index(at), count=1)
                _dkdv_head_load(q_desc, do_desc, lse_desc, delta_desc, q_smem, do_smem, lse_smem, delta_smem, ready,
                                empty, b, h, n_heads, q_len, full_idx, full_first, n_full, part_idx, part_first,
                                part_end, n_steps, it, BQ, BLOCK_M, STAGES)
                it += n_steps
                heads += 1
            taken += 1


@gluon.jit
def _dkdv_consume_tiles(q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem, records, kv_ready, kv_empty, head_ready,
                        head_empty, ready, empty, dk_desc, dv_desc, T, n_kv_heads, group, kv_len, n_bkv, n_tiles,
                        qk_scale, scale, ONE_LOOP: gl.constexpr, BQ: gl.constexpr, BLOCK_M: gl.constexpr,
                        ROWS: gl.constexpr, HEAD_D: gl.constexpr, STAGES: gl.constexpr, OVERLAP: gl.constexpr,
                        ME: gl.constexpr, num_warps: gl.constexpr):
    """A persistent dK/dV consumer partition (keys ``ME * ROWS`` on of each tile): per tile, waits
    for its K and V, takes each query head's record (``_dkdv_load_tiles``) and steps
    (``_dkdv_head``), then stores dK and dV through the tile's K/V buffers and frees them."""
    st_layout: gl.constexpr = _mma_layouts(num_warps, ROWS, BLOCK_M, HEAD_D)[0]
    acc_layout: gl.constexpr = _mma_layouts(num_warps, ROWS, BLOCK_M, HEAD_D)[1]
    op_layout: gl.constexpr = _mma_layouts(num_warps, ROWS, BLOCK_M, HEAD_D)[2]
    KV_BUFFERS: gl.constexpr = kv_ready.shape[0]
    HALVES: gl.constexpr = k_smem.shape[0] // KV_BUFFERS
    full_idx = kernels._section(T, kernels.BWD_FULL_IDX)
    part_idx = kernels._section(T, kernels.BWD_PART_IDX)
    col_lo = kernels._section(T, kernels.COL_LO)
    col_hi = kernels._section(T, kernels.COL_HI)
    it = 0
    taken = 0
    heads = 0
    for r in range(gl.cdiv(n_tiles, gl.num_programs(0))):
        tile = _round_tile(r)
        if tile < n_tiles:
            bkv = tile % n_bkv
            buffer = taken % KV_BUFFERS
            k_tile = k_smem.index(buffer * HALVES + ME)
            v_tile = v_smem.index(buffer * HALVES + ME)
            mbarrier.wait(kv_ready.index(buffer), (taken // KV_BUFFERS) & 1)
            dk = gl.zeros([ROWS, HEAD_D], gl.float32, acc_layout)
            dv = gl.zeros([ROWS, HEAD_D], gl.float32, acc_layout)
            keys_at = 0
            for g in range(group):
                at, start_n, slot, full_first, n_full, part_first, part_end, n_steps, _ = _take_record(
                    records, head_ready, heads, num_warps)
                _partition_barrier()  # every thread has read the record before it is released
                mbarrier.arrive(head_empty.index(at), count=1)
                keys_at = start_n + ME * ROWS
                lo, hi, whole_lo, whole_hi = _key_spans(
                    col_lo, col_hi, slot, keys_at + gl.arange(0, ROWS, gl.SliceLayout(1, st_layout)), kv_len)
                dk, dv = _dkdv_head(k_tile.reshape([ROWS, HEAD_D]), v_tile.reshape([ROWS, HEAD_D]), q_smem, do_smem,
                                    lse_smem, delta_smem, ready, empty, dk, dv, it, full_idx, full_first, n_full,
                                    part_idx, part_first, part_end, n_steps, lo, hi, whole_lo, whole_hi,
                                    qk_scale, ONE_LOOP, BQ, BLOCK_M, HEAD_D, STAGES, OVERLAP, st_layout, op_layout)
                it += n_steps
                heads += 1
            _dkdv_store(k_tile, v_tile, dk, dv, dk_desc, dv_desc, bkv // n_kv_heads, bkv % n_kv_heads, keys_at, scale)
            mbarrier.arrive(kv_empty.index(buffer), count=1)
            taken += 1


@gluon.jit(do_not_specialize=["q_len", "kv_len"])
def _attn_bwd_dkdv_sm90_persistent(q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc, lse_desc, delta_desc, T, n_heads,
                                   n_kv_heads, group, q_len, kv_len, n_kv_blocks, n_bkv, qk_scale, scale,
                                   ONE_LOOP: gl.constexpr, TRIM: gl.constexpr, N_MASK_HEADS: gl.constexpr,
                                   BQ: gl.constexpr, BK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                                   HEAD_D: gl.constexpr, STAGES: gl.constexpr, KV_BUFFERS: gl.constexpr,
                                   OVERLAP: gl.constexpr, PINGPONG: gl.constexpr, num_warps: gl.constexpr):
    """The dK/dV kernel as a persistent kernel (``DKDV_PERSISTENT``): a program per
    multiprocessor takes the ``_attn_bwd_dkdv_sm90`` programs' tiles in rounds
    (``_round_tile``); its load warp reads a tile's lists and copies its K and V (into one of
    ``KV_BUFFERS`` pairs) while the consumers still work on the tile before, and hands them each
    query head's lists through a ring of records."""
    gl.static_assert(BK % BLOCK_N == 0, "a program's keys must lie in one table key block")
    gl.static_assert(BQ % BLOCK_M == 0, "a query step must lie in one table query block")
    dtype: gl.constexpr = q_desc.dtype
    HALVES: gl.constexpr = 2 if PINGPONG else 1  # consumer partitions, each with its own keys
    ROWS: gl.constexpr = BLOCK_N // HALVES
    gl.static_assert(k_desc.block_type.shape[2] == ROWS, "K, V, dK and dV are copied in a partition's keys")
    n_tiles = n_kv_blocks * (BK // BLOCK_N) * n_bkv
    q_smem = gl.allocate_shared_memory(dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [KV_BUFFERS * HALVES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [KV_BUFFERS * HALVES] + v_desc.block_type.shape, v_desc.layout)
    lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES] + lse_desc.block_type.shape, lse_desc.layout)
    delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES] + delta_desc.block_type.shape, delta_desc.layout)
    records = gl.allocate_shared_memory(gl.int32, [2, RECORD], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    kv_ready = _barriers(KV_BUFFERS, 1)
    kv_empty = _barriers(KV_BUFFERS, HALVES)
    head_ready = _barriers(2, 1)
    head_empty = _barriers(2, HALVES)
    ready = _barriers(STAGES, 1)
    empty = _barriers(STAGES, HALVES)  # released by every consumer partition
    if PINGPONG:
        gl.warp_specialize([
            (_dkdv_consume_tiles, (q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem, records, kv_ready, kv_empty,
                                   head_ready, head_empty, ready, empty, dk_desc, dv_desc, T, n_kv_heads, group,
                                   kv_len, n_bkv, n_tiles, qk_scale, scale, ONE_LOOP, BQ, BLOCK_M, ROWS, HEAD_D,
                                   STAGES, OVERLAP, 0, ROWS // 16)),
            (_dkdv_consume_tiles, (q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem, records, kv_ready, kv_empty,
                                   head_ready, head_empty, ready, empty, dk_desc, dv_desc, T, n_kv_heads, group,
                                   kv_len, n_bkv, n_tiles, qk_scale, scale, ONE_LOOP, BQ, BLOCK_M, ROWS, HEAD_D,
                                   STAGES, OVERLAP, 1, ROWS // 16)),
            (_dkdv_load_tiles, (q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, q_smem, do_smem, k_smem,
                                v_smem, lse_smem, delta_smem, records, kv_ready, kv_empty, head_ready, head_empty,
                                ready, empty, T, n_heads, n_kv_heads, group, q_len, kv_len, n_kv_blocks, n_bkv,
                                n_tiles, N_MASK_HEADS, ONE_LOOP, TRIM, BQ, BK, BLOCK_M, BLOCK_N, STAGES)),
        ], [ROWS // 16, 1], [CONSUMER_REGS, LOAD_REGS])
    else:
        gl.warp_specialize([
            (_dkdv_consume_tiles, (q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem, records, kv_ready, kv_empty,
                                   head_ready, head_empty, ready, empty, dk_desc, dv_desc, T, n_kv_heads, group,
                                   kv_len, n_bkv, n_tiles, qk_scale, scale, ONE_LOOP, BQ, BLOCK_M, ROWS, HEAD_D,
                                   STAGES, OVERLAP, 0, num_warps)),
            (_dkdv_load_tiles, (q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, q_smem, do_smem, k_smem,
                                v_smem, lse_smem, delta_smem, records, kv_ready, kv_empty, head_ready, head_empty,
                                ready, empty, T, n_heads, n_kv_heads, group, q_len, kv_len, n_kv_blocks, n_bkv,
                                n_tiles, N_MASK_HEADS, ONE_LOOP, TRIM, BQ, BK, BLOCK_M, BLOCK_N, STAGES)),
        ], [1], [LOAD_REGS])
