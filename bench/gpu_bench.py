#!/usr/bin/env python3
"""maskc's Triton kernels against FlexAttention and SDPA on one GPU (issue 3).

    python bench/gpu_bench.py                  # everything; adds a run to bench/RESULTS.md
    python bench/gpu_bench.py --sizes 8192 --no-write
    python bench/gpu_bench.py --sizes 131072 --masks causal doc-causal window-1024 --skip ring build
    python bench/gpu_bench.py --tune --variants defaults "set short rows"   # maskc's variants (default: causal 32K)
    python bench/gpu_bench.py --list-variants  # tile configs, tile sets, one loop
    ncu --clock-control none ... python bench/gpu_bench.py --profile doc-causal   # one call of each tool
    python bench/gpu_bench.py --noise --sizes 8192 131072 --masks doc-causal window-1024  # see noise()

Per mask and size (batch 1, 16 heads, head dim 128, bf16): forward and backward
TFLOP/s of maskc and of ``torch.compile(flex_attention)`` on the same mask, and
of SDPA's flash and cuDNN backends on causal. FLOPs are useful FLOPs: 4 x head
dim per allowed pair forward (``CompiledMask.allowed_pairs()`` counts them
exactly, and FlexAttention is credited with the same count), 2.5 times that
backward. Errors are the largest absolute difference from a float32 reference:
forward on sampled rows at every size, forward and backward on the whole
problem at the smallest size. Then the 4 x 4 ring tiles of a 128K
document-causal mask, the mask build times of both tools, and a loop of 20
training steps with new document lengths each step. The short table comes last.
The whole-problem float32 reference holds a dense mask, so it runs up to 16K tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import maskc  # noqa: E402 - after the path setup, to bench this checkout
from maskc.codegen import launch, plan, tuning  # noqa: E402
from results import add_run  # noqa: E402

HEADS, HEAD_DIM, DTYPE, DEVICE = 16, 128, torch.bfloat16, "cuda"
WINDOW, CHUNK, PREFIX = 1024, 8192, 2048
WHOLE_ERRORS_UP_TO = 16384  # tokens; the float32 reference of the whole problem holds a dense mask
SECTION = "## GPU kernels (issue 3)"

torch._dynamo.config.cache_size_limit = 256
torch._dynamo.config.accumulated_cache_size_limit = 4096
torch._functorch.config.donated_buffer = False  # the timing loops replay one backward graph
flex = torch.compile(flex_attention, dynamic=False)


# -- masks, in both tools' words ------------------------------------------------------------
def document_lengths(total: int, rng: np.random.Generator) -> list[int]:
    """Packed documents of 512 to 4096 tokens filling ``total`` (the last one cut)."""
    lengths, used = [], 0
    while used < total:
        n = min(int(rng.integers(512, 4097)), total - used)
        lengths.append(n)
        used += n
    return lengths


def document_ids(lengths) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths), device=DEVICE), torch.tensor(lengths, device=DEVICE))


MASKS = ("causal", "doc-causal", "window-1024", "prefix-lm", "chunked-8K")


def masks(length: int, rng: np.random.Generator, names=MASKS) -> dict:
    """name -> (maskc mask, flex mask_mod) for ``length`` tokens, for the masks in ``names``."""
    lengths = document_lengths(length, rng)
    doc = document_ids(lengths)
    every = {
        "causal": (maskc.Causal(), lambda b, h, q, kv: q >= kv),
        "doc-causal": (maskc.Documents(lengths=lengths) & maskc.Causal(),
                       lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv)),
        "window-1024": (maskc.SlidingWindow(left=WINDOW), lambda b, h, q, kv: (q >= kv) & (q - kv <= WINDOW)),
        "prefix-lm": (maskc.Prefix(length=PREFIX) | maskc.Causal(), lambda b, h, q, kv: (kv < PREFIX) | (q >= kv)),
        "chunked-8K": (maskc.Chunked(size=CHUNK) & maskc.Causal(),
                       lambda b, h, q, kv: (q // CHUNK == kv // CHUNK) & (q >= kv)),
    }
    return {name: every[name] for name in names}


def block_mask(mask_mod, q_len: int, kv_len: int):
    return create_block_mask(mask_mod, None, None, q_len, kv_len, device=DEVICE, BLOCK_SIZE=128, _compile=True)


# -- measuring --------------------------------------------------------------------------------
def inputs(q_len: int, kv_len: int, seed: int = 0):
    torch.manual_seed(seed)
    q = torch.randn(1, HEADS, q_len, HEAD_DIM, device=DEVICE, dtype=DTYPE, requires_grad=True)
    k = torch.randn(1, HEADS, kv_len, HEAD_DIM, device=DEVICE, dtype=DTYPE, requires_grad=True)
    v = torch.randn(1, HEADS, kv_len, HEAD_DIM, device=DEVICE, dtype=DTYPE, requires_grad=True)
    return q, k, v


def ms(fn) -> float:
    """Median milliseconds of ``fn`` over 100 ms of runs, and at least 20 runs: a 128K causal
    backward takes 0.4 s, and one run of it moved by up to 7% between calls."""
    once = triton.testing.do_bench(fn, warmup=1, rep=1, return_mode="median")
    return triton.testing.do_bench(fn, warmup=max(10.0, 3 * once), rep=max(100.0, 20 * once), return_mode="median")


def time_fwd_bwd(attend, q, k, v) -> tuple[float, float]:
    """Median forward and backward milliseconds of ``attend(q, k, v) -> out``."""
    fwd = ms(lambda: attend(q, k, v))
    out = attend(q, k, v)
    grad = torch.randn_like(out)
    bwd = ms(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True))
    return fwd, bwd


def tflops(pairs: int, millis: float, factor: float = 1.0) -> float:
    return factor * 4 * HEAD_DIM * pairs * HEADS / (millis * 1e-3) / 1e12


def sample_rows(q_len: int, rng: np.random.Generator, n: int = 48) -> np.ndarray:
    return np.unique(np.concatenate([[0, q_len - 1], rng.integers(0, q_len, n)]))


def rows_reference(spec: maskc.Spec, rows: np.ndarray, q, k, v) -> torch.Tensor:
    """float32 attention of query ``rows`` under the spec's own definition of the mask."""
    allowed = spec.mask.allowed(rows[:, None], np.arange(spec.kv_len)[None, :], spec.q_len, spec.kv_len)
    allowed = torch.from_numpy(np.ascontiguousarray(allowed)).to(DEVICE)
    s = (q[:, :, rows].float() @ k.float().transpose(-1, -2)) / math.sqrt(HEAD_DIM)
    p = torch.softmax(s.masked_fill(~allowed, -math.inf), dim=-1).nan_to_num(0.0)
    return p @ v.float()


def full_reference(spec: maskc.Spec, q, k, v):
    """float32 attention of the whole problem with autograd (small sizes only)."""
    cm = maskc.compile(spec)
    allowed = cm.dense().to(DEVICE)
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    s = (qf @ kf.transpose(-1, -2)) / math.sqrt(HEAD_DIM)
    p = torch.softmax(s.masked_fill(~allowed, -math.inf), dim=-1).nan_to_num(0.0)
    return p @ vf, (qf, kf, vf)


def max_error(got, want) -> float:
    return (got.float() - want.float()).abs().max().item()


# -- sections -------------------------------------------------------------------------------------
def correctness(rows: list) -> None:
    """Small problems of every dtype, head dim and head layout against float32 / float64 references."""
    cases = [
        ("causal bf16 hd128", maskc.Causal(), 1000, 1000, torch.bfloat16, 128, 16, 16),
        ("doc-causal fp16 hd64 GQA", maskc.Documents(lengths=[300, 511, 200]) & maskc.Causal(), 1011, 1011,
         torch.float16, 64, 8, 2),
        ("window bf16 hd256 MQA", maskc.SlidingWindow(left=100, align="bottom_right"), 700, 900, torch.bfloat16,
         256, 4, 1),
        ("chunk or prefix fp32 hd80", maskc.Chunked(size=256) | maskc.Prefix(length=30), 640, 640, torch.float32,
         80, 4, 4),
        ("dense bf16 hd128", maskc.Dense(values=np.random.default_rng(1).random((384, 512)) < 0.2), 384, 512,
         torch.bfloat16, 128, 4, 4),
        ("ring tile bf16 hd128", maskc.Documents(lengths=[0, 300, 212], kv_lengths=[400, 112, 0]), 512, 512,
         torch.bfloat16, 128, 4, 4),
    ]
    for case in cases:
        try:
            rows.append(check_case(*case))
        except Exception as error:  # a failing case is reported in the table, the others still run
            print(f"{case[0]}: {type(error).__name__}: {error}", flush=True)
            rows.append((case[0], *[float("nan")] * 5, f"failed: {type(error).__name__}"))


def check_case(name, mask, q_len, kv_len, dtype, head_dim, heads, kv_heads) -> tuple:
    """Output, LSE and gradient errors of one small problem against the float64 reference op."""
    spec = maskc.Spec(q_len=q_len, kv_len=kv_len, mask=mask)
    cm = maskc.compile(spec)
    torch.manual_seed(0)
    q = torch.randn(2, heads, q_len, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(2, kv_heads, kv_len, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(2, kv_heads, kv_len, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
    out, lse = cm(q, k, v, return_lse=True)
    d_out, d_lse = torch.randn_like(out), torch.randn_like(lse)
    finite = torch.isfinite(lse)
    loss = (out.float() * d_out).sum() + torch.where(finite, lse * d_lse, 0).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    wide = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = cm(*wide, return_lse=True, backend="reference")
    ref_loss = (ref_out * d_out.double()).sum() + torch.where(finite, ref_lse * d_lse.double(), 0).sum()
    ref_grads = torch.autograd.grad(ref_loss, wide)
    errors = [max_error(out, ref_out), max_error(torch.where(finite, lse, 0), torch.where(finite, ref_lse, 0))]
    errors += [max_error(g, r) / r.abs().max().item() for g, r in zip(grads, ref_grads)]
    nan = any(t.isnan().any().item() for t in (out, lse, *grads))
    return (name, *errors, nan)


def untrimmed_steps(ptr, idx, lo, hi, own_block, entry_block, program, step):
    """``spans.partial_steps`` without the trimming: each program walks its group's whole PARTIAL list."""
    subs = entry_block // step
    group = np.arange(-(-lo.shape[1] // program)) * program // own_block
    return np.stack([ptr[:, group] * subs, ptr[:, group + 1] * subs], axis=-1).astype(np.int32)


@contextlib.contextmanager
def variant(configs=(), one_loop=True, spans=True, trim=True, tma=launch.USE_TMA, dq_atomic=False):
    """maskc with some kernels' tile configs changed (``(kernel, TileConfig)`` pairs), with spans
    but FULL and PARTIAL tiles in two loops (``plan.ONE_LOOP``), without spans
    (``codegen/spans.py``): the generated predicate on every PARTIAL tile, or with spans but
    every PARTIAL step walked (``untrimmed_steps``), with TMA copies in the kernels ``tma`` only,
    with dQ added with atomics by the dK/dV kernel (``MASKC_DQ_ATOMIC=1``)."""
    saved = dict(tuning.DEFAULTS_16BIT), dict(tuning.SHORT_ROWS_16BIT)
    for kernel, config in configs:  # for masks of long and short rows alike
        tuning.DEFAULTS_16BIT[(kernel, HEAD_DIM)] = tuning.SHORT_ROWS_16BIT[(kernel, HEAD_DIM)] = config
    trimmed = plan.partial_steps
    plan.ONE_LOOP = one_loop
    if not trim:
        plan.partial_steps = untrimmed_steps
    plan.USE_SPANS = spans
    saved_tma, launch.USE_TMA = launch.USE_TMA, frozenset(tma)
    launch._fitted.clear()
    launch._launches.clear()
    try:
        with mock.patch.dict(os.environ, {"MASKC_DQ_ATOMIC": "1" if dq_atomic else "0"}):
            yield
    finally:
        for table, before in zip((tuning.DEFAULTS_16BIT, tuning.SHORT_ROWS_16BIT), saved):
            table.clear()
            table.update(before)
        plan.partial_steps = trimmed
        plan.ONE_LOOP = True
        plan.USE_SPANS = True
        launch.USE_TMA = saved_tma
        launch._fitted.clear()
        launch._launches.clear()


T = tuning.TileConfig
#: Whole-set variants: (table block size, kernel configs), timed in both passes.
TILE_SETS = {
    "set short rows": (128, [("forward", T(64, 64, 4, 3)), ("dq", T(128, 64, 8, 3)), ("dkdv", T(64, 128, 8, 3))]),
    "set long rows": (128, [("forward", T(128, 128, 8, 3)), ("dq", T(128, 64, 8, 3)), ("dkdv", T(64, 128, 8, 3))]),
    "set table 64x128": ((64, 128), [("forward", T(64, 64, 4, 3)), ("dq", T(64, 64, 4, 3)),
                                     ("dkdv", T(64, 128, 8, 2))]),
    "set table 64": (64, [("forward", T(64, 64, 4, 3)), ("dq", T(64, 64, 4, 3)), ("dkdv", T(64, 64, 4, 3))]),
    "set small backward": (128, [("forward", T(64, 64, 4, 3)), ("dq", T(64, 64, 4, 2)), ("dkdv", T(64, 64, 4, 2))]),
}


def variants(names=()) -> dict:
    """name -> (table block size, variant arguments, passes it changes); ``names`` may add tile
    configs outside the candidates, written like them (``"dkdv 32x64 w4 s2"``)."""
    out = {"defaults": (128, {}, "fwd bwd"), "two loops": (128, dict(one_loop=False), "fwd bwd"),
           "generated predicate": (128, dict(spans=False), "fwd bwd"),
           "untrimmed": (128, dict(trim=False), "fwd bwd"), "no tma": (128, dict(tma=()), "fwd bwd"),
           "tma everywhere": (128, dict(tma=tuning.KERNELS), "fwd bwd"),
           "dq atomic": (128, dict(dq_atomic=True), "bwd"),
           "dq atomic, dkdv 64x64 w4 s2": (128, dict(dq_atomic=True, configs=[("dkdv", T(64, 64, 4, 2))]), "bwd")}
    out.update({name: (block, dict(configs=configs), "fwd bwd") for name, (block, configs) in TILE_SETS.items()})
    for kernel in tuning.KERNELS:  # each candidate for masks of long and short rows alike
        for config in tuning.CANDIDATES[kernel]:
            out[f"{kernel} {tiles(config)}"] = (128, dict(configs=[(kernel, config)]),
                                                "fwd" if kernel == "forward" else "bwd")
    for name in names:
        written = re.fullmatch(r"(forward|dq|dkdv) (\d+)x(\d+) w(\d+) s(\d+)", name)
        if written and name not in out:
            kernel, *numbers = written.groups()
            out[name] = (128, dict(configs=[(kernel, T(*map(int, numbers)))]), "fwd" if kernel == "forward" else "bwd")
    return out


def tune(sizes, names, chosen, report: list) -> None:
    """Per mask and size: FlexAttention and maskc's defaults, then each chosen variant
    (``variants()``) in the passes it changes; median useful TFLOP/s."""
    def add(*row) -> None:
        report.append(row)
        print(*row, flush=True)

    rng = np.random.default_rng(0)
    every = variants(chosen)
    for length in sizes:
        q, k, v = inputs(length, length)
        for name, (mask, mask_mod) in masks(length, rng, names).items():
            spec = maskc.Spec(q_len=length, kv_len=length, mask=mask)
            bm = block_mask(mask_mod, length, length)
            pairs = maskc.compile(spec).allowed_pairs()
            fwd, bwd = time_fwd_bwd(lambda q, k, v: flex(q, k, v, block_mask=bm), q, k, v)
            add(name, length, "flex", "defaults", tflops(pairs, fwd), tflops(pairs, bwd, 2.5))
            print(f"{name} {length}: maskc against flex, largest |difference| of out, dq, dk, dv:",
                  agreement(maskc.compile(spec), lambda q, k, v: flex(q, k, v, block_mask=bm), q, k, v), flush=True)
            for label in ["defaults"] + [c for c in chosen if c != "defaults"]:
                block, arguments, passes = every[label]
                with variant(**arguments):
                    cm = maskc.compile(spec, block_size=block)
                    speed = [float("nan"), float("nan")]
                    if "fwd" in passes:
                        speed[0] = tflops(pairs, ms(lambda: cm(q, k, v)))
                    if "bwd" in passes:
                        out = cm(q, k, v)
                        grad = torch.randn_like(out)
                        speed[1] = tflops(pairs, ms(lambda: torch.autograd.grad(out, (q, k, v), grad,
                                                                                 retain_graph=True)), 2.5)
                    add(name, length, "maskc", label, *speed)


def agreement(first, second, q, k, v) -> str:
    """Largest absolute difference between two attention ops' outputs and gradients."""
    results = []
    for attend in (first, second):
        out = attend(q, k, v)
        grad = torch.ones_like(out) / math.sqrt(out.numel())
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    return ", ".join(f"{max_error(a, b):.2e}" for a, b in zip(*results))


def profile(length: int, name: str) -> None:
    """One forward and backward of each tool on one mask, after a warm-up: run under
    ``ncu --clock-control none --launch-skip-before-match ...`` to read the kernels' counters."""
    rng = np.random.default_rng(0)
    q, k, v = inputs(length, length)
    mask, mask_mod = masks(length, rng, [name])[name]
    cm = maskc.compile(maskc.Spec(q_len=length, kv_len=length, mask=mask))
    bm = block_mask(mask_mod, length, length)
    for attend in (cm, lambda q, k, v: flex(q, k, v, block_mask=bm)):
        for _ in range(2):  # the first call compiles, the second is the one to read
            out = attend(q, k, v)
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    torch.cuda.synchronize()


def gpu_state() -> str:
    """SM and memory clocks, power draw and temperature, as nvidia-smi reports them now."""
    query = "--query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu"
    return subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True,
                          text=True).stdout.strip()


def noise(sizes, names, repeats: int = 4) -> None:
    """What moves the timings: per mask and size, each tool's host time per call (50 forward and
    20 backward calls queued without waiting for the GPU: where it exceeds the kernels' time, a
    timing measures the host), then ``repeats`` alternating timings of both tools' forward with
    the clocks and power after each."""
    rng = np.random.default_rng(0)
    for length in sizes:
        q, k, v = inputs(length, length)
        for name, (mask, mask_mod) in masks(length, rng, names).items():
            cm = maskc.compile(maskc.Spec(q_len=length, kv_len=length, mask=mask))
            bm = block_mask(mask_mod, length, length)
            tools = {"maskc": cm, "flex": lambda q, k, v: flex(q, k, v, block_mask=bm)}
            for tool, attend in tools.items():
                out = attend(q, k, v)
                grad = torch.randn_like(out)
                torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
                torch.cuda.synchronize()
                host = []
                for calls, run in ((50, lambda: attend(q, k, v)),
                                   (20, lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True))):
                    start = time.perf_counter()
                    for _ in range(calls):
                        run()
                    host.append((time.perf_counter() - start) / calls * 1e3)
                    torch.cuda.synchronize()
                print(f"{name} {length} {tool}: host ms per call, forward {host[0]:.3f}, backward {host[1]:.3f}",
                      flush=True)
            for repeat in range(repeats):
                speeds = [f"{tool} {tflops(cm.allowed_pairs(), ms(lambda: attend(q, k, v))):.0f}"
                          for tool, attend in tools.items()]
                print(f"{name} {length} forward TFLOP/s, repeat {repeat}: {', '.join(speeds)} | {gpu_state()}",
                      flush=True)


def tiles(config: tuning.TileConfig) -> str:
    return f"{config.block_m}x{config.block_n} w{config.num_warps} s{config.num_stages}"


def tune_table(report) -> str:
    out = ["| mask | tokens | tool | tiles | fwd TFLOP/s | bwd TFLOP/s | fwd / flex | bwd / flex |",
           "|---|---|---|---|---|---|---|---|"]
    flex_of = {(r[0], r[1]): r for r in report if r[2] == "flex"}
    def cell(value: float, form: str) -> str:
        return "–" if math.isnan(value) else format(value, form)

    for name, length, tool, tiles, fwd, bwd in report:
        ref = flex_of[name, length]
        out.append(f"| {name} | {length // 1024}K | {tool} | {tiles} | {cell(fwd, '.0f')} | {cell(bwd, '.0f')} | "
                   f"{cell(fwd / ref[4], '.2f')}x | {cell(bwd / ref[5], '.2f')}x |".replace("–x", "–"))
    return "\n".join(out)


def main_table(sizes, names, rows: list, errors: list) -> None:
    rng = np.random.default_rng(0)
    for length in sizes:
        q, k, v = inputs(length, length)
        sample = sample_rows(length, rng)
        for name, (mask, mask_mod) in masks(length, rng, names).items():
            spec = maskc.Spec(q_len=length, kv_len=length, mask=mask)
            cm = maskc.compile(spec)
            bm = block_mask(mask_mod, length, length)
            pairs = cm.allowed_pairs()
            mc = time_fwd_bwd(cm, q, k, v)
            fx = time_fwd_bwd(lambda q, k, v: flex(q, k, v, block_mask=bm), q, k, v)
            rows.append((name, length, "maskc", tflops(pairs, mc[0]), tflops(pairs, mc[1], 2.5), mc))
            rows.append((name, length, "flex", tflops(pairs, fx[0]), tflops(pairs, fx[1], 2.5), fx))
            with torch.no_grad():
                want = rows_reference(spec, sample, q, k, v)
                err_mc = max_error(cm(q, k, v)[:, :, sample], want)
                err_fx = max_error(flex(q, k, v, block_mask=bm)[:, :, sample], want)
            errors.append((name, length, "fwd rows", err_mc, err_fx))
            print(*rows[-2], *rows[-1], flush=True)
            if length == min(sizes) and length <= WHOLE_ERRORS_UP_TO:
                errors.append((name, length, "fwd+bwd all", *whole_errors(spec, cm, bm, q, k, v)))
            if name == "causal":
                for backend, label in ((SDPBackend.FLASH_ATTENTION, "sdpa-flash"), (SDPBackend.CUDNN_ATTENTION,
                                                                                     "sdpa-cudnn")):
                    with sdpa_kernel(backend):
                        t = time_fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                         q, k, v)
                    rows.append((name, length, label, tflops(pairs, t[0]), tflops(pairs, t[1], 2.5), t))
        del q, k, v
        torch.cuda.empty_cache()


def whole_errors(spec, cm, bm, q, k, v) -> tuple[float, float]:
    """Largest error of output and gradients (relative to the largest reference value) of both tools."""
    want, wide = full_reference(spec, q, k, v)
    grad = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, wide, grad)
    out = []
    for attend in (cm, lambda q, k, v: flex(q, k, v, block_mask=bm)):
        got = attend(q, k, v)
        grads = torch.autograd.grad(got, (q, k, v), grad.to(got.dtype))
        out.append(max([max_error(got, want)] + [max_error(g, w) / w.abs().max().item()
                                                  for g, w in zip(grads, want_grads)]))
    return tuple(out)


def ring(rows: list, length: int = 131072, parts: int = 4) -> None:
    """The 4 x 4 tiles of a document-causal mask: per tile kind, both tools' time and useful TFLOP/s."""
    rng = np.random.default_rng(1)
    lengths = document_lengths(length, rng)
    doc = document_ids(lengths)
    spec = maskc.Spec(q_len=length, kv_len=length, mask=maskc.Documents(lengths=lengths) & maskc.Causal())
    tiles = maskc.partition(spec, parts, parts)
    size = length // parts
    q, k, v = inputs(size, size)
    offsets = torch.zeros(2, dtype=torch.int64, device=DEVICE)  # tile origin, a tensor so flex compiles once

    def mask_mod(b, h, qi, kj):
        i, j = qi + offsets[0], kj + offsets[1]
        return (doc[i] == doc[j]) & (i >= j)

    totals = {"maskc": [0.0, 0.0], "flex": [0.0, 0.0]}
    empty = {"maskc": [], "flex": []}
    total_pairs = 0
    for a in range(parts):
        for b in range(parts):
            cm = maskc.compile(tiles[a][b])
            offsets.copy_(torch.tensor([a * size, b * size]))
            bm = block_mask(mask_mod, size, size)
            pairs = cm.allowed_pairs()
            total_pairs += pairs
            mc = time_fwd_bwd(cm, q, k, v)
            fx = time_fwd_bwd(lambda q, k, v: flex(q, k, v, block_mask=bm), q, k, v)
            for tool, t in (("maskc", mc), ("flex", fx)):
                if pairs == 0:
                    empty[tool].append(t[0])
                totals[tool][0] += t[0]
                totals[tool][1] += t[1]
    for tool in ("maskc", "flex"):
        fwd, bwd = totals[tool]
        rows.append(("ring 4x4 (all 16 tiles)", length, tool, tflops(total_pairs, fwd), tflops(total_pairs, bwd, 2.5),
                     (fwd, bwd)))
        rows.append(("ring: one empty tile, fwd ms", length, tool, float("nan"), float("nan"),
                     (float(np.mean(empty[tool])) if empty[tool] else float("nan"), float("nan"))))


def build_times(report: list, length: int = 131072, steps: int = 20) -> None:
    """Mask build time of both tools, and a training loop with new document lengths every step."""
    rng = np.random.default_rng(2)
    for name, (mask, mask_mod) in masks(length, rng).items():
        spec = maskc.Spec(q_len=length, kv_len=length, mask=mask)
        maskc.compile(spec)
        block_mask(mask_mod, length, length)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        maskc.compile(spec)
        t1 = time.perf_counter()
        block_mask(mask_mod, length, length)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        report.append((f"build {name}", length, 1e3 * (t1 - t0), 1e3 * (t2 - t1), ""))

    q, k, v = inputs(length, length)
    doc = [document_ids(document_lengths(length, rng))]  # replaced every step; flex's mask_mod reads it

    def mask_mod(b, h, qi, kj):
        return (doc[0][qi] == doc[0][kj]) & (qi >= kj)

    for tool in ("maskc", "flex"):
        build, step, first = [], [], None
        kernels_before = len(launch._predicates)
        graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for n in range(steps):
            lengths = document_lengths(length, rng)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            if tool == "maskc":
                op = maskc.compile(maskc.Spec(q_len=length, kv_len=length,
                                              mask=maskc.Documents(lengths=lengths) & maskc.Causal()))
            else:
                doc[0] = document_ids(lengths)
                bm = block_mask(mask_mod, length, length)
                op = lambda q, k, v, bm=bm: flex(q, k, v, block_mask=bm)  # noqa: E731
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            out = op(q, k, v)
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            build.append(t1 - t0)
            step.append(t2 - t1)
            first = first if first is not None else t2 - t0
        recompiled = (len(launch._predicates) - kernels_before if tool == "maskc"
                      else torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before)
        report.append((f"{steps} steps, new docs ({tool})", length, 1e3 * float(np.median(build)),
                       1e3 * float(np.median(step)), f"first step {1e3 * first:.0f} ms, new kernels/graphs "
                                                     f"{recompiled}"))


# -- report -----------------------------------------------------------------------------------------
def machine() -> str:
    return (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
            f"CUDA {torch.version.cuda}, {platform.node() or 'unknown host'}")


def tables(rows, errors, builds, checks) -> str:
    """The run's tables as markdown; a section that did not run (``--skip``) has none."""
    out = []

    def table(title: str, header: str, lines: list) -> None:
        if lines:
            columns = header.count("|") - 1
            out.extend(["", title, "", header, "|" + "---|" * columns, *lines])

    flex_of = {(r[0], r[1]): r for r in rows if r[2] == "flex"}
    speeds = []
    for name, length, tool, fwd, bwd, (fwd_ms, bwd_ms) in rows:
        ratio = ("", "")
        if tool == "maskc" and (name, length) in flex_of and not math.isnan(fwd):
            ratio = (f"{fwd / flex_of[name, length][3]:.2f}x", f"{bwd / flex_of[name, length][4]:.2f}x")
        speeds.append(f"| {name} | {length // 1024}K | {tool} | {fwd:.0f} ({fwd_ms:.3f}) | {bwd:.0f} ({bwd_ms:.3f}) | "
                      f"{ratio[0]} | {ratio[1]} |")
    table("Forward / backward useful TFLOP/s (median ms in brackets); ratio = maskc / flex in this run.",
          "| mask | tokens | tool | fwd TFLOP/s | bwd TFLOP/s | fwd ratio | bwd ratio |", speeds)
    table("Largest absolute error against float32 (gradients: relative to the largest reference value).",
          "| mask | tokens | what | maskc | flex |",
          [f"| {n} | {length // 1024}K | {what} | {a:.2e} | {b:.2e} |" for n, length, what, a, b in errors])
    table("Mask build (ms, median) and training steps with new document lengths.",
          "| what | tokens | maskc build / step ms | flex build / step ms | note |",
          [f"| {n} | {length // 1024}K | {a:.1f} | {b:.1f} | {note} |" for n, length, a, b, note in builds])
    table("Small problems against the float64 reference op (gradients relative).",
          "| case | out | lse | dq | dk | dv | NaN |",
          [f"| {c[0]} | " + " | ".join(f"{x:.1e}" for x in c[1:6]) + f" | {c[6]} |" for c in checks])
    return "\n".join(out[1:])


def write_results(text: str, command: str) -> None:
    add_run(SECTION, f"Command: `{command}`  \nDate: {datetime.date.today().isoformat()}  \nMachine: {machine()}  \n"
                     f"Batch 1, {HEADS} heads, head dim {HEAD_DIM}, bf16. maskc tables built for blocks of 128; "
                     f"kernel tiles per `maskc/codegen/tuning.py`.\n\n{text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", help="tokens (default 8192 32768 131072; --tune: 32768)")
    parser.add_argument("--masks", nargs="+", choices=MASKS, help="default all (--tune: causal)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    parser.add_argument("--tune", action="store_true", help="time maskc's variants (tile configs and switches)")
    parser.add_argument("--variants", nargs="+", help="with --tune: which (default all; --list-variants; or any "
                                                      "tile config written like theirs)")
    parser.add_argument("--list-variants", action="store_true")
    parser.add_argument("--profile", choices=MASKS, help="one fwd+bwd of each tool on this mask (for ncu)")
    parser.add_argument("--noise", action="store_true", help="host time per call; repeated timings with clocks")
    parser.add_argument("--skip", nargs="*", default=[], choices=["checks", "table", "ring", "build"])
    args = parser.parse_args()
    if args.list_variants:
        print("\n".join(variants()))
        return
    chosen = args.variants or list(variants())
    unknown = set(chosen) - set(variants(chosen))
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; --list-variants lists them")
    print(machine(), flush=True)
    if args.profile:
        profile((args.sizes or [131072])[0], args.profile)
        return
    if args.noise:
        noise(args.sizes or [8192, 131072], args.masks or ["doc-causal", "window-1024"])
        return
    if args.tune:
        checks, report = [], []
        if "checks" not in args.skip:
            correctness(checks)
            print(tables([], [], [], checks), flush=True)
        print("defaults:", ", ".join(f"{kernel} {tiles(tuning.DEFAULTS_16BIT[(kernel, HEAD_DIM)])}"
                                     for kernel in tuning.KERNELS), flush=True)
        tune(args.sizes or [32768], args.masks or ["causal"], chosen, report)
        print(tune_table(report))
        return
    sizes, names = args.sizes or [8192, 32768, 131072], args.masks or MASKS
    checks, rows, errors, builds = [], [], [], []
    stages = [("checks", lambda: correctness(checks)), ("table", lambda: main_table(sizes, names, rows, errors)),
              ("ring", lambda: ring(rows)), ("build", lambda: build_times(builds))]
    for name, run in stages:
        if name not in args.skip:
            t0 = time.perf_counter()
            run()
            print(f"[{name} done in {time.perf_counter() - t0:.0f} s]", flush=True)
    text = tables(rows, errors, builds, checks)
    if not args.no_write:
        write_results(text, "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]))
    print(text)


if __name__ == "__main__":
    main()
