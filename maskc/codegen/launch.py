"""Launch logic: check the op's arguments, then run the reference or the Triton path."""

from __future__ import annotations

import math
from typing import Optional

import torch

from .reference import reference_attention, reference_backward

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("reference", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_HEAD_DIM = 256
TRITON_MAX_BATCH_HEADS = 65535  # the launch grids' second axis (programs of one head run together on the first)


def check_inputs(cm, q, k, v, scale) -> None:
    """Raise ``TypeError``/``ValueError`` naming the bad argument, before any work."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, length, head_dim], got shape {tuple(x.shape)}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}.dtype={x.dtype} is not supported; use one of {SUPPORTED_DTYPES}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[2] != cm.q_len:
        raise ValueError(f"q has {q.shape[2]} queries (q.shape={tuple(q.shape)}) but the mask has q_len={cm.q_len}")
    for name, x in (("k", k), ("v", v)):
        if x.shape[2] != cm.kv_len:
            raise ValueError(
                f"{name} has {x.shape[2]} keys ({name}.shape={tuple(x.shape)}) but the mask has kv_len={cm.kv_len}"
            )
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"q, k, v must share the batch size, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads, got {k.shape[1]} and {v.shape[1]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q's {q.shape[1]} heads must be a multiple of k's {k.shape[1]} heads (GQA/MQA)")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must share head_dim, got {q.shape[3]} and {k.shape[3]}")
    if cm.n_heads not in (1, q.shape[1]):
        raise ValueError(f"the mask has {cm.n_heads} per-head masks but q has {q.shape[1]} heads")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise TypeError(f"scale must be a finite number or None, got {scale!r}")


def check_triton_inputs(cm, q, k, v) -> None:
    """What the Triton kernels support beyond ``check_inputs``; raised before any launch."""
    from .predicate import MAX_POSITIONS
    from .triton_attention import interpreting

    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"q.dtype={q.dtype} is not supported by backend='triton'; use one of {TRITON_DTYPES} "
                        "or backend='reference'")
    for name, x in (("q", q), ("v", v)):
        if x.shape[3] > TRITON_MAX_HEAD_DIM:
            raise ValueError(f"{name} has head_dim={x.shape[3]}; backend='triton' supports head dims up to "
                             f"{TRITON_MAX_HEAD_DIM} (others are padded up to a power of two >= 16)")
    if not (q.is_cuda or (q.device.type == "cpu" and interpreting())):
        raise ValueError(f"q.device={q.device}: backend='triton' runs on CUDA tensors, or on CPU tensors when "
                         "TRITON_INTERPRET=1 was set before maskc's kernels were imported")
    if any(b % 16 for b in cm.block_size):
        raise ValueError(f"the mask was compiled with block_size={cm.block_size}; backend='triton' needs "
                         "multiples of 16 (kernel tiles are powers of two >= 16 dividing them)")
    if q.shape[0] * q.shape[1] > TRITON_MAX_BATCH_HEADS:
        raise ValueError(f"q has batch * heads = {q.shape[0]} * {q.shape[1]}; backend='triton' supports at most "
                         f"{TRITON_MAX_BATCH_HEADS}")
    if cm.q_len + cm.kv_len >= MAX_POSITIONS:
        raise ValueError(f"q_len + kv_len = {cm.q_len + cm.kv_len}: backend='triton' supports fewer than "
                         f"{MAX_POSITIONS} positions")


def heads_of_slot(cm, n_heads: int) -> dict:
    """Table slot -> the query heads it masks (a slice when one slot serves all)."""
    slots = cm.table.head_slot.tolist()
    if len(set(slots)) == 1:
        return {slots[0]: slice(None)}
    out: dict[int, list[int]] = {}
    for head, slot in enumerate(slots if len(slots) == n_heads else slots * n_heads):
        out.setdefault(slot, []).append(head)
    return out


def _uses_triton(cm, q, k, v, backend: Optional[str]) -> bool:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{backend=} must be one of {BACKENDS} or None")
    if backend == "triton" or (backend is None and q.is_cuda):
        check_triton_inputs(cm, q, k, v)
        return True
    return False


def attention(cm, q, k, v, scale: Optional[float] = None, return_lse: bool = False, backend: Optional[str] = None):
    check_inputs(cm, q, k, v, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if _uses_triton(cm, q, k, v, backend):
        from .triton_attention import triton_attention

        out, lse = triton_attention(cm, q, k, v, scale)
    else:
        out, lse = reference_attention(cm, q, k, v, scale, heads_of_slot(cm, q.shape[1]))
    return (out, lse) if return_lse else out


def attention_backward(cm, q, k, v, out, lse, d_out, d_lse=None, scale: Optional[float] = None,
                       backend: Optional[str] = None):
    """``(dq, dk, dv)`` of attention under ``cm`` from a forward's ``out`` and ``lse``, without
    recomputing the forward; ``d_lse`` may be ``None``. ``out`` and ``lse`` need not come from this
    mask: ring attention passes the merged result of all tiles, and gets each tile's share."""
    check_inputs(cm, q, k, v, scale)
    rows = q.shape[:-1]
    for name, x, shape in (("out", out, rows + (v.shape[-1],)), ("d_out", d_out, rows + (v.shape[-1],)),
                           ("lse", lse, rows), ("d_lse", d_lse, rows)):
        if x is None and name == "d_lse":
            continue
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(shape) or x.device != q.device:
            raise ValueError(f"{name} must be a tensor of shape {tuple(shape)} on {q.device}, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if _uses_triton(cm, q, k, v, backend):
        from .triton_attention import triton_backward

        return triton_backward(cm, q, k, v, out, lse, d_out, d_lse, scale)
    return reference_backward(cm, q, k, v, out, lse, d_out, d_lse, scale, heads_of_slot(cm, q.shape[1]))
