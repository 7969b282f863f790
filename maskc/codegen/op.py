"""The attention op: eager calls, the ``torch.library`` ops that ``torch.compile`` sees, and autograd.

A call runs one of two backends over tensors that describe the mask:

* ``"triton"``: the kernels of ``kernels.py`` over the packed plan of the
  mask on the call's device (``plan.py``: ``tables`` and ``patterns``);
* ``"reference"``: plain torch over the run table (``reference.py``).

Eager calls (``attention``) check their arguments once per mask and call key
(shapes, dtypes, devices, backend) and go through ``_EagerAttention``, an
autograd function that calls the backend directly: the ``torch.library``
dispatch costs the host about as much as the kernels of a short mask take.
Calls that need no gradient skip autograd too.

Under ``torch.compile`` the same call becomes the registered op
``maskc::attention`` (backward: ``maskc::attention_backward``), whose inputs
are ``q``, ``k``, ``v`` and the mask's tensors, and whose constants are the
backend and the mask's structure (``plan.Structure.key``). A new mask of the
same structure (documents of new lengths) is new data for the same graph: no
recompilation, and under CUDA graphs (``mode="reduce-overhead"``) new values
copied into the graph's static inputs. The Triton plan must exist before the
compiled call (``maskc.compile(..., device=...)`` or ``CompiledMask.to``):
building it copies tables to the device, which a traced graph cannot do.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .checks import BACKENDS, check_inputs, check_scale
from .plan import structure_of
from .reference import reference_backward, reference_forward


def _launch():
    """``launch.py``, imported on the first Triton call: importing it defines the kernels, which
    reads ``TRITON_INTERPRET`` then (the CPU tests set it first)."""
    from . import launch

    return launch


def _forward(tables, backend: str, key: str, q, k, v, scale: float):
    if backend == "triton":
        return _launch().forward(structure_of(key), tables[0], tables[1], q, k, v, scale)
    return reference_forward(tables, key, q, k, v, scale)


def _backward(tables, backend: str, key: str, q, k, v, out, lse, d_out, d_lse, scale: float, dq_sum=None):
    if backend == "triton":
        d_out = torch.zeros_like(out) if d_out is None else d_out
        return _launch().backward(structure_of(key), tables[0], tables[1], q, k, v, out.to(q.dtype),
                                  lse.to(torch.float32), d_out.to(q.dtype), d_lse, scale, dq_sum)
    dq, dk, dv = reference_backward(tables, key, q, k, v, out, lse, d_out, d_lse, scale)
    return (dq, dk, dv) if dq_sum is None else (dq_sum.add_(dq), dk, dv)


# -- torch.library ops (what torch.compile sees) ----------------------------------------------
@torch.library.custom_op("maskc::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: list[torch.Tensor], backend: str,
                  structure: str, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(tables, backend, structure, q, k, v, scale)


@_attention_op.register_fake
def _(q, k, v, tables, backend, structure, scale):
    lse_dtype = torch.float64 if q.dtype == torch.float64 and backend == "reference" else torch.float32
    return q.new_empty(q.shape[:-1] + (v.shape[-1],)), q.new_empty(q.shape[:-1], dtype=lse_dtype)


@torch.library.custom_op("maskc::attention_backward", mutates_args=())
def _attention_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           lse: torch.Tensor, d_out: torch.Tensor, d_lse: Optional[torch.Tensor],
                           tables: list[torch.Tensor],
                           backend: str, structure: str,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(tables, backend, structure, q, k, v, out, lse, d_out, d_lse, scale)


@_attention_backward_op.register_fake
def _(q, k, v, out, lse, d_out, d_lse, tables, backend, structure, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, tables, backend, structure, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *tables)
    ctx.backend, ctx.structure, ctx.scale = backend, structure, scale


def _attention_grad(ctx, d_out, d_lse):
    q, k, v, out, lse, *tables = ctx.saved_tensors
    d_out = torch.zeros_like(out) if d_out is None else d_out  # d_lse may stay None: the kernels take it
    dq, dk, dv = _attention_backward_op(q, k, v, out, lse, d_out, d_lse, tables, ctx.backend, ctx.structure,
                                        ctx.scale)
    return dq, dk, dv, [None] * len(tables), None, None, None


_attention_op.register_autograd(_attention_grad, setup_context=_setup_context)


# -- eager calls ---------------------------------------------------------------------------------
class _Call:
    """What calls of one mask with one call key run: the backend, the mask's tensors for it, the
    structure key and the default scale."""

    __slots__ = ("backend", "tables", "key", "default_scale")

    def __init__(self, backend: str, tables: tuple, key: str, default_scale: float):
        self.backend, self.tables, self.key, self.default_scale = backend, tables, key, default_scale


class _EagerAttention(torch.autograd.Function):
    """The op outside ``torch.compile``: the forward and backward of the registered op, without
    its dispatch."""

    @staticmethod
    def forward(ctx, q, k, v, call: _Call, scale: float):
        out, lse = _forward(call.tables, call.backend, call.key, q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.set_materialize_grads(False)  # an unused LSE's gradient stays None: no zeros made and read
        ctx.call, ctx.scale = call, scale
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        call = ctx.call
        dq, dk, dv = _backward(call.tables, call.backend, call.key, q, k, v, out, lse, d_out, d_lse, ctx.scale)
        return dq, dk, dv, None, None


def _backend(cm, q, k, v, backend: Optional[str]) -> str:
    """The backend a call runs (checked for what it supports)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{backend=} must be one of {BACKENDS} or None")
    if backend == "triton" or (backend is None and q.is_cuda):
        _launch().check_triton_inputs(cm.block_size, q, k, v)
        return "triton"
    return "reference"


def _tables(cm, backend: str, device: torch.device) -> tuple[tuple, str]:
    if backend == "triton":
        plan = cm.plan(device)
        return (plan.tables, plan.patterns), plan.key
    return cm.reference_tables.tensors, cm.reference_tables.key


def _call(cm, q, k, v, backend: Optional[str]) -> _Call:
    """The checked ``_Call`` of ``cm`` for these tensors' shapes, dtypes and devices."""
    try:
        key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, backend)
    except AttributeError:  # not tensors: check_inputs says which
        key = None
    call = cm.calls.get(key)
    if call is None:
        check_inputs(cm.q_len, cm.kv_len, cm.n_heads, q, k, v, None)
        chosen = _backend(cm, q, k, v, backend)
        tables, structure = _tables(cm, chosen, q.device)
        call = cm.calls[key] = _Call(chosen, tables, structure, 1.0 / math.sqrt(q.shape[-1]))
    return call


def _scale(call_scale: float, scale) -> float:
    if scale is None:
        return call_scale
    check_scale(scale)
    return float(scale)


def attention(cm, q, k, v, scale: Optional[float] = None, return_lse: bool = False, backend: Optional[str] = None):
    """``CompiledMask.__call__``: ``out`` (and ``lse``) of attention under ``cm``."""
    if torch.compiler.is_compiling():
        out, lse = _traced(cm, q, k, v, scale, backend)
    else:
        call = _call(cm, q, k, v, backend)
        scale = _scale(call.default_scale, scale)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            out, lse = _EagerAttention.apply(q, k, v, call, scale)
        else:
            out, lse = _forward(call.tables, call.backend, call.key, q, k, v, scale)
    return (out, lse) if return_lse else out


def kernel_paths(cm, q, k, v, backend: Optional[str] = None) -> dict[str, str]:
    """``CompiledMask.kernel_paths``: which kernel runs each part of a call with these tensors."""
    call = _call(cm, q, k, v, backend)
    if call.backend == "reference":
        return dict.fromkeys(("forward", "dq", "dkdv"), "reference")
    return _launch().kernel_paths(structure_of(call.key), q, k, v)


def _traced(cm, q, k, v, scale, backend):
    """The call as ``torch.compile`` traces it: the registered op, the mask's tensors as inputs."""
    check_inputs(cm.q_len, cm.kv_len, cm.n_heads, q, k, v, scale)
    chosen = _backend(cm, q, k, v, backend)
    if chosen == "triton":
        plan = cm.plans.get(str(q.device))
        if plan is None:
            raise RuntimeError(
                f"maskc: under torch.compile the mask's launch tables must already be on {q.device}: compile it "
                f"with maskc.compile(spec, device='{q.device}') or call cm.to('{q.device}') before the compiled "
                "call (building them copies to the device, which a compiled graph cannot do)")
        tables, key = [plan.tables, plan.patterns], plan.key
    else:
        tables, key = list(cm.reference_tables.tensors), cm.reference_tables.key
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _attention_op(q, k, v, tables, chosen, key, scale)


def attention_backward(cm, q, k, v, out, lse, d_out, d_lse=None, scale: Optional[float] = None,
                       backend: Optional[str] = None, dq_sum: Optional[torch.Tensor] = None):
    """``CompiledMask.backward``: ``(dq, dk, dv)`` from a forward's ``out`` and ``lse``, without
    recomputing the forward; ``d_lse`` may be ``None``. ``out`` and ``lse`` need not come from this
    mask: ring attention passes the merged result of all tiles, and gets each tile's share, adding
    the dQ shares into one ``dq_sum``."""
    call = _call(cm, q, k, v, backend)
    rows = q.shape[:-1]
    for name, x, shape in (("out", out, rows + (v.shape[-1],)), ("d_out", d_out, rows + (v.shape[-1],)),
                           ("lse", lse, rows), ("d_lse", d_lse, rows), ("dq_sum", dq_sum, q.shape)):
        if x is None and name in ("d_lse", "dq_sum"):
            continue
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(shape) or x.device != q.device:
            raise ValueError(f"{name} must be a tensor of shape {tuple(shape)} on {q.device}, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if dq_sum is not None:
        want = torch.float64 if q.dtype == torch.float64 else torch.float32
        if dq_sum.dtype != want:
            raise TypeError(f"dq_sum must be {want} for q of {q.dtype}, got {dq_sum.dtype}")
    return _backward(call.tables, call.backend, call.key, q, k, v, out, lse, d_out, d_lse,
                     _scale(call.default_scale, scale), dq_sum)
