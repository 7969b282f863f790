"""The reference attention op: plain torch, one query block at a time.

It walks the same forward table as the Triton kernel: per query block it
gathers the keys of its FULL and PARTIAL runs, applies the mask only on the
PARTIAL ones (from the exact row intervals, or the stored bit pattern for
``Dense``/``Predicate`` masks) and never touches EMPTY tiles. Forward and
backward are written out (a ``torch.autograd.Function``) rather than left to
autograd, so that rows with no allowed key give output 0, log-sum-exp ``-inf``
and zero gradients instead of NaN, and so that a gradient flowing into the
log-sum-exp (as ``merge_partials`` produces) is honoured exactly.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..passes import intervals as iv


def _block_keys(cm, slot: int, qb: int):
    """Key positions of the non-empty tiles of query block ``qb`` and their ``bool`` mask."""
    bq, bk = cm.block_size
    r0, r1 = qb * bq, min((qb + 1) * bq, cm.q_len)
    table = cm.table.forward
    rows = cm.bounds[slot].sure
    keys, masks = [], []
    for full in (True, False):
        for start, end, pattern in table.runs_of(slot, qb, full):
            c0, c1 = start * bk, min(end * bk, cm.kv_len)
            keys.append(np.arange(c0, c1))
            if full:
                masks.append(np.ones((r1 - r0, c1 - c0), dtype=bool))
            elif pattern >= 0:
                masks.append(cm.table.patterns[pattern, : r1 - r0, : c1 - c0].numpy())
            else:
                masks.append(iv.window(rows, r0, r1, c0, c1))
    if not keys:
        return None, None
    return torch.from_numpy(np.concatenate(keys)), torch.from_numpy(np.concatenate(masks, axis=1))


def _probabilities(q, k, keys, mask, scale, lse):
    """``P`` of one block, recomputed from the stored log-sum-exp (0 where masked or empty)."""
    s = (q @ k[:, :, keys].transpose(-1, -2)) * scale
    finite = torch.isfinite(lse)
    p = torch.exp(s - torch.where(finite, lse, torch.zeros_like(lse))[..., None])
    return torch.where(mask.to(q.device) & finite[..., None], p, torch.zeros_like(p))


def _work_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expand(x, groups, work):
    """``[B, Hkv, S, D]`` -> ``[B, Hkv * groups, S, D]`` in the working precision (GQA)."""
    return x.to(work).repeat_interleave(groups, dim=1)


class ReferenceAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cm, scale, heads_of_slot):
        work = _work_dtype(q.dtype)
        groups = q.shape[1] // k.shape[1]
        qw, kw, vw = q.to(work), _expand(k, groups, work), _expand(v, groups, work)
        out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=work, device=q.device)
        lse = torch.full(q.shape[:-1], -math.inf, dtype=work, device=q.device)
        bq = cm.block_size[0]
        for slot, heads in heads_of_slot.items():
            qh, kh, vh = qw[:, heads], kw[:, heads], vw[:, heads]
            out_h, lse_h = out[:, heads], lse[:, heads]
            for qb in range(cm.n_q_blocks):
                keys, mask = _block_keys(cm, slot, qb)
                if keys is None:
                    continue
                rows = slice(qb * bq, min((qb + 1) * bq, cm.q_len))
                s = (qh[:, :, rows] @ kh[:, :, keys].transpose(-1, -2)) * scale
                lse_h[:, :, rows] = torch.logsumexp(s.masked_fill(~mask.to(q.device), -math.inf), dim=-1)
                p = _probabilities(qh[:, :, rows], kh, keys, mask, scale, lse_h[:, :, rows])
                out_h[:, :, rows] = p @ vh[:, :, keys]
            out[:, heads], lse[:, heads] = out_h, lse_h
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cm, ctx.scale, ctx.heads_of_slot = cm, scale, heads_of_slot
        # float32 as the contract says; float64 inputs keep float64 so that merging tiles stays exact
        return out.to(q.dtype), lse if work == torch.float64 else lse.to(torch.float32)

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = reference_backward(ctx.cm, q, k, v, out, lse, d_out, d_lse, ctx.scale, ctx.heads_of_slot)
        return dq, dk, dv, None, None, None


def reference_backward(cm, q, k, v, out, lse, d_out, d_lse, scale: float, heads_of_slot: dict):
    """``(dq, dk, dv)`` from the forward's ``out`` and ``lse`` (any precision; worked in float32, or
    float64 for float64 inputs); ``d_out``/``d_lse`` may be ``None`` (no gradient flows there)."""
    work, groups, bq = _work_dtype(q.dtype), q.shape[1] // k.shape[1], cm.block_size[0]
    qw, kw, vw = q.to(work), _expand(k, groups, work), _expand(v, groups, work)
    out, lse = out.to(work), lse.to(work)
    d_out = torch.zeros_like(out) if d_out is None else d_out.to(work)
    d_lse = torch.zeros_like(lse) if d_lse is None else d_lse.to(work)
    # dS = P * (dP - D) with D_i = rowsum(dO * O) - dlse_i, since d lse_i / d s_ij = P_ij
    delta = (d_out * out).sum(-1) - torch.where(torch.isfinite(lse), d_lse, torch.zeros_like(d_lse))
    dq, dk, dv = torch.zeros_like(qw), torch.zeros_like(kw), torch.zeros_like(vw)
    for slot, heads in heads_of_slot.items():
        qh, kh, vh, do_h, lse_h, delta_h = (x[:, heads] for x in (qw, kw, vw, d_out, lse, delta))
        dq_h, dk_h, dv_h = torch.zeros_like(qh), torch.zeros_like(kh), torch.zeros_like(vh)
        for qb in range(cm.n_q_blocks):
            keys, mask = _block_keys(cm, slot, qb)
            if keys is None:
                continue
            rows = slice(qb * bq, min((qb + 1) * bq, cm.q_len))
            p = _probabilities(qh[:, :, rows], kh, keys, mask, scale, lse_h[:, :, rows])
            dp = do_h[:, :, rows] @ vh[:, :, keys].transpose(-1, -2)
            ds = p * (dp - delta_h[:, :, rows, None])
            dq_h[:, :, rows] += (ds @ kh[:, :, keys]) * scale
            dk_h[:, :, keys] += (ds.transpose(-1, -2) @ qh[:, :, rows]) * scale
            dv_h[:, :, keys] += p.transpose(-1, -2) @ do_h[:, :, rows]
        dq[:, heads], dk[:, heads], dv[:, heads] = dq_h, dk_h, dv_h
    b, hkv = k.shape[0], k.shape[1]
    dk = dk.view(b, hkv, groups, *dk.shape[2:]).sum(2)
    dv = dv.view(b, hkv, groups, *dv.shape[2:]).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def reference_attention(cm, q, k, v, scale: float, heads_of_slot: dict):
    """``(out, lse)`` by the reference path; differentiable in ``q``, ``k``, ``v``.

    ``heads_of_slot`` maps each table slot to the query heads it masks (a slice
    or a list of head indices)."""
    return ReferenceAttention.apply(q, k, v, cm, scale, heads_of_slot)
