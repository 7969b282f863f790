"""Tile sizes, warps and pipeline stages of the attention kernels, and their autotuning.

Tiles and table blocks. The index tables are built for ``cm.block_size =
(BQ, BK)``. A kernel tile never straddles a table block, so the PARTIAL/FULL
kind of a table tile holds for every kernel tile inside it:

* forward and dQ: a program owns ``BLOCK_M`` query rows, a divisor of ``BQ``,
  and steps over keys ``BLOCK_N`` at a time, a divisor of ``BK``;
* dK/dV: a program owns ``BLOCK_N`` keys (divisor of ``BK``) and steps over
  queries ``BLOCK_M`` at a time (divisor of ``BQ``).

Both must be powers of two >= 16 (``tl.arange`` and ``tl.dot``), so a table
block of 128 allows tiles of 16 to 128; ``fit`` shrinks a config to the
largest power-of-two divisor of the table block.

``config_for`` returns the default for the GPU class, dtype, head dim and row
length of the mask (``SHORT_ROWS``; chosen from measurements on an H100/H200,
see bench/RESULTS.md), so a first call compiles one variant per kernel and is
not slow. With ``MASKC_AUTOTUNE=1`` the first call for each (kernel, device,
dtype, head dim, table block, row length) times ``CANDIDATES`` and keeps the
fastest for the rest of the process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

KERNELS = ("forward", "dq", "dkdv")


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # query rows: per program (forward, dQ) or per step (dK/dV)
    block_n: int  # keys: per step (forward, dQ) or per program (dK/dV)
    num_warps: int
    num_stages: int


#: (kernel, padded head dim) -> config, for 16-bit inputs on Hopper-class GPUs, masks with long
#: rows (``SHORT_ROWS``). At head dim 128 on an H200, once the pipeline loads two steps ahead
#: (``kernels._step_start``), the fastest were a forward of 128 x 128 and FlexAttention's
#: own backward tiles (dQ 128 x 64, dK/dV 64 x 128, 8 warps, 3 stages): causal 128K, useful
#: TFLOP/s 493 forward and 412 backward (bench/RESULTS.md). dK/dV keeps two [BLOCK_N, head dim]
#: float32 accumulators live: at 64 x 128 with 8 warps and 3 stages it takes 255 registers and
#: spills 120 bytes where PARTIAL tiles test spans (``spans.py``), 272 with a generated predicate.
DEFAULTS_16BIT = {
    ("forward", 16): TileConfig(128, 128, 4, 3),
    ("forward", 32): TileConfig(128, 128, 4, 3),
    ("forward", 64): TileConfig(128, 128, 4, 3),
    ("forward", 128): TileConfig(128, 128, 8, 3),
    ("forward", 256): TileConfig(64, 64, 4, 2),
    ("dq", 16): TileConfig(64, 64, 4, 2),
    ("dq", 32): TileConfig(64, 64, 4, 2),
    ("dq", 64): TileConfig(64, 64, 4, 2),
    ("dq", 128): TileConfig(128, 64, 8, 3),
    ("dq", 256): TileConfig(64, 32, 4, 2),
    ("dkdv", 16): TileConfig(32, 64, 4, 3),
    ("dkdv", 32): TileConfig(32, 64, 4, 3),
    ("dkdv", 64): TileConfig(32, 64, 4, 3),
    ("dkdv", 128): TileConfig(64, 128, 8, 3),
    ("dkdv", 256): TileConfig(16, 32, 4, 2),
}

#: A mask has short rows when its query blocks with work hold fewer tiles than this on average
#: (packed documents of a few thousand tokens, sliding windows): each program then runs a few
#: steps, and smaller forward tiles that fit two programs on a multiprocessor hide one program's
#: start and end behind the other's steps.
SHORT_ROWS = 32

#: Where short rows change the configs of ``DEFAULTS_16BIT`` (bench/RESULTS.md, 128K tokens, useful
#: TFLOP/s). The forward: H200, one call, document-causal 384 against 372 with 128 x 128 tiles,
#: sliding window 1024 377 against 362 (in other calls the two were even); its programs of 64
#: rows also leave out the steps their spans do not meet (``spans.partial_steps``). dK/dV in
#: programs of 64 keys, 32 queries a step, two programs a multiprocessor: H100, four calls,
#: backward document-causal 309-331 against 320-322 with 64 x 128 tiles, window 308-314
#: against 292-302.
SHORT_ROWS_16BIT = {
    ("forward", 128): TileConfig(64, 64, 4, 3),
    ("dkdv", 128): TileConfig(32, 64, 4, 3),
}

#: float32 inputs (tests, checks): smaller tiles, the scores take twice the registers.
DEFAULTS_32BIT = {
    "forward": TileConfig(64, 32, 4, 2),
    "dq": TileConfig(64, 32, 4, 2),
    "dkdv": TileConfig(32, 64, 4, 2),
}

#: The decode path (``decode.py``, ``decode_work.py``): ``block_m`` caps a program's tile rows
#: (query rows times the query heads of one KV head it packs), ``block_n`` is its key step. Decode
#: is bound by reading K/V: a step of 64 keys at head dim 128 moves 32 KB, and 3 stages (96 KB of
#: shared memory) leave room for two programs a multiprocessor. A tile of 64 rows keeps the MMA
#: time of a step near a quarter of its copy time. Estimates, to be confirmed by
#: bench/decode_bench.py (``MASKC_AUTOTUNE=1`` times ``CANDIDATES``). The merge kernel's
#: ``block_m`` caps its tile rows likewise; it has no key steps.
DECODE_16BIT = {"decode": TileConfig(64, 64, 4, 3), "merge": TileConfig(64, 16, 4, 1)}
DECODE_32BIT = {"decode": TileConfig(32, 32, 4, 2), "merge": TileConfig(64, 16, 4, 1)}

#: Masks that take the decode path (``plan.build_plan``, ``decode_work.py``): at most this many
#: query rows (the host builds per-row work lists), in row groups of at most this many rows,
DECODE_MAX_ROWS = 1024
DECODE_MAX_GROUP_ROWS = 16
#: at least this many groups a query block on average (rows of several sequences, or few rows:
#: where one group fills a query block, the main kernels' programs share its keys already),
DECODE_GROUPS_PER_QUERY_BLOCK = 4
#: and programs that read at most this many times the key blocks the main kernels' forward reads,
#: counted without GQA (with ``G`` query heads a KV head, decode reads each block once for all
#: ``G``, the main kernels ``G`` times): few rows of long reach, where the main kernels' query
#: blocks run few programs of many steps.
DECODE_READS_FACTOR = 2
#: Keys one decode program reads (split-K chunk): at least ``DECODE_CHUNK_KEYS``, and
#: ``DECODE_CHUNK_KEYS_PER_ROW`` per row of a group, so that the float32 partial results a
#: program writes and the merge reads stay a few percent of the K/V it reads.
DECODE_CHUNK_KEYS = 512
DECODE_CHUNK_KEYS_PER_ROW = 128

#: Under ``TRITON_INTERPRET=1`` (CPU tests) the smallest tiles are the fastest.
INTERPRETER = TileConfig(16, 16, 1, 1)

#: What ``MASKC_AUTOTUNE=1`` tries, before ``fit`` (duplicates after fitting are timed once);
#: each compiles for sm_90 with no or few register spills on the generated predicates of
#: bench/gpu_bench.py (ptxas -v, triton 3.6).
CANDIDATES = {
    "forward": [TileConfig(128, 128, 8, 3), TileConfig(128, 64, 8, 3), TileConfig(128, 64, 8, 4),
                TileConfig(128, 128, 8, 2), TileConfig(64, 64, 4, 3), TileConfig(64, 32, 4, 3)],
    "dq": [TileConfig(128, 64, 8, 3), TileConfig(128, 64, 8, 4), TileConfig(128, 64, 8, 2),
           TileConfig(128, 128, 8, 2), TileConfig(64, 64, 4, 2), TileConfig(64, 64, 4, 3)],
    "dkdv": [TileConfig(64, 128, 8, 3), TileConfig(64, 128, 8, 2), TileConfig(64, 128, 8, 4),
             TileConfig(64, 64, 4, 2), TileConfig(32, 128, 8, 3), TileConfig(32, 64, 4, 3)],
    "decode": [TileConfig(64, 64, 4, 3), TileConfig(64, 64, 4, 4), TileConfig(64, 128, 4, 2),
               TileConfig(64, 128, 8, 3), TileConfig(128, 64, 8, 3), TileConfig(32, 64, 4, 4)],
    "merge": [TileConfig(64, 16, 4, 1)],
}

#: The sm_90 Gluon kernels' tiles (``hopper.py``), head dim -> (BLOCK_M, BLOCK_N, STAGES).
#: Forward: its consumers hold O (their rows x D, float32) and two steps of scores and
#: probabilities in registers, so at D 256 the key step halves. Shared memory: Q plus ``STAGES``
#: K and V tiles (D 128: 32 + 2 * 2 * 32 KB); a third stage measured no faster.
SM90_FORWARD = {64: (128, 128, 3), 128: (128, 128, 2), 256: (128, 64, 2)}
#: dK/dV: ``BLOCK_N`` keys a program, whose two consumer warpgroups hold dK and dV (64 keys x D
#: each, float32) in registers over the whole query loop, and ``BLOCK_M`` queries a step. At D
#: 128 steps of 64 queries spill (ptxas: 372 bytes, and it serializes the ``wgmma``; the step's
#: S, dP, P and dS beside dK and dV exceed the 240 registers a thread gets) and measured 10-15%
#: slower; steps of 32 do not spill. At D 256 a warpgroup could not hold dK and dV of 64 keys (256
#: registers a thread): programs of 64 keys put the two warpgroups side by side, each with half
#: of the head dim, and share P and dS through shared memory each step; steps of 32 queries
#: spill 100 bytes of loop scalars there (steps of 64: 280).
SM90_DKDV = {64: (64, 128, 2), 128: (32, 128, 3), 256: (32, 64, 2)}
#: dQ: ``BLOCK_M`` rows a program (two consumer warpgroups of 64, dQ in registers as the forward
#: holds O) and ``BLOCK_N`` keys a step. Beside dQ a step holds S, dP, P and dS: steps of 128
#: keys spill at D 128 (the GPU machine's ptxas, CUDA 12.8: 712 bytes, and it serializes the
#: ``wgmma``). At D 256 dQ alone takes 128 registers a thread, and Q and dO 128 KB of shared
#: memory: steps of 64 keys would need 256 KB. Shared memory: Q and dO plus the K/V stages (D
#: 128: 64 + 2 * 2 * 16 KB; D 256: 128 + 2 * 2 * 16 KB).
SM90_DQ = {64: (128, 128, 2), 128: (128, 64, 2), 256: (128, 32, 2)}

_tuned: dict[tuple, TileConfig] = {}


def _pow2_divisor(block: int) -> int:
    return block & -block


def fit(config: TileConfig, bq: int, bk: int) -> TileConfig:
    """``config`` with tiles shrunk to divide the table blocks ``(bq, bk)``."""
    return replace(config, block_m=min(config.block_m, _pow2_divisor(bq)),
                   block_n=min(config.block_n, _pow2_divisor(bk)))


def smaller(config: TileConfig) -> Optional[TileConfig]:
    """The next config to try when ``config`` needs more shared memory than the GPU has:
    fewer pipeline stages first, then narrower tiles; ``None`` past the smallest."""
    if config.num_stages > 1:
        return replace(config, num_stages=config.num_stages - 1)
    if config.block_n > 16:
        return replace(config, block_n=config.block_n // 2, num_stages=2)
    if config.block_m > 16:
        return replace(config, block_m=config.block_m // 2, num_stages=2)
    return None


def head_bucket(head_dim: int) -> int:
    """The padded head dim the kernels work on: a power of two >= 16."""
    return max(16, 1 << (head_dim - 1).bit_length())


def default_config(kernel: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                   short_rows: bool = False) -> TileConfig:
    if device.type != "cuda":
        return INTERPRETER
    if kernel in DECODE_16BIT:
        return (DECODE_32BIT if dtype == torch.float32 else DECODE_16BIT)[kernel]
    if dtype == torch.float32:
        return DEFAULTS_32BIT[kernel]
    key = (kernel, head_bucket(head_dim))
    return SHORT_ROWS_16BIT.get(key, DEFAULTS_16BIT[key]) if short_rows else DEFAULTS_16BIT[key]


def _autotuning(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("MASKC_AUTOTUNE") == "1"


def tile_pairs(device: torch.device, bq: int, bk: int, short_rows: bool) -> tuple[tuple[str, int, int], ...]:
    """``(direction, program, step)`` of every config ``config_for`` can return on ``device`` for
    table blocks ``(bq, bk)``, any dtype and head dim, and on GPUs of the sm_90 kernels' tiles: ``("forward", block_m, block_n)`` for the
    forward and dQ, ``("backward", block_n, block_m)`` for dK/dV. The plan trims the PARTIAL
    steps of these (``plan.py``); a config outside them (a smaller one after ``OutOfResources``)
    walks every step."""
    configs = set()
    for kernel in KERNELS:
        for dtype in (torch.bfloat16, torch.float32):
            for head_dim in (16, 32, 64, 128, 256):
                configs.add((kernel, fit(default_config(kernel, device, dtype, head_dim, short_rows), bq, bk)))
        if _autotuning(device):
            configs |= {(kernel, fit(c, bq, bk)) for c in CANDIDATES[kernel]}
    pairs = {("backward", c.block_n, c.block_m) if kernel == "dkdv" else ("forward", c.block_m, c.block_n)
             for kernel, c in configs}
    if device.type == "cuda":  # the sm_90 kernels' tiles, where the table blocks hold them
        pairs |= {("forward", m, n) for sm90 in (SM90_FORWARD, SM90_DQ) for m, n, _ in sm90.values()
                  if bq % m == 0 and bk % n == 0}
        pairs |= {("backward", n, m) for m, n, _ in SM90_DKDV.values() if bq % m == 0 and bk % n == 0}
    return tuple(sorted(pairs))


def config_for(kernel: str, device: torch.device, dtype: torch.dtype, head_dim: int, bq: int, bk: int,
               short_rows: bool = False, bench: Optional[Callable[[TileConfig], float]] = None) -> TileConfig:
    """The tile config of ``kernel``; timed over ``CANDIDATES`` once if ``MASKC_AUTOTUNE=1``.

    ``short_rows``: the mask's rows hold fewer than ``SHORT_ROWS`` tiles on average.
    ``bench(config)`` runs the kernel with ``config`` and returns its time; it
    must leave the outputs as a run with any other config would."""
    chosen = fit(default_config(kernel, device, dtype, head_dim, short_rows), bq, bk)
    if bench is None or not _autotuning(device):
        return chosen
    key = (kernel, torch.cuda.get_device_name(device), dtype, head_bucket(head_dim), bq, bk, short_rows)
    if key not in _tuned:
        from triton.runtime.errors import OutOfResources  # importing triton reads TRITON_INTERPRET: not before a call

        candidates = dict.fromkeys([chosen] + [fit(c, bq, bk) for c in CANDIDATES[kernel]])
        timings = {}
        for config in candidates:
            try:
                timings[config] = bench(config)
            except OutOfResources:  # more shared memory or registers than the GPU has: not a candidate
                continue
        _tuned[key] = min(timings, key=timings.get) if timings else chosen
    return _tuned[key]
