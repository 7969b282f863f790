"""Splitting a spec into a grid of tiles, and merging attention computed per tile.

``partition(spec, q_splits, kv_splits)[i][j]`` is the ``Spec`` of query part
``i`` against key part ``j`` in that tile's local coordinates, written in the
IR by ``passes.crop`` (never by slicing a dense mask). Attention over a query
part is the ``merge_partials`` of its tiles' results: each tile is attention
over a disjoint set of keys, so the parts combine exactly by their
log-sum-exp, and a part whose rows attend nothing (``lse = -inf``) contributes
nothing.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np
import torch

from .errors import SpecError
from .ir.spec import Spec
from .passes.crop import Window, crop
from .passes.simplify import simplify

Split = Union[int, Sequence[int]]


def split_points(split: Split, length: int, name: str = "split") -> np.ndarray:
    """Boundaries ``int64[parts + 1]`` of a split: ``n`` near-equal contiguous parts
    (the first ``length % n`` one longer) or explicit part sizes."""
    if isinstance(split, (int, np.integer)) and not isinstance(split, bool):
        n = int(split)
        if n <= 0:
            raise SpecError(name, f"{name}={n} must be a positive number of parts")
        if n > length:
            raise SpecError(name, f"{name}={n} parts cannot split {length} positions into non-empty parts")
        sizes = np.full(n, length // n, dtype=np.int64)
        sizes[: length % n] += 1
    else:
        try:
            sizes = np.asarray([int(s) for s in split], dtype=np.int64)
        except (TypeError, ValueError):
            raise SpecError(name, f"{name} must be an int or a list of part sizes, got {split!r}") from None
        bad = np.flatnonzero(sizes <= 0)
        if len(bad):
            raise SpecError(f"{name}[{bad[0]}]", f"part sizes must be positive, got {int(sizes[bad[0]])}")
        if sizes.sum() != length:
            raise SpecError(name, f"part sizes sum to {int(sizes.sum())}, not the length {length}")
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def crop_spec(spec: Spec, q0: int, q1: int, kv0: int, kv1: int) -> Spec:
    """The spec of rows ``[q0, q1)`` against keys ``[kv0, kv1)``, in local coordinates."""
    window = Window(spec.q_len, spec.kv_len, q0, q1, kv0, kv1)
    memo: dict = {}
    heads = tuple(simplify(crop(m, window), memo) for m in spec.heads)
    mask = heads if isinstance(spec.mask, tuple) else heads[0]
    return Spec(q_len=q1 - q0, kv_len=kv1 - kv0, mask=mask)


def partition(spec: Spec, q_splits: Split, kv_splits: Split) -> list[list[Spec]]:
    """``tiles[i][j]``: the ``Spec`` of query part ``i`` and key part ``j`` in its own coordinates."""
    if not isinstance(spec, Spec):
        raise TypeError(f"spec must be a maskc.Spec, got {type(spec).__name__}")
    q_points = split_points(q_splits, spec.q_len, "q_splits")
    kv_points = split_points(kv_splits, spec.kv_len, "kv_splits")
    return [
        [crop_spec(spec, int(q0), int(q1), int(k0), int(k1)) for k0, k1 in zip(kv_points[:-1], kv_points[1:])]
        for q0, q1 in zip(q_points[:-1], q_points[1:])
    ]


def merge_partials(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]):
    """``(out, lse)`` of attention over the union of disjoint key sets.

    ``outs[p]`` is ``[..., L, D]`` and ``lses[p]`` ``[..., L]`` (natural log,
    ``-inf`` where part ``p`` has no allowed key). Rows empty in every part give
    ``out = 0`` and ``lse = -inf``; nothing is NaN, gradients included.
    """
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(f"need one lse per output and at least one part, got {len(outs)} outs and {len(lses)} lses")
    for p, (o, l) in enumerate(zip(outs, lses)):
        if o.shape[:-1] != l.shape or o.shape != outs[0].shape:
            raise ValueError(
                f"outs[{p}] has shape {tuple(o.shape)} and lses[{p}] {tuple(l.shape)}; every out must be "
                f"{tuple(outs[0].shape)} and every lse its shape without the last dimension"
            )
    work = torch.float64 if any(x.dtype == torch.float64 for x in (*outs, *lses)) else torch.float32
    lse = torch.stack([l.to(work) for l in lses])
    peak = lse.max(dim=0).values
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    weight = torch.exp(lse - peak)  # exp(-inf) = 0 for empty parts
    total = weight.sum(dim=0)
    some = total > 0
    safe_total = torch.where(some, total, torch.ones_like(total))
    merged_lse = torch.where(some, peak + torch.log(safe_total), torch.full_like(total, -math.inf))
    out = sum(w[..., None] * o.to(work) for w, o in zip(weight / safe_total, outs))
    return out.to(outs[0].dtype), merged_lse
