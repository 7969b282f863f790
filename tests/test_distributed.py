"""``ring_attention`` over gloo on the CPU: 2, 3 and 4 spawned processes against
single-process attention, forward and backward, every strategy, with the work
the tile ops did counted against single-process attention's; bad input and
plans that differ between ranks raising ``ValueError`` on every rank; a rank
that never calls or dies making the others raise within the group's timeout.
One spawn per world size runs every case; the 3-rank example script runs once."""

from __future__ import annotations

import contextlib
import datetime
import os
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
from maskc.compiler import CompiledMask
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
FAILURE_TIMEOUT_S = 3  # the process group timeout of the tests of ranks that never call or die


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


@contextlib.contextmanager
def tile_work():
    """Counts the calls of every ``CompiledMask``'s forward and backward entry points and the allowed
    pairs of the masks they ran: ``{"forward": [calls, pairs], "backward": [calls, pairs]}``."""
    counts = {"forward": [0, 0], "backward": [0, 0]}
    entry_points = {"forward": CompiledMask.__call__, "backward": CompiledMask.backward}

    def counted(name, fn):
        def run(self, *args, **kwargs):
            counts[name][0] += 1
            counts[name][1] += self.allowed_pairs()
            return fn(self, *args, **kwargs)
        return run

    CompiledMask.__call__, CompiledMask.backward = (counted(name, fn) for name, fn in entry_points.items())
    try:
        yield counts
    finally:
        CompiledMask.__call__, CompiledMask.backward = entry_points.values()


def _check_work(counts_after_forward, counts, single_pairs, group):
    """Forward + backward of the ring, summed over the ranks, runs each allowed pair once forward and
    once backward, as single-process attention does, and no forward in the backward (no recompute)."""
    forward_calls, forward_pairs = counts_after_forward
    totals = torch.tensor([forward_calls, forward_pairs, counts["forward"][0] - forward_calls, *counts["backward"]],
                          dtype=torch.int64)
    dist.all_reduce(totals, group=group)
    forward_calls, forward_pairs, recomputed, backward_calls, backward_pairs = totals.tolist()
    assert recomputed == 0
    assert forward_calls == backward_calls  # one backward per tile run forward
    assert forward_pairs == backward_pairs == single_pairs
    assert forward_pairs + backward_pairs <= 1.05 * (2 * single_pairs)


def _check_ring(spec, strategy, rank, world, group=None):
    plan = shard_plan(spec, world, strategy, min_chunk=2)
    q, k, v, d_out, d_lse = _inputs()
    expected = _single_process(spec, q, k, v, d_out, d_lse)
    local = [plan.shard(x, rank).clone().requires_grad_() for x in (q, k, v)]
    # k and v as non-contiguous views ([batch, tokens, heads, dim] storage), as many models hold them
    local[1:] = [x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in local[1:]]
    with tile_work() as counts:
        out, lse = ring_attention(*local, plan, group=group, return_lse=True)
        after_forward = list(counts["forward"])
        finite = torch.isfinite(lse)
        local_d_lse = plan.shard(d_lse, rank, dim=-1)
        ((out * plan.shard(d_out, rank)).sum() + (torch.where(finite, lse, 0.0) * local_d_lse).sum()).backward()
    _check_work(after_forward, counts, maskc.compile(spec).allowed_pairs(), group)
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
    with pytest.raises(ValueError, match=r"ranks \[1.*\] built a different plan than rank 0: rank 1's strategy "
                                         "or shard layout differs"):
        ring_attention(*[other.shard(x, rank) for x in (q, k, v)], other)
    # a data loader out of step: rank 1 packs other documents into the same 1024 tokens
    lengths = [400, 400, 224] if rank == 1 else [300, 500, 224]
    desynced = shard_plan(maskc.Spec(q_len=1024, kv_len=1024, mask=maskc.Documents(lengths=lengths) & maskc.Causal()),
                          world, "contiguous")
    x = torch.zeros(1, 1, 1024, 8)
    with pytest.raises(ValueError, match=r"ranks \[1\] built a different plan than rank 0: rank 1's spec differs"):
        ring_attention(*(desynced.shard(x, rank) for _ in range(3)), desynced)


def _worker(rank: int, world: int, port: int):
    torch.set_num_threads(1)  # the processes share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        _check_bad_input(rank, world)  # first: the ranks must stay in step after refusing
        for spec in SPECS.values():
            for strategy in STRATEGIES:
                _check_ring(spec, strategy, rank, world)
        if world == 2:
            _check_absent_rank(rank)
        if world == 4:  # a sub-group whose ranks are not the world's: peers are mapped
            members = [1, 2, 3]
            group = dist.new_group(members)
            if rank in members:
                _check_ring(SPECS["document_causal"], "balanced", members.index(rank), 3, group=group)
    finally:
        dist.destroy_process_group()


def _local_causal(rank: int, world: int):
    spec = SPECS["causal"]
    plan = shard_plan(spec, world, "contiguous")
    return plan, [plan.shard(x, rank).clone().requires_grad_() for x in _inputs()[:3]]


def _check_absent_rank(rank: int) -> None:
    """Rank 1 never calls ring_attention: rank 0 raises within the group's timeout instead of hanging."""
    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=FAILURE_TIMEOUT_S))
    if rank == 0:
        plan, local = _local_causal(rank, 2)
        start = time.monotonic()
        with pytest.raises(RuntimeError):  # gloo: DistBackendError "Timed out waiting ... for recv operation"
            ring_attention(*local, plan, group=group)
        assert time.monotonic() - start < FAILURE_TIMEOUT_S + 10
    dist.barrier()  # rank 1 waits here, on the world group


def _dying_worker(rank: int, port: int) -> None:
    """Rank 1 dies during its first tile; rank 0 must raise soon, not hang."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=FAILURE_TIMEOUT_S))
    plan, local = _local_causal(rank, 2)
    if rank == 1:
        CompiledMask.__call__ = lambda *args, **kwargs: os._exit(0)
    start = time.monotonic()
    with pytest.raises(RuntimeError):  # gloo: DistBackendError "Connection closed by peer" or a timeout
        ring_attention(*local, plan).sum().backward()
    assert time.monotonic() - start < FAILURE_TIMEOUT_S + 10


def _join(context, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=max(deadline - time.monotonic(), 0)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{what} did not finish in {TIMEOUT_S} s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ring_attention_matches_single_process(world):
    context = mp.start_processes(_worker, args=(world, _free_port()), nprocs=world, join=False,
                                 start_method="spawn")
    _join(context, f"ring attention over {world} processes")


def test_a_rank_that_dies_makes_the_others_raise():
    context = mp.start_processes(_dying_worker, args=(_free_port(),), nprocs=2, join=False, start_method="spawn")
    _join(context, "ring attention with a dying rank")


def test_the_ring_example_runs_and_matches():
    example = Path(__file__).parent.parent / "examples" / "ring_document_causal.py"
    run = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("match single-process attention") == 3 and "NaN: True" not in run.stdout
    assert run.stdout.count("EMPTY, skipped") == 4  # 3 above the diagonal; rank 2 vs rank 0: no shared document
