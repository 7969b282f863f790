#!/usr/bin/env python3
"""maskc's call path on one GPU (issue 14): host time, short sequences, CUDA graphs, 128K.

    python bench/runtime_bench.py                      # everything; prints the tables last
    python bench/runtime_bench.py --write              # and adds the run to bench/RESULTS.md
    python bench/runtime_bench.py --before .before     # also the maskc of an earlier commit, side by side

Batch 1, 16 heads, head dim 128, bf16, blocks of 128. Measured in one process:

* host time per call: a tiny problem (1K tokens, causal) whose GPU work takes
  microseconds, called 200 times back to back; the time per call is what the
  host spends, since the GPU keeps up. Forward alone, and a training step
  (forward, then backward from a fixed output gradient). Beside
  ``torch.compile(flex_attention)`` with its block mask built once, and SDPA.
* 8K tokens, 4 and 8 documents, causal inside: forward + backward eager (median
  of timed repeats), and replayed from a CUDA graph holding forward and
  backward; maskc against compiled FlexAttention.
* 128K: forward and backward of causal and document-causal, with ``--before``
  also by the maskc of an earlier commit (a copy of its package renamed
  ``maskc_before``, its ops registered as ``maskc_before::``), same call.

In the 8K and 128K sections, "maskc, sm90 backward" is the same mask with the
opt-in sm_90 dQ and dK/dV kernels on (``MASKC_GLUON_BACKWARD=1``), and "maskc,
sm90 persistent" with those and the persistent variants of the three sm_90
kernels (``hopper.py``'s ``PERSISTENT``, ``DQ_PERSISTENT``, ``DKDV_PERSISTENT``), and
"maskc, dQ atomic" the Triton backward whose dK/dV kernel adds dQ (``MASKC_DQ_ATOMIC=1``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
import triton
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import maskc  # noqa: E402 - after the path setup, to bench this checkout
from results import add_command_run, gpu_machine  # noqa: E402

HEADS, HEAD_DIM, DTYPE, DEVICE = 16, 128, torch.bfloat16, "cuda"
SECTION = "## Call path: host time, short sequences, CUDA graphs (issue 14)"
SM90_BACKWARD = "maskc, sm90 backward"  # maskc with MASKC_GLUON_BACKWARD=1 (``switches``)
SM90_PERSISTENT = "maskc, sm90 persistent"  # and the persistent sm_90 kernels
DQ_ATOMIC = "maskc, dQ atomic"  # the Triton backward with MASKC_DQ_ATOMIC=1

torch._dynamo.config.cache_size_limit = 64
torch._functorch.config.donated_buffer = False  # the timing loops replay one backward graph
flex = torch.compile(flex_attention, dynamic=False)


def inputs(length: int, seed: int = 0):
    torch.manual_seed(seed)
    return tuple(torch.randn(1, HEADS, length, HEAD_DIM, device=DEVICE, dtype=DTYPE, requires_grad=True)
                 for _ in range(3))


def document_lengths(total: int, n: int, rng) -> list[int]:
    cuts = np.sort(rng.choice(np.arange(1, total), n - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]])).tolist()


def doc_ids(lengths) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths), device=DEVICE), torch.tensor(lengths, device=DEVICE))


def tools(lengths, length: int, before=None) -> dict:
    """name -> attend(q, k, v) -> out, for a document-causal mask of ``lengths``."""
    spec = maskc.Spec(q_len=length, kv_len=length, mask=maskc.Documents(lengths=lengths) & maskc.Causal())
    doc = doc_ids(lengths)
    bm = create_block_mask(lambda b, h, i, j: (doc[i] == doc[j]) & (i >= j), None, None, length, length,
                           device=DEVICE, _compile=True)
    cm = maskc.compile(spec, device=DEVICE)
    found = {"maskc": cm, "flex": lambda q, k, v: flex(q, k, v, block_mask=bm)}
    if before is not None:
        found["maskc before"] = before.compile(before.Spec.model_validate(spec.model_dump()))
    return found


def with_backward_variants(found: dict) -> dict:
    """``found`` and maskc with its opt-in sm_90 backward kernels, then with their persistent
    variants too, and with dQ added by the Triton dK/dV kernel (``switches``)."""
    return {**found, SM90_BACKWARD: found["maskc"], SM90_PERSISTENT: found["maskc"], DQ_ATOMIC: found["maskc"]}


def switches(name: str):
    """The environment a tool's calls run in: ``MASKC_GLUON_BACKWARD=1`` for ``SM90_BACKWARD``,
    ``MASKC_DQ_ATOMIC=1`` for ``DQ_ATOMIC`` (read at each call); for ``SM90_PERSISTENT`` the first and the
    persistent kernels, through hopper_bench's ``variant`` (which sets them and clears the kept
    launches, whose keys do not hold them)."""
    if name == SM90_PERSISTENT:
        import hopper_bench  # here: its imports (gpu_bench's flex, FA4 lookups) serve this row alone

        return hopper_bench.variant({"PERSISTENT": True, "DQ_PERSISTENT": True, "DKDV_PERSISTENT": True})
    return mock.patch.dict(os.environ, {SM90_BACKWARD: {"MASKC_GLUON_BACKWARD": "1"},
                                        DQ_ATOMIC: {"MASKC_DQ_ATOMIC": "1"}}.get(name, {}))


# -- host time ---------------------------------------------------------------------------------
def per_call_us(fn, calls: int = 200) -> float:
    """Microseconds per call of ``fn`` run back to back (the GPU keeps up: this is host time)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def profile_host(calls: int = 300) -> None:
    """Where the host time of maskc's eager calls goes: each layer of the call path timed alone
    (1K tokens, causal), then cProfile's top entries of the forward and the training step."""
    import cProfile
    import pstats

    from maskc.codegen import launch, op

    length = 1024
    q, k, v = inputs(length)
    grad = torch.randn_like(q)
    cm = tools([length], length)["maskc"]
    out, lse = cm(q, k, v, return_lse=True)
    call = op._call(cm, q, k, v, None)
    structure, (tables, patterns), scale = op.structure_of(call.key), call.tables, call.default_scale
    d_lse = torch.zeros_like(lse)
    layers = {
        "torch.empty (one output)": lambda: torch.empty_like(q),
        "launch.forward": lambda: launch.forward(structure, tables, patterns, q, k, v, scale),
        "op._forward": lambda: op._forward(call.tables, call.backend, call.key, q, k, v, scale),
        "cm(q, k, v) without grad": None,
        "cm(q, k, v)": lambda: cm(q, k, v),
        "launch.backward": lambda: launch.backward(structure, tables, patterns, q, k, v, out, lse, grad, d_lse,
                                                   scale),
        "step: cm(q, k, v), backward": lambda: torch.autograd.backward(cm(q, k, v), grad),
        "SDPA step": lambda: torch.autograd.backward(F.scaled_dot_product_attention(q, k, v, is_causal=True), grad),
    }
    for label, fn in layers.items():
        if fn is None:
            with torch.no_grad():
                us = per_call_us(lambda: cm(q, k, v))
        else:
            us = per_call_us(fn)
        print(f"{label:32s} {us:7.1f} us", flush=True)
    fresh = inputs(length, seed=1)  # tensors no earlier backward accumulated into (a graph cannot capture that)
    for label, attend in (("maskc", cm), ("SDPA", lambda q, k, v: F.scaled_dot_product_attention(q, k, v,
                                                                                                  is_causal=True))):
        replay = graphed(lambda: torch.autograd.grad(attend(*fresh), fresh, grad))
        print(f"GPU time of a {label} step (CUDA graph replay): {median_ms(replay) * 1e3:.1f} us", flush=True)
    for label, fn in (("forward", lambda: cm(q, k, v)),
                      ("step", lambda: torch.autograd.backward(cm(q, k, v), grad))):
        per_call_us(fn, 20)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            fn()
        profiler.disable()
        torch.cuda.synchronize()
        print(f"--- {label}: {calls} calls")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(22)


def host_times(report: list, before) -> None:
    length = 1024
    q, k, v = inputs(length)
    grad = torch.randn_like(q)
    found = tools([length], length, before)
    found["sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for name, attend in found.items():
        with torch.no_grad():
            fwd_nograd = per_call_us(lambda: attend(q, k, v))
        fwd = per_call_us(lambda: attend(q, k, v))
        step = per_call_us(lambda: torch.autograd.backward(attend(q, k, v), grad))
        report.append((name, fwd_nograd, fwd, step))
        print("host", name, f"{fwd_nograd:.0f} {fwd:.0f} {step:.0f} us", flush=True)


# -- short sequences ------------------------------------------------------------------------------
def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def graphed(fn):
    """``fn`` captured in a CUDA graph (after warm-up on a side stream); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def short_sequences(report: list, before) -> None:
    length, rng = 8192, np.random.default_rng(0)
    q, k, v = inputs(length)
    grad = torch.randn_like(q)
    for n_docs in (4, 8):
        lengths = document_lengths(length, n_docs, rng)
        for name, attend in with_backward_variants(tools(lengths, length, before)).items():
            def step():
                out = attend(q, k, v)
                torch.autograd.grad(out, (q, k, v), grad)

            with switches(name):
                eager = median_ms(step)
                fwd = median_ms(lambda: attend(q, k, v))
                fresh = inputs(length, seed=1)  # leaves no eager step used: their grad accumulators are on no stream
                try:
                    in_graph = median_ms(graphed(lambda: torch.autograd.grad(attend(*fresh), fresh, grad)))
                except Exception as error:  # noqa: BLE001 - report a tool that cannot be captured
                    print(f"{name}: CUDA graph capture failed: {type(error).__name__}: {error}", flush=True)
                    traceback.print_exc()
                    in_graph = float("nan")
            report.append((f"{n_docs} documents", name, fwd, eager, in_graph))
            print("8K", n_docs, name, f"fwd {fwd:.3f} step {eager:.3f} graph {in_graph:.3f} ms", flush=True)


# -- 128K --------------------------------------------------------------------------------------------
def long_sequences(report: list, before) -> None:
    length, rng = 131072, np.random.default_rng(1)
    q, k, v = inputs(length)
    grad = torch.randn_like(q)
    lengths = [length]
    for mask in ("causal", "doc-causal"):
        if mask == "doc-causal":
            lengths = []
            while sum(lengths) < length:
                lengths.append(int(rng.integers(512, 4097)))
            lengths[-1] -= sum(lengths) - length
        for name, attend in with_backward_variants(tools(lengths, length, before)).items():
            with switches(name):
                fwd = median_ms(lambda: attend(q, k, v))
                out = attend(q, k, v)
                bwd = median_ms(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True))
            report.append((mask, name, fwd, bwd))
            print("128K", mask, name, f"fwd {fwd:.2f} bwd {bwd:.2f} ms", flush=True)


# -- report ---------------------------------------------------------------------------------------------
def tables(hosts, shorts, longs) -> str:
    out = []
    if hosts:
        out += ["Host time per call, 1K tokens (us; the GPU work is microseconds).", "",
                "| tool | forward, no grad | forward | forward + backward |", "|---|---|---|---|"]
        out += [f"| {n} | {a:.0f} | {b:.0f} | {c:.0f} |" for n, a, b, c in hosts]
    if shorts:
        flex = {r[0]: r for r in shorts if r[1] == "flex"}
        out += ["", "8K tokens, documents with causal inside: ms (median); ratio = flex / tool, same run.", "",
                "| mask | tool | forward | fwd + bwd eager | ratio | fwd + bwd in a CUDA graph | ratio |",
                "|---|---|---|---|---|---|---|"]
        for mask, name, fwd, eager, graph in shorts:
            f = flex[mask]
            out.append(f"| {mask} | {name} | {fwd:.3f} | {eager:.3f} | {f[3] / eager:.2f}x | {graph:.3f} | "
                       f"{f[4] / graph:.2f}x |")
    if longs:
        flex = {r[0]: r for r in longs if r[1] == "flex"}
        out += ["", "128K tokens: ms (median); ratio = flex / tool, same run.", "",
                "| mask | tool | forward | backward | fwd ratio | bwd ratio |", "|---|---|---|---|---|---|"]
        out += [f"| {m} | {n} | {f:.2f} | {b:.2f} | {flex[m][2] / f:.2f}x | {flex[m][3] / b:.2f}x |"
                for m, n, f, b in longs]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", nargs="*", default=[], choices=["host", "short", "long"])
    parser.add_argument("--before", help="a folder holding maskc_before, the package of an earlier commit")
    parser.add_argument("--write", action="store_true", help="add the run to bench/RESULTS.md")
    parser.add_argument("--profile", action="store_true", help="cProfile the host path of maskc's calls, then stop")
    args = parser.parse_args()
    if args.profile:
        profile_host()
        return
    before = None
    if args.before:
        sys.path.insert(0, args.before)
        before = importlib.import_module("maskc_before")
    print(gpu_machine(), flush=True)
    hosts, shorts, longs = [], [], []
    for name, run, rows in (("host", host_times, hosts), ("short", short_sequences, shorts),
                            ("long", long_sequences, longs)):
        if name not in args.skip:
            run(rows, before)
    text = tables(hosts, shorts, longs)
    if args.write:
        add_command_run(SECTION, gpu_machine(), text)
    print(text)


if __name__ == "__main__":
    main()
