"""Pass ``empty``: the queries that attend nothing and the keys nobody attends, exactly.

A row is empty when its ``maybe`` bound is empty; it is not when its ``sure``
bound holds a key; otherwise (only under ``Dense``/``Predicate``) the tiles
evaluated by ``classify`` decide. Columns are counted with one difference array
over the keys (``bincount`` of interval starts minus ends), linear in the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import intervals as iv
from .classify import BlockMap
from .lower import Bounds
from .pipeline import Pass


def covered_keys(rows: iv.Rows, kv_len: int) -> np.ndarray:
    """``bool[kv_len]``: keys allowed for at least one row."""
    # unused slots are [0, 0): their start and end cancel
    starts = np.bincount(rows.lo.ravel(), minlength=kv_len + 1)
    stops = np.bincount(rows.hi.ravel(), minlength=kv_len + 1)
    return np.cumsum(starts - stops)[:kv_len] > 0


def empty_rows_cols(bounds: Bounds, block_map: BlockMap, kv_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``int64`` positions of empty query rows and empty key columns."""
    has_key = bounds.sure.real()[:, 0]  # canonical rows hold their intervals first
    covered = covered_keys(bounds.sure, kv_len)
    if not bounds.exact:
        has_key[block_map.row_hits] = True
        covered[block_map.col_hits] = True
    return np.flatnonzero(~has_key).astype(np.int64), np.flatnonzero(~covered).astype(np.int64)


@dataclass(frozen=True)
class EmptyRowsCols(Pass):
    name: str = "empty"
    needs: tuple = ("simplified", "rows", "block_maps")
    provides: tuple = ("empty",)

    def run(self, state):
        kv_len = state["simplified"].kv_len
        return {"empty": {
            m: empty_rows_cols(b, state["block_maps"][m], kv_len) for m, b in state["rows"].items()
        }}
