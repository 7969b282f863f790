"""Pass ``tables``: the block-sparse index tables the kernels walk.

Layout (one ``IndexTable`` per direction; ``forward`` is grouped by query block
and lists key blocks, ``backward`` is grouped by key block and lists query
blocks). ``S`` is the number of distinct head masks analysed ("slots"):

=============================  ===============================================
``head_slot: int32[H_mask]``   head -> slot (identical heads share one slot)
``full_ptr: int32[S, G + 1]``  runs of FULL tiles of group ``g`` in slot ``s``
                               are ``full_runs[full_ptr[s, g]:full_ptr[s, g+1]]``
``full_runs: int32[Rf, 2]``    ``[start, end)`` of consecutive blocks, all FULL
``part_ptr``, ``part_runs``    the same for PARTIAL tiles
``part_pattern: int32[Rp]``    for masks with ``Dense``/``Predicate``: index
                               into ``patterns`` (their runs are single tiles);
                               -1 for runs whose predicate is generated code
``order: int32[S, G]``         groups by decreasing work, empty groups last
``work: int32[S, G]``          tiles per group (FULL + PARTIAL)
=============================  ===============================================

``patterns: bool[P, block_q, block_kv]`` is shared by both directions. Memory
grows with the runs of non-empty tiles: a causal mask has two runs per query
block whatever its length.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
import torch

from . import intervals as iv
from .classify import BlockMap
from .intervals import Runs
from .pipeline import Pass


@dataclass(frozen=True)
class IndexTable:
    full_ptr: torch.Tensor
    full_runs: torch.Tensor
    part_ptr: torch.Tensor
    part_runs: torch.Tensor
    part_pattern: torch.Tensor
    order: torch.Tensor
    work: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self))

    def runs_of(self, slot: int, group: int, full: bool) -> list[tuple[int, int, int]]:
        """``(start, end, pattern)`` runs of one group (debugging and the reference op)."""
        ptr, runs = (self.full_ptr, self.full_runs) if full else (self.part_ptr, self.part_runs)
        a, b = int(ptr[slot, group]), int(ptr[slot, group + 1])
        pattern = [-1] * (b - a) if full else self.part_pattern[a:b].tolist()
        return [(int(s), int(e), p) for (s, e), p in zip(runs[a:b].tolist(), pattern)]

    def to(self, device) -> "IndexTable":
        return IndexTable(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


@dataclass(frozen=True)
class Table:
    """Both directions' index tables and the shared bit patterns."""

    head_slot: torch.Tensor
    forward: IndexTable
    backward: IndexTable
    patterns: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.head_slot.nbytes + self.forward.nbytes + self.backward.nbytes + self.patterns.nbytes

    def to(self, device) -> "Table":
        return Table(self.head_slot.to(device), self.forward.to(device), self.backward.to(device),
                     self.patterns.to(device))


def _ptr(group: np.ndarray, n_groups: int) -> np.ndarray:
    ptr = np.zeros(n_groups + 1, dtype=np.int64)
    np.cumsum(np.bincount(group, minlength=n_groups), out=ptr[1:])
    return ptr


def _transpose_tiles(runs: Runs, pattern: np.ndarray) -> tuple[Runs, np.ndarray]:
    order = np.lexsort((runs.group, runs.lo))
    return Runs(runs.lo[order], runs.group[order], runs.group[order] + 1), pattern[order]


def _direction(per_slot: list[tuple[Runs, Runs, Optional[np.ndarray]]], n_groups: int) -> IndexTable:
    full_ptr, part_ptr, full_runs, part_runs, patterns, order, work = [], [], [], [], [], [], []
    full_base = part_base = 0
    for full, part, pattern in per_slot:
        full_ptr.append(_ptr(full.group, n_groups) + full_base)
        part_ptr.append(_ptr(part.group, n_groups) + part_base)
        full_base += len(full)
        part_base += len(part)
        full_runs.append(np.stack([full.lo, full.hi], axis=1))
        part_runs.append(np.stack([part.lo, part.hi], axis=1))
        patterns.append(np.full(len(part), -1, dtype=np.int64) if pattern is None else pattern)
        tiles = np.bincount(full.group, weights=full.hi - full.lo, minlength=n_groups) + np.bincount(
            part.group, weights=part.hi - part.lo, minlength=n_groups)
        work.append(tiles.astype(np.int64))
        order.append(np.argsort(-tiles, kind="stable"))

    def t(parts, shape=(0,)):
        arr = np.concatenate(parts) if parts else np.zeros(shape, dtype=np.int64)
        return torch.from_numpy(np.ascontiguousarray(arr).astype(np.int32))

    return IndexTable(
        full_ptr=torch.from_numpy(np.stack(full_ptr).astype(np.int32)),
        full_runs=t(full_runs, (0, 2)).reshape(-1, 2),
        part_ptr=torch.from_numpy(np.stack(part_ptr).astype(np.int32)),
        part_runs=t(part_runs, (0, 2)).reshape(-1, 2),
        part_pattern=t(patterns),
        order=torch.from_numpy(np.stack(order).astype(np.int32)),
        work=torch.from_numpy(np.stack(work).astype(np.int32)),
    )


def emit_tables(heads, block_maps: dict, bq: int, bk: int) -> Table:
    """Index tables for the heads ``heads`` (expressions), analyses in ``block_maps``."""
    slots = list(dict.fromkeys(heads))
    forward, backward, patterns = [], [], []
    n_patterns = 0
    for mask in slots:
        bm: BlockMap = block_maps[mask]
        full_t = iv.transpose_runs(bm.full, bm.n_kv_blocks)
        if bm.patterns is None:
            forward.append((bm.full, bm.partial, None))
            backward.append((full_t, iv.transpose_runs(bm.partial, bm.n_kv_blocks), None))
        else:
            pattern_of = bm.pattern_of + n_patterns
            n_patterns += len(bm.patterns)
            patterns.append(bm.patterns)
            forward.append((bm.full, bm.partial, pattern_of))
            backward.append((full_t, *_transpose_tiles(bm.partial, pattern_of)))
    n_q, n_kv = block_maps[slots[0]].n_q_blocks, block_maps[slots[0]].n_kv_blocks
    return Table(
        head_slot=torch.tensor([slots.index(m) for m in heads], dtype=torch.int32),
        forward=_direction(forward, n_q),
        backward=_direction(backward, n_kv),
        patterns=torch.from_numpy(np.concatenate(patterns)) if patterns else torch.zeros((0, bq, bk), dtype=torch.bool),
    )


@dataclass(frozen=True)
class EmitTables(Pass):
    name: str = "tables"
    needs: tuple = ("simplified", "block_maps", "block_size")
    provides: tuple = ("table",)

    def run(self, state):
        bq, bk = state["block_size"]
        return {"table": emit_tables(state["simplified"].heads, state["block_maps"], bq, bk)}
