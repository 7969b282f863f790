"""Brute-force oracles, written from the node table of docs/contract.md alone.

Nothing here calls ``Mask.allowed`` or anything in ``maskc.passes``: each node's
rule is re-stated on a dense ``[q_len, kv_len]`` grid, and attention is plain
float64 torch. Slow on purpose; used only by the tests.
"""

from __future__ import annotations

import math

import numpy as np
import torch

import maskc


def dense_mask(node: maskc.Mask, q_len: int, kv_len: int) -> np.ndarray:
    """``bool[q_len, kv_len]``: ``allowed(i, j)`` of ``node`` in a scope of ``(q_len, kv_len)``."""
    return np.broadcast_to(np.asarray(_allowed(node, q_len, kv_len), dtype=bool), (q_len, kv_len)).copy()


def _allowed(node: maskc.Mask, q_len: int, kv_len: int):
    # Python integers (object arrays): offsets and lengths of any size, no int64 overflow
    i = np.arange(q_len).astype(object)[:, None]
    j = np.arange(kv_len).astype(object)[None, :]
    shape = (q_len, kv_len)
    kind = node.kind
    if kind == "full":
        return np.ones(shape, dtype=bool)
    if kind == "empty":
        return np.zeros(shape, dtype=bool)
    if kind in ("causal", "sliding_window"):
        s = kv_len - q_len if node.align == "bottom_right" else 0
        if kind == "causal":
            return j <= i + node.offset + s
        ok = np.ones(shape, dtype=bool)
        if node.left is not None:
            ok = ok & (i + s - node.left <= j)
        if node.right is not None:
            ok = ok & (j <= i + s + node.right)
        return ok
    if kind == "chunked":
        return i // node.size == j // node.size
    if kind == "prefix":
        return j < node.length
    if kind == "range":
        (a, b), (c, d) = node.q, node.kv
        return (a <= i) & (i < b) & (c <= j) & (j < d)
    if kind == "documents":
        out = np.zeros(shape, dtype=bool)
        kv_lengths = node.lengths if node.kv_lengths is None else node.kv_lengths
        q0, k0 = node.q_start, node.kv_start  # positions before them: no document
        for lq, lk in zip(node.lengths, kv_lengths):
            out[q0:q0 + lq, k0:k0 + lk] = dense_mask(node.inner, lq, lk)
            q0, k0 = q0 + lq, k0 + lk
        return out
    if kind == "dense":
        values = np.asarray(node.values.array, dtype=bool)
        assert values.shape == shape, (values.shape, shape)
        return values.copy()
    if kind == "predicate":
        ii = torch.arange(q_len, dtype=torch.int64)[:, None]
        jj = torch.arange(kv_len, dtype=torch.int64)[None, :]
        return np.asarray(node.fn(ii, jj))
    if kind == "and":
        out = np.ones(shape, dtype=bool)
        for x in node.of:
            out &= dense_mask(x, q_len, kv_len)
        return out
    if kind == "or":
        out = np.zeros(shape, dtype=bool)
        for x in node.of:
            out |= dense_mask(x, q_len, kv_len)
        return out
    if kind == "not":
        return ~dense_mask(node.of, q_len, kv_len)
    raise AssertionError(f"the oracle does not know kind {kind!r}")


def spec_masks(spec: maskc.Spec) -> np.ndarray:
    """``bool[H_mask, q_len, kv_len]``: one dense mask per head (``H_mask == 1`` when shared)."""
    heads = spec.mask if isinstance(spec.mask, tuple) else (spec.mask,)
    return np.stack([dense_mask(m, spec.q_len, spec.kv_len) for m in heads])


def block_kinds(masks: np.ndarray, bq: int, bk: int) -> np.ndarray:
    """``uint8[H, nQ, nK]``: EMPTY (0), PARTIAL (1) or FULL (2) judged on in-range positions."""
    h, q_len, kv_len = masks.shape
    n_q, n_k = -(-q_len // bq), -(-kv_len // bk)
    out = np.zeros((h, n_q, n_k), dtype=np.uint8)
    for a in range(n_q):
        for b in range(n_k):
            tile = masks[:, a * bq:(a + 1) * bq, b * bk:(b + 1) * bk].reshape(h, -1)
            out[:, a, b] = np.where(tile.all(1), 2, np.where(tile.any(1), 1, 0))
    return out


def attention(q, k, v, masks, scale=None):
    """``(out, lse)`` in float64, differentiable, from a dense ``bool[H_mask, q_len, kv_len]`` mask.

    GQA/MQA repeats each key/value head over its group of query heads. Rows with
    no allowed key give output 0 and lse ``-inf`` (and no NaN in any gradient).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    k = k.to(torch.float64).repeat_interleave(groups, dim=1)
    v = v.to(torch.float64).repeat_interleave(groups, dim=1)
    mask = torch.as_tensor(np.asarray(masks))[None]  # [1, H_mask, q_len, kv_len]
    has_key = mask.any(-1)
    s = (q.to(torch.float64) @ k.transpose(-1, -2)) * scale
    s = torch.where(mask, s, -math.inf)
    s = torch.where(has_key[..., None], s, 0.0)  # an empty row's lse stays finite inside the graph
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]) * mask
    return p @ v, torch.where(has_key, lse, -math.inf)
