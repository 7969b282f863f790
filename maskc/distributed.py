"""Context-parallel attention: mask-aware ring attention over ``torch.distributed``.

Every rank holds its shard of the sequence (``ShardPlan.shard``) of ``q``,
``k`` and ``v``. At ring step ``t`` rank ``r`` holds the K/V shard of rank
``r - t`` and computes its queries against it with that tile's compiled op
(``ShardPlan.tile_spec`` compiled once per plan and rank, ``compiled_tiles``),
merging the partial results by log-sum-exp (``maskc.merge_partials``).

Communication is hidden behind compute. Each step first posts its messages
(``batch_isend_irecv``: the K/V shard held sent on, the next one received),
then computes, then waits. The next shard lands in the one of two receive
buffers that is not being computed on (double buffering). On GPUs the
messages go on a side CUDA stream that waits for the compute stream before it
starts, and the compute stream waits for them only where it reads what
arrived (``_Transport``). Tiles that allow nothing are skipped, and a shard
stops at the last rank that needs it (``ShardPlan.last_hop``).

The backward pass does no forward work. K/V travel the ring again, and each
tile's op turns the saved merged ``out`` and ``lse`` into its exact share of
the gradients (``CompiledMask.backward``: ``P = exp(s - lse)``,
``delta = rowsum(d_out * out) - d_lse``). dQ stays on the rank; the dK/dV
share of another rank's shard is sent straight to that rank with the next
step's messages (``ShardPlan.returns_share``) and added to its own. Forward
plus backward of the ring visits each allowed pair exactly as often as
single-device attention does: once forward, once backward.

Arguments are checked on every rank before the ring starts: each rank's
plan fingerprint (spec, strategy, shard layout: ``ShardPlan.fingerprints``),
shapes and dtypes travel in one small ``all_gather``, so a mismatch on one
rank (say a data loader that gave it other document lengths) raises
``ValueError`` on all of them, naming the ranks that differ, instead of
computing wrong attention. A rank that dies or never calls cannot be told
apart from a slow one: the others fail once the process group's ``timeout``
(``init_process_group(timeout=...)``) runs out, or at once where the backend
sees the connection drop. With gloo they raise ``RuntimeError`` ("Timed out
waiting 3000ms for send operation to complete", "Connection reset by
peer"); with NCCL the watchdog aborts the operation and, by default
(``TORCH_NCCL_ASYNC_ERROR_HANDLING``), ends the process.
"""

from __future__ import annotations

import math
import weakref
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .compiler import CompiledMask, compile as compile_mask
from .ir.spec import Spec
from .partitioning import merge_partials
from .passes.shard import STRATEGIES, ShardPlan, shard_plan

# message kinds, part of each P2P tag so that gloo pairs sends and receives unambiguously
_K, _V, _DK, _DV = range(4)
_KINDS = 4

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PARTS, _PARTS_SAID = ("spec", "layout"), ("spec", "strategy or shard layout")  # of ShardPlan.fingerprints

_compiled: "weakref.WeakKeyDictionary[ShardPlan, dict]" = weakref.WeakKeyDictionary()


def compiled_tiles(plan: ShardPlan, rank: int, block_size=128) -> tuple[Optional[CompiledMask], ...]:
    """The op of each of ``rank``'s ring steps (``None`` where the tile is empty), compiled once per plan."""
    per_plan = _compiled.setdefault(plan, {})
    key = (rank, block_size if isinstance(block_size, int) else tuple(block_size))
    if key not in per_plan:
        per_plan[key] = tuple(
            None if tile.empty else compile_mask(plan.tile_spec(rank, tile.source), block_size=block_size)
            for tile in plan.tiles[rank]
        )
    return per_plan[key]


# -- checking the arguments on every rank --------------------------------------------


def _header(plan: ShardPlan, q, k, v) -> list[int]:
    """What one rank tells the others: its plan's fingerprints (spec, layout; 60 bits of each), whether
    q, k, v share a device, and ``(dtype code, batch, heads, tokens, head_dim)`` of each of q, k, v (all -1
    where unusable)."""
    tensors = [x for x in (q, k, v) if isinstance(x, torch.Tensor)]
    out = [int(plan.fingerprints[part][:15], 16) for part in _PARTS] + [int(len({x.device for x in tensors}) <= 1)]
    for x in (q, k, v):
        usable = isinstance(x, torch.Tensor) and x.dim() == 4 and x.dtype in _DTYPES
        out += [_DTYPES.index(x.dtype), *x.shape] if usable else [-1] * 5
    return out


def _plan_problem(headers: np.ndarray) -> Optional[str]:
    """The ranks whose plan differs from rank 0's, and what differs, or ``None``."""
    differ = headers[:, :len(_PARTS)] != headers[:1, :len(_PARTS)]
    ranks = np.flatnonzero(differ.any(axis=1)).tolist()
    if not ranks:
        return None
    what = "; ".join(f"rank {r}'s " + " and ".join(part for part, d in zip(_PARTS_SAID, differ[r]) if d)
                     + (" differ" if differ[r].all() else " differs") for r in ranks)
    return (f"ranks {ranks} built a different plan than rank 0: {what}. Every rank must build its plan from the "
            "same spec (the same document lengths: a data loader out of step gives ranks different ones), "
            "world_size, strategy and options")


def _problems(plan: ShardPlan, headers: np.ndarray) -> list[str]:
    """Every mismatch between the ranks' arguments and the plan, named by rank and argument."""
    plan_problem = _plan_problem(headers)
    if plan_problem:  # the rest would be judged against plans that differ
        return [plan_problem]
    found = []
    headers = headers[:, len(_PARTS):]
    args = headers[:, 1:].reshape(len(headers), 3, 5)
    for r, row in enumerate(headers):
        if not row[0]:
            found.append(f"rank {r}: q, k, v must be on one device")
        for name, (dtype, *shape) in zip("qkv", args[r].tolist()):
            if dtype < 0:
                found.append(f"rank {r}: {name} must be a 4-D [batch, heads, tokens, head_dim] tensor of one of "
                             f"{_DTYPES}")
            elif shape[2] != plan.shard_lengths[r]:
                found.append(f"rank {r}: {name} has {shape[2]} tokens ({name}.shape={tuple(shape)}) but the plan "
                             f"gives rank {r} {plan.shard_lengths[r]}")
    if found:
        return found
    same = [0, 1, 2, 4]  # everything but the tokens must agree across ranks
    for r in np.flatnonzero((args[:, :, same] != args[:1, :, same]).any(axis=(1, 2))).tolist():
        found.append(f"rank {r}: (dtype, batch, heads, head_dim) of q, k, v are {args[r][:, same].tolist()} "
                     f"but rank 0's are {args[0][:, same].tolist()}")
    (q_dtype, q_batch, q_heads, _, q_dim), (k_dtype, k_batch, k_heads, _, k_dim), (v_dtype, v_batch, v_heads, _, _) = (
        args[0].tolist())
    if not q_dtype == k_dtype == v_dtype:
        found.append(f"q, k, v must share a dtype, got {_DTYPES[q_dtype]}, {_DTYPES[k_dtype]}, {_DTYPES[v_dtype]}")
    if not q_batch == k_batch == v_batch or k_heads != v_heads or q_heads % k_heads or q_dim != k_dim:
        found.append(f"q {tuple(args[0][0, 1:])}, k {tuple(args[0][1, 1:])}, v {tuple(args[0][2, 1:])} do not fit "
                     "attention: batch must match, k and v must have the same heads, dividing q's, and q and k "
                     "the same head_dim")
    return found


def _check(q, k, v, plan, group) -> None:
    """Raise on every rank if any rank's arguments do not fit the plan (before the ring starts)."""
    if not isinstance(plan, ShardPlan):
        raise TypeError(f"plan must be a ShardPlan (from maskc.distributed.shard_plan), got {type(plan).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ring_attention needs torch.distributed initialised (dist.init_process_group)")
    # the ranks' arguments travel in one small all_gather, on the device the group's backend needs
    world = dist.get_world_size(group)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    mine = torch.tensor(_header(plan, q, k, v), dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    if world != plan.world_size:  # after the gather: the other ranks see this plan's other fingerprint
        raise ValueError(f"the process group has {world} ranks but the plan was made for "
                         f"world_size={plan.world_size}")
    problems = _problems(plan, torch.stack(every).cpu().numpy())
    if problems:
        raise ValueError("ring_attention arguments do not match the plan: " + "; ".join(problems))


# -- the ring --------------------------------------------------------------------------


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class Partials:
    """One rank's partial results (its tiles' ``out, lse``) merged by log-sum-exp as they come, in the
    work precision (float32, float64 for float64 inputs), as ``ring_attention``'s forward merges them.
    On GPUs in float32 each merge is one pass of ``codegen/merge.py``'s kernel, in place after the
    first; elsewhere ``merge_partials``."""

    def __init__(self, q: torch.Tensor, v: torch.Tensor):
        self.q, self.v, self.work = q, v, _work_dtype(q.dtype)
        self.out = self.lse = None
        self.merged = False  # whether self.out is a merge's result, which later merges may overwrite

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        if self.out is None:  # kept as it is: the first merge converts it
            self.out, self.lse = out, lse
            return
        if out.is_cuda and self.work == torch.float32:
            from .codegen.merge import merge  # here: importing kernels reads TRITON_INTERPRET

            self.out, self.lse = merge(self.out, self.lse, out, lse, in_place=self.merged)
        else:
            self.out, self.lse = merge_partials([self.out.to(self.work), out], [self.lse, lse])
        self.merged = True

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out, lse)``: ``out`` in q's dtype, ``lse`` in the work precision; 0 and ``-inf`` with no part."""
        q, work = self.q, self.work
        if self.out is None:  # the queries attend nothing
            shape = q.shape[:-1]
            return (torch.zeros(shape + (self.v.shape[-1],), dtype=q.dtype, device=q.device),
                    torch.full(shape, -math.inf, dtype=work, device=q.device))
        return self.out.to(q.dtype), self.lse.to(work)


class _Transport:
    """One rank's asynchronous sends and receives, started a batch at a time.

    ``post`` starts a step's messages together (``batch_isend_irecv``). With
    CUDA tensors it starts them on a side stream that first waits for the
    compute stream (what is sent is computed, what is received into is no
    longer read), so the compute queued after it runs beside the transfer; every
    tensor is marked as used on that stream (``record_stream``), so the caching
    allocator does not give its memory out again before the transfer ends.
    ``wait`` makes the caller's stream (NCCL) or the caller (gloo) wait for a
    batch. Messages are tagged ``(step, kind)`` and every message is received
    in the receiver's batch of the step it is sent in, so batches pair up.
    """

    def __init__(self, plan: ShardPlan, group, device: torch.device):
        self.plan, self.group = plan, group
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def post(self, step: int, sends: Sequence[tuple], receives: Sequence[tuple]) -> list:
        """Start ``(tensor, group rank, kind)`` sends and receives; their requests."""
        def op(kind, tensor, rank, message):
            rank %= self.plan.world_size
            peer = rank if self.group is None else dist.get_global_rank(self.group, rank)
            return dist.P2POp(kind, tensor, peer, self.group, step * _KINDS + message)

        ops = [op(dist.isend, *x) for x in sends] + [op(dist.irecv, *x) for x in receives]
        if not ops:
            return []
        if self.stream is None:
            return dist.batch_isend_irecv(ops)
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            requests = dist.batch_isend_irecv(ops)
        for x in ops:
            x.tensor.record_stream(self.stream)
        return requests

    @staticmethod
    def wait(requests: Sequence) -> None:
        for request in requests:
            request.wait()


class _Ring:
    """One rank's view of a plan's ring: who it talks to and what it computes at each step."""

    def __init__(self, plan: ShardPlan, group, block_size):
        self.plan, self.group = plan, group
        self.rank = dist.get_rank(group)
        self.tiles = compiled_tiles(plan, self.rank, block_size)

    def _buffers(self, like: tuple) -> list:
        """Two flat buffers per tensor of ``like`` (K, V) for the shards that arrive, used in turn:
        the shard arriving during step ``t`` lands in ``[t % 2]``, never the one held at ``t``."""
        plan, me = self.plan, self.rank
        arriving = [int(plan.shard_lengths[plan.source(me, t + 1)])
                    for t in range(plan.n_steps) if plan.receives(me, t)]
        n = max(arriving, default=0)
        return [[x.new_empty(x[:, :, :1].numel() * n) for x in like] for _ in range(2 if n else 0)]

    def _kv_messages(self, step: int, held: tuple, like: tuple, buffers: list):
        """The K/V messages of ``step``: ``held`` sent on if a later rank needs its shard, and the next
        shard received into a buffer. Returns the sends, the receives and the arriving pair (or ``None``)."""
        me, plan = self.rank, self.plan
        sends = [(x, me + 1, kind) for x, kind in zip(held, (_K, _V))] if plan.forwards(me, step) else []
        if not plan.receives(me, step):
            return sends, [], None
        n = int(plan.shard_lengths[plan.source(me, step + 1)])
        arriving = tuple(flat[: x[:, :, :1].numel() * n].view(x.shape[:2] + (n,) + x.shape[3:])
                         for flat, x in zip(buffers[step % 2], like))
        return sends, [(x, me - 1, kind) for x, kind in zip(arriving, (_K, _V))], arriving

    # -- forward ------------------------------------------------------------------------
    def forward(self, q, k, v, scale):
        """``(out, lse)`` of this rank's queries against the whole sequence."""
        k, v = k.contiguous(), v.contiguous()  # sent as they are
        transport, buffers = _Transport(self.plan, self.group, q.device), self._buffers((k, v))
        merged = Partials(q, v)
        held = (k, v)
        for step, op in enumerate(self.tiles):
            sends, receives, arriving = self._kv_messages(step, held, (k, v), buffers)
            requests = transport.post(step, sends, receives)  # the next K/V travels during the compute below
            if op is not None:
                merged.add(*op(q, *held, scale=scale, return_lse=True))
            transport.wait(requests)
            held = arriving
        return merged.result()

    # -- backward -------------------------------------------------------------------------
    def backward(self, q, k, v, out, lse, d_out, d_lse, scale):
        """``(dq, dk, dv)`` of this rank's shards from the merged forward ``out``/``lse``.

        The K/V shards travel the ring again. Each tile's op gives its share of
        the gradients from the merged ``out`` and ``lse`` without recomputing
        its forward (``CompiledMask.backward``); the dK/dV share of another
        rank's shard goes straight to that rank at the next step, posted with
        the step's K/V before its compute, and the owner adds it to its own.
        """
        plan, me, p = self.plan, self.rank, self.plan.world_size
        work = _work_dtype(q.dtype)
        k, v = k.contiguous(), v.contiguous()  # sent as they are
        transport, buffers = _Transport(plan, self.group, q.device), self._buffers((k, v))
        dq = torch.zeros(q.shape, dtype=work, device=q.device)
        dk, dv = (torch.zeros(x.shape, dtype=work, device=x.device) for x in (k, v))
        incoming = None  # a share of this rank's dK/dV arriving (at most one per step)
        held, outgoing = (k, v), []
        for step in range(plan.n_steps + 1):  # the step past the last only sends the last shares home
            sends, receives, arriving = (self._kv_messages(step, held, (k, v), buffers) if step < plan.n_steps
                                         else ([], [], None))
            sends += outgoing
            sharer = (me + step - 1) % p  # the rank that held this rank's K/V at step - 1
            returning = step > 0 and plan.returns_share(sharer, step - 1)
            if returning:
                if incoming is None:
                    incoming = (torch.empty_like(k), torch.empty_like(v))
                receives += [(x, sharer, kind) for x, kind in zip(incoming, (_DK, _DV))]
            requests = transport.post(step, sends, receives)
            outgoing = []
            op = self.tiles[step] if step < plan.n_steps else None
            if op is not None:
                _, share_k, share_v = op.backward(q, *held, out, lse, d_out, d_lse, scale=scale, dq_sum=dq)
                if step == 0:
                    dk += share_k
                    dv += share_v
                else:
                    source = plan.source(me, step)
                    outgoing = [(share_k.contiguous(), source, _DK), (share_v.contiguous(), source, _DV)]
            transport.wait(requests)
            if returning:
                dk += incoming[0]
                dv += incoming[1]
            held = arriving
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring: _Ring, scale: float):
        out, lse = ring.forward(q, k, v, scale)
        # the merged out as returned: the work precision for float32/float64 inputs; fp16/bf16 ones, which
        # the Triton backward reads in their own dtype, as single-device attention saves them
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.scale = ring, scale
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.ring.backward(q, k, v, out, lse, d_out, d_lse, ctx.scale)
        return dq, dk, dv, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: ShardPlan, group=None,
                   scale: Optional[float] = None, return_lse: bool = False, block_size=128):
    """Attention of this rank's query shard over the whole sequence, by ring attention.

    ``q [B, Hq, n_q, D]``, ``k``, ``v [B, Hkv, n_kv, D]`` are this rank's shards
    (``plan.shard(x, rank)``; ``n_q == n_kv == plan.shard_lengths[rank]``) and
    the result is this rank's shard of single-device attention on the gathered
    sequence: ``out [B, Hq, n_q, D]`` and, with ``return_lse``, ``lse [B, Hq, n_q]``
    (float32, or float64 for float64 inputs; ``-inf`` on rows that attend
    nothing). Differentiable. ``group`` is the process group of the plan's
    ranks (default: the world). Every rank must call it with its own shards;
    if any rank's arguments do not match the plan, every rank raises
    ``ValueError`` (a plan built from other document lengths included). If a
    rank never calls or dies, the others raise the backend's ``RuntimeError``
    within the process group's timeout. ``block_size`` is the tiles'
    ``maskc.compile`` block size; each rank compiles its tiles once per plan.
    """
    _check(q, k, v, plan, group)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse = _RingAttention.apply(q, k, v, _Ring(plan, group, block_size), scale)
    return (out, lse) if return_lse else out


# -- the report -----------------------------------------------------------------------------


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def plan_report(spec: Spec, world_size: int, strategies: Optional[Sequence[str]] = None, png=None,
                kv_heads: int = 8, head_dim: int = 128, dtype_bytes: int = 2) -> str:
    """A text report of the sharding plans of ``spec`` over ``world_size`` ranks (and a PNG with ``png``).

    Per strategy: the work (allowed pairs) of every rank and the busiest/mean
    ratio, the tiles computed and skipped, and the bytes each rank sends in the
    forward pass (K and V, ``kv_heads x head_dim`` of ``dtype_bytes``) and the
    backward pass (K and V again, and the dK/dV shares it computed for other
    ranks' shards, in the same dtype) against a plain ring that forwards every
    shard ``P - 1`` times, with a float32 dK/dV accumulator in the backward.
    """
    strategies = list(STRATEGIES if not strategies else strategies)
    plans = [shard_plan(spec, world_size, s) for s in strategies]
    kv = 2 * kv_heads * head_dim * dtype_bytes  # K and V of one token
    grads = 2 * kv_heads * head_dim * 4  # float32 dK and dV of one token
    p = world_size
    lines = [f"context-parallel plans: {spec.q_len} tokens over {p} ranks; bytes per token: K+V {kv}, "
             f"dK+dV {kv} ({kv_heads} KV heads x {head_dim}, {dtype_bytes}-byte K/V; a plain ring's float32 "
             f"dK+dV accumulator {grads})"]
    for plan in plans:
        run = sum(not t.empty for row in plan.tiles for t in row)
        lines += ["", f"{plan.strategy}: {plan.n_chunks} chunks ({plan.n_chunks // p} per rank), "
                  f"{plan.n_steps} ring steps of {p}; busiest/mean work {plan.imbalance:.3f}, modeled time "
                  f"{plan.time_imbalance:.3f}; "
                  f"tiles computed {run}, skipped {p * p - run} of {p * p}",
                  f"  {'rank':>4} {'tokens':>9} {'work (pairs)':>16} {'/mean':>6} {'tiles':>5} "
                  f"{'fwd sent':>10} {'plain ring':>10} {'bwd sent':>10} {'plain ring':>10}"]
        mean = plan.work.mean() or 1
        for r in range(p):
            sent, plain = plan.sent_tokens(r), plan.plain_ring_tokens(r)
            plain_home = int(plan.shard_lengths[(r + 1) % p]) if p > 1 else 0  # the plain ring's last holder
            lines.append(
                f"  {r:>4} {plan.shard_lengths[r]:>9} {plan.work[r]:>16} {plan.work[r] / mean:>6.3f} "
                f"{sum(not t.empty for t in plan.tiles[r]):>5} {_bytes(sent * kv):>10} {_bytes(plain * kv):>10} "
                f"{_bytes((sent + plan.share_tokens(r)) * kv):>10} "
                f"{_bytes(plain * (kv + grads) + plain_home * grads):>10}")
        busiest = max(plan.sent_tokens(r) for r in range(p))
        plain = max(plan.plain_ring_tokens(r) for r in range(p))
        saving = 1 - busiest / plain if plain else 0.0
        lines.append(f"  busiest sender: {_bytes(busiest * kv)} forward vs {_bytes(plain * kv)} in a plain ring "
                     f"({saving:.0%} less)")
    if png is not None:
        _plot(plans, png)
        lines += ["", f"wrote {png}"]
    return "\n".join(lines)


def _plot(plans: Sequence[ShardPlan], path) -> None:
    """A rank-by-step grid per plan: shade = the tile's work, blank = skipped, label = K/V shard held,
    ``>`` = the shard is sent on after the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    p = plans[0].world_size
    size = max(3.0, min(0.45 * p, 12.0))
    fig, axes = plt.subplots(1, len(plans), figsize=(size * len(plans) + 2, size + 1.2), squeeze=False,
                             layout="constrained")
    for ax, plan in zip(axes[0], plans):
        work = np.zeros((p, p))
        for r in range(p):
            for t in range(plan.n_steps):
                work[r, t] = plan.tile(r, t).work
        shade = np.where(work > 0, work / max(work.max(), 1), np.nan)
        image = ax.imshow(shade, cmap="viridis", vmin=0, vmax=1, aspect="equal")
        if p <= 16:
            for r in range(p):
                for t in range(p):
                    label = f"{plan.source(r, t)}" + (">" if t < plan.n_steps and plan.forwards(r, t) else "")
                    ax.text(t, r, label, ha="center", va="center", fontsize=7,
                            color="white" if work[r, t] > 0 else "grey")
        ax.set_title(f"{plan.strategy}: busiest/mean {plan.imbalance:.2f}", fontsize=9)
        ax.set_xlabel("ring step")
        ax.set_ylabel("rank")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="tile work / the plan's busiest tile")
    fig.supxlabel("label: K/V shard held;  >: sent on after the step\nblank: skipped, nothing allowed", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["STRATEGIES", "Partials", "ShardPlan", "compiled_tiles", "plan_report", "ring_attention", "shard_plan"]
