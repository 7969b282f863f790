"""Merging two partial attention results ``(out, lse)`` over disjoint key sets, in one pass.

Ring attention computes a rank's queries against one K/V shard at a time and
merges each tile's result into a running one by log-sum-exp
(``maskc.merge_partials`` says the rule). Written with torch operations, a
merge of ``[B, H, L, D]`` results takes a dozen passes over the tensors: on
one H200, 0.53 ms for 16K rows of 16 heads x 128, more than the attention of
a small tile (bench/RESULTS.md, issue 17). This kernel reads each input once
and writes the result once, and skips what a row does not need: rows that a
tile leaves empty (``lse = -inf``) read no ``out`` of it, and an in-place merge
writes only the rows the new part changes.

Per row, with ``m = max(lse_a, lse_b)`` (0 when both are ``-inf``)::

    w_a = exp(lse_a - m),  w_b = exp(lse_b - m)
    out = (w_a out_a + w_b out_b) / (w_a + w_b),  lse = m + log(w_a + w_b)

and ``out = 0``, ``lse = -inf`` where both parts are empty: no NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS = 32  # rows a program merges


@triton.jit
def _merge(a_out, a_lse, b_out, b_lse, dst_out, dst_lse, n_rows, head_dim, IN_PLACE: tl.constexpr,
           BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    in_rows = rows < n_rows
    lse_a = tl.load(a_lse + rows, mask=in_rows, other=float("-inf"))
    lse_b = tl.load(b_lse + rows, mask=in_rows, other=float("-inf"))
    peak = tl.maximum(lse_a, lse_b)
    peak = tl.where(peak == float("-inf"), 0.0, peak)
    w_a = tl.exp(lse_a - peak)
    w_b = tl.exp(lse_b - peak)
    total = w_a + w_b
    some = total > 0
    safe = tl.where(some, total, 1.0)
    lse = tl.where(some, peak + tl.log(safe), float("-inf"))
    at = rows.to(tl.int64)[:, None] * head_dim + cols[None, :]
    inside = in_rows[:, None] & (cols[None, :] < head_dim)
    out_a = tl.load(a_out + at, mask=inside & (w_a > 0)[:, None], other=0.0).to(tl.float32)
    out_b = tl.load(b_out + at, mask=inside & (w_b > 0)[:, None], other=0.0).to(tl.float32)
    out = out_a * (w_a / safe)[:, None] + out_b * (w_b / safe)[:, None]
    changed = (w_b > 0) if IN_PLACE else in_rows  # in place, rows that b leaves empty keep a's values
    tl.store(dst_out + at, out.to(dst_out.dtype.element_ty), mask=inside & changed[:, None])
    tl.store(dst_lse + rows, lse, mask=in_rows & changed)


def merge(a_out: torch.Tensor, a_lse: torch.Tensor, b_out: torch.Tensor, b_lse: torch.Tensor,
          in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of parts ``a`` and ``b`` (``out [..., L, D]``, ``lse [..., L]`` float32):
    new float32 tensors, or ``a``'s own (float32, contiguous) updated with ``in_place``."""
    head_dim = a_out.shape[-1]
    b_out, b_lse = b_out.contiguous(), b_lse.contiguous()
    if in_place:
        if any(x.dtype != torch.float32 or not x.is_contiguous() for x in (a_out, a_lse)):
            raise ValueError("an in-place merge needs a contiguous float32 out and lse")
        dst_out, dst_lse = a_out, a_lse
    else:
        a_out, a_lse = a_out.contiguous(), a_lse.contiguous()
        dst_out = torch.empty(a_out.shape, dtype=torch.float32, device=a_out.device)
        dst_lse = torch.empty(a_lse.shape, dtype=torch.float32, device=a_lse.device)
    n_rows = a_lse.numel()
    if n_rows:
        _merge[(triton.cdiv(n_rows, ROWS),)](a_out, a_lse, b_out, b_lse, dst_out, dst_lse, n_rows, head_dim,
                                             IN_PLACE=in_place, BLOCK_D=triton.next_power_of_2(head_dim),
                                             ROWS=ROWS)
    return dst_out, dst_lse
