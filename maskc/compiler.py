"""``maskc.compile``: spec -> simplified IR -> analysis -> tables -> ``CompiledMask``.

The whole lowering is the list ``PASSES``; the pass manager orders it by what
each pass needs and provides (see ``passes/pipeline.py``).
"""

from __future__ import annotations

import enum
from functools import cached_property
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from .errors import SpecError
from .ir import nodes as ir
from .ir.spec import Spec, read_spec
from .passes.classify import BlockMap, Classify
from .passes.empty import EmptyRowsCols
from .passes.lower import Bounds, Lower
from .passes.pipeline import run_pipeline
from .passes.simplify import Simplify
from .passes.tables import EmitTables, Table
from .codegen.plan import Plan, build_plan
from .codegen.reference import ReferenceTables

PASSES = (Simplify(), Lower(), Classify(), EmptyRowsCols(), EmitTables())


class TileKind(enum.IntEnum):
    """What a ``(q_block, kv_block)`` tile holds; the values of ``block_kinds``."""

    EMPTY = 0  # no allowed pair: never visited
    PARTIAL = 1  # some allowed, some masked: the mask predicate runs here
    FULL = 2  # every in-range pair allowed: runs with no mask code


EMPTY, PARTIAL, FULL = TileKind.EMPTY, TileKind.PARTIAL, TileKind.FULL


def _block_sizes(block_size) -> tuple[int, int]:
    sizes = (block_size, block_size) if isinstance(block_size, int) else block_size
    if (
        not isinstance(sizes, (tuple, list))
        or len(sizes) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in sizes)
    ):
        raise ValueError(f"{block_size=} must be a positive int or a (q, kv) pair of positive ints")
    return tuple(sizes)


class CompiledMask:
    """A compiled mask: block map, empty rows/columns, index tables, and the attention op.

    Created by ``maskc.compile``. Attributes:

    * ``block_kinds``: ``uint8[H_mask, q_blocks, kv_blocks]`` of ``EMPTY``/``PARTIAL``/``FULL``
      (built from the tables on first access);
    * ``empty_rows``/``empty_cols``: sorted ``int64`` positions; for a per-head
      mask, a tuple with one tensor per head;
    * ``table``: ``passes.tables.Table`` (layout documented there); ``nbytes``.
    """

    def __init__(self, spec: Spec, block_size=128, debug: Optional[Callable[[str], None]] = None):
        if not isinstance(spec, Spec):
            raise TypeError(f"maskc.compile expects a maskc.Spec, YAML/JSON text or a spec file's path, "
                            f"got {type(spec).__name__}")
        self.spec = spec
        self.block_size = _block_sizes(block_size)
        state = run_pipeline(PASSES, {"spec": spec, "block_size": self.block_size}, debug=debug)
        self.simplified: Spec = state["simplified"]
        self.table: Table = state["table"]
        slots = list(dict.fromkeys(self.simplified.heads))
        self.slot_masks: tuple[ir.Mask, ...] = tuple(slots)
        self.bounds: tuple[Bounds, ...] = tuple(state["rows"][m] for m in slots)
        self.block_maps: tuple[BlockMap, ...] = tuple(state["block_maps"][m] for m in slots)
        empties = [state["empty"][m] for m in self.simplified.heads]
        rows = tuple(torch.from_numpy(r) for r, _ in empties)
        cols = tuple(torch.from_numpy(c) for _, c in empties)
        shared = not isinstance(spec.mask, tuple)
        self.empty_rows = rows[0] if shared else rows
        self.empty_cols = cols[0] if shared else cols
        bm = self.block_maps[0]
        self.n_q_blocks, self.n_kv_blocks = bm.n_q_blocks, bm.n_kv_blocks
        self.q_len: int = spec.q_len
        self.kv_len: int = spec.kv_len
        #: ``H_mask``: 1 for a head-shared mask, else the number of per-head masks
        self.n_heads: int = len(self.simplified.heads)
        #: what the reference op reads (``codegen/reference.py``)
        self.reference_tables = ReferenceTables.of(self)
        #: the Triton launch plan per device (``codegen/plan.py``), built by ``to`` or a first call
        self.plans: dict[str, Plan] = {}
        #: checked call keys (shapes, dtypes, devices, backend) -> what they run (``codegen/op.py``)
        self.calls: dict = {}

    @property
    def has_opaque(self) -> bool:
        return any(bm.patterns is not None for bm in self.block_maps)

    # -- the block map ----------------------------------------------------------------
    @cached_property
    def block_kinds(self) -> torch.Tensor:
        """``uint8[H_mask, q_blocks, kv_blocks]``: ``EMPTY``, ``PARTIAL`` or ``FULL`` per tile."""
        per_slot = np.zeros((len(self.block_maps), self.n_q_blocks, self.n_kv_blocks), dtype=np.uint8)
        for s, bm in enumerate(self.block_maps):
            for runs, kind in ((bm.full, FULL), (bm.partial, PARTIAL)):
                q, k = runs.cells()
                per_slot[s, q, k] = kind
        slot = self.table.head_slot.numpy()
        return torch.from_numpy(per_slot[slot] if len(slot) > 1 else per_slot)

    @property
    def nbytes(self) -> int:
        """Bytes held by the block map runs, the index tables, patterns and row intervals."""
        runs = sum(
            r.nbytes for bm in self.block_maps for x in (bm.full, bm.partial) for r in (x.group, x.lo, x.hi)
        )
        rows = sum(b.sure.lo.nbytes + b.sure.hi.nbytes for b in self.bounds)
        return runs + rows + self.table.nbytes

    def tile_counts(self) -> dict[str, int]:
        """Tiles of each kind, summed over mask heads."""
        total = len(self.table.head_slot) * self.n_q_blocks * self.n_kv_blocks
        slot = self.table.head_slot.tolist()
        full = sum(self.block_maps[s].full.tiles for s in slot)
        partial = sum(self.block_maps[s].partial.tiles for s in slot)
        return {"full": full, "partial": partial, "empty": total - full - partial}

    def allowed_pairs(self, head: Optional[int] = None) -> int:
        """Allowed ``(query, key)`` pairs (exact): of one mask head, or summed over all."""
        slots = self.table.head_slot.tolist()
        if head is not None:
            return self._slot_pairs(slots[head])
        return sum(self._slot_pairs(s) for s in slots)

    def _slot_pairs(self, slot: int) -> int:
        bounds, bm = self.bounds[slot], self.block_maps[slot]
        if bm.patterns is None:
            return int(bounds.sure.counts().sum())
        # with Dense/Predicate: FULL tiles count their in-range area, PARTIAL ones their bits
        return self.tile_area(bm.full) + int(bm.patterns[bm.pattern_of].sum())

    def tile_area(self, runs) -> int:
        """In-range ``(query, key)`` positions covered by runs of tiles (edge tiles are smaller)."""
        bq, bk = self.block_size
        rows = np.minimum((runs.group + 1) * bq, self.q_len) - runs.group * bq
        cols = np.minimum(runs.hi * bk, self.kv_len) - runs.lo * bk
        return int((rows * cols).sum())

    def load_(self, other: "CompiledMask") -> "CompiledMask":
        """Copy ``other``'s launch tables into this mask's, in place, on every device this mask has
        tables on, and return this mask: a CUDA graph captured with this mask then replays with
        ``other``'s (a new mask every training step, one capture). Both masks must have one
        structure (``plan.Structure``: kinds of nodes, shapes, block sizes) and tables of one length
        (lengths are rounded up to powers of two, so masks of one structure mostly share it);
        otherwise ``ValueError``, and the graph must be captured again. Afterwards this object's
        spec, block map and reference tables still describe the mask it was compiled from: use it
        for replays."""
        for device, plan in self.plans.items():
            theirs = other.plan(device)
            if theirs.key != plan.key:
                raise ValueError("load_: the masks differ in structure (their generated kernels differ); "
                                 "capture the graph again with the new mask")
            for name in ("tables", "patterns"):
                mine, new = getattr(plan, name), getattr(theirs, name)
                if mine.shape != new.shape:
                    raise ValueError(f"load_: the new mask's {name} hold {new.numel()} entries, this mask's "
                                     f"{mine.numel()}; capture the graph again with the new mask")
                mine.copy_(new)
        return self

    # -- debugging ----------------------------------------------------------------
    def dense(self, head: int = 0) -> torch.Tensor:
        """``bool[q_len, kv_len]``: the mask of one head, evaluated densely (debugging only)."""
        if self.q_len * self.kv_len > ir.MAX_DENSE_ELEMENTS:
            raise ValueError(
                f"dense() would hold {self.q_len} x {self.kv_len} = {self.q_len * self.kv_len} elements, more "
                f"than maskc.ir.MAX_DENSE_ELEMENTS={ir.MAX_DENSE_ELEMENTS}; inspect block_kinds, show() or a "
                "partition tile instead"
            )
        mask = self.spec.heads[head]
        i = np.arange(self.q_len, dtype=np.int64)[:, None]
        j = np.arange(self.kv_len, dtype=np.int64)[None, :]
        return torch.from_numpy(np.array(mask.allowed(i, j, self.q_len, self.kv_len), dtype=bool))

    def show(self, head: int = 0, max_width: int = 96, file=None) -> str:
        """Print (and return) a text picture of the block map with its statistics."""
        from .inspect import render_text

        text = render_text(self, head=head, max_width=max_width)
        print(text, file=file)
        return text

    def plot(self, path, head: int = 0) -> None:
        """Write a PNG picture of the block map, empty rows and columns marked."""
        from .inspect import render_png

        render_png(self, path, head=head)

    # -- interop and generated code -------------------------------------------------
    def to_block_mask(self, device=None):
        """This mask as a FlexAttention ``BlockMask`` on ``device`` (see ``maskc.interop``)."""
        from .interop import to_block_mask

        return to_block_mask(self, device)

    @property
    def kernel_source(self) -> str:
        """The Triton source generated for this mask's PARTIAL tiles and kernels."""
        from .codegen.plan import kernel_source

        return kernel_source(self)

    # -- devices -------------------------------------------------------------------------
    def plan(self, device) -> Plan:
        """The Triton launch plan of this mask on ``device`` (``codegen/plan.py``), built once."""
        key = _device_key(device)
        if key not in self.plans:
            self.plans[key] = build_plan(self, torch.device(key))
        return self.plans[key]

    def to(self, device) -> "CompiledMask":
        """Build the launch tables on ``device`` now (one host-to-device copy) and return this mask.
        Calls build them on first use anyway; a call under ``torch.compile`` or inside CUDA graph
        capture cannot, so build them before (``maskc.compile(spec, device=...)`` does)."""
        self.plan(device)
        return self

    # -- the op -------------------------------------------------------------------------
    def __call__(self, q, k, v, scale: Optional[float] = None, return_lse: bool = False,
                 backend: Optional[str] = None):
        """Attention of ``q [B, Hq, q_len, D]`` over ``k``, ``v [B, Hkv, kv_len, D]`` under this mask.

        Returns ``out [B, Hq, q_len, D]`` and, with ``return_lse``, ``lse [B, Hq, q_len]``
        (float32, natural log, ``-inf`` on empty rows). Empty rows give 0.
        ``backend`` forces ``"reference"`` (plain torch) or ``"triton"``; by default
        CUDA tensors take Triton and others the reference path.
        """
        from .codegen.op import attention

        return attention(self, q, k, v, scale=scale, return_lse=return_lse, backend=backend)

    def backward(self, q, k, v, out, lse, d_out, d_lse=None, scale: Optional[float] = None,
                 backend: Optional[str] = None, dq_sum: Optional[torch.Tensor] = None):
        """``(dq, dk, dv)`` of ``self(q, k, v, scale=scale, return_lse=True)`` from its saved ``out``
        and ``lse`` and the gradients ``d_out`` (and ``d_lse``, or ``None``), without recomputing the
        forward. ``out``/``lse`` may be a merged result of several masks (ring attention): each mask
        then gives its share of the gradients. With ``dq_sum`` (float32, float64 for float64 ``q``;
        ``q``'s shape), dQ is added into it in place and it is returned as ``dq``: rows this mask
        leaves empty are not touched, which saves a pass per ring tile."""
        from .codegen.op import attention_backward

        return attention_backward(self, q, k, v, out, lse, d_out, d_lse, scale=scale, backend=backend,
                                  dq_sum=dq_sum)

    def kernel_paths(self, q, k, v, backend: Optional[str] = None) -> dict[str, str]:
        """Which kernel a call with these tensors runs for its forward and its two backward kernels
        (``"forward"``, ``"dq"``, ``"dkdv"``): ``"sm90-gluon"`` (the Hopper fast path),
        ``"triton"`` followed by why the fast path does not apply, ``"triton-decode"`` or
        ``"reference"``."""
        from .codegen.op import kernel_paths

        return kernel_paths(self, q, k, v, backend)

    def __repr__(self) -> str:
        c = self.tile_counts()
        return (
            f"CompiledMask(q_len={self.q_len}, kv_len={self.kv_len}, heads={self.n_heads}, "
            f"block_size={self.block_size}, tiles: {c['full']} full, {c['partial']} partial, {c['empty']} empty)"
        )


def _device_key(device) -> str:
    """``device`` as the key of ``CompiledMask.plans``: ``"cuda"`` names the current CUDA device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def compile(spec: Union[Spec, str, Path], block_size: Union[int, Sequence[int]] = 128, debug=None,
            device=None) -> CompiledMask:
    """Compile ``spec`` for tiles of ``block_size``: a ``Spec``, YAML/JSON text, or
    the path of a spec file (a ``Path``, or a ``str`` naming an existing file).

    ``block_size`` is an int or a ``(q, kv)`` pair. ``debug`` (e.g. ``print``)
    receives one line per pass with its time and result. ``device`` (e.g.
    ``"cuda"``) builds the kernels' launch tables there now (``CompiledMask.to``),
    as calls under ``torch.compile`` or CUDA graph capture need.
    """
    if isinstance(spec, (str, Path)):
        spec = read_spec(spec)
    compiled = CompiledMask(spec, block_size=block_size, debug=debug)
    return compiled if device is None else compiled.to(device)


__all__ = ["compile", "CompiledMask", "TileKind", "EMPTY", "PARTIAL", "FULL", "SpecError"]
