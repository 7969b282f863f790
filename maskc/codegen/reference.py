"""The reference attention op: plain torch, one query block at a time.

It walks the forward run table (``passes/tables.py``): per query block it
gathers the keys of its FULL and PARTIAL runs, applies the mask only on the
PARTIAL ones (from the exact row intervals, or the stored bit pattern for
``Dense``/``Predicate`` masks) and never touches EMPTY tiles. Forward and
backward are written out rather than left to autograd, so that rows with no
allowed key give output 0, log-sum-exp ``-inf`` and zero gradients instead of
NaN, and so that a gradient flowing into the log-sum-exp (as
``merge_partials`` produces) is honoured exactly.

It reads the mask from tensors alone (``ReferenceTables``), as the Triton
path reads its packed plan, so that under ``torch.compile`` the tables are
inputs of the op and a new mask of the same structure reuses the graph.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..passes import intervals as iv
from .plan import pack, padded_bytes, unpack

#: the sections of ``ReferenceTables.tensors[0]``, then ``lo``, ``hi`` of each slot's row intervals
_TABLES = ("head_slot", "full_ptr", "full_runs", "part_ptr", "part_runs", "part_pattern", "patterns_shape")


@dataclass(frozen=True, eq=False)
class ReferenceTables:
    """What the reference op reads of a compiled mask: ``tensors``, two buffers (``plan.pack``:
    the forward run table and, per slot, the exact row intervals ``int64[q_len, m]`` ``lo`` and
    ``hi``; ``plan.padded_bytes``: the bit patterns), and ``key``, the shapes as text (a constant
    of compiled graphs). Packed like the Triton plan, and for the same reason: a new mask of the
    same shapes is new data of the same lengths for a compiled graph."""

    tensors: tuple
    key: str

    @staticmethod
    def of(cm) -> "ReferenceTables":
        table, fwd = cm.table, cm.table.forward
        sections = [x.numpy() for x in (table.head_slot, fwd.full_ptr, fwd.full_runs, fwd.part_ptr, fwd.part_runs,
                                        fwd.part_pattern)]
        sections.append(np.array(table.patterns.shape))
        sections += [x for b in cm.bounds for x in (b.sure.lo, b.sure.hi)]
        key = json.dumps({"q_len": cm.q_len, "kv_len": cm.kv_len, "block_q": cm.block_size[0],
                          "block_kv": cm.block_size[1]})
        return ReferenceTables((torch.from_numpy(pack(sections, np.int64)), padded_bytes(table.patterns, "cpu")), key)


class _Mask:
    """The run table of ``ReferenceTables`` as numpy, for one call."""

    def __init__(self, tensors, key: str):
        sections = unpack(tensors[0].numpy())
        self.__dict__.update(zip(_TABLES, sections))
        shape = tuple(self.patterns_shape.tolist())
        self.patterns = tensors[1].numpy()[: int(np.prod(shape))].reshape(shape)
        rows = sections[len(_TABLES):]
        self.rows = [iv.Rows(lo, hi) for lo, hi in zip(rows[::2], rows[1::2])]
        shape = json.loads(key)
        self.q_len, self.kv_len = shape["q_len"], shape["kv_len"]
        self.bq, self.bk = shape["block_q"], shape["block_kv"]
        self.n_q_blocks = -(-self.q_len // self.bq)

    def heads_of_slot(self, n_heads: int) -> dict:
        """Table slot -> the query heads it masks (a slice when one slot serves all)."""
        slots = self.head_slot.tolist()
        if len(set(slots)) == 1:
            return {slots[0]: slice(None)}
        out: dict[int, list[int]] = {}
        for head, slot in enumerate(slots if len(slots) == n_heads else slots * n_heads):
            out.setdefault(slot, []).append(head)
        return out

    def block_keys(self, slot: int, qb: int):
        """Key positions of the non-empty tiles of query block ``qb`` and their ``bool`` mask."""
        r0, r1 = qb * self.bq, min((qb + 1) * self.bq, self.q_len)
        keys, masks = [], []
        for full, ptr, runs in ((True, self.full_ptr, self.full_runs), (False, self.part_ptr, self.part_runs)):
            for r in range(int(ptr[slot, qb]), int(ptr[slot, qb + 1])):
                c0, c1 = int(runs[r, 0]) * self.bk, min(int(runs[r, 1]) * self.bk, self.kv_len)
                keys.append(np.arange(c0, c1))
                if full:
                    masks.append(np.ones((r1 - r0, c1 - c0), dtype=bool))
                elif self.part_pattern[r] >= 0:
                    masks.append(self.patterns[self.part_pattern[r], : r1 - r0, : c1 - c0].astype(bool))
                else:
                    masks.append(iv.window(self.rows[slot], r0, r1, c0, c1))
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


def reference_forward(tensors, key: str, q, k, v, scale: float):
    """``(out, lse)``: ``out`` in ``q``'s dtype, ``lse`` float32 (float64 for float64 inputs, so
    that merging tiles stays exact)."""
    mask = _Mask(tensors, key)
    work = _work_dtype(q.dtype)
    groups = q.shape[1] // k.shape[1]
    qw, kw, vw = q.to(work), _expand(k, groups, work), _expand(v, groups, work)
    out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=work, device=q.device)
    lse = torch.full(q.shape[:-1], -math.inf, dtype=work, device=q.device)
    for slot, heads in mask.heads_of_slot(q.shape[1]).items():
        qh, kh, vh = qw[:, heads], kw[:, heads], vw[:, heads]
        out_h, lse_h = out[:, heads], lse[:, heads]
        for qb in range(mask.n_q_blocks):
            keys, allowed = mask.block_keys(slot, qb)
            if keys is None:
                continue
            rows = slice(qb * mask.bq, min((qb + 1) * mask.bq, mask.q_len))
            s = (qh[:, :, rows] @ kh[:, :, keys].transpose(-1, -2)) * scale
            lse_h[:, :, rows] = torch.logsumexp(s.masked_fill(~allowed.to(q.device), -math.inf), dim=-1)
            p = _probabilities(qh[:, :, rows], kh, keys, allowed, scale, lse_h[:, :, rows])
            out_h[:, :, rows] = p @ vh[:, :, keys]
        out[:, heads], lse[:, heads] = out_h, lse_h
    return out.to(q.dtype), lse if work == torch.float64 else lse.to(torch.float32)


def reference_backward(tensors, key: str, q, k, v, out, lse, d_out, d_lse, scale: float):
    """``(dq, dk, dv)`` from the forward's ``out`` and ``lse`` (any precision; worked in float32, or
    float64 for float64 inputs); ``d_out``/``d_lse`` may be ``None`` (no gradient flows there)."""
    mask = _Mask(tensors, key)
    work, groups, bq = _work_dtype(q.dtype), q.shape[1] // k.shape[1], mask.bq
    qw, kw, vw = q.to(work), _expand(k, groups, work), _expand(v, groups, work)
    out, lse = out.to(work), lse.to(work)
    d_out = torch.zeros_like(out) if d_out is None else d_out.to(work)
    d_lse = torch.zeros_like(lse) if d_lse is None else d_lse.to(work)
    # dS = P * (dP - D) with D_i = rowsum(dO * O) - dlse_i, since d lse_i / d s_ij = P_ij
    delta = (d_out * out).sum(-1) - torch.where(torch.isfinite(lse), d_lse, torch.zeros_like(d_lse))
    dq, dk, dv = torch.zeros_like(qw), torch.zeros_like(kw), torch.zeros_like(vw)
    for slot, heads in mask.heads_of_slot(q.shape[1]).items():
        qh, kh, vh, do_h, lse_h, delta_h = (x[:, heads] for x in (qw, kw, vw, d_out, lse, delta))
        dq_h, dk_h, dv_h = torch.zeros_like(qh), torch.zeros_like(kh), torch.zeros_like(vh)
        for qb in range(mask.n_q_blocks):
            keys, allowed = mask.block_keys(slot, qb)
            if keys is None:
                continue
            rows = slice(qb * bq, min((qb + 1) * bq, mask.q_len))
            p = _probabilities(qh[:, :, rows], kh, keys, allowed, scale, lse_h[:, :, rows])
            dp = do_h[:, :, rows] @ vh[:, :, keys].transpose(-1, -2)
            ds = p * (dp - delta_h[:, :, rows, None])
            dq_h[:, :, rows] += (ds @ kh[:, :, keys]) * scale
            dk_h[:, :, keys] += (ds.transpose(-1, -2) @ qh[:, :, rows]) * scale
            dv_h[:, :, keys] += p.transpose(-1, -2) @ do_h[:, :, rows]
        dq[:, heads], dk[:, heads], dv[:, heads] = dq_h, dk_h, dv_h
    b, hkv = k.shape[0], k.shape[1]
    dk = dk.view(b, hkv, groups, *dk.shape[2:]).sum(2)
    dv = dv.view(b, hkv, groups, *dv.shape[2:]).sum(2)
    # in the layouts of the inputs, as the Triton backward and the op's fake implementation give them
    return tuple(torch.empty_like(x).copy_(g) for x, g in ((q, dq), (k, dk), (v, dv)))
