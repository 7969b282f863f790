#!/usr/bin/env python3
"""One-GPU rehearsal of ring attention (issue 17): every rank's tile schedule, one rank after another.

    python bench/ring_rehearsal.py                         # one GPU: P = 4, 8 at 128K and 512K document-causal
    python bench/ring_rehearsal.py --write                 # also record the table in bench/RESULTS.md
    python bench/ring_rehearsal.py --tokens 131072 --worlds 4 --strategies balanced --iters 2   # shorter
    python bench/ring_rehearsal.py --device cpu --tiny     # CPU, reference path, tiny sizes (checks the script)

For each sequence length (documents of seeded random lengths, 512 to 16K
tokens, 16 to 512 with ``--tiny``, causal inside each), world size P and sharding strategy, the plan's
schedule runs rank by rank on one device, with no communication: rank ``r``'s
forward (its tiles' ops, merged by log-sum-exp as ``ring_attention`` merges
them) and its backward from the merged ``out``/``lse`` (each tile's
``CompiledMask.backward``: dQ summed, dK/dV shares added to their shard's),
timed with CUDA events (median of ``--iters`` after one warm-up). Reported:

* per rank: forward and backward compute ms, tiles run, allowed pairs;
* busiest/mean of the ranks' measured time and of their allowed pairs;
* work against single-device attention: allowed pairs, and visited tile area
  (the FULL and PARTIAL tiles' in-range positions: what the kernels iterate
  over), both summed over all ranks' tiles;
* the ranks' time summed against single-device forward + backward-from-saved
  of the whole sequence, and ``bound = single / (P x busiest)``: the per-GPU
  efficiency a P-GPU ring reaches at most, with all communication hidden;
* error: the rehearsal's out, lse, dq, dk, dv, assembled from every rank,
  against single-device attention (largest ``|a - b| / max |b|``).

Targets: busiest/mean <= 1.05 and work <= 1.05x single-device for
document-causal. The table is printed last; ``--write`` adds it to
bench/RESULTS.md. The first call of each tile structure compiles its Triton
kernels; the compile seconds are reported apart and not timed.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import maskc  # noqa: E402 - after the path setup, to bench this checkout
from maskc.distributed import Partials, compiled_tiles, shard_plan  # noqa: E402
from maskc.passes.shard import STRATEGIES  # noqa: E402
from compile_bench import document_lengths, machine  # noqa: E402
from results import add_run  # noqa: E402

SECTION = "## Ring attention rehearsal on one GPU (issue 17)"
GPU = {"tokens": [1 << 17, 1 << 19], "worlds": [4, 8], "heads": 16, "head_dim": 128, "dtype": torch.bfloat16,
       "min_chunk": 128, "block_size": 128, "documents": (512, 16384)}
TINY = {"tokens": [2048], "worlds": [4, 8], "heads": 2, "head_dim": 16, "dtype": torch.float32, "min_chunk": 32,
        "block_size": 32, "documents": (16, 512)}


def document_causal(n: int, seed: int, documents: tuple[int, int]) -> maskc.Spec:
    lengths = document_lengths(n, seed, *documents)
    return maskc.Spec(q_len=n, kv_len=n, mask=maskc.Documents(lengths=lengths) & maskc.Causal())


def visited(cm: maskc.CompiledMask) -> int:
    """In-range positions of the FULL and PARTIAL tiles, summed over the mask's heads."""
    return sum(cm.tile_area(cm.block_maps[s].full) + cm.tile_area(cm.block_maps[s].partial)
               for s in cm.table.head_slot.tolist())


class Clock:
    """Milliseconds of a function: CUDA events on a GPU, the wall clock on the CPU."""

    def __init__(self, device: torch.device, iters: int):
        self.device, self.iters = device, iters

    def ms(self, fn) -> list[float]:
        """Median milliseconds of each phase ``fn`` marks: ``fn(mark)`` calls ``mark()`` between phases."""
        runs = []
        for _ in range(self.iters):
            if self.device.type == "cuda":
                events = [torch.cuda.Event(enable_timing=True)]
                events[0].record()

                def mark():
                    events.append(torch.cuda.Event(enable_timing=True))
                    events[-1].record()

                fn(mark)
                torch.cuda.synchronize(self.device)
                runs.append([a.elapsed_time(b) for a, b in zip(events, events[1:])])
            else:
                stamps = [time.perf_counter()]
                fn(lambda: stamps.append(time.perf_counter()))
                runs.append([1e3 * (b - a) for a, b in zip(stamps, stamps[1:])])
        return [statistics.median(phase) for phase in zip(*runs)]


class Rank:
    """One rank's tile schedule: its queries against the K/V shard of each ring step with work."""

    def __init__(self, plan, rank: int, shards: dict, block_size: int):
        self.plan, self.rank = plan, rank
        self.q, self.v, self.d_out = shards["q"][rank], shards["v"][rank], shards["d_out"][rank]
        self.tiles = [(op, plan.source(rank, step)) for step, op in
                      enumerate(compiled_tiles(plan, rank, block_size)) if op is not None]
        self.kv = {s: (shards["k"][s], shards["v"][s]) for _, s in self.tiles}

    def forward(self):
        merged = Partials(self.q, self.v)
        for op, source in self.tiles:
            merged.add(*op(self.q, *self.kv[source], return_lse=True))
        return merged.result()

    def backward(self, out, lse):
        """``dq`` and the dK/dV share of each source shard."""
        dq, shares = torch.zeros_like(self.q, dtype=torch.float32), {}
        for op, source in self.tiles:
            _, share_k, share_v = op.backward(self.q, *self.kv[source], out, lse, self.d_out, dq_sum=dq)
            shares[source] = (share_k, share_v)
        return dq, shares

    def step(self, mark):
        out, lse = self.forward()
        mark()
        self.backward(out, lse)
        mark()

    def tile_step(self, mark):
        """``step`` with a mark after each tile's op, merge and backward (``--tiles``)."""
        merged = Partials(self.q, self.v)
        for op, source in self.tiles:
            part = op(self.q, *self.kv[source], return_lse=True)
            mark()
            merged.add(*part)
            mark()
        out, lse = merged.result()
        dq = torch.zeros_like(self.q, dtype=torch.float32)
        for op, source in self.tiles:
            op.backward(self.q, *self.kv[source], out, lse, self.d_out, dq_sum=dq)
            mark()

    def tile_lines(self, clock) -> list[str]:
        """Per tile: the op's forward, the merge and the backward (ms), its pairs and tiles."""
        times = clock.ms(self.tile_step)
        n = len(self.tiles)
        fwd, bwd = times[:2 * n], times[2 * n:]
        lines = []
        for t, (op, source) in enumerate(self.tiles):
            counts = op.tile_counts()
            lines.append(f"    tile {t} (keys of rank {source}): fwd {fwd[2 * t]:6.3f} merge {fwd[2 * t + 1]:6.3f} "
                         f"bwd {bwd[t]:6.3f} ms; pairs {op.allowed_pairs()}, "
                         f"blocks {counts['full']} full {counts['partial']} partial, "
                         f"{op.q_len} x {op.kv_len}")
        return lines


def single_device(spec, tensors, block_size, clock):
    """Whole-sequence forward and backward-from-saved: results and ``[fwd ms, bwd ms]``."""
    cm = maskc.compile(spec, block_size=block_size)
    q, k, v, d_out = (tensors[name] for name in ("q", "k", "v", "d_out"))
    out, lse = cm(q, k, v, return_lse=True)
    grads = cm.backward(q, k, v, out, lse, d_out)

    def step(mark):
        o, l = cm(q, k, v, return_lse=True)
        mark()
        cm.backward(q, k, v, o, l, d_out)
        mark()

    return cm, (out, lse, *grads), clock.ms(step)


def rehearse(spec, p: int, strategy: str, tensors: dict, single, settings: dict, clock: Clock,
             tiles: bool = False) -> dict:
    plan = shard_plan(spec, p, strategy, min_chunk=settings["min_chunk"])
    shards = {name: [plan.shard(x, r) for r in range(p)] for name, x in tensors.items()}
    start = time.perf_counter()
    ranks = [Rank(plan, r, shards, settings["block_size"]) for r in range(p)]
    results = []
    for rank in ranks:  # untimed: compiles each tile structure's kernels, and gives the results to check
        out, lse = rank.forward()
        results.append((out, lse, *rank.backward(out, lse)))
    if clock.device.type == "cuda":
        torch.cuda.synchronize(clock.device)
    compile_s = time.perf_counter() - start
    times = [clock.ms(rank.step) for rank in ranks]
    if tiles:
        for rank in ranks:
            print(f"  rank {rank.rank}:", *rank.tile_lines(clock), sep="\n", flush=True)
    cm, expected, single_ms = single
    pairs = [sum(op.allowed_pairs() for op, _ in rank.tiles) for rank in ranks]
    area = sum(visited(op) for rank in ranks for op, _ in rank.tiles)
    total = [sum(t) for t in times]
    return {"tokens": spec.q_len, "p": p, "strategy": strategy, "times": times, "pairs": pairs,
            "tiles": [len(rank.tiles) for rank in ranks], "compile_s": compile_s,
            "time_ratio": max(total) / statistics.mean(total), "pair_ratio": max(pairs) / statistics.mean(pairs),
            "work": sum(pairs) / cm.allowed_pairs(), "area": area / visited(cm),
            "sum_vs_single": sum(total) / sum(single_ms), "bound": sum(single_ms) / (p * max(total)),
            "single_ms": sum(single_ms), "error": error(plan, results, expected)}


def error(plan, results, expected) -> float:
    """Largest ``|a - b| / max |b|`` over out, lse, dq, dk, dv assembled from every rank's results."""
    out = plan.unshard([r[0] for r in results])
    lse = plan.unshard([r[1] for r in results], dim=-1)
    dq = plan.unshard([r[2] for r in results])
    dk, dv = (torch.zeros_like(x, dtype=torch.float32) for x in expected[3:])
    for rank_results in results:
        for source, (share_k, share_v) in rank_results[3].items():
            where = torch.from_numpy(plan.positions(source)).to(dk.device)
            dk.index_add_(2, where, share_k.float())
            dv.index_add_(2, where, share_v.float())
    worst = 0.0
    for got, want in zip((out, lse, dq, dk, dv), expected):
        finite = torch.isfinite(want)  # lse: -inf on rows that attend nothing, in both
        assert torch.equal(finite, torch.isfinite(got)), "rows that attend nothing differ"
        scale = torch.where(finite, want, 0).abs().max().item() or 1.0  # no boolean indexing: its indices
        largest = 0.0  # of 512K tokens' gradients take 32 GiB; float64 copies a head at a time
        for h in range(want.shape[1]):
            diff = torch.where(finite[:, h], got[:, h].double() - want[:, h].double(), 0.0)
            largest = max(largest, diff.abs().max().item())
        worst = max(worst, largest / scale)
    return worst


def rank_lines(row: dict) -> list[str]:
    lines = [f"document-causal {row['tokens']} tokens, P={row['p']}, {row['strategy']}: "
             f"busiest/mean time {row['time_ratio']:.3f}, pairs {row['pair_ratio']:.3f}; work {row['work']:.3f}x "
             f"pairs, {row['area']:.3f}x tile area of single-device; ranks' sum {row['sum_vs_single']:.3f}x "
             f"single-device's {row['single_ms']:.2f} ms; bound {row['bound']:.3f}; error {row['error']:.1e}; "
             f"first calls {row['compile_s']:.1f} s"]
    for r, ((fwd, bwd), tiles, pairs) in enumerate(zip(row["times"], row["tiles"], row["pairs"])):
        lines.append(f"  rank {r}: fwd {fwd:8.2f} ms  bwd {bwd:8.2f} ms  total {fwd + bwd:8.2f} ms  "
                     f"tiles {tiles:2d}  pairs {pairs}")
    return lines


def table(rows: list[dict], device: str, settings: dict) -> str:
    lines = [f"every rank's tile schedule in sequence on one {device}; document-causal, {settings['heads']} heads x "
             f"{settings['head_dim']}, {str(settings['dtype']).replace('torch.', '')}; time = forward + "
             "backward-from-saved compute (median); bound = single / (P x busiest)",
             "| tokens | P | strategy | busiest/mean time | busiest/mean pairs | pairs vs single | tile area vs "
             "single | sum of ranks vs single | single ms | bound | max rel. error |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        tokens = f"{r['tokens'] // 1024}K" if r["tokens"] >= 1024 else str(r["tokens"])
        lines.append(f"| {tokens} | {r['p']} | {r['strategy']} | {r['time_ratio']:.3f} | {r['pair_ratio']:.3f} | "
                     f"{r['work']:.3f} | {r['area']:.3f} | {r['sum_vs_single']:.3f} | {r['single_ms']:.1f} | "
                     f"{r['bound']:.3f} | {r['error']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (the reference path)")
    parser.add_argument("--tiny", action="store_true", help="2K tokens, 2 heads x 16, float32, block size 32")
    parser.add_argument("--tokens", type=int, nargs="+", help="sequence lengths (default 128K 512K)")
    parser.add_argument("--worlds", type=int, nargs="+", help="world sizes (default 4 8)")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES[::-1]),
                        help="default: balanced (the target's), zigzag, contiguous")
    parser.add_argument("--heads", type=int, help="query and key/value heads (default 16)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="seed of the document lengths and the tensors")
    parser.add_argument("--write", action="store_true", help="add the table to bench/RESULTS.md")
    parser.add_argument("--tiles", action="store_true", help="also time each rank's tiles one by one")
    args = parser.parse_args()
    settings = dict(TINY if args.tiny else GPU)
    settings["heads"] = args.heads or settings["heads"]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device is visible; run with --device cpu --tiny")
    if device.type == "cpu" and settings["dtype"] != torch.float32:
        settings["dtype"] = torch.float32  # the reference path; bf16 on the CPU would only be slower
    clock = Clock(device, args.iters)
    rows = []
    for n in args.tokens or settings["tokens"]:
        spec = document_causal(n, args.seed, settings["documents"])
        g = torch.Generator(device=device).manual_seed(args.seed)
        shape = (1, settings["heads"], n, settings["head_dim"])
        tensors = {name: torch.randn(shape, generator=g, device=device, dtype=settings["dtype"])
                   for name in ("q", "k", "v", "d_out")}
        single = single_device(spec, tensors, settings["block_size"], clock)
        for p in args.worlds or settings["worlds"]:
            for strategy in args.strategies:
                row = rehearse(spec, p, strategy, tensors, single, settings, clock, args.tiles)
                rows.append(row)
                print("\n".join(rank_lines(row)), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({machine()})"
    text = table(rows, name, settings)
    print("", text, sep="\n")
    if args.write:
        when = datetime.datetime.now().astimezone().strftime("%a %b %d %H:%M:%S %Z %Y")
        command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
        add_run(SECTION, f"Command: `{command}`  \nDate: {when}  \nMachine: {name}\n\n{text}")


if __name__ == "__main__":
    main()
