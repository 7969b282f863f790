"""The decode path's work list: row groups, their key blocks with per-row spans, and key chunks.

Decoding and chunked prefill attend a few query rows per sequence to many
keys. The main kernels (``kernels.py``) give each query block of 128 rows one
program per query head: with one new query per sequence, a single query block
holds every sequence's row, so one program walks every sequence's keys, and
each query head of a KV head reads them again. The decode kernel
(``decode.py``) works from this list instead, built once per mask from its
exact row intervals (``passes/lower.py``):

* **row groups**: consecutive rows whose first allowed key lies in one key
  block (the rows of one sequence of a cache, of one document), at most
  ``tuning.DECODE_MAX_GROUP_ROWS`` of them. Every row is in one group; rows
  that allow nothing form groups with no keys. ``rows`` (``R``) is the
  largest group's size rounded up to a power of two;
* **entries**: per group, the key blocks its rows allow keys in, ascending,
  and per entry the interval of allowed keys of each of the group's rows
  inside that block (``lo == hi``: none). A row allowing two intervals in one
  block (pages smaller than the block, say) gets a second entry for the same
  block; only blocks some row of the group needs are listed, so a group never
  reads another sequence's keys;
* **items**: each group's entries split into chunks of about
  ``chunk_keys`` keys (split-K, "flash-decoding"), the unit of one decode
  program. A group's items are consecutive; programs take them largest
  first (``order``), so that the last to finish are the smallest.

Layout (sections of the packed plan, ``plan.py``)::

    DECODE_COUNTS      int32[2]                 items, groups
    DECODE_GROUP_ROWS  int32[n_groups, 2]       first row, rows of each group
    DECODE_GROUP_ITEMS int32[n_groups + 1]      the items of group g are [ptr[g], ptr[g + 1])
    DECODE_ITEMS       int32[n_items, 3]        group, first entry, end entry
    DECODE_BLOCKS      int32[n_entries]         key block of each entry
    DECODE_SPANS       int32[n_entries, 2, R]   lo of each of the group's rows, then hi
                                                (absolute key positions inside the block)
    DECODE_ORDER       int32[n_items]           program p runs item order[p]: most entries first

``reads`` (the entries) is what one KV head's programs read, in key blocks;
the plan compares it with the main kernels' tiles (``plan.build_plan``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import tuning


@dataclass(frozen=True)
class DecodeWork:
    """The decode kernel's work list of one mask (layout in the module docstring)."""

    group_rows: np.ndarray  # int32[n_groups, 2]
    group_items: np.ndarray  # int32[n_groups + 1]
    items: np.ndarray  # int32[n_items, 3]
    blocks: np.ndarray  # int32[n_entries]
    spans: np.ndarray  # int32[n_entries, 2, R]
    order: np.ndarray  # int32[n_items]

    @property
    def rows(self) -> int:
        return self.spans.shape[2]

    @property
    def reads(self) -> int:
        return len(self.blocks)

    @property
    def counts(self) -> np.ndarray:
        return np.array([len(self.items), len(self.group_rows)], dtype=np.int32)


def _row_groups(first_block: np.ndarray, max_rows: int) -> np.ndarray:
    """``bool[q_len]``: where a group starts. A run of rows of one first block (-1: empty rows)
    is cut every ``max_rows`` rows."""
    n = len(first_block)
    at = np.arange(n)
    run_start = np.ones(n, dtype=bool)
    run_start[1:] = first_block[1:] != first_block[:-1]
    run_first = np.maximum.accumulate(np.where(run_start, at, 0))
    return (at - run_first) % max_rows == 0


def _chunks(n_entries: np.ndarray, entry_start: np.ndarray, per_chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Items ``int[n_items, 3]`` (group, first entry, end entry) splitting each group's entries
    into ``ceil(n / per_chunk)`` chunks of near-equal size, and ``int[n_groups + 1]`` offsets."""
    k = -(-n_entries // per_chunk)
    group = np.repeat(np.arange(len(k)), k)
    c = np.arange(k.sum()) - np.repeat(np.cumsum(k) - k, k)  # chunk index within its group
    first = entry_start[group] + c * n_entries[group] // k[group]
    end = entry_start[group] + (c + 1) * n_entries[group] // k[group]
    ptr = np.zeros(len(k) + 1, dtype=np.int64)
    np.cumsum(k, out=ptr[1:])
    return np.stack([group, first, end], axis=1), ptr


def decode_work(cm, max_reads: int) -> Optional[DecodeWork]:
    """The decode work list of ``cm``, or ``None`` where the decode kernel does not apply: per-head
    masks, ``Dense``/``Predicate`` nodes (inexact intervals), more than ``tuning.DECODE_MAX_ROWS``
    rows, fewer than ``tuning.DECODE_GROUPS_PER_QUERY_BLOCK`` row groups a query block on average,
    or more than ``max_reads`` key-block reads (checked before the lists are built)."""
    if len(cm.slot_masks) != 1 or cm.q_len > tuning.DECODE_MAX_ROWS or not cm.bounds[0].exact:
        return None
    (bq, bk), rows = cm.block_size, cm.bounds[0].sure
    real = rows.real()
    row_first_block = np.where(real[:, 0], rows.lo[:, 0] // bk, -1)
    starts = _row_groups(row_first_block, tuning.DECODE_MAX_GROUP_ROWS)
    if cm.q_len * tuning.DECODE_GROUPS_PER_QUERY_BLOCK > bq * int(starts.sum()):
        return None
    group_of_row = np.cumsum(starts) - 1
    group_first = np.flatnonzero(starts)
    group_size = np.diff(np.append(group_first, cm.q_len))
    n_rows = 1 << int(group_size.max() - 1).bit_length()

    row, k = np.nonzero(real)  # intervals in row order, ascending within a row
    lo, hi = rows.lo[row, k], rows.hi[row, k]
    first_block, last_block = lo // bk, (hi - 1) // bk
    per_interval = last_block - first_block + 1
    if per_interval.sum() > tuning.DECODE_MAX_GROUP_ROWS * max_reads:  # every entry holds at most that many
        return None

    # one piece per (interval, block it meets), in (row, block) order
    piece = np.arange(per_interval.sum())
    interval = np.repeat(np.arange(len(row)), per_interval)
    block = first_block[interval] + piece - (np.cumsum(per_interval) - per_interval)[interval]
    piece_row = row[interval]
    piece_lo = np.maximum(lo[interval], block * bk)
    piece_hi = np.minimum(hi[interval], (block + 1) * bk)
    repeat = np.zeros(len(piece), dtype=bool)  # a row's second interval in one block
    repeat[1:] = (piece_row[1:] == piece_row[:-1]) & (block[1:] == block[:-1])
    run_first = np.maximum.accumulate(np.where(repeat, 0, piece))
    occurrence = piece - run_first

    # entries: distinct (group, block, occurrence), ascending
    group = group_of_row[piece_row]
    width = int(occurrence.max(initial=0)) + 1
    keys = (group * cm.n_kv_blocks + block) * width + occurrence
    entry_keys, entry_of_piece = np.unique(keys, return_inverse=True)
    if len(entry_keys) > max_reads:
        return None
    entry_group = entry_keys // (cm.n_kv_blocks * width)
    spans = np.zeros((len(entry_keys), 2, n_rows), dtype=np.int32)
    at_row = piece_row - group_first[group]
    spans[entry_of_piece, 0, at_row] = piece_lo
    spans[entry_of_piece, 1, at_row] = piece_hi

    n_entries = np.bincount(entry_group, minlength=len(group_first))
    entry_start = np.cumsum(n_entries) - n_entries
    chunk_keys = max(tuning.DECODE_CHUNK_KEYS, tuning.DECODE_CHUNK_KEYS_PER_ROW * n_rows)
    items, group_items = _chunks(n_entries, entry_start, max(1, chunk_keys // bk))
    return DecodeWork(
        group_rows=np.stack([group_first, group_size], axis=1).astype(np.int32),
        group_items=group_items.astype(np.int32),
        items=items.astype(np.int32),
        blocks=(entry_keys // width % cm.n_kv_blocks).astype(np.int32),
        spans=spans,
        order=np.argsort(items[:, 1] - items[:, 2], kind="stable").astype(np.int32),
    )
