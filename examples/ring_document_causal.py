"""Ring attention over 3 processes (gloo, CPU) on the mask of xformers issue 995.

Three packed documents of 5, 4 and 3 tokens, causal inside each, 12 tokens split
contiguously over 3 ranks (4 tokens each). Below the diagonal the tiles have
queries that attend nothing and keys nobody attends; above it they are empty
and never run, and rank 2's shard is never sent anywhere. The script prints
each rank's tile at each ring step, runs ``ring_attention`` forward and
backward, and checks it against single-process attention.

    python examples/ring_document_causal.py
"""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import maskc
from maskc.distributed import compiled_tiles, ring_attention, shard_plan

SPEC = maskc.Spec(q_len=12, kv_len=12, mask=maskc.Documents(lengths=[5, 4, 3]) & maskc.Causal())
WORLD = 3
BLOCK = 1  # one token per tile of the block map, so the pictures show every pair


def print_tiles(plan) -> None:
    for rank in range(WORLD):
        ops = compiled_tiles(plan, rank, BLOCK)
        for step in range(WORLD):
            source = plan.source(rank, step)
            where = f"rank {rank} (tokens {plan.positions(rank).tolist()}), step {step}, keys of rank {source}"
            if step >= plan.n_steps or ops[step] is None:
                print(f"{where}: EMPTY, skipped\n")
                continue
            sent = "sent on to the next rank" if plan.forwards(rank, step) else "not sent further"
            print(f"{where}: {plan.tile(rank, step).work} allowed pairs; this K/V shard is then {sent}")
            ops[step].show()
            print()


def run(rank: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    plan = shard_plan(SPEC, WORLD, "contiguous")
    if rank == 0:
        print_tiles(plan)
    g = torch.Generator().manual_seed(0)
    q, k, v, d_out = (torch.randn(1, 2, 12, 16, generator=g, dtype=torch.float64) for _ in range(4))

    whole = [x.clone().requires_grad_() for x in (q, k, v)]
    expected = maskc.compile(SPEC)(*whole)
    expected.backward(d_out)

    local = [plan.shard(x, rank).clone().requires_grad_() for x in (q, k, v)]
    out = ring_attention(*local, plan, block_size=BLOCK)
    out.backward(plan.shard(d_out, rank))
    errors = [(out - plan.shard(expected, rank)).abs().max()]
    errors += [(mine.grad - plan.shard(full.grad, rank)).abs().max() for mine, full in zip(local, whole)]
    error = torch.stack(errors).max().item()
    dist.barrier()
    print(f"rank {rank}: out, dq, dk, dv match single-process attention (max error {error:.1e}); "
          f"NaN: {any(torch.isnan(x).any().item() for x in (out, *[x.grad for x in local]))}")
    dist.destroy_process_group()


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(port,), nprocs=WORLD)


if __name__ == "__main__":
    main()
