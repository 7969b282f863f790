"""Checks of the op's arguments that every backend shares, raised before any work."""

from __future__ import annotations

import math

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("reference", "triton")


def check_inputs(q_len: int, kv_len: int, n_mask_heads: int, q, k, v, scale) -> None:
    """Raise ``TypeError``/``ValueError`` naming the bad argument, before any work."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, length, head_dim], got shape {tuple(x.shape)}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}.dtype={x.dtype} is not supported; use one of {SUPPORTED_DTYPES}")
        if x.shape[3] == 0:
            raise ValueError(f"{name} has head_dim 0 ({name}.shape={tuple(x.shape)}); head dims must be >= 1")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[2] != q_len:
        raise ValueError(f"q has {q.shape[2]} queries (q.shape={tuple(q.shape)}) but the mask has q_len={q_len}")
    for name, x in (("k", k), ("v", v)):
        if x.shape[2] != kv_len:
            raise ValueError(
                f"{name} has {x.shape[2]} keys ({name}.shape={tuple(x.shape)}) but the mask has kv_len={kv_len}"
            )
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"q, k, v must share the batch size, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads, got {k.shape[1]} and {v.shape[1]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q's {q.shape[1]} heads must be a multiple of k's {k.shape[1]} heads (GQA/MQA)")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must share head_dim, got {q.shape[3]} and {k.shape[3]}")
    if n_mask_heads not in (1, q.shape[1]):
        raise ValueError(f"the mask has {n_mask_heads} per-head masks but q has {q.shape[1]} heads")
    check_scale(scale)


def check_scale(scale) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise TypeError(f"scale must be a finite number or None, got {scale!r}")
