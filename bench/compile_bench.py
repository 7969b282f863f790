"""Compile time and peak extra memory of maskc beside FlexAttention's ``create_block_mask``.

    python bench/compile_bench.py                  # print the measurements and a table
    python bench/compile_bench.py --results        # also write them into bench/RESULTS.md

What is measured, per mask kind (causal, document-causal with seeded documents
of 512 to 16K tokens, sliding window of 4096 keys) and length (16K to 1M
tokens), at block size 128 on one CPU thread:

* maskc: ``maskc.compile(spec, 128)``, which builds the block map (as runs of
  FULL and PARTIAL tiles), the empty rows and columns and both index tables
  (forward and backward). Memory: its first call on the spec (after a warm-up
  at 4K tokens). Time: the median of ``--repeats`` further calls.
* FlexAttention: ``create_block_mask(mask_mod, None, None, n, n, device="cpu",
  BLOCK_SIZE=128)`` with the same mask as a ``mask_mod``, timed once after a
  warm-up at 1K tokens; only at the lengths it can reach (16K and 32K; 64K
  and up are attempted only if the memory expected from the 32K run, which
  grows with ``n**2``, fits in 80% of the machine's available memory).

Every measurement runs in its own child process, so that one tool's memory
cannot hide another's and an out-of-memory kill cannot end the run. Memory is
the peak resident set size (``VmHWM``) of that child during the call minus its
resident size just before (the peak is reset through ``/proc/self/clear_refs``
first): it counts numpy, torch and Python allocations alike. For maskc the
peak of ``tracemalloc`` (numpy and Python allocations) is reported beside it.

One thread: each child runs with ``OMP_NUM_THREADS=MKL_NUM_THREADS=
OPENBLAS_NUM_THREADS=1`` in its environment and calls ``torch.set_num_threads(1)``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

from results import add_run

BLOCK = 128
LENGTHS = [1 << k for k in range(14, 21)]  # 16K .. 1M
KINDS = ("causal", "document_causal", "sliding_window")
WINDOW = 4096
FLEX_SURE = (1 << 14, 1 << 15)  # FlexAttention on the CPU: 16K and 32K; longer only if memory allows
SECTION = "## Compile time (issue 2)"


def document_lengths(n: int, seed: int = 0, low: int = 512, high: int = 16384) -> list[int]:
    """Seeded document lengths of ``low`` to ``high`` (512 to 16K) tokens filling ``n`` (the last one cut to fit)."""
    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    total = 0
    while total < n:
        lengths.append(min(int(rng.integers(low, high + 1)), n - total))
        total += lengths[-1]
    return lengths


def maskc_spec(kind: str, n: int):
    import maskc

    mask = {
        "causal": maskc.Causal(),
        "document_causal": maskc.Documents(lengths=document_lengths(n)) & maskc.Causal(),
        "sliding_window": maskc.SlidingWindow(left=WINDOW - 1),
    }[kind]
    return maskc.Spec(q_len=n, kv_len=n, mask=mask)


def flex_mask_mod(kind: str, n: int):
    if kind == "causal":
        return lambda b, h, q, kv: q >= kv
    if kind == "sliding_window":
        return lambda b, h, q, kv: (q >= kv) & (q - kv < WINDOW)
    lengths = torch.tensor(document_lengths(n))
    doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    return lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv)


# -- one measurement (in a child process) ------------------------------------------------------------


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _peak_extra_mb(fn) -> tuple[object, float]:
    """``fn()`` and its peak resident memory above the resident memory before it (MB)."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
    before = _rss_kib("VmRSS")
    out = fn()
    return out, (_rss_kib("VmHWM") - before) / 1024


def measure(tool: str, kind: str, n: int, repeats: int) -> dict:
    torch.set_num_threads(1)
    if tool == "maskc":
        import maskc

        maskc.compile(maskc_spec(kind, 4096), BLOCK)  # imports and first-call costs, at a small size
        spec = maskc_spec(kind, n)
        # memory first, while the allocator holds no freed memory of earlier compiles at this size
        cm, rss = _peak_extra_mb(lambda: maskc.compile(spec, BLOCK))
        del cm
        tracemalloc.start()
        cm = maskc.compile(spec, BLOCK)
        traced = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            cm = maskc.compile(spec, BLOCK)
            times.append(time.perf_counter() - start)
        tiles = cm.tile_counts()
        return {"seconds": statistics.median(times), "min_seconds": min(times), "peak_mb": rss, "traced_mb": traced,
                "nbytes_mb": cm.nbytes / 2**20, "tiles": tiles["full"] + tiles["partial"]}

    from torch.nn.attention.flex_attention import create_block_mask

    create_block_mask(flex_mask_mod(kind, 1024), None, None, 1024, 1024, device="cpu", BLOCK_SIZE=BLOCK)
    mod = flex_mask_mod(kind, n)
    start = time.perf_counter()
    bm, rss = _peak_extra_mb(lambda: create_block_mask(mod, None, None, n, n, device="cpu", BLOCK_SIZE=BLOCK))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mb": rss, "tiles": int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum())}


def in_child(tool: str, kind: str, n: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--child", tool, kind, str(n), "--repeats", str(repeats)]
    one_thread = {var: "1" for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **one_thread})
    if done.returncode != 0:
        reason = "killed (out of memory?)" if done.returncode < 0 else done.stderr.strip().splitlines()[-1]
        return {"error": reason}
    return json.loads(done.stdout.strip().splitlines()[-1])


def available_mb() -> float:
    return int(re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1)) / 1024


# -- the run --------------------------------------------------------------------------------------


def fmt_n(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 else f"{n >> 10}K"


def run(repeats: int) -> tuple[list[dict], list[str]]:
    rows, notes = [], []
    for kind in KINDS:
        flex_peak = None  # (n, peak MB) of this kind's last FlexAttention run; None stops trying
        for n in LENGTHS:
            ours = in_child("maskc", kind, n, repeats)
            print(f"{kind:16} {fmt_n(n):>5} maskc {1e3 * ours['seconds']:9.1f} ms  peak +{ours['peak_mb']:7.1f} MB "
                  f"(traced {ours['traced_mb']:.1f} MB, nbytes {ours['nbytes_mb']:.1f} MB)", flush=True)
            flex = None
            if n in FLEX_SURE:
                flex = in_child("flex", kind, n, 1)
            elif flex_peak is not None:
                expected = flex_peak[1] * (n / flex_peak[0]) ** 2
                if expected < 0.8 * available_mb():
                    flex = in_child("flex", kind, n, 1)
                else:
                    flex = {"error": f"skipped: needs ~{expected / 1024:.0f} GB"}
                    notes.append(f"FlexAttention {kind} at {fmt_n(n)} and longer skipped: about {expected / 1024:.0f} "
                                 f"GB expected ({(n / flex_peak[0]) ** 2:.0f}x its {fmt_n(flex_peak[0])} peak), "
                                 f"{available_mb() / 1024:.0f} GB available")
            if flex is not None:
                flex_peak = (n, flex["peak_mb"]) if "peak_mb" in flex else None
                if "error" in flex:
                    print(f"{kind:16} {fmt_n(n):>5} flex  {flex['error']}", flush=True)
                else:
                    print(f"{kind:16} {fmt_n(n):>5} flex  {1e3 * flex['seconds']:9.1f} ms  "
                          f"peak +{flex['peak_mb']:7.1f} "
                          f"MB -> maskc {flex['seconds'] / ours['seconds']:,.0f}x faster; same non-empty tiles: "
                          f"{flex['tiles'] == ours['tiles']}", flush=True)
            rows.append({"kind": kind, "n": n, "maskc": ours, "flex": flex})
    return rows, notes


def table(rows: list[dict]) -> str:
    out = [
        "| mask | tokens | maskc compile, median (min) | maskc peak extra RSS | maskc nbytes "
        "| create_block_mask | its peak extra RSS | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m, f = r["maskc"], r["flex"]
        flex_cols = ["-", "", ""] if f is None else [f["error"], "", ""] if "error" in f else [
            f"{f['seconds']:.2f} s", f"{f['peak_mb']:,.0f} MB", f"{f['seconds'] / m['seconds']:,.0f}x"]
        out.append(f"| {r['kind']} | {fmt_n(r['n'])} | {1e3 * m['seconds']:.1f} ({1e3 * m['min_seconds']:.1f}) ms | "
                   f"{m['peak_mb']:.0f} MB | "
                   f"{m['nbytes_mb']:.1f} MB | " + " | ".join(flex_cols) + " |")
    return "\n".join(out)


def machine() -> str:
    cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    load = Path("/proc/loadavg").read_text().split()[0]
    return (f"{cpu.group(1) if cpu else platform.processor()}, `nproc` = {os.cpu_count()}, "
            f"{available_mb() / 1024:.0f} GB available, load average {load} at the start; "
            f"Python {platform.python_version()}, torch {torch.__version__}, "
            f"numpy {np.__version__}")


def targets(rows: list[dict]) -> list[str]:
    by = {(r["kind"], r["n"]): r for r in rows}
    big = by[("document_causal", 1 << 20)]["maskc"]
    small = by[("document_causal", 1 << 14)]
    lines = [
        f"- 1M-token document-causal compile: {1e3 * big['seconds']:.1f} ms (target <= 100 ms): "
        f"{'met' if big['seconds'] <= 0.1 else 'MISSED'}; peak extra memory {big['peak_mb']:.0f} MB "
        f"(target <= 400 MB): {'met' if big['peak_mb'] <= 400 else 'MISSED'}",
    ]
    if small["flex"] and "error" not in small["flex"]:
        ratio = small["flex"]["seconds"] / small["maskc"]["seconds"]
        lines.append(f"- 16K document-causal vs create_block_mask: {ratio:,.0f}x faster (target >= 300x): "
                     f"{'met' if ratio >= 300 else 'MISSED'}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9, help="timed maskc calls per point (median reported)")
    parser.add_argument("--results", action="store_true", help="add the results to bench/RESULTS.md")
    parser.add_argument("--child", nargs=3, metavar=("TOOL", "KIND", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        tool, kind, n = args.child
        print(json.dumps(measure(tool, kind, int(n), args.repeats)))
        return

    command = "python bench/compile_bench.py" + (" --results" if args.results else "") + \
        (f" --repeats {args.repeats}" if args.repeats != 9 else "")
    when = datetime.datetime.now().astimezone().strftime("%a %b %d %H:%M:%S %Z %Y")
    host = machine()
    rows, notes = run(args.repeats)
    report = "\n".join([
        f"Command: `{command}`  ",
        f"Date: {when}  ",
        f"Machine: {host}  ",
        f"Block size {BLOCK}, one CPU thread; maskc time = median (and min) of {args.repeats} compiles "
        "(block map, empty rows/columns, forward and backward tables); create_block_mask timed once; "
        "memory = peak extra resident memory of the call in a fresh process (see the docstring of "
        "bench/compile_bench.py).",
        "",
        *targets(rows),
        *(f"- {note}" for note in notes),
        "",
        table(rows),
    ])
    print()
    print(report)
    if args.results:
        add_run(SECTION, report)


if __name__ == "__main__":
    main()
