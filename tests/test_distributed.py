"""``ring_attention`` over gloo on the CPU: 2, 3 and 4 spawned processes against
single-process attention, forward and backward, every strategy; and bad input
raising ``ValueError`` on every rank. One spawn per world size runs every case;
the 3-rank example script runs once."""

from __future__ import annotations

import datetime
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import maskc
from maskc.distributed import ring_attention
from maskc.passes.shard import STRATEGIES, shard_plan

TOKENS = 48  # splits into 2P chunks for P = 2, 3, 4
SPECS = {
    "causal": maskc.Spec(q_len=TOKENS, kv_len=TOKENS, mask=maskc.Causal()),
    # documents cross shard boundaries; the last 3 tokens are padding (empty rows and columns)
    "document_causal": maskc.Spec(q_len=TOKENS, kv_len=TOKENS,
                                  mask=maskc.Documents(lengths=[5, 17, 3, 11, 9]) & maskc.Causal()),
    "sliding_window": maskc.Spec(q_len=TOKENS, kv_len=TOKENS, mask=maskc.SlidingWindow(left=6)),
}
TIMEOUT_S = 240


def _inputs(seed: int = 0, dtype=torch.float64):
    """Full-sequence q [1, 4, T, 8], k, v [1, 2, T, 8] (grouped-query), and output gradients."""
    g = torch.Generator().manual_seed(seed)
    q, d_out = (torch.randn(1, 4, TOKENS, 8, generator=g, dtype=dtype) for _ in range(2))
    k, v = (torch.randn(1, 2, TOKENS, 8, generator=g, dtype=dtype) for _ in range(2))
    d_lse = torch.randn(1, 4, TOKENS, generator=g, dtype=torch.float32)
    return q, k, v, d_out, d_lse


def _single_process(spec, q, k, v, d_out, d_lse):
    """``out, lse, dq, dk, dv`` of the whole sequence on one process (the loss uses lse too)."""
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = maskc.compile(spec)(q, k, v, return_lse=True)
    finite = torch.isfinite(lse)
    ((out * d_out).sum() + (torch.where(finite, lse, 0.0) * d_lse).sum()).backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def _check_ring(spec, strategy, rank, world, group=None):
    plan = shard_plan(spec, world, strategy, min_chunk=2)
    q, k, v, d_out, d_lse = _inputs()
    expected = _single_process(spec, q, k, v, d_out, d_lse)
    local = [plan.shard(x, rank).clone().requires_grad_() for x in (q, k, v)]
    out, lse = ring_attention(*local, plan, group=group, return_lse=True)
    finite = torch.isfinite(lse)
    local_d_lse = plan.shard(d_lse, rank, dim=-1)
    ((out * plan.shard(d_out, rank)).sum() + (torch.where(finite, lse, 0.0) * local_d_lse).sum()).backward()
    got = (out, lse, *(x.grad for x in local))
    names = ("out", "lse", "dq", "dk", "dv")
    for name, value, whole in zip(names, got, expected):
        want = plan.shard(whole, rank, dim=-1 if name == "lse" else -2)
        assert not torch.isnan(value).any(), f"{spec} {strategy} rank {rank}: NaN in {name}"
        torch.testing.assert_close(value, want, atol=1e-6, rtol=1e-6, equal_nan=False,
                                   msg=lambda m: f"{strategy} {name} rank {rank}: {m}")


def _check_bad_input(rank, world):
    spec = SPECS["document_causal"]
    q, k, v, _, _ = _inputs()
    plan = shard_plan(spec, world, "zigzag")
    local = [plan.shard(x, rank) for x in (q, k, v)]
    wrong_world = shard_plan(spec, world + 1, "contiguous")
    with pytest.raises(ValueError, match="world_size="):
        ring_attention(*local, wrong_world)
    short = [local[0][:, :, 1:] if rank == 1 else local[0], *local[1:]]  # one rank's q is a token short
    with pytest.raises(ValueError, match="rank 1: q has"):  # on every rank, not only rank 1
        ring_attention(*short, plan)
    other = shard_plan(spec, world, "contiguous") if rank == 0 else plan  # same shard sizes, other layout
    with pytest.raises(ValueError, match=r"ranks \[0\] and \[1.*\] hold different plans"):
        ring_attention(*[other.shard(x, rank) for x in (q, k, v)], other)


def _worker(rank: int, world: int, port: int):
    torch.set_num_threads(1)  # the processes share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        _check_bad_input(rank, world)  # first: the ranks must stay in step after refusing
        for spec in SPECS.values():
            for strategy in STRATEGIES:
                _check_ring(spec, strategy, rank, world)
        if world == 4:  # a sub-group whose ranks are not the world's: peers are mapped
            members = [1, 2, 3]
            group = dist.new_group(members)
            if rank in members:
                _check_ring(SPECS["document_causal"], "balanced", members.index(rank), 3, group=group)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ring_attention_matches_single_process(world):
    context = mp.start_processes(_worker, args=(world, _free_port()), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=max(deadline - time.monotonic(), 0)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"ring attention over {world} processes did not finish in {TIMEOUT_S} s")


def test_the_ring_example_runs_and_matches():
    example = Path(__file__).parent.parent / "examples" / "ring_document_causal.py"
    run = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("match single-process attention") == 3 and "NaN: True" not in run.stdout
    assert run.stdout.count("EMPTY, skipped") == 4  # 3 above the diagonal; rank 2 vs rank 0: no shared document
