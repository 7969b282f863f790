"""Per-tile block lists: the launch data the Triton kernels walk, expanded from ``cm.table``.

``passes/tables.py`` stores, per group, *runs* of consecutive FULL and PARTIAL
blocks: compact, and what the reference op and the FlexAttention export read.
A kernel that walked runs would start one software-pipelined loop per run,
paying its prologue and epilogue each time; document and window masks have
several short runs per block. The kernels therefore walk these lists instead:
every group has exactly one loop over its FULL tiles and one over its PARTIAL
tiles, whatever runs they form; masks whose spans tell the two apart in the
kernel walk one list of both (``merged``).

Layout, per direction (``forward``: groups are query blocks and entries key
blocks; ``backward``: groups are key blocks and entries query blocks), with
``S`` slots (distinct head masks) and ``G`` groups:

==============================  =============================================
``full_ptr: int32[S, G + 1]``   the FULL tiles of group ``g`` in slot ``s`` are
                                ``full_idx[full_ptr[s, g]:full_ptr[s, g + 1]]``
``full_idx: int32[Nf]``         entry blocks, ascending within a group
``part_ptr``, ``part_idx``      the same for PARTIAL tiles
``part_pattern: int32[Np]``     per PARTIAL tile: its bit pattern (index into
                                ``table.patterns``) or -1 (generated predicate)
==============================  =============================================

A FULL tile of the last entry block, when the end of the sequence cuts that
block short, is listed as PARTIAL with pattern -1: FULL tiles then need no
bounds checks at all, and the predicate (which is false out of range) checks
them. Memory is 4 bytes per non-empty tile and direction, plus 8 per group and
slot: 4 MB for a causal mask of 128K tokens in blocks of 128. ``Plan`` in
``plan.py`` packs the lists once per compiled mask and device.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from ..passes.intervals import Runs


@dataclass(frozen=True)
class BlockLists:
    """One direction's tiles as per-group lists (layout in the module docstring)."""

    full_ptr: torch.Tensor
    full_idx: torch.Tensor
    part_ptr: torch.Tensor
    part_idx: torch.Tensor
    part_pattern: torch.Tensor

    def to(self, device) -> "BlockLists":
        return BlockLists(**{f.name: nonempty(getattr(self, f.name).contiguous().to(device)) for f in fields(self)})


def nonempty(t: torch.Tensor) -> torch.Tensor:
    """``t``, or one zero of its dtype where it is empty (a kernel pointer needs storage)."""
    return t if t.numel() else torch.zeros(1, dtype=t.dtype, device=t.device)


def owners(ptr: np.ndarray) -> np.ndarray:
    """For each item of the arrays that ``ptr`` (``[S, G + 1]``) splits into per-group lists,
    its list ``slot * G + group`` (the slots' items follow one another)."""
    per_list = np.diff(ptr, axis=1).ravel()
    return np.repeat(np.arange(len(per_list)), per_list)


def _tiles(ptr: torch.Tensor, runs: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(list, entry, run)`` of every tile of a run table: ``list = slot * G + group``,
    and the run it came from."""
    runs = runs.numpy().astype(np.int64).reshape(-1, 2)
    cells = Runs(np.arange(len(runs)), runs[:, 0], runs[:, 1])
    run, entry = cells.cells()
    return owners(ptr.numpy().astype(np.int64))[run], entry, run


def _int32(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.int32))


def _csr(lists: np.ndarray, n_slots: int, n_groups: int) -> torch.Tensor:
    """``int32[S, G + 1]`` start offsets of sorted ``lists`` (each slot's row absolute)."""
    starts = np.zeros(n_slots * n_groups + 1, dtype=np.int64)
    np.cumsum(np.bincount(lists, minlength=n_slots * n_groups), out=starts[1:])
    at = np.arange(n_slots)[:, None] * n_groups + np.arange(n_groups + 1)[None, :]
    return torch.from_numpy(starts[at].astype(np.int32))


def expand(direction, ragged_entry: int) -> BlockLists:
    """``direction`` (a ``passes.tables.IndexTable``) as per-tile lists.

    ``ragged_entry``: the entry block that the end of the sequence cuts short, or
    -1 where the length is a multiple of the block; its FULL tiles go to PARTIAL."""
    n_slots, n_groups = direction.full_ptr.shape[0], direction.full_ptr.shape[1] - 1
    full_list, full_entry, _ = _tiles(direction.full_ptr, direction.full_runs)
    part_list, part_entry, part_run = _tiles(direction.part_ptr, direction.part_runs)
    part_pattern = direction.part_pattern.numpy().astype(np.int64)[part_run]

    cut = full_entry == ragged_entry
    part_list = np.concatenate([part_list, full_list[cut]])
    part_entry = np.concatenate([part_entry, full_entry[cut]])
    part_pattern = np.concatenate([part_pattern, np.full(int(cut.sum()), -1, dtype=np.int64)])
    full_list, full_entry = full_list[~cut], full_entry[~cut]
    # the moved tiles hold each group's largest entry: a stable sort by list keeps entries ascending
    order = np.argsort(part_list, kind="stable")
    return BlockLists(
        full_ptr=_csr(full_list, n_slots, n_groups),
        full_idx=_int32(full_entry),
        part_ptr=_csr(part_list, n_slots, n_groups),
        part_idx=_int32(part_entry[order]),
        part_pattern=_int32(part_pattern[order]),
    )


def merged(lists: BlockLists) -> BlockLists:
    """``lists`` with every group's FULL tiles moved into its PARTIAL list, entries ascending
    (pattern -1): one list and one loop per group, for masks whose spans tell FULL steps
    from PARTIAL ones in the kernel (``plan.ONE_LOOP``)."""
    n_slots, n_groups = lists.full_ptr.shape[0], lists.full_ptr.shape[1] - 1
    owner = np.concatenate([owners(lists.full_ptr.numpy()), owners(lists.part_ptr.numpy())])
    entry = np.concatenate([lists.full_idx.numpy(), lists.part_idx.numpy()])
    pattern = np.concatenate([np.full(len(lists.full_idx), -1), lists.part_pattern.numpy()])
    order = np.lexsort((entry, owner))
    return BlockLists(
        full_ptr=torch.zeros_like(lists.full_ptr), full_idx=torch.zeros(0, dtype=torch.int32),
        part_ptr=_csr(owner[order], n_slots, n_groups), part_idx=_int32(entry[order]),
        part_pattern=_int32(pattern[order]))
