"""Context-parallel attention: mask-aware ring attention over ``torch.distributed``.

Every rank holds its shard of the sequence (``ShardPlan.shard``) of ``q``,
``k`` and ``v``. At ring step ``t`` rank ``r`` holds the K/V shard of rank
``r - t``, computes its queries against it with that tile's compiled op
(``ShardPlan.tile_spec`` compiled once per plan and rank), and merges the
partial result by log-sum-exp (``maskc.merge_partials``). K/V move to the
next rank with ``batch_isend_irecv`` posted before the step's compute, so the
transfer overlaps it. Empty tiles compute nothing, and a shard stops where the
last rank that needs it is (``ShardPlan.last_hop``).

The backward pass runs its own ring: K/V travel again, each with a float32
dK/dV accumulator that every rank holding the shard adds its share to and
passes on after its compute; the last holder sends the finished accumulator
straight back to the shard's owner. A tile's share of the gradient is the
gradient of its partial result under the merge (``_tile_grads``).

Arguments are checked on every rank before the ring starts; shapes, dtypes and
plans are compared across ranks with one small ``all_gather``, so a mistake on
one rank raises ``ValueError`` on all of them instead of leaving the others
waiting in a send.
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
_K, _V, _DK, _DV, _DK_HOME, _DV_HOME = range(6)
_KINDS = 8

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

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
    """What one rank tells the others: its plan's fingerprint, whether q, k, v share a device, and
    ``(dtype code, batch, heads, tokens, head_dim)`` of each of q, k, v (all -1 where unusable)."""
    tensors = [x for x in (q, k, v) if isinstance(x, torch.Tensor)]
    out = [plan.fingerprint, int(len({x.device for x in tensors}) <= 1)]
    for x in (q, k, v):
        usable = isinstance(x, torch.Tensor) and x.dim() == 4 and x.dtype in _DTYPES
        out += [_DTYPES.index(x.dtype), *x.shape] if usable else [-1] * 5
    return out


def _problems(plan: ShardPlan, headers: np.ndarray) -> list[str]:
    """Every mismatch between the ranks' arguments and the plan, named by rank and argument."""
    found = []
    args = headers[:, 2:].reshape(len(headers), 3, 5)
    fingerprints = headers[:, 0].tolist()
    if len(set(fingerprints)) > 1:
        groups = [[r for r, f in enumerate(fingerprints) if f == one] for one in dict.fromkeys(fingerprints)]
        found.append(f"ranks {' and '.join(map(str, groups))} hold different plans; every rank must pass the "
                     "same plan (same spec, world_size, strategy and options)")
    for r, row in enumerate(headers):
        if not row[1]:
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
    world = dist.get_world_size(group)
    if world != plan.world_size:
        raise ValueError(f"the process group has {world} ranks but the plan was made for "
                         f"world_size={plan.world_size}")
    # the ranks' arguments travel in one small all_gather, on the device the group's backend needs
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    mine = torch.tensor(_header(plan, q, k, v), dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    problems = _problems(plan, torch.stack(every).cpu().numpy())
    if problems:
        raise ValueError("ring_attention arguments do not match the plan: " + "; ".join(problems))


# -- the ring --------------------------------------------------------------------------


class _Ring:
    """One rank's view of a plan's ring: who it talks to and what it computes at each step."""

    def __init__(self, plan: ShardPlan, group, block_size):
        self.plan, self.group = plan, group
        self.rank = dist.get_rank(group)
        self.tiles = compiled_tiles(plan, self.rank, block_size)

    def _post(self, sends: Sequence[tuple], receives: Sequence[tuple]) -> list:
        """Start ``(tensor, group rank, kind, step)`` sends and receives together; their requests."""
        def op(kind, tensor, rank, message, step):
            rank %= self.plan.world_size
            peer = rank if self.group is None else dist.get_global_rank(self.group, rank)
            return dist.P2POp(kind, tensor, peer, self.group, step * _KINDS + message)

        ops = [op(dist.isend, *x) for x in sends] + [op(dist.irecv, *x) for x in receives]
        return dist.batch_isend_irecv(ops) if ops else []

    def _arriving(self, step: int, like: tuple, dtype=None) -> tuple:
        """Empty tensors shaped like ``like`` (K, V) for the shard that arrives during ``step``."""
        n = int(self.plan.shard_lengths[self.plan.source(self.rank, step + 1)])
        return tuple(torch.empty(x.shape[:2] + (n,) + x.shape[3:], dtype=dtype or x.dtype, device=x.device)
                     for x in like)

    def _pass(self, step: int, held: Optional[tuple], like: tuple, kinds: tuple, dtype=None):
        """Send the pair ``held`` on if a later rank needs its shard, and receive the next shard's pair.
        Returns the requests and the arriving pair (``None`` if nothing arrives)."""
        me, plan = self.rank, self.plan
        sends = [(x, me + 1, kind, step) for x, kind in zip(held, kinds)] if plan.forwards(me, step) else []
        arriving = self._arriving(step, like, dtype) if plan.receives(me, step) else None
        receives = [(x, me - 1, kind, step) for x, kind in zip(arriving, kinds)] if arriving else []
        return self._post(sends, receives), arriving

    # -- forward ------------------------------------------------------------------------
    def forward(self, q, k, v, scale):
        """``(out, lse)`` of this rank's queries against the whole sequence."""
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = lse = None
        held = (k, v)
        for step, op in enumerate(self.tiles):
            requests, arriving = self._pass(step, held, (k, v), (_K, _V))  # overlaps the compute below
            if op is not None:
                part, part_lse = op(q, *held, scale=scale, return_lse=True)
                if out is None:
                    out, lse = part.to(work), part_lse
                else:
                    out, lse = merge_partials([out, part], [lse, part_lse])
            for request in requests:
                request.wait()
            held = arriving
        if out is None:  # this rank's queries attend nothing
            out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=work, device=q.device)
            lse = torch.full(q.shape[:-1], -math.inf, dtype=work, device=q.device)
        return out.to(q.dtype), lse.to(work)  # float32, or float64 for float64 inputs, as the tile ops give

    # -- backward -------------------------------------------------------------------------
    def backward(self, q, k, v, out, lse, d_out, d_lse, scale):
        """``(dq, dk, dv)`` of this rank's shards; dK/dV accumulators travel with the K/V."""
        plan, me = self.plan, self.rank
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        dq = torch.zeros(q.shape, dtype=work, device=q.device)
        held = (k, v)
        grads = tuple(torch.zeros(x.shape, dtype=work, device=x.device) for x in (k, v))
        grads_requests: list = []  # the accumulator of the shard held next, and the last one sent on
        home_requests: list = []  # this rank's finished dK/dV coming back, or another's going home
        home = None
        for step, op in enumerate(self.tiles):
            source = plan.source(me, step)
            kv_requests, arriving = self._pass(step, held, (k, v), (_K, _V))
            share = None if op is None else _tile_grads(op, q, *held, out, lse, d_out, d_lse, scale, work)
            for request in grads_requests:
                request.wait()
            if share is not None:
                dq += share[0]
                grads[0].add_(share[1])
                grads[1].add_(share[2])
            grads_requests, next_grads = self._pass(step, grads, (k, v), (_DK, _DV), work)
            # a finished accumulator goes home; sends and receives in one batch, since two ranks
            # can be each other's last holder at the same step
            sends, receives = [], []
            if step == int(plan.last_hop[source]):
                if source == me:
                    home = grads
                else:
                    sends = [(x, source, kind, step) for x, kind in zip(grads, (_DK_HOME, _DV_HOME))]
            if step > 0 and step == int(plan.last_hop[me]):
                home = tuple(torch.empty(x.shape, dtype=work, device=x.device) for x in (k, v))
                receives = [(x, plan.final_holder(me), kind, step) for x, kind in zip(home, (_DK_HOME, _DV_HOME))]
            home_requests += self._post(sends, receives)
            for request in kv_requests:
                request.wait()
            held, grads = arriving, next_grads
        for request in grads_requests + home_requests:
            request.wait()
        return dq.to(q.dtype), home[0].to(k.dtype), home[1].to(v.dtype)


def _tile_grads(op: CompiledMask, q, k, v, out, lse, d_out, d_lse, scale, work):
    """``(dq, dk, dv)`` of one tile's share of the merged attention.

    With the merge ``out = sum_t w_t out_t``, ``w_t = exp(lse_t - lse)``, the
    tile's partial result receives ``d out_t = w_t d_out`` and
    ``d lse_t = w_t (d_lse + rowsum(d_out * (out_t - out)))``; the tile op's own
    backward turns those into its share of dq, dk, dv. The partial result is
    recomputed here: its forward values were merged away.
    """
    with torch.enable_grad():
        inputs = [x.detach().requires_grad_() for x in (q, k, v)]
        part, part_lse = op(*inputs, scale=scale, return_lse=True)
        finite = torch.isfinite(part_lse)
        weight = torch.where(finite, torch.exp(part_lse.to(work) - torch.where(finite, lse, part_lse).to(work)), 0.0)
        d_out = d_out.to(work)
        d_part_lse = weight * (d_lse.to(work) + (d_out * (part.to(work) - out.to(work))).sum(-1))
        d_part = (weight[..., None] * d_out).to(part.dtype)
        return torch.autograd.grad((part, part_lse), inputs, (d_part, d_part_lse.to(part_lse.dtype)))


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring: _Ring, scale: float):
        out, lse = ring.forward(q, k, v, scale)
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
    ``ValueError``. ``block_size`` is the tiles' ``maskc.compile`` block size;
    each rank compiles its tiles once per plan.
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
    backward pass (K, V and float32 dK/dV) against a ring that forwards every
    shard ``P - 1`` times.
    """
    strategies = list(STRATEGIES if not strategies else strategies)
    plans = [shard_plan(spec, world_size, s) for s in strategies]
    kv = 2 * kv_heads * head_dim * dtype_bytes  # K and V of one token
    grads = 2 * kv_heads * head_dim * 4  # float32 dK and dV of one token
    p = world_size
    lines = [f"context-parallel plans: {spec.q_len} tokens over {p} ranks; bytes per token: K+V {kv}, "
             f"dK+dV {grads} ({kv_heads} KV heads x {head_dim}, {dtype_bytes}-byte K/V)"]
    for plan in plans:
        run = sum(not t.empty for row in plan.tiles for t in row)
        lines += ["", f"{plan.strategy}: {plan.n_chunks} chunks ({plan.n_chunks // p} per rank), "
                  f"{plan.n_steps} ring steps of {p}; busiest/mean work {plan.imbalance:.3f}; "
                  f"tiles computed {run}, skipped {p * p - run} of {p * p}",
                  f"  {'rank':>4} {'tokens':>9} {'work (pairs)':>16} {'/mean':>6} {'tiles':>5} "
                  f"{'fwd sent':>10} {'plain ring':>10} {'bwd sent':>10} {'plain ring':>10}"]
        mean = plan.work.mean() or 1
        for r in range(p):
            sent, plain = plan.sent_tokens(r), plan.plain_ring_tokens(r)
            home = sum(int(plan.shard_lengths[s]) for s in plan.returned_by(r))
            plain_home = int(plan.shard_lengths[(r + 1) % p]) if p > 1 else 0  # the plain ring's last holder
            lines.append(
                f"  {r:>4} {plan.shard_lengths[r]:>9} {plan.work[r]:>16} {plan.work[r] / mean:>6.3f} "
                f"{sum(not t.empty for t in plan.tiles[r]):>5} {_bytes(sent * kv):>10} {_bytes(plain * kv):>10} "
                f"{_bytes(sent * (kv + grads) + home * grads):>10} "
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


__all__ = ["STRATEGIES", "ShardPlan", "compiled_tiles", "plan_report", "ring_attention", "shard_plan"]
