"""FlexAttention interop: a ``CompiledMask`` as a ``torch.nn.attention.flex_attention.BlockMask``.

``to_block_mask(cm)`` hands FlexAttention maskc's exact analysis, so a
FlexAttention user keeps ``flex_attention`` and replaces ``create_block_mask``
(which evaluates the mask on every ``q_len * kv_len`` position) by
``maskc.compile(spec, block_size=...).to_block_mask()``.

The ``BlockMask`` layout (torch 2.13), for ``H == H_mask`` heads and batch 1
(it broadcasts over the batch, and over the query heads when ``H_mask == 1``):

=======================================  =============================================
``kv_num_blocks: int32[1, H, nQ]``       PARTIAL tiles per query block
``kv_indices: int32[1, H, nQ, nK]``      their key blocks, ascending, then the
                                         unused key blocks ascending
``full_kv_num_blocks``, ``full_kv_...``  the same for FULL tiles (run unmasked)
``q_num_blocks: int32[1, H, nK]``,       the transpose (per key block, its query
``q_indices: int32[1, H, nK, nQ]``       blocks), read by the backward pass
``full_q_num_blocks``, ``full_q_...``    the same for FULL tiles
``BLOCK_SIZE``, ``seq_lengths``          ``cm.block_size``, ``(q_len, kv_len)``
=======================================  =============================================

It is written from maskc's run tables (``cm.table``) in time linear in its
size, which is FlexAttention's format: four ``int32[H, nQ, nK]`` index tensors
(maskc's own tables grow with the runs of non-empty tiles). It is the layout
``create_block_mask`` produces, entry for entry, with one difference: a tile at
the ragged end of the sequence is FULL when all of its in-range positions are
allowed (maskc's rule), where ``create_block_mask`` counts its out-of-range
padding as masked and calls it PARTIAL. FlexAttention's kernels bound-check the
last block whatever its kind, so the result is the same.

``mask_mod(b, h, q_idx, kv_idx)`` is built from the simplified expression as
torch operations that work under ``torch.vmap`` (eager ``flex_attention``,
``create_mask``) and under ``torch.compile``: ``Documents`` look up per-token
document tables, ``Dense`` indexes its values, ``Predicate`` calls its function,
and a per-head mask selects each head's expression with ``torch.where``.
"""

from __future__ import annotations

import functools
import operator
from typing import Callable

import numpy as np
import torch

from .errors import SpecError
from .ir import nodes as ir
from .passes import intervals as iv

#: ``fn(i, j, q_len, kv_len) -> bool tensor``: a node's rule on index tensors (results
#: broadcast against each other, as FlexAttention's own ``noop_mask`` does); the scope
#: sizes are ints at the top of a spec and per-element tensors inside ``Documents``.
Rule = Callable[..., torch.Tensor]


def to_block_mask(cm, device=None):
    """``cm`` as a FlexAttention ``BlockMask`` on ``device`` (default CPU, where maskc's tables live).

    The tables hold the same FULL/PARTIAL/EMPTY tiles as ``cm.block_kinds``;
    the ``mask_mod`` allows exactly the spec's pairs. Raises ``SpecError`` naming
    the node when a ``Predicate`` cannot run under ``torch.vmap``.
    """
    from torch.nn.attention.flex_attention import BlockMask

    device = torch.device("cpu") if device is None else torch.device(device)
    table, slots = cm.table, cm.table.head_slot.tolist()

    def layout(direction, full: bool, n_groups: int, width: int):
        per_slot = [_flex_layout(direction, s, full, n_groups, width) for s in range(len(cm.slot_masks))]
        count, indices = np.stack([c for c, _ in per_slot]), np.stack([i for _, i in per_slot])
        if slots != list(range(len(per_slot))):  # heads sharing a slot get their own copy
            count, indices = count[slots], indices[slots]
        return (torch.from_numpy(x)[None].to(device) for x in (count, indices))

    n_q, n_kv = cm.n_q_blocks, cm.n_kv_blocks
    kv_num, kv_idx = layout(table.forward, False, n_q, n_kv)
    full_kv_num, full_kv_idx = layout(table.forward, True, n_q, n_kv)
    q_num, q_idx = layout(table.backward, False, n_kv, n_q)
    full_q_num, full_q_idx = layout(table.backward, True, n_kv, n_q)
    return BlockMask(
        seq_lengths=(cm.q_len, cm.kv_len),
        kv_num_blocks=kv_num,
        kv_indices=kv_idx,
        full_kv_num_blocks=full_kv_num,
        full_kv_indices=full_kv_idx,
        q_num_blocks=q_num,
        q_indices=q_idx,
        full_q_num_blocks=full_q_num,
        full_q_indices=full_q_idx,
        BLOCK_SIZE=tuple(cm.block_size),
        mask_mod=mask_mod(cm, device),
    )


def _flex_layout(direction, slot: int, full: bool, n_groups: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One slot's FULL (or PARTIAL) tiles of one table direction in FlexAttention's layout:
    ``(int32[G], int32[G, width])``, per group the number of listed blocks and every
    block, the listed ones first, each part ascending (``create_block_mask``'s order).

    Each row is a sequence of intervals, its runs then the gaps between them, so the
    rows are written as one ``Runs.cells()``: work linear in the output, no sort of it."""
    ptr, runs = (direction.full_ptr, direction.full_runs) if full else (direction.part_ptr, direction.part_runs)
    ptr = ptr[slot].numpy().astype(np.int64)
    runs = runs[ptr[0]:ptr[-1]].numpy().astype(np.int64)
    group = np.repeat(np.arange(n_groups, dtype=np.int64), np.diff(ptr))
    lo, hi = runs[:, 0], runs[:, 1]
    every = np.arange(n_groups, dtype=np.int64)
    gaps = iv.sweep([(group, lo, hi), (every, np.zeros_like(every), np.full_like(every, width))], width,
                    {"gaps": lambda c: (c[1] > 0) & (c[0] == 0)})["gaps"]
    listed_first = np.concatenate([np.zeros(len(group)), np.ones(len(gaps))])
    g, a, b = (np.concatenate(x) for x in ((group, gaps.group), (lo, gaps.lo), (hi, gaps.hi)))
    order = np.lexsort((a, listed_first, g))
    _, columns = iv.Runs(g[order], a[order], b[order]).cells()
    count = np.bincount(group, weights=hi - lo, minlength=n_groups)
    return count.astype(np.int32), columns.astype(np.int32).reshape(n_groups, width)


# -- mask_mod ------------------------------------------------------------------------


def mask_mod(cm, device=None) -> Callable:
    """FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)`` for the compiled mask ``cm``.

    Built from ``cm.simplified``; its lookup tables live on ``device``."""
    device = torch.device("cpu") if device is None else torch.device(device)
    for predicate in {n for head in cm.simplified.heads for n in ir.walk(head) if isinstance(n, ir.Predicate)}:
        _check_traceable(predicate, _path_of(cm.spec, predicate))
    rules = [_rule(m, device) for m in cm.slot_masks]
    q_len, kv_len = cm.q_len, cm.kv_len

    if len(rules) == 1:
        rule = rules[0]

        def maskc_mask_mod(b, h, q_idx, kv_idx):
            return rule(q_idx, kv_idx, q_len, kv_len)

        return maskc_mask_mod

    head_slot = cm.table.head_slot.to(device)

    def maskc_per_head_mask_mod(b, h, q_idx, kv_idx):
        slot = head_slot[h]
        out = rules[0](q_idx, kv_idx, q_len, kv_len)
        for s, rule in enumerate(rules[1:], start=1):
            out = torch.where(slot == s, rule(q_idx, kv_idx, q_len, kv_len), out)
        return out

    return maskc_per_head_mask_mod


def _path_of(spec, target: ir.Mask) -> str:
    """The field path of the first occurrence of ``target`` in ``spec`` (for error messages)."""

    def search(node, path):
        if node == target:
            return path
        for name, child in node.children():
            found = search(child, f"{path}.{name}")
            if found is not None:
                return found
        return None

    for path, head in spec.named_heads():
        found = search(head, path)
        if found is not None:
            return found
    return "mask"


def _check_traceable(node: ir.Predicate, path: str) -> None:
    """Raise ``SpecError`` at ``path`` unless ``node.fn`` runs under FlexAttention's ``torch.vmap``."""
    i = torch.arange(3, dtype=torch.int64)
    j = torch.arange(4, dtype=torch.int64)
    try:
        out = torch.vmap(torch.vmap(node.fn, in_dims=(None, 0)), in_dims=(0, None))(i, j)
    except Exception as error:  # whatever the callable raised, the node is not exportable
        raise SpecError(
            path,
            f"this Predicate cannot be expressed for FlexAttention: calling it under torch.vmap failed "
            f"({type(error).__name__}: {error}). Write it with torch operations on its index tensors only "
            "(no .item(), numpy, or Python if/and/or on tensors)",
        ) from error
    if out.shape != (3, 4) or out.dtype.is_floating_point or out.dtype.is_complex:
        raise SpecError(
            path,
            f"this Predicate cannot be expressed for FlexAttention: under torch.vmap it returned "
            f"{out.dtype} of shape {tuple(out.shape)} for 3 x 4 indices; it must return a bool tensor of their "
            "broadcast shape",
        )


def _shift(align: str, q_len, kv_len):
    return kv_len - q_len if align == "bottom_right" else 0


def _full(node, device) -> Rule:
    return lambda i, j, q_len, kv_len: torch.ones_like(i + j, dtype=torch.bool)


def _empty(node, device) -> Rule:
    return lambda i, j, q_len, kv_len: torch.zeros_like(i + j, dtype=torch.bool)


def _causal(node: ir.Causal, device) -> Rule:
    return lambda i, j, q_len, kv_len: j <= i + node.offset + _shift(node.align, q_len, kv_len)


def _window(node: ir.SlidingWindow, device) -> Rule:
    def rule(i, j, q_len, kv_len):
        centre = i + _shift(node.align, q_len, kv_len)
        ok = torch.ones_like(i + j, dtype=torch.bool)
        if node.left is not None:
            ok = ok & (j >= centre - node.left)
        if node.right is not None:
            ok = ok & (j <= centre + node.right)
        return ok

    return rule


def _chunked(node: ir.Chunked, device) -> Rule:
    return lambda i, j, q_len, kv_len: i // node.size == j // node.size


def _prefix(node: ir.Prefix, device) -> Rule:
    return lambda i, j, q_len, kv_len: j < node.length


def _range(node: ir.Range, device) -> Rule:
    (a, b), (c, d) = node.q, node.kv
    return lambda i, j, q_len, kv_len: (i >= a) & (i < b) & (j >= c) & (j < d)


def _document_table(starts: np.ndarray, lengths, pad: int, device) -> torch.Tensor:
    """``int32[end + 1]``: the document of each position, ``pad`` outside every document."""
    table = np.full(int(starts[-1]) + 1, pad, dtype=np.int32)
    table[starts[0]:starts[-1]] = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    return torch.from_numpy(table).to(device)


def _documents(node: ir.Documents, device) -> Rule:
    inner = _rule(node.inner, device)
    n = len(node.lengths)
    q_start, k_start = node.starts()
    # query padding is document n and key padding n + 1, so they never match;
    # the per-document arrays carry zeros for both
    q_doc = _document_table(q_start, node.lengths, n, device)
    k_doc = _document_table(k_start, node.key_lengths, n + 1, device)

    def per_doc(values) -> torch.Tensor:
        return torch.tensor(list(values) + [0, 0], dtype=torch.int64, device=device)

    q0, k0 = per_doc(q_start[:-1]), per_doc(k_start[:-1])
    lq, lk = per_doc(node.lengths), per_doc(node.key_lengths)
    q_end, k_end = int(q_start[-1]), int(k_start[-1])

    def rule(i, j, q_len, kv_len):
        di = torch.where(i < 0, n, q_doc[i.clamp(0, q_end)])
        dj = torch.where(j < 0, n + 1, k_doc[j.clamp(0, k_end)])
        return (di == dj) & inner(i - q0[di], j - k0[di], lq[di], lk[di])

    return rule


def _dense(node: ir.Dense, device) -> Rule:
    values = torch.from_numpy(node.values.array.copy()).to(device)
    rows, cols = node.values.shape

    def rule(i, j, q_len, kv_len):
        inside = (i >= 0) & (i < rows) & (j >= 0) & (j < cols)
        return inside & values[i.clamp(0, rows - 1), j.clamp(0, cols - 1)]

    return rule


def _predicate(node: ir.Predicate, device) -> Rule:
    return lambda i, j, q_len, kv_len: node.fn(i.to(torch.int64), j.to(torch.int64)).to(torch.bool)


def _and(node: ir.And, device) -> Rule:
    if not node.of:
        return _full(node, device)
    rules = [_rule(x, device) for x in node.of]
    return lambda i, j, q_len, kv_len: functools.reduce(operator.and_, (r(i, j, q_len, kv_len) for r in rules))


def _or(node: ir.Or, device) -> Rule:
    if not node.of:
        return _empty(node, device)
    rules = [_rule(x, device) for x in node.of]
    return lambda i, j, q_len, kv_len: functools.reduce(operator.or_, (r(i, j, q_len, kv_len) for r in rules))


def _not(node: ir.Not, device) -> Rule:
    of = _rule(node.of, device)
    return lambda i, j, q_len, kv_len: ~of(i, j, q_len, kv_len)


_RULES = {
    ir.Full: _full,
    ir.Empty: _empty,
    ir.Causal: _causal,
    ir.SlidingWindow: _window,
    ir.Chunked: _chunked,
    ir.Prefix: _prefix,
    ir.Range: _range,
    ir.Documents: _documents,
    ir.Dense: _dense,
    ir.Predicate: _predicate,
    ir.And: _and,
    ir.Or: _or,
    ir.Not: _not,
}


def _rule(node: ir.Mask, device) -> Rule:
    return _RULES[type(node)](node, device)
