#!/usr/bin/env python3
"""maskc's sm_90 Gluon kernels (issue 18) against its Triton kernels, FlexAttention, FA4 and SDPA.

    python bench/hopper_bench.py                   # checks, then the speed table; adds a run to RESULTS.md
    python bench/hopper_bench.py --no-write --sizes 32768
    python bench/hopper_bench.py --skip speed      # the checks only
    python bench/hopper_bench.py --skip checks --backward --sizes 32768   # forward and backward

One H200 (or H100), one process. Checks first: the sm_90 forward of each
schedule variant against maskc's Triton forward and a float32 reference on
sampled rows, over masks of ragged lengths, GQA, head dims 64/128/256 and
empty rows (small problems take the path here: the size threshold is lifted);
with ``--backward`` each variant's gradients against the Triton kernels' too.
Then forward useful TFLOP/s (4 x head dim per allowed pair) of, per size and
mask (batch 1, 16 heads, head dim 128, bf16): maskc's sm_90 forward and its
variants, maskc's Triton forward, FlexAttention's Triton backend, its FLASH
backend and FlashAttention-4 where ``flash_attn.cute`` (flash-attn-4) is
installed (FA4 runs document-causal through
its varlen kernel and the window through ``window_size``), and SDPA on causal.
With ``--backward`` each tool runs forward and backward (autograd) and the table
gives both, the backward's useful TFLOP/s counting 2.5 times the forward's work;
maskc's sm_90 variants then run the opt-in dQ and dK/dV kernels
(``MASKC_GLUON_BACKWARD=1``; "sm90 Triton dQ" only the second) and their schedule
variants. The short table comes last.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from functools import partial
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench  # noqa: E402 - its HEADS and HEAD_DIM are the run's (--heads, --head-dim)
from gpu_bench import (DEVICE, WINDOW, block_mask, flex, inputs, masks, max_error, ms, rows_reference,  # noqa: E402
                       sample_rows, tflops)
from results import add_command_run, gpu_machine  # noqa: E402

import maskc  # noqa: E402 - gpu_bench put this checkout on the path
from maskc.codegen import hopper, launch  # noqa: E402

SECTION = "## sm_90 fast path (issue 18)"
SIZES = (32768, 131072)
MASK_NAMES = ("causal", "doc-causal", "window-1024")

#: maskc's sm_90 schedule variants: module attributes of ``hopper.py`` set for the variant (tiles
#: whose ``wgmma`` ptxas serializes, as ``tuning.py`` lists, are left out)
VARIANTS = {"sm90": {}, "sm90 no overlap": {"OVERLAP": False}, "sm90 one warpgroup": {"PINGPONG": False},
            "sm90 3 stages": {"CONFIGS": {**hopper.CONFIGS, 128: (128, 128, 3)}},
            "sm90 FMA softmax": {"FMA_SOFTMAX": True}, "sm90 turns": {"TURNS": True},
            "sm90 persistent": {"PERSISTENT": True}, "sm90 persistent turns": {"PERSISTENT": True, "TURNS": True},
            "sm90 dQ persistent": {"DQ_PERSISTENT": True}, "sm90 dK/dV persistent": {"DKDV_PERSISTENT": True},
            "sm90 all persistent": {"PERSISTENT": True, "DQ_PERSISTENT": True, "DKDV_PERSISTENT": True},
            "sm90 dK/dV one partition": {"DKDV_PINGPONG": False},
            "sm90 dK/dV no overlap": {"DKDV_OVERLAP": False},
            "sm90 dK/dV 2 stages": {"DKDV_CONFIGS": {**hopper.DKDV_CONFIGS, 128: (32, 128, 2)}},
            "sm90 dK/dV 64-key programs": {"DKDV_CONFIGS": {**hopper.DKDV_CONFIGS, 128: (64, 64, 2)}},
            "sm90 dK/dV 64-query steps at D 256": {"DKDV_CONFIGS": {**hopper.DKDV_CONFIGS, 256: (64, 64, 2)}},
            "sm90 Triton dQ": {"DQ_CONFIGS": {}},
            "sm90 dQ one partition": {"DQ_PINGPONG": False},
            "sm90 dQ no overlap": {"DQ_OVERLAP": False},
            "sm90 dQ 3 stages": {"DQ_CONFIGS": {**hopper.DQ_CONFIGS, 128: (128, 64, 3)}}}


@contextlib.contextmanager
def variant(settings: dict, gluon: bool = True):
    """maskc with ``hopper.py`` settings changed and its sm_90 kernels on, the opt-in backward ones
    too (``gluon=False``: the Triton kernels)."""
    switch = "1" if gluon else "0"
    with mock.patch.dict(os.environ, {"MASKC_GLUON": switch, "MASKC_GLUON_BACKWARD": switch}), \
            mock.patch.multiple(hopper, **settings) if settings else contextlib.nullcontext():
        launch._launches.clear()
        launch._sm90_decided.clear()
        try:
            yield
        finally:
            launch._launches.clear()
            launch._sm90_decided.clear()


# -- checks ------------------------------------------------------------------------------------
CHECKS = [  # name, mask, q_len, kv_len, dtype, head dim, heads, kv heads
    ("causal short rows", maskc.Causal(), 3000, 3000, torch.bfloat16, 128, 8, 8),
    ("causal long rows", maskc.Causal(), 12000, 12000, torch.bfloat16, 128, 8, 8),
    ("doc-causal ragged GQA", maskc.Documents(lengths=[1700, 2333, 1, 967]) & maskc.Causal(), 5001, 5001,
     torch.float16, 64, 8, 2),
    ("window cross MQA", maskc.SlidingWindow(left=700, align="bottom_right"), 3000, 7000, torch.bfloat16, 256, 4, 1),
    ("prefix-lm", maskc.Prefix(length=1000) | maskc.Causal(), 6000, 6000, torch.bfloat16, 128, 4, 4),
    ("ring tile, empty rows", maskc.Documents(lengths=[0, 3000, 2120], kv_lengths=[4000, 1120, 0]), 5120, 5120,
     torch.bfloat16, 128, 4, 4),
    ("chunked causal hd256", maskc.Chunked(size=1024) & maskc.Causal(), 5000, 5000, torch.bfloat16, 256, 4, 2),
]


def check(name, mask, q_len, kv_len, dtype, head_dim, heads, kv_heads, backward: bool = False) -> list:
    spec = maskc.Spec(q_len=q_len, kv_len=kv_len, mask=mask)
    cm = maskc.compile(spec)
    torch.manual_seed(0)
    q = torch.randn(1, heads, q_len, head_dim, device=DEVICE, dtype=dtype)
    k = torch.randn(1, kv_heads, kv_len, head_dim, device=DEVICE, dtype=dtype)
    v = torch.randn(1, kv_heads, kv_len, head_dim, device=DEVICE, dtype=dtype)
    rows = sample_rows(q_len, np.random.default_rng(0), 64)
    groups = heads // kv_heads
    want = rows_reference(spec, rows, q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1))
    scale = 1 / math.sqrt(gpu_bench.HEAD_DIM)  # the reference's scale, whatever the head dim
    leaves = tuple(x.detach().requires_grad_() for x in (q, k, v))
    grad = torch.randn(q.shape[:-1] + (v.shape[-1],), device=DEVICE, dtype=dtype)

    def gradients() -> tuple:
        return torch.autograd.grad(cm(*leaves, scale=scale), leaves, grad) if backward else ()

    with variant({}, gluon=False):
        triton_out, triton_lse = cm(q, k, v, return_lse=True, scale=scale)
        triton_grads = gradients()
    found = []
    for label, settings in VARIANTS.items():
        with variant(settings):
            path = "/".join(p.split(" ")[0] for p in cm.kernel_paths(q, k, v).values())  # forward/dq/dkdv
            out, lse = cm(q, k, v, return_lse=True, scale=scale)
            grads = gradients()
            torch.cuda.synchronize()
        nan = bool(out.isnan().any() or lse.isnan().any() or any(g.isnan().any() for g in grads))
        same_empty = torch.equal(torch.isfinite(lse), torch.isfinite(triton_lse))
        grad_error = max((max_error(a, b) for a, b in zip(grads, triton_grads)), default=math.nan)
        found.append((name, label, path, max_error(out[:, :, rows], want), max_error(out, triton_out),
                      max_error(lse.nan_to_num(0, 0, 0), triton_lse.nan_to_num(0, 0, 0)), grad_error, nan,
                      same_empty))
        print(*found[-1], flush=True)
    return found


def checks(backward: bool) -> list:
    saved, launch.TMA_MIN_PAIRS = launch.TMA_MIN_PAIRS, 0
    try:
        found = []
        for case in CHECKS:
            try:
                found += check(*case, backward=backward)
            except Exception as error:  # reported in the table; the other cases still run
                print(f"{case[0]}: {type(error).__name__}: {error}", flush=True)
                found.append((case[0], "-", f"failed: {type(error).__name__}: {error}"[:120], *[math.nan] * 4,
                              True, False))
        return found
    finally:
        launch.TMA_MIN_PAIRS = saved


# -- speed ---------------------------------------------------------------------------------------
def fa4():
    try:
        from flash_attn.cute import flash_attn_func, flash_attn_varlen_func
        return flash_attn_func, flash_attn_varlen_func
    except Exception as error:  # not installed here: the column stays empty
        print(f"FA4 not available: {type(error).__name__}: {error}", flush=True)
        return None


def first(result):
    return result[0] if isinstance(result, tuple) else result


def fa4_call(name: str, lengths, q, k, v):
    """FA4 on ``name``: ``(fn, (q, k, v))`` with copies of q, k, v in its ``[B, N, H, D]`` layout
    (``[N, H, D]`` for varlen) that ``fn`` takes; ``None`` where it has no such mask."""
    found = fa4()
    if found is None:
        return None
    func, varlen = found
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_(x.requires_grad) for x in (q, k, v))
    if name == "causal":
        return (lambda q, k, v: first(func(q, k, v, causal=True))), (qt, kt, vt)
    if name == "window-1024":
        return (lambda q, k, v: first(func(q, k, v, causal=True, window_size=(WINDOW, 0)))), (qt, kt, vt)
    if name == "doc-causal":
        cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), device=DEVICE, dtype=torch.int32)
        longest = int(max(lengths))
        return (lambda q, k, v: first(varlen(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest,
                                             max_seqlen_k=longest, causal=True))), \
            tuple(x[0].detach().requires_grad_(x.requires_grad) for x in (qt, kt, vt))
    return None


flex_flash = torch.compile(partial(flex_attention, kernel_options={"BACKEND": "FLASH"}), dynamic=False)


def timing(fn, q, k, v, backward: bool) -> tuple:
    """``(forward ms, backward ms or None)`` of ``fn(q, k, v) -> out``."""
    return gpu_bench.time_fwd_bwd(fn, q, k, v) if backward else (ms(lambda: fn(q, k, v)), None)


def speed(sizes, names, variants, backward: bool = False) -> list:
    rows = []
    for length in sizes:
        rng = np.random.default_rng(length)
        for name, (mask, mask_mod) in masks(length, rng, names).items():
            spec = maskc.Spec(q_len=length, kv_len=length, mask=mask)
            cm = maskc.compile(spec)
            pairs = cm.allowed_pairs()
            q, k, v = inputs(length, length)
            if not backward:
                q, k, v = (x.detach() for x in (q, k, v))
            timed = {}
            for label in variants:
                with variant(VARIANTS[label]):
                    cm(q, k, v)  # compiles; a variant that fails to runs Triton's forward, and is left out
                    paths = cm.kernel_paths(q, k, v)
                    print(label, paths, flush=True)
                    if paths["forward"] == "sm90-gluon":
                        timed[label] = timing(cm, q, k, v, backward)
            with variant({}, gluon=False):
                timed["triton"] = timing(cm, q, k, v, backward)
            bm = block_mask(mask_mod, length, length)
            timed["flex"] = timing(partial(flex, block_mask=bm), q, k, v, backward)
            try:
                flex_flash(q, k, v, block_mask=bm)
                timed["flex FLASH"] = timing(partial(flex_flash, block_mask=bm), q, k, v, backward)
            except Exception as error:  # the FLASH backend needs FA4's CuTe DSL
                print(f"flex FLASH: {type(error).__name__}: {str(error)[:200]}", flush=True)
            lengths = getattr(mask, "lengths", None) or next(
                (m.lengths for m in getattr(mask, "of", []) if hasattr(m, "lengths")), None)
            call = fa4_call(name, lengths, q, k, v)
            if call is not None:
                try:
                    timed["FA4"] = timing(call[0], *call[1], backward)
                except Exception as error:
                    print(f"FA4 {name}: {type(error).__name__}: {str(error)[:200]}", flush=True)
            if name == "causal":
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    timed["sdpa"] = timing(partial(F.scaled_dot_product_attention, is_causal=True), q, k, v,
                                           backward)
            for tool, (fwd, bwd) in timed.items():
                rows.append((name, length, tool, tflops(pairs, fwd), fwd,
                             tflops(pairs, bwd, 2.5) if bwd else None, bwd))
                print(rows[-1], flush=True)
            del bm
            torch.cuda.empty_cache()
    return rows


# -- report --------------------------------------------------------------------------------------
def tables(check_rows, speed_rows) -> str:
    out = []
    if check_rows:
        out += ["Checks: the sm_90 kernels (each variant) on small problems; errors are the largest absolute "
                "difference from a float32 reference on 64 sampled rows and from maskc's Triton kernels (gradients: "
                "with --backward); paths: forward/dq/dkdv.", "",
                "| case | variant | paths | vs float32 | vs Triton out | vs Triton LSE | grads vs Triton | NaN | "
                "same empty rows |", "|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {c[0]} | {c[1]} | {c[2]} | {c[3]:.1e} | {c[4]:.1e} | {c[5]:.1e} | {c[6]:.1e} | {c[7]} | {c[8]} |"
                for c in check_rows]
    if speed_rows:
        by = {(r[0], r[1], r[2]): r for r in speed_rows}
        tools = list(dict.fromkeys(r[2] for r in speed_rows))
        backward = any(r[5] for r in speed_rows)

        def cell(r) -> str:
            return f"{r[3]:.0f} / {r[5]:.0f}" if backward and r[5] else f"{r[3]:.0f}"

        def ratio(a, b) -> str:
            return f"{a[3] / b[3]:.2f}x / {a[5] / b[5]:.2f}x" if backward and a[5] and b[5] else f"{a[3] / b[3]:.2f}x"

        what = "Forward / backward" if backward else "Forward"
        out += ["", f"{what} useful TFLOP/s (batch 1, {gpu_bench.HEADS} heads, head dim {gpu_bench.HEAD_DIM}, bf16; "
                "the backward counts 2.5 times the forward's work); ratios of maskc's sm_90 path to each tool in "
                "this run.", "",
                "| mask | tokens | " + " | ".join(tools) + " | sm90 / triton | sm90 / flex | sm90 / FA4 | sm90 / flex FLASH |",
                "|---|---|" + "---|" * (len(tools) + 4)]
        for name, length in dict.fromkeys((r[0], r[1]) for r in speed_rows):
            cells = [cell(by[name, length, t]) if (name, length, t) in by else "" for t in tools]
            sm90 = by.get((name, length, "sm90"))
            ratios = [ratio(sm90, by[name, length, t]) if sm90 and (name, length, t) in by else ""
                      for t in ("triton", "flex", "FA4", "flex FLASH")]
            out.append(f"| {name} | {length // 1024}K | " + " | ".join(cells + ratios) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--masks", nargs="+", default=list(MASK_NAMES), choices=MASK_NAMES)
    parser.add_argument("--skip", nargs="*", default=[], choices=["checks", "speed"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="maskc's sm_90 variants to time (default all)")
    parser.add_argument("--head-dim", type=int, default=gpu_bench.HEAD_DIM, help="of the speed table")
    parser.add_argument("--heads", type=int, default=gpu_bench.HEADS, help="of the speed table")
    parser.add_argument("--backward", action="store_true", help="time forward and backward (autograd)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    if torch.cuda.get_device_capability()[0] != 9:
        sys.exit("the sm_90 forward needs an sm_90 GPU (H100, H200)")
    check_rows = checks(args.backward) if "checks" not in args.skip else []
    gpu_bench.HEAD_DIM, gpu_bench.HEADS = args.head_dim, args.heads
    speed_rows = speed(args.sizes, args.masks, args.variants, args.backward) if "speed" not in args.skip else []
    text = tables(check_rows, speed_rows)
    if not args.no_write:
        add_command_run(SECTION, gpu_machine(), text)
    print(text)


if __name__ == "__main__":
    main()
