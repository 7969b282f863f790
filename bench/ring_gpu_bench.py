#!/usr/bin/env python3
"""Mask-aware ring attention across GPUs with NCCL: correctness, speed and overlap (issues 6, 17).

    python bench/ring_gpu_bench.py                           # every visible GPU (at least 2), one process each
    python bench/ring_gpu_bench.py --results                 # also write the table into bench/RESULTS.md
    torchrun --nproc-per-node 8 bench/ring_gpu_bench.py      # the same under torchrun
    python bench/ring_gpu_bench.py --backend gloo --tiny     # a CPU smoke run (2 processes, tiny sizes)

For causal and document-causal masks (seeded documents of 512 to 16K tokens)
at 128K to 1M tokens, 16 heads, head dim 128, bf16, and each sharding strategy:

* check: at ``--check-tokens`` every rank also runs single-GPU maskc attention
  on the whole sequence and compares its shard of out, dq, dk, dv with
  ``ring_attention``'s (largest absolute difference over all ranks);
* time per step: median over ``--iters`` of forward and of forward+backward,
  slowest rank (every rank starts together after a barrier);
* TFLOP/s per GPU: useful FLOPs (4 x head dim x heads per allowed pair forward,
  3.5 times that forward+backward) over P GPUs and the step time;
* per-GPU efficiency: that over the TFLOP/s of the single-GPU kernel on the
  same per-GPU work (the same mask kind at tokens / P, on one GPU);
* overlap: the share of the ring's communication hidden by compute,
  ``(compute + comm - ring) / comm`` clipped to [0, 1], where compute is this
  rank's tile schedule run without communication (forward, then each tile's
  backward from the merged out and lse, as in ``bench/ring_rehearsal.py``) and
  comm is the ring run with every tile's compute replaced by empty results
  (its K/V and dK/dV shares still travel).

With one GPU it stops and points to ``bench/ring_rehearsal.py``, which runs
every rank's schedule on that GPU and gives the efficiency a multi-GPU ring
can reach at most.

NVLink multicast stays off (``NCCL_NVLS_ENABLE=0``,
``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``, ``NVSHMEM_DISABLE_NVLS=1``, set below
before torch loads). Rank 0 prints a line per measurement and the short table last.
"""

from __future__ import annotations

import os

for _var, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                     ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_var] = _value

import argparse  # noqa: E402
import datetime  # noqa: E402
import math  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import maskc  # noqa: E402 - after the path setup, to bench this checkout
from maskc.distributed import _Ring, compiled_tiles, ring_attention, shard_plan  # noqa: E402
from maskc.passes.shard import STRATEGIES  # noqa: E402
from compile_bench import document_lengths  # noqa: E402 - the documents of bench/plan_bench.py too
from results import add_run  # noqa: E402
from ring_rehearsal import Rank  # noqa: E402 - one rank's tile schedule, as the rehearsal runs it

SECTION = "## Ring attention on GPUs (issue 6)"

KINDS = ("causal", "document_causal")
FULL = {"tokens": [1 << 17, 1 << 18, 1 << 19, 1 << 20], "check_tokens": 1 << 15, "heads": 16, "head_dim": 128,
        "dtype": torch.bfloat16, "min_chunk": 128}
TINY = {"tokens": [192], "check_tokens": 96, "heads": 2, "head_dim": 16, "dtype": torch.float32, "min_chunk": 4}
BACKWARD_FACTOR = 3.5  # forward + backward FLOPs over forward FLOPs


def spec(kind: str, n: int, tiny: bool) -> maskc.Spec:
    if kind == "causal":
        return maskc.Spec(q_len=n, kv_len=n, mask=maskc.Causal())
    lengths = document_lengths(n) if not tiny else [n // 5, n // 3, n - n // 5 - n // 3]
    return maskc.Spec(q_len=n, kv_len=n, mask=maskc.Documents(lengths=lengths) & maskc.Causal())


class Bench:
    """One rank's measurements."""

    def __init__(self, rank: int, world: int, device: torch.device, settings: dict, iters: int, warmup: int):
        self.rank, self.world, self.device, self.s = rank, world, device, settings
        self.iters, self.warmup = iters, warmup

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def max_over_ranks(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def ms(self, fn) -> float:
        """Median milliseconds of ``fn`` on the slowest rank, every rank starting together."""
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.iters):
            self.sync()
            dist.barrier()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(1e3 * (time.perf_counter() - start))
        return self.max_over_ranks(statistics.median(times))

    def tensors(self, n_q: int, n_kv: int, seed: int):
        g = torch.Generator(device=self.device).manual_seed(seed)
        h, d, dtype = self.s["heads"], self.s["head_dim"], self.s["dtype"]
        q = torch.randn(1, h, n_q, d, generator=g, device=self.device, dtype=dtype)
        k, v = (torch.randn(1, h, n_kv, d, generator=g, device=self.device, dtype=dtype) for _ in range(2))
        return q, k, v

    def flops(self, pairs: int) -> float:
        return 4.0 * self.s["head_dim"] * self.s["heads"] * pairs

    # -- correctness ------------------------------------------------------------------------
    def check(self, kind: str, strategy: str) -> float:
        """Largest difference between ring and single-GPU out, dq, dk, dv (all ranks)."""
        n = self.s["check_tokens"]
        s = spec(kind, n, self.s is TINY)
        plan = shard_plan(s, self.world, strategy, min_chunk=self.s["min_chunk"])
        q, k, v = self.tensors(n, n, seed=1)  # the same on every rank: seeded generator
        d_out = self.tensors(n, n, seed=2)[0]
        whole = [x.clone().requires_grad_() for x in (q, k, v)]
        expected = maskc.compile(s)(*whole)
        expected.backward(d_out)
        local = [plan.shard(x, self.rank).detach().clone().requires_grad_() for x in (q, k, v)]
        out = ring_attention(*local, plan)
        out.backward(plan.shard(d_out, self.rank))
        pairs = [(out, expected)] + [(mine.grad, full.grad) for mine, full in zip(local, whole)]
        error = max((a.float() - plan.shard(b, self.rank).float()).abs().max().item() for a, b in pairs)
        return self.max_over_ranks(error)

    # -- speed ------------------------------------------------------------------------------
    def single_gpu_tflops(self, kind: str, n: int) -> float:
        """Forward+backward TFLOP/s of the single-GPU kernel on ``n // P`` tokens of the same kind (rank 0)."""
        value = 0.0
        if self.rank == 0:
            s = spec(kind, n // self.world, self.s is TINY)
            op = maskc.compile(s)
            q, k, v = (x.requires_grad_() for x in self.tensors(s.q_len, s.kv_len, seed=3))
            d_out = torch.randn_like(q)
            step = self._ms_local(lambda: torch.autograd.grad(op(q, k, v), (q, k, v), d_out))
            value = BACKWARD_FACTOR * self.flops(op.allowed_pairs()) / (step * 1e-3) / 1e12
        dist.barrier()
        return value

    def _ms_local(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.iters):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(1e3 * (time.perf_counter() - start))
        return statistics.median(times)

    def compute_only_ms(self, plan) -> tuple[float, float]:
        """Forward and forward+backward milliseconds of this rank's tile schedule with no communication
        (``ring_rehearsal.Rank``: the tiles' forward merged, then each tile's backward from the merged
        out and lse, as the ring runs them)."""
        me, n = self.rank, plan.shard_lengths
        q = self.tensors(int(n[me]), 1, seed=0)[0]
        kv = {s: self.tensors(1, int(n[s]), seed=s)[1:] for s in range(self.world)}
        shards = {"q": {me: q}, "d_out": {me: torch.randn_like(q)}, "k": {s: x[0] for s, x in kv.items()},
                  "v": {s: x[1] for s, x in kv.items()}}
        rank = Rank(plan, me, shards, 128)
        return self.ms(rank.forward), self.ms(lambda: rank.step(lambda: None))

    def comm_only_ms(self, plan, q, k, v) -> tuple[float, float]:
        """Forward and forward+backward milliseconds of the ring's transfers, every tile's compute
        replaced by empty results of its shapes (the K/V and the dK/dV shares still travel)."""
        ring = _Ring(plan, None, 128)
        ring.tiles = tuple(None if op is None else NoCompute() for op in ring.tiles)
        scale = 1.0 / math.sqrt(q.shape[-1])
        out, lse = ring.forward(q, k, v, scale)
        d_out, d_lse = torch.ones_like(out), torch.zeros_like(lse)
        return (self.ms(lambda: ring.forward(q, k, v, scale)),
                self.ms(lambda: (ring.forward(q, k, v, scale), ring.backward(q, k, v, out, lse, d_out, d_lse, scale))))

    def run(self, kind: str, n: int, strategy: str, single: float) -> dict:
        s = spec(kind, n, self.s is TINY)
        plan = shard_plan(s, self.world, strategy, min_chunk=self.s["min_chunk"])
        n_local = int(plan.shard_lengths[self.rank])
        q, k, v = (x.requires_grad_() for x in self.tensors(n_local, n_local, seed=10 + self.rank))
        d_out = torch.randn_like(q)
        forward = self.ms(lambda: ring_attention(q, k, v, plan))
        step = self.ms(lambda: torch.autograd.grad(ring_attention(q, k, v, plan), (q, k, v), d_out))
        compute_fwd, compute_step = self.compute_only_ms(plan)
        comm_fwd, comm_step = self.comm_only_ms(plan, q.detach(), k.detach(), v.detach())
        per_gpu = BACKWARD_FACTOR * self.flops(int(plan.work.sum())) / self.world / (step * 1e-3) / 1e12
        hidden = (compute_step + comm_step - step) / comm_step if comm_step > 0 else 1.0
        return {"kind": kind, "tokens": n, "strategy": strategy, "imbalance": plan.imbalance, "fwd_ms": forward,
                "step_ms": step, "tflops": per_gpu, "single": single, "ratio": per_gpu / single if single else 0.0,
                "compute_ms": compute_step, "comm_ms": comm_step, "overlap": min(max(hidden, 0.0), 1.0)}


class NoCompute:
    """Stands in for a tile's op in communication-only timing: results of the right shapes, no attention."""

    def __call__(self, q, k, v, scale=None, return_lse=False):
        rows = q.shape[:-1]
        return q.new_zeros(rows + (v.shape[-1],)), q.new_full(rows, -math.inf, dtype=torch.float32)

    def backward(self, q, k, v, out, lse, d_out, d_lse=None, scale=None):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def table(rows: list[dict], world: int, device_name: str) -> str:
    lines = [f"ring attention over {world} x {device_name}, fwd+bwd step (slowest rank, median); overlap = share "
             "of communication hidden by compute",
             "| mask | tokens | strategy | busiest/mean | fwd ms | step ms | TFLOP/s per GPU | single-GPU TFLOP/s | "
             "per-GPU efficiency | compute ms | comm ms | overlap |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        tokens = f"{r['tokens'] // 1024}K" if r["tokens"] >= 1024 else str(r["tokens"])
        lines.append(f"| {r['kind'].replace('_', '-')} | {tokens} | {r['strategy']} | "
                     f"{r['imbalance']:.3f} | {r['fwd_ms']:.1f} | {r['step_ms']:.1f} | {r['tflops']:.1f} | "
                     f"{r['single']:.1f} | {r['ratio']:.2f} | {r['compute_ms']:.1f} | {r['comm_ms']:.1f} | "
                     f"{r['overlap']:.0%} |")
    return "\n".join(lines)


def main_worker(rank: int, world: int, args, init_method: str) -> None:
    settings = TINY if args.tiny else FULL
    if args.backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    dist.init_process_group(args.backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=10))
    bench = Bench(rank, world, device, settings, iters=args.iters, warmup=args.warmup)
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        for kind in KINDS:
            for strategy in args.strategies:
                error = bench.check(kind, strategy)
                say(f"check {kind} {strategy} at {settings['check_tokens']} tokens: max |ring - single-GPU| "
                    f"over out, dq, dk, dv = {error:.2e}", flush=True)
        rows = []
        for kind in KINDS:
            for n in (args.tokens or settings["tokens"]):
                single = bench.single_gpu_tflops(kind, n)
                single = bench.max_over_ranks(single)  # rank 0 measured it; the others hold 0
                for strategy in args.strategies:
                    row = bench.run(kind, n, strategy, single)
                    rows.append(row)
                    say(f"{kind} {n} {strategy}: step {row['step_ms']:.1f} ms, {row['tflops']:.1f} TFLOP/s per "
                        f"GPU (per-GPU efficiency {row['ratio']:.2f}), overlap {row['overlap']:.0%}", flush=True)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (gloo)"
        text = table(rows, world, name)
        say("", text, sep="\n", flush=True)
        if args.results and rank == 0:
            when = datetime.datetime.now().astimezone().strftime("%a %b %d %H:%M:%S %Z %Y")
            command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
            add_run(SECTION, f"Command: `{command}`  \nDate: {when}  \nNCCL_NVLS_ENABLE=0, "
                          f"TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1\n\n{text}")
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["nccl", "gloo"], default="nccl")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, float32 (for a CPU smoke run)")
    parser.add_argument("--nprocs", type=int, help="processes to spawn (default: every GPU; 2 with gloo)")
    parser.add_argument("--tokens", type=int, nargs="+", help="sequence lengths (default 128K 256K 512K 1M)")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--results", action="store_true", help="write the table into bench/RESULTS.md")
    args = parser.parse_args()
    if args.tiny:
        args.iters, args.warmup = min(args.iters, 2), min(args.warmup, 1)
    if "RANK" in os.environ:  # under torchrun
        main_worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, "env://")
        return
    world = args.nprocs or (torch.cuda.device_count() if args.backend == "nccl" else 2)
    if world < 2:
        parser.error(f"{torch.cuda.device_count()} CUDA device(s) visible: a ring needs at least 2. On one GPU, "
                     "bench/ring_rehearsal.py runs every rank's tile schedule and reports the efficiency a ring can "
                     "reach; on the CPU, run this with --backend gloo --tiny")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(main_worker, args=(world, args, f"tcp://127.0.0.1:{port}"), nprocs=world)


if __name__ == "__main__":
    main()
