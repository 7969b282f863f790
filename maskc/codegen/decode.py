"""The decode path: split-K attention over row groups, the query heads of a KV head packed in one tile.

For masks of few query rows with long reach, decoding and chunked prefill
over a KV cache, padded or paged (``plan.py`` says when), the forward runs
these two kernels over the work list of ``decode_work.py`` instead of the
main forward:

* ``_decode_fwd``, grid ``(decode_items, batch * kv_heads * splits)``: one
  program per item (a chunk of one row group's key blocks; the largest
  first) and KV head. Its
  tile holds the group's rows times the ``HEADS`` query heads of that KV head
  it packs (``tile_of``), so each K/V step is loaded once for all of them
  (GQA; ``splits > 1`` only where a group's rows times the heads exceed the
  tile). Pairs are masked by the entry's per-row spans; a group reads only
  the blocks its rows need, so a query block holding rows of many sequences
  no longer makes one program read them all. A program writes its rows'
  partial ``(out, lse)``, normalised, in float32 scratch; where its group
  has one item, the final ``out`` and ``lse`` directly.
* ``_decode_merge``, grid ``(decode_groups, batch * kv_heads * splits)``:
  per row group of several items, combines the partials exactly by
  log-sum-exp; groups of no item (rows that allow nothing) get out 0 and LSE
  ``-inf``, never NaN.

Scratch ``float32[decode_items, batch, q_heads, R, BLOCK_DV]`` (and the LSE
without ``BLOCK_DV``) is indexed by item, head and row in the group, not by
tile, so the two kernels may pack heads differently. The backward is the
main kernels' (``kernels.py``): exact, unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch, tuning
from .kernels import LN2, _inside, _load_tile, _masked_softmax_step, _section, _step_start
from .plan import Section, Structure

DECODE_COUNTS = tl.constexpr(int(Section.DECODE_COUNTS))
DECODE_GROUP_ROWS = tl.constexpr(int(Section.DECODE_GROUP_ROWS))
DECODE_GROUP_ITEMS = tl.constexpr(int(Section.DECODE_GROUP_ITEMS))
DECODE_ITEMS = tl.constexpr(int(Section.DECODE_ITEMS))
DECODE_BLOCKS = tl.constexpr(int(Section.DECODE_BLOCKS))
DECODE_SPANS = tl.constexpr(int(Section.DECODE_SPANS))
DECODE_ORDER = tl.constexpr(int(Section.DECODE_ORDER))


# -- helpers ------------------------------------------------------------------------
@triton.jit
def _kv_program(n_kv_heads, group, HEADS: tl.constexpr):
    """``(batch, kv_head, split)`` of this program: grid axis 1 runs over ``batch * kv_heads *
    splits``, ``splits = cdiv(group, HEADS)`` programs sharing the query heads of one KV head."""
    splits = tl.cdiv(group, HEADS)
    at = tl.program_id(1)
    b, rest = at // (n_kv_heads * splits), at % (n_kv_heads * splits)
    return b, rest // splits, rest % splits


@triton.jit
def _group_tile(T, grp, kv_head, split, group, HEADS: tl.constexpr, TILE_M: tl.constexpr):
    """What tile row ``m`` holds for row group ``grp``: row ``m // HEADS`` of the group (``r``) and
    query head ``kv_head * group + split * HEADS + m % HEADS`` (``h``); ``rows``: the query
    positions; ``valid``: a real row and head."""
    at = _section(T, DECODE_GROUP_ROWS) + grp * 2
    first_row, n_rows = tl.load(at), tl.load(at + 1)
    m = tl.arange(0, TILE_M)
    r = m // HEADS
    g = split * HEADS + m % HEADS
    return r, kv_head * group + g, first_row + r, (r < n_rows) & (g < group)


@triton.jit
def _row_ptrs(base, h, rows, stride_h, stride_m, stride_d, BLOCK_COLS: tl.constexpr):
    """Pointers ``[TILE_M, BLOCK_COLS]`` to rows ``rows`` of heads ``h`` of one batch entry."""
    cols = tl.arange(0, BLOCK_COLS)
    return base + h[:, None].to(tl.int64) * stride_h + rows[:, None].to(tl.int64) * stride_m + cols[None, :] * stride_d


@triton.jit
def _store_final(Out, Lse, o, lse, b, h, rows, valid, n_heads, q_len, stride_ob, stride_oh, stride_om, stride_od,
                 HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The final ``out`` and natural ``lse`` of the tile's valid rows (``Lse``: ``[batch, heads,
    q_len]``, contiguous)."""
    ptrs = _row_ptrs(Out + b.to(tl.int64) * stride_ob, h, rows, stride_oh, stride_om, stride_od, BLOCK_DV)
    cols = tl.arange(0, BLOCK_DV)
    tl.store(ptrs, o.to(Out.dtype.element_ty), mask=valid[:, None] & (cols[None, :] < HEAD_DV))
    tl.store(Lse + (b * n_heads + h).to(tl.int64) * q_len + rows, lse, mask=valid)


@triton.jit
def _partial_at(item, b, h, r, batch, n_heads, ROWS: tl.constexpr):
    """Index of the partial result of row ``r`` of an item's group, head ``h``: scratch is
    ``[items, batch, heads, ROWS]`` (times ``BLOCK_DV`` for ``out``)."""
    return ((b.to(tl.int64) + item * batch) * n_heads + h) * ROWS + r


# -- the decode kernel ------------------------------------------------------------------
@triton.jit(do_not_specialize=["q_len", "kv_len"])
def _decode_fwd(Q, K, V, Out, Lse, PartOut, PartLse, T,
                stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
                batch, n_heads, n_kv_heads, group, q_len, kv_len, qk_scale,
                CUT: tl.constexpr, ROWS: tl.constexpr, HEADS: tl.constexpr, TILE_M: tl.constexpr,
                BK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
                HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    tl.static_assert(BK % BLOCK_N == 0, "a key step must lie in one table key block")
    tl.static_assert(TILE_M >= ROWS * HEADS, "the tile holds every row of a group for its heads")
    if tl.program_id(0) >= tl.load(_section(T, DECODE_COUNTS)):  # the grid is rounded up (plan.rounded_up)
        return
    item = tl.load(_section(T, DECODE_ORDER) + tl.program_id(0))  # largest first
    b, kv_head, split = _kv_program(n_kv_heads, group, HEADS)
    item_at = _section(T, DECODE_ITEMS) + item * 3
    grp, first, end = tl.load(item_at), tl.load(item_at + 1), tl.load(item_at + 2)
    r, h, rows, valid = _group_tile(T, grp, kv_head, split, group, HEADS, TILE_M)
    q_ptrs = _row_ptrs(Q + b.to(tl.int64) * stride_qb, h, rows, stride_qh, stride_qm, stride_qd, BLOCK_D)
    q = tl.load(q_ptrs, mask=valid[:, None] & (tl.arange(0, BLOCK_D)[None, :] < HEAD_D), other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    acc = tl.zeros([TILE_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([TILE_M], dtype=tl.float32)
    m_i = tl.full([TILE_M], float("-inf"), dtype=tl.float32)

    SUBS: tl.constexpr = BK // BLOCK_N  # kernel steps an entry's key block
    blocks = _section(T, DECODE_BLOCKS)
    spans = _section(T, DECODE_SPANS) + r
    in_group = r < ROWS  # tile rows past the group's R read no span (they are not valid either)
    first, end = first * SUBS, end * SUBS
    start_n = _step_start(blocks, first, end, BK, BLOCK_N)
    for step in range(first, end):
        at_n = start_n
        offs_n = at_n + tl.arange(0, BLOCK_N)
        start_n = _step_start(blocks, step + 1, end, BK, BLOCK_N)
        entry_spans = spans + (step // SUBS) * (2 * ROWS)
        lo = tl.load(entry_spans, mask=in_group, other=0)
        hi = tl.load(entry_spans + ROWS, mask=in_group, other=0)
        k = _load_tile(k_base, offs_n, kv_len, stride_kn, stride_kd, HEAD_D, BLOCK_D, CUT)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        t = tl.where(_inside(offs_n[None, :], lo[:, None], hi[:, None]), s * qk_scale, float("-inf"))
        p, m_new, m_ref = _masked_softmax_step(t, m_i)
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base, offs_n, kv_len, stride_vn, stride_vd, HEAD_DV, BLOCK_DV, CUT)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0  # rows with no allowed key in this chunk: out 0, LSE -inf
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))
    group_items = _section(T, DECODE_GROUP_ITEMS) + grp
    if tl.load(group_items + 1) - tl.load(group_items) == 1:  # the group's only item: final
        _store_final(Out, Lse, o, lse2 * LN2, b, h, rows, valid, n_heads, q_len, stride_ob, stride_oh, stride_om,
                     stride_od, HEAD_DV, BLOCK_DV)
    else:
        slots = _partial_at(item, b, h, r, batch, n_heads, ROWS)
        cols = tl.arange(0, BLOCK_DV)
        tl.store(PartOut + slots[:, None] * BLOCK_DV + cols[None, :], o, mask=valid[:, None])
        tl.store(PartLse + slots, lse2, mask=valid)


# -- the merge ------------------------------------------------------------------------
@triton.jit(do_not_specialize=["q_len"])
def _decode_merge(Out, Lse, PartOut, PartLse, T, stride_ob, stride_oh, stride_om, stride_od,
                  batch, n_heads, n_kv_heads, group, q_len,
                  ROWS: tl.constexpr, HEADS: tl.constexpr, TILE_M: tl.constexpr, HEAD_DV: tl.constexpr,
                  BLOCK_DV: tl.constexpr):
    """``out = sum_c 2^(lse_c - lse) out_c`` and ``lse = log2 sum_c 2^lse_c`` (base 2 here, natural
    when stored) over the items ``c`` of one row group, running the maximum as the forward does."""
    grp = tl.program_id(0)
    if grp >= tl.load(_section(T, DECODE_COUNTS) + 1):  # the grid is rounded up (plan.rounded_up)
        return
    group_items = _section(T, DECODE_GROUP_ITEMS) + grp
    first_item, end_item = tl.load(group_items), tl.load(group_items + 1)
    if end_item - first_item == 1:  # stored by its only decode program
        return
    b, kv_head, split = _kv_program(n_kv_heads, group, HEADS)
    r, h, rows, valid = _group_tile(T, grp, kv_head, split, group, HEADS, TILE_M)
    cols = tl.arange(0, BLOCK_DV)
    acc = tl.zeros([TILE_M, BLOCK_DV], dtype=tl.float32)
    total = tl.zeros([TILE_M], dtype=tl.float32)
    m_i = tl.full([TILE_M], float("-inf"), dtype=tl.float32)
    for item in range(first_item, end_item):
        slots = _partial_at(item, b, h, r, batch, n_heads, ROWS)
        lse_c = tl.load(PartLse + slots, mask=valid, other=float("-inf"))
        o_c = tl.load(PartOut + slots[:, None] * BLOCK_DV + cols[None, :], mask=valid[:, None], other=0.0)
        m_new = tl.maximum(m_i, lse_c)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_ref)
        weight = tl.math.exp2(lse_c - m_ref)
        acc = acc * alpha[:, None] + o_c * weight[:, None]
        total = total * alpha + weight
        m_i = m_new
    empty = total == 0.0  # rows that allow nothing (and groups of no item): out 0, LSE -inf
    safe = tl.where(empty, 1.0, total)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(safe)) * LN2)
    _store_final(Out, Lse, acc / safe[:, None], lse, b, h, rows, valid, n_heads, q_len, stride_ob, stride_oh,
                 stride_om, stride_od, HEAD_DV, BLOCK_DV)


# -- host ---------------------------------------------------------------------------------------
def tile_of(rows: int, group: int, block_m: int) -> tuple[int, int]:
    """``(heads, tile rows)`` of a program: the query heads of one KV head it packs (all ``group``
    of them, rounded up to a power of two, while ``rows`` times them fit ``block_m``) and its tile
    rows, at least 16 (``tl.dot``)."""
    heads = min(triton.next_power_of_2(group), max(1, block_m // rows))
    return heads, max(16, rows * heads)


def forward(structure: Structure, tables: torch.Tensor, q, k, v, out, lse, qk_scale: float):
    """``(out, lse)`` of the decode path, written into ``out`` and ``lse`` (``launch.forward``
    allocates them and checks the arguments; ``qk_scale = scale * log2(e) >= 0``)."""
    batch, n_heads = q.shape[0], q.shape[1]
    part_out = torch.empty((structure.decode_items, batch, n_heads, structure.decode_rows,
                            tuning.head_bucket(v.shape[-1])), dtype=torch.float32, device=q.device)
    part_lse = torch.empty(part_out.shape[:-1], dtype=torch.float32, device=q.device)
    aligned = launch._aligned(q, k, v)
    launch.launch("decode", launch._key("decode", structure, aligned, q, k, v),
                  (q, k, v, out, lse, part_out, part_lse, tables, qk_scale),
                  lambda config: _decode_launch(structure, config, aligned, q, k, v, out), structure, q, v)
    launch.launch("merge", launch._key("merge", structure, aligned, q, k, v), (out, lse, part_out, part_lse, tables),
                  lambda config: _merge_launch(structure, config, aligned, q, k, v, out), structure, q, v)
    return out, lse


def _grid(programs: int, heads: int, q, k) -> tuple[int, int, int]:
    """``(programs, batch * kv_heads * splits, 1)`` for programs packing ``heads`` query heads."""
    return programs, q.shape[0] * k.shape[1] * triton.cdiv(q.shape[1] // k.shape[1], heads), 1


def _shared(structure: Structure, q, k, v, out) -> dict:
    """The arguments both kernels take, fixed by the launch key."""
    return dict(**launch._strides("o", out), batch=q.shape[0], n_heads=q.shape[1], n_kv_heads=k.shape[1],
                group=q.shape[1] // k.shape[1], q_len=structure.q_len, ROWS=structure.decode_rows,
                HEAD_DV=v.shape[-1], BLOCK_DV=tuning.head_bucket(v.shape[-1]))


def _decode_launch(structure: Structure, config: tuning.TileConfig, aligned: bool, q, k, v, out) -> launch.Launch:
    heads, tile = tile_of(structure.decode_rows, q.shape[1] // k.shape[1], config.block_m)
    fixed = dict(**_shared(structure, q, k, v, out), **launch._strides("q", q), **launch._strides("k", k, "bhnd"),
                 **launch._strides("v", v, "bhnd"), kv_len=structure.kv_len, CUT=structure.cut, HEADS=heads,
                 TILE_M=tile, BK=structure.block_kv, BLOCK_N=config.block_n, HEAD_D=q.shape[-1],
                 BLOCK_D=tuning.head_bucket(q.shape[-1]), PRECISION=launch._precision(q.dtype))
    return launch.Launch(_decode_fwd, _grid(structure.decode_items, heads, q, k), fixed,
                         ("Q", "K", "V", "Out", "Lse", "PartOut", "PartLse", "T", "qk_scale"), config, {}, aligned)


def _merge_launch(structure: Structure, config: tuning.TileConfig, aligned: bool, q, k, v, out) -> launch.Launch:
    heads, tile = tile_of(structure.decode_rows, q.shape[1] // k.shape[1], config.block_m)
    return launch.Launch(_decode_merge, _grid(structure.decode_groups, heads, q, k),
                         dict(**_shared(structure, q, k, v, out), HEADS=heads, TILE_M=tile),
                         ("Out", "Lse", "PartOut", "PartLse", "T"), config, {}, aligned)
