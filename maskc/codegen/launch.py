"""Host side of the kernels: argument checks, tile configs and launches, each done once per shape.

A call's cost on the host is what short sequences pay: at 8K tokens the
kernels of a document mask take a few hundred microseconds. So everything
that depends only on the mask's structure and the tensors' shapes, strides,
dtypes and device is worked out once per such key and kept (``Launch``): the
argument checks, the tile config that fits, the grid, the constexprs, and the
compiled kernel. A launch after the first goes straight to the compiled
kernel's launcher with a prepared argument list, past Triton's JIT binder
(which re-derives the specialisation of every argument at every call); only
the tensors, the scale and the stream are new.

Triton specialises a kernel on the alignment of its pointer arguments and on
integer arguments equal to 1 or divisible by 16. Integers are fixed by the key;
the tensors a call brings are checked for 16-byte alignment at every call, and
a call whose tensors are not aligned goes through the JIT (correct, slower).
Launch hooks (profilers) also send every launch through the JIT.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from typing import Callable, Optional

import torch
import triton
from triton.runtime.errors import OutOfResources
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction
from triton.tools.tensor_descriptor import TensorDescriptor

from . import kernels, tuning
from .plan import Structure, predicate_source
from .predicate import FUNCTION_NAME

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_HEAD_DIM = 256
TRITON_MAX_BATCH_HEADS = 65535  # the launch grids' second axis (programs of one head run together on the first)

#: The kernels whose loop steps copy their K/V (forward, dQ) or Q/dO (dK/dV) tiles with the tensor
#: memory accelerator (``kernels._load_step``) on GPUs that have one (sm_90 and later), where the
#: tensors allow a descriptor. dK/dV loads with pointers: with TMA it measured 1-3% slower
#: (bench/RESULTS.md).
USE_TMA = frozenset({"forward", "dq"})

#: Smaller problems (``q_len * kv_len``) load with pointers on GPUs (``_use_tma``).
TMA_MIN_PAIRS = 1 << 24

_INTERPRETED = isinstance(kernels._attn_fwd, InterpretedFunction)


def interpreting() -> bool:
    """True when the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _INTERPRETED


# -- argument checks ------------------------------------------------------------------------
def check_triton_inputs(block_size: tuple[int, int], q, k, v) -> None:
    """What the Triton kernels support beyond ``check_inputs``; raised before any launch."""
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"q.dtype={q.dtype} is not supported by backend='triton'; use one of {TRITON_DTYPES} "
                        "or backend='reference'")
    for name, x in (("q", q), ("v", v)):
        if x.shape[3] > TRITON_MAX_HEAD_DIM:
            raise ValueError(f"{name} has head_dim={x.shape[3]}; backend='triton' supports head dims up to "
                             f"{TRITON_MAX_HEAD_DIM} (others are padded up to a power of two >= 16)")
    if not (q.is_cuda or (q.device.type == "cpu" and interpreting())):
        raise ValueError(f"q.device={q.device}: backend='triton' runs on CUDA tensors, or on CPU tensors when "
                         "TRITON_INTERPRET=1 was set before maskc's kernels were imported")
    if any(b % 16 for b in block_size):
        raise ValueError(f"the mask was compiled with block_size={block_size}; backend='triton' needs "
                         "multiples of 16 (kernel tiles are powers of two >= 16 dividing them)")
    if q.shape[0] * q.shape[1] > TRITON_MAX_BATCH_HEADS:
        raise ValueError(f"q has batch * heads = {q.shape[0]} * {q.shape[1]}; backend='triton' supports at most "
                         f"{TRITON_MAX_BATCH_HEADS}")


# -- the generated predicate ------------------------------------------------------------------
_predicates: dict[str, Callable] = {}


def predicate(digest: str):
    """The ``@triton.jit`` predicate of a structure, compiled once per distinct text."""
    if digest not in _predicates:
        import linecache

        source = predicate_source(digest)
        filename = f"maskc_generated/{FUNCTION_NAME}_{digest}.py"
        # Triton reads a function's source through inspect/linecache
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        namespace = {"triton": triton, "tl": triton.language, "__name__": f"maskc_generated_{digest}"}
        exec(compile(source, filename, "exec"), namespace)  # the text comes from predicate.py, not from user input
        python_fn = namespace[FUNCTION_NAME].fn  # run it the way the kernels that call it run
        _predicates[digest] = InterpretedFunction(python_fn) if interpreting() else JITFunction(python_fn)
    return _predicates[digest]


# -- TMA ----------------------------------------------------------------------------------------
def tma(kernel: str, *tensors: torch.Tensor) -> bool:
    """Whether ``kernel`` copies its step tiles of ``tensors`` with TMA: it is in ``USE_TMA``, the
    GPU is sm_90 or later (or Triton's interpreter runs the kernels: it runs descriptors too), and
    a descriptor can describe each tensor (``describable``)."""
    if kernel not in USE_TMA:
        return False
    if not interpreting() and torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
        return False
    return describable(*tensors)


def describable(*tensors: torch.Tensor) -> bool:
    """Whether a TMA descriptor can describe each tensor: unit last stride, 16-byte aligned base
    and other strides (the copy engine's rules)."""
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0
               and all(st > 0 and st * t.element_size() % 16 == 0 for st in strides(t)[:-1]) for t in tensors)


def strides(t: torch.Tensor) -> list[int]:
    """``t``'s strides, with those of dimensions of size 1 (no index moves along them, and torch
    leaves them arbitrary) set past the whole tensor, a stride the copy engine accepts."""
    extent = max(size * stride for size, stride in zip(t.shape, t.stride()))
    return [stride if size > 1 else extent for size, stride in zip(t.shape, t.stride())]


def descriptor(t: torch.Tensor, rows: int, use_tma: bool):
    """A descriptor of ``t[batch, heads, rows, cols]`` for tiles of ``rows`` rows (``_load_step``),
    or ``t`` itself where the kernels load with pointers (the argument is then unused)."""
    if not use_tma:
        return t
    return TensorDescriptor(t, list(t.shape), strides(t), [1, 1, rows, tuning.head_bucket(t.shape[-1])])


# -- the sm_90 fast path ----------------------------------------------------------------------
_hopper_module = None  # hopper.py once imported, or the reason it cannot be


def _hopper():
    """``hopper.py`` (the Gluon forward), imported on first use, or the reason it cannot be: an
    installed Triton without the Gluon API it needs."""
    global _hopper_module
    if _hopper_module is None:
        try:
            from . import hopper
            _hopper_module = hopper
        except (ImportError, AttributeError, TypeError) as error:
            _hopper_module = f"this Triton ({triton.__version__}) lacks the Gluon API of the sm_90 path ({error})"
    return _hopper_module


#: Per sm_90 launch key (``_sm90_key``): why the sm_90 kernel does not run (``None``: it runs).
#: Decided once per key, so that a call asks no device property (nor anything a CUDA graph
#: capture cannot take) once its key is known.
_sm90_decided: dict[tuple, Optional[str]] = {}


def sm90_unsupported(structure: Structure, kernel: str, q, k, v, *more: torch.Tensor) -> Optional[str]:
    """Why ``kernel`` (``"forward"``, ``"dq"`` or ``"dkdv"``) of these tensors under ``structure``
    does not run the sm_90 Gluon kernel (``hopper.py``), or ``None`` where it does (decode
    structures never get here); ``more``: the backward's other tensors (``_run_sm90``)."""
    if os.environ.get("MASKC_GLUON", "1") == "0":
        return "turned off by MASKC_GLUON=0"
    if interpreting() or not q.is_cuda:
        return "not on a CUDA GPU"
    capability = torch.cuda.get_device_capability(q.device)
    if capability[0] != 9:
        return f"the GPU is sm_{capability[0]}{capability[1]}; the path is written for sm_90"
    hopper = _hopper()
    if isinstance(hopper, str):
        return hopper
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"q.dtype={q.dtype}; the path takes float16 and bfloat16"
    if kernel != "forward" and os.environ.get("MASKC_GLUON_BACKWARD", "0") != "1":
        return (f"the sm_90 {'dQ' if kernel == 'dq' else 'dK/dV'} kernel is opt-in (MASKC_GLUON_BACKWARD=1) until "
                "it outruns the Triton kernel")
    configs = {"forward": hopper.CONFIGS, "dq": hopper.DQ_CONFIGS, "dkdv": hopper.DKDV_CONFIGS}[kernel]
    if q.shape[-1] not in configs or v.shape[-1] != q.shape[-1]:
        return (f"head dims {q.shape[-1]} and {v.shape[-1]}; the path's {kernel} takes equal head dims of "
                f"{', '.join(map(str, configs))}")
    if not structure.spans:
        return "the mask's PARTIAL tiles need its generated predicate"
    block_m, block_n, _ = configs[q.shape[-1]]
    if structure.block_q % block_m or structure.block_kv % block_n:
        return f"block_size ({structure.block_q}, {structure.block_kv}) is not a multiple of ({block_m}, {block_n})"
    if structure.q_len * structure.kv_len < TMA_MIN_PAIRS:
        return f"fewer than {TMA_MIN_PAIRS} pairs: the host's descriptors cost more than the kernel saves"
    if kernel == "dkdv" and structure.q_len % 4:
        return f"q_len={structure.q_len} is not a multiple of 4: the rows' LSE and delta are copied 16 bytes aligned"
    if not (_aligned(q, k, v, *more) and describable(q, k, v, *more)):
        return "a tensor's strides or alignment do not allow a TMA descriptor"
    return None


def _describe(t: torch.Tensor, rows: int):
    return _hopper().descriptor(t, strides(t), rows)


def _sm90_forward_launch(structure: Structure, q, k, v) -> Launch:
    hopper = _hopper()
    block_m, block_n, stages = hopper.CONFIGS[q.shape[-1]]
    rows = block_m // 2 if hopper.PINGPONG else block_m  # a consumer partition's rows: one warp per 16
    config = tuning.TileConfig(block_m, block_n, rows // 16, stages)
    fixed = dict(n_heads=q.shape[1], group=q.shape[1] // k.shape[1], q_len=structure.q_len, kv_len=structure.kv_len,
                 n_q_blocks=structure.n_q_blocks, ONE_LOOP=structure.one_loop,
                 TRIM=structure.trim("forward", block_m, block_n), N_MASK_HEADS=structure.n_mask_heads,
                 BQ=structure.block_q, BK=structure.block_kv, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_D=q.shape[-1],
                 STAGES=stages, OVERLAP=hopper.OVERLAP, PINGPONG=hopper.PINGPONG, FMA=hopper.FMA_SOFTMAX,
                 TURNS=hopper.TURNS, maxnreg=hopper.MAX_REGS)
    grid = (structure.n_q_blocks * (structure.block_q // block_m), q.shape[0] * q.shape[1], 1)
    kernel, grid = _tiles_kernel(hopper._attn_fwd_sm90, hopper._attn_fwd_sm90_persistent, hopper.PERSISTENT, grid,
                                 q.device, fixed, n_bh=grid[1],
                                 Q_BUFFERS=_own_buffers(1, block_m, block_n, stages, q.shape[-1]))
    return Launch(kernel, grid, fixed, ("q_desc", "k_desc", "v_desc", "o_desc", "Lse", "T", "qk_scale"), config,
                  {"q_desc": rows, "k_desc": block_n, "v_desc": block_n, "o_desc": rows}, True, _describe)


def multiprocessors(device: torch.device) -> int:
    """The GPU's multiprocessor count: the persistent kernels' grid."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tiles_kernel(kernel, persistent_kernel, persistent: bool, grid: tuple[int, int, int], device: torch.device,
                  fixed: dict, **more) -> tuple:
    """The kernel and grid that run the tiles of ``grid`` (``grid[0]`` programs of each of
    ``grid[1]`` heads): ``kernel``, a program per tile; or where ``persistent``,
    ``persistent_kernel``, a program per multiprocessor (or per tile where there are fewer)
    taking the tiles in rounds, with ``more`` (the heads' count, its own buffers) in ``fixed``."""
    if not persistent:
        return kernel, grid
    fixed.update(more)
    return persistent_kernel, (min(grid[0] * grid[1], multiprocessors(device)), 1, 1)


#: Shared memory an sm_90 program may take (bytes): the H100's and H200's 227 KiB.
SM90_SHARED_BYTES = 227 * 1024


def _own_buffers(own_tiles: int, own_rows: int, step_rows: int, stages: int, head_d: int) -> int:
    """Buffers of a persistent program's own tiles (``own_tiles`` of ``own_rows`` rows: the
    forward's Q, dQ's Q and dO, dK/dV's K and V): two (the next tile's are copied while this
    tile's are read) where they fit in shared memory beside the ring of ``stages`` steps of two
    tiles of ``step_rows`` rows (16-bit), else one."""
    return 2 if (2 * own_tiles * own_rows + 2 * stages * step_rows) * head_d * 2 <= SM90_SHARED_BYTES - 1024 else 1


def _sm90_dq_launch(structure: Structure, q, k, v, out, d_out, dq) -> Launch:
    hopper = _hopper()
    block_m, block_n, stages = hopper.DQ_CONFIGS[q.shape[-1]]
    rows = block_m // 2 if hopper.DQ_PINGPONG else block_m  # a consumer partition's rows: one warp per 16
    config = tuning.TileConfig(block_m, block_n, rows // 16, stages)
    fixed = dict(**_strides("o", out), **_strides("dq", dq), n_heads=q.shape[1], group=q.shape[1] // k.shape[1],
                 q_len=structure.q_len, kv_len=structure.kv_len, n_q_blocks=structure.n_q_blocks,
                 ONE_LOOP=structure.one_loop, TRIM=structure.trim("forward", block_m, block_n),
                 N_MASK_HEADS=structure.n_mask_heads,
                 BQ=structure.block_q, BK=structure.block_kv, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_D=q.shape[-1],
                 STAGES=stages, OVERLAP=hopper.DQ_OVERLAP, PINGPONG=hopper.DQ_PINGPONG,
                 ADD_DQ=dq.dtype == torch.float32,  # ``backward``'s dq_sum: inputs here are 16-bit
                 maxnreg=hopper.MAX_REGS)
    grid = (structure.n_q_blocks * (structure.block_q // block_m), q.shape[0] * q.shape[1], 1)
    kernel, grid = _tiles_kernel(hopper._attn_bwd_dq_sm90, hopper._attn_bwd_dq_sm90_persistent, hopper.DQ_PERSISTENT,
                                 grid, q.device, fixed, n_bh=grid[1],
                                 Q_BUFFERS=_own_buffers(2, block_m, block_n, stages, q.shape[-1]))
    return Launch(kernel, grid, fixed,
                  ("q_desc", "k_desc", "v_desc", "Out", "do_desc", "dQ", "Lse", "dLse", "Lse2", "Delta", "T",
                   "qk_scale", "scale"), config,
                  {"q_desc": rows, "k_desc": block_n, "v_desc": block_n, "do_desc": rows}, True, _describe)


def _sm90_dkdv_launch(structure: Structure, q, k, v, d_out) -> Launch:
    hopper = _hopper()
    block_m, block_n, stages = hopper.DKDV_CONFIGS[q.shape[-1]]
    # two partitions of a warpgroup each, 64 keys apiece, or one of two warpgroups (side by side
    # over the head dim where the program has 64 keys)
    pingpong = hopper.DKDV_PINGPONG and block_n == 128
    rows = block_n // 2 if pingpong else block_n  # a consumer partition's keys
    config = tuning.TileConfig(block_m, block_n, 4 if pingpong else 8, stages)
    fixed = dict(n_heads=q.shape[1], n_kv_heads=k.shape[1], group=q.shape[1] // k.shape[1], q_len=structure.q_len,
                 kv_len=structure.kv_len, n_kv_blocks=structure.n_kv_blocks, ONE_LOOP=structure.one_loop,
                 TRIM=structure.trim("backward", block_n, block_m), N_MASK_HEADS=structure.n_mask_heads,
                 BQ=structure.block_q, BK=structure.block_kv, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_D=q.shape[-1],
                 STAGES=stages, OVERLAP=hopper.DKDV_OVERLAP, PINGPONG=pingpong, maxnreg=hopper.MAX_REGS)
    grid = (structure.n_kv_blocks * (structure.block_kv // block_n), q.shape[0] * k.shape[1], 1)
    kernel, grid = _tiles_kernel(hopper._attn_bwd_dkdv_sm90, hopper._attn_bwd_dkdv_sm90_persistent,
                                 hopper.DKDV_PERSISTENT, grid, q.device, fixed, n_bkv=grid[1],
                                 KV_BUFFERS=_own_buffers(2, block_n, block_m, stages, q.shape[-1]))
    return Launch(kernel, grid, fixed,
                  ("q_desc", "do_desc", "k_desc", "v_desc", "dk_desc", "dv_desc", "lse_desc", "delta_desc", "T",
                   "qk_scale", "scale"), config,
                  {"q_desc": block_m, "do_desc": block_m, "k_desc": rows, "v_desc": rows, "dk_desc": rows,
                   "dv_desc": rows, "lse_desc": block_m, "delta_desc": block_m}, True, _describe)


def _sm90_key(kernel: str, structure: Structure, q, k, v, *more: torch.Tensor) -> tuple:
    """What decides the sm_90 ``kernel`` of a call: its launch key and the switches that apply."""
    return _key(f"{kernel}_sm90", structure, _aligned(q, k, v, *more), q, k, v, *more) + (
        os.environ.get("MASKC_GLUON", "1"), os.environ.get("MASKC_GLUON_BACKWARD", "0"), TMA_MIN_PAIRS)


def _sm90_reason(key: tuple, kernel: str, structure: Structure, *tensors: torch.Tensor) -> Optional[str]:
    if key not in _sm90_decided:
        _sm90_decided[key] = sm90_unsupported(structure, kernel, *tensors)
    return _sm90_decided[key]


#: Each sm_90 kernel's launch, built from the structure and the tensors ``_run_sm90`` is given.
_SM90_LAUNCHES = {"forward": _sm90_forward_launch, "dq": _sm90_dq_launch, "dkdv": _sm90_dkdv_launch}


def _run_sm90(kernel: str, structure: Structure, tensors: tuple, values: tuple, flags: tuple = ()) -> bool:
    """Run the sm_90 ``kernel`` on ``values`` where it applies to ``tensors``: q, k, v and, for
    dQ, out, d_out and dq, for dK/dV, d_out. ``False`` where the Triton kernel must run.
    ``flags``: what else the compiled kernel depends on (an argument that is ``None``)."""
    if structure.q_len * structure.kv_len < TMA_MIN_PAIRS:  # the common short call: no key to build
        return False
    key = _sm90_key(kernel, structure, *tensors)
    found = _launches.get(key + flags)
    if found is not None:
        found(values)
        return True
    if _sm90_reason(key, kernel, structure, *tensors) is not None:
        return False
    try:
        found = _SM90_LAUNCHES[kernel](structure, *tensors)
        found(values)  # the first call compiles
    except Exception as error:  # a Triton whose Gluon compiles differently: Triton's kernel instead
        _sm90_decided[key] = f"the sm_90 kernel failed to compile: {type(error).__name__}: {error}"
        warnings.warn(f"maskc: {_sm90_decided[key]}; the Triton {kernel} kernel runs instead", RuntimeWarning,
                      stacklevel=3)
        return False
    _launches[key + flags] = found
    return True


def kernel_paths(structure: Structure, q, k, v) -> dict[str, str]:
    """Which kernel runs each part of a call with these tensors (the output, its gradient and dQ
    taken as laid out like ``q``): ``"sm90-gluon"`` or ``"triton"``, with the reason where the
    sm_90 path does not apply."""
    def path(kernel: str, *more: torch.Tensor) -> str:
        reason = _sm90_reason(_sm90_key(kernel, structure, q, k, v, *more), kernel, structure, q, k, v, *more)
        return "sm90-gluon" if reason is None else f"triton ({reason})"

    forward = "triton-decode" if structure.decode else path("forward")  # decode: few rows of long reach
    if dq_atomic():
        atomic = "triton (MASKC_DQ_ATOMIC=1: the dK/dV kernel adds dQ with atomics)"
        return {"forward": forward, "dq": atomic, "dkdv": atomic}
    return {"forward": forward, "dq": path("dq", q, q, q), "dkdv": path("dkdv", q)}


# -- launches -----------------------------------------------------------------------------------
def _hooks_set() -> bool:
    hook = triton.knobs.runtime.launch_enter_hook
    return bool(getattr(hook, "calls", hook))


class Launch:
    """Launches of one kernel for one key (structure, shapes, strides, dtypes, device, alignment)
    with one tile config. The first goes through Triton's JIT, which compiles the kernel (or
    raises ``OutOfResources``) and returns it; later ones call its launcher directly with
    ``template``, the arguments in the kernel's order, where the per-call ``names`` are filled
    in. The values of the names in ``descriptors`` are tensors that the kernel copies with TMA:
    each is wrapped in a descriptor for tiles of that many rows (by ``describe``), a copy of one
    made at the first call with the new tensor in it (the key fixes shapes and strides). Compile
    options that are no argument (``maxnreg``) may be in ``fixed``."""

    def __init__(self, kernel, grid: tuple[int, int, int], fixed: dict, names: tuple[str, ...],
                 config: tuning.TileConfig, descriptors: dict[str, int], aligned: bool,
                 describe: Callable = lambda t, rows: descriptor(t, rows, True)):
        self.kernel, self.grid, self.config, self.aligned = kernel, grid, config, aligned
        self.describe = describe  # (tensor, rows) -> the descriptor the kernel takes
        self.fixed, self.names = fixed, names
        order = kernel.arg_names
        self.template = [fixed.get(name) for name in order]
        self.slots = [order.index(name) for name in names]
        self.descriptors = {names.index(name): rows for name, rows in descriptors.items()}
        self.made: dict[int, TensorDescriptor] = {}
        self.compiled = None
        self.direct = None  # the compiled kernel's launcher, function, metadata and the stream getter

    def _wrapped(self, values: tuple) -> list:
        values = list(values)
        for n, rows in self.descriptors.items():
            made = self.made.get(n)
            if made is None:
                made = self.made[n] = self.describe(values[n], rows)
            else:
                made = copy.copy(made)
                made.base = values[n]
            values[n] = made
        return values

    def __call__(self, values: tuple) -> None:
        device = values[0].device.index  # a tensor: the first argument is never a descriptor's
        if self.descriptors:
            values = self._wrapped(values)
        compiled = self.compiled
        if compiled is None or _hooks_set():
            kwargs = dict(self.fixed)
            kwargs.update(zip(self.names, values))
            found = self.kernel[self.grid](num_warps=self.config.num_warps, num_stages=self.config.num_stages,
                                           **kwargs)
            if self.aligned and not interpreting():  # an unaligned key keeps going through the JIT
                self.compiled = found
                self.direct = (found.run, found.function, found.packed_metadata,
                               triton.runtime.driver.active.get_current_stream)
            return
        args = self.template.copy()
        for slot, value in zip(self.slots, values):
            args[slot] = value
        run, function, metadata, current_stream = self.direct
        run(*self.grid, current_stream(device), function, metadata, None, None, None, *args)


_launches: dict[tuple, Launch] = {}
#: the tile config that fitted, per kernel, structure, dtype, device and head dims
_fitted: dict[tuple, tuning.TileConfig] = {}


def launch(name: str, key: tuple, values: tuple, build: Callable[[tuning.TileConfig], Launch],
           structure: Structure, q, v) -> None:
    """Launch kernel ``name`` with ``values`` through the ``Launch`` kept for ``key``; the first
    call of a key picks its tile config (``tuning.config_for``), or the next smaller one while the
    GPU lacks the shared memory it needs (masks with bit patterns pipeline one more tile)."""
    found = _launches.get(key)
    if found is not None:
        found(values)
        return

    def bench(config: tuning.TileConfig) -> float:
        return triton.testing.do_bench(lambda: build(config)(values), warmup=5, rep=25)

    fit_key = (name, structure.key, q.dtype, q.device, q.shape[-1], v.shape[-1])
    config = _fitted.get(fit_key) or tuning.config_for(name, q.device, q.dtype, q.shape[-1], structure.block_q,
                                                       structure.block_kv, structure.short_rows, bench=bench)
    while True:
        found = build(config)
        try:
            found(values)
        except OutOfResources:  # raised before the kernel runs: nothing was written
            config = tuning.smaller(config)
            if config is None:
                raise
            continue
        _launches[key], _fitted[fit_key] = found, config
        return


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 only applies to float32 operands


def _constexprs(structure: Structure, direction: str, config: tuning.TileConfig, q, v) -> dict:
    """Constexpr arguments of the three kernels."""
    program, step = (config.block_m, config.block_n) if direction == "forward" else (config.block_n, config.block_m)
    spans = structure.spans  # the predicate and its numbers go unused: one kernel for every such mask
    return dict(
        partial_mask=kernels.spans_only if spans else predicate(structure.source), SPANS=spans,
        ONE_LOOP=structure.one_loop, CUT=structure.cut, TRIM=structure.trim(direction, program, step),
        N_MASK_HEADS=structure.n_mask_heads, ARGS_WIDTH=1 if spans else structure.args_width, BQ=structure.block_q,
        BK=structure.block_kv, BLOCK_M=config.block_m, BLOCK_N=config.block_n, HEAD_D=q.shape[-1],
        BLOCK_D=tuning.head_bucket(q.shape[-1]), HEAD_DV=v.shape[-1],
        BLOCK_DV=tuning.head_bucket(v.shape[-1]), PRECISION=_precision(q.dtype),
    )


def _aligned(*tensors: torch.Tensor) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def _key(name: str, structure: Structure, aligned: bool, q, k, v, *more: torch.Tensor) -> tuple:
    """What fixes a kernel's launch: everything but the tensors' data."""
    key = (name, structure.key, aligned, q.dtype, q.device, q.shape, q.stride(), k.shape, k.stride(), v.shape,
           v.stride())
    return key + tuple(x for t in more for x in (t.shape, t.stride(), t.dtype)) if more else key


def _use_tma(kernel: str, structure: Structure, aligned: bool, *tensors: torch.Tensor) -> bool:
    """TMA copies for ``kernel``'s steps (``tma``), on GPUs for problems of ``TMA_MIN_PAIRS`` pairs
    or more: a descriptor is encoded on the host at every launch, about 10 us for the two, which
    smaller problems, whose host time exceeds their kernels', feel and cannot win back."""
    return aligned and tma(kernel, *tensors) and (
        interpreting() or structure.q_len * structure.kv_len >= TMA_MIN_PAIRS)


def _strides(prefix: str, t: torch.Tensor, letters: str = "bhmd") -> dict:
    return {f"stride_{prefix}{letter}": st for letter, st in zip(letters, t.stride())}


def forward(structure: Structure, tables, patterns, q, k, v, scale: float):
    """``(out, lse)`` of the Triton forward (arguments checked by the caller)."""
    if scale < 0:  # the kernel needs scale >= 0 (see _fwd_tiles); softmax(scale * q k^T) is unchanged
        q, scale = -q, -scale
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    if structure.empty:
        return out.zero_(), lse.fill_(-math.inf)
    if structure.decode:  # few rows of long reach: split-K over row groups, GQA in the tile
        from . import decode  # imports this module: here, not at the top

        return decode.forward(structure, tables, q, k, v, out, lse, scale * kernels.LOG2E.value)
    if _run_sm90("forward", structure, (q, k, v), (q, k, v, out, lse, tables, scale * kernels.LOG2E.value)):
        return out, lse
    aligned = _aligned(q, k, v)

    def build(config: tuning.TileConfig) -> Launch:
        use_tma = _use_tma("forward", structure, aligned, k, v)
        fixed = dict(**_strides("q", q), **_strides("k", k, "bhnd"), **_strides("v", v, "bhnd"), **_strides("o", out),
                     n_heads=q.shape[1], group=q.shape[1] // k.shape[1], q_len=structure.q_len,
                     kv_len=structure.kv_len, n_q_blocks=structure.n_q_blocks, TMA=use_tma,
                     **_constexprs(structure, "forward", config, q, v))
        grid = (structure.n_q_blocks * (structure.block_q // config.block_m), q.shape[0] * q.shape[1], 1)
        return Launch(kernels._attn_fwd, grid, fixed,
                      ("Q", "K", "V", "K_desc", "V_desc", "Out", "Lse", "T", "patterns", "qk_scale"), config,
                      {"K_desc": config.block_n, "V_desc": config.block_n} if use_tma else {}, aligned)

    launch("forward", _key("forward", structure, aligned, q, k, v),
           (q, k, v, k, v, out, lse, tables, patterns, scale * kernels.LOG2E.value), build, structure, q, v)
    return out, lse


def dq_atomic() -> bool:
    """Whether the backward adds dQ with atomics (``MASKC_DQ_ATOMIC=1``): the dK/dV kernel adds
    each step's ``dS K`` into a float32 sum (``kernels._dkdv_tiles``) after a kernel of the row
    terms, instead of the dQ kernel computing ``S`` and ``dP`` again, which makes a tile's five
    products instead of seven; the order of the additions, and so dQ's last bits, vary from run
    to run. The Triton kernels then run the whole backward, also where the sm_90 ones would
    (``MASKC_GLUON_BACKWARD=1``)."""
    return os.environ.get("MASKC_DQ_ATOMIC", "0") == "1"


#: Rows of a program of the row-terms kernel (``kernels._attn_bwd_rows``).
ROWS_BLOCK = 64


def _launch_row_terms(structure: Structure, out, d_out, lse, d_lse, lse2, delta, dq, zero_dq: bool) -> None:
    """The backward's row terms (LSE in base 2, ``delta``) into ``lse2`` and ``delta``, by their
    own kernel: with ``dq_atomic``, no dQ kernel computes them. With ``zero_dq`` the kernel zeroes
    the float32 ``dq`` that the dK/dV kernel then adds into (no launch of its own for that)."""
    aligned = _aligned(out, d_out, lse, dq, *([] if d_lse is None else [d_lse]))
    key = _key("rows", structure, aligned, out, d_out, lse, dq) + (d_lse is None, zero_dq)
    found = _launches.get(key)
    if found is None:
        grid = (triton.cdiv(structure.q_len, ROWS_BLOCK), out.shape[0] * out.shape[1], 1)
        fixed = dict(**_strides("o", out), **_strides("do", d_out), **_strides("dq", dq), n_heads=out.shape[1],
                     q_len=structure.q_len, BLOCK_M=ROWS_BLOCK, HEAD_D=dq.shape[-1],
                     BLOCK_D=tuning.head_bucket(dq.shape[-1]), HEAD_DV=out.shape[-1],
                     BLOCK_DV=tuning.head_bucket(out.shape[-1]), ZERO_DQ=zero_dq)
        found = _launches[key] = Launch(kernels._attn_bwd_rows, grid, fixed,
                                        ("Out", "dOut", "Lse", "dLse", "Lse2", "Delta", "dQ"),
                                        tuning.TileConfig(ROWS_BLOCK, ROWS_BLOCK, 4, 1), {}, aligned)
    found((out, d_out, lse, d_lse, lse2, delta, dq))


def backward(structure: Structure, tables, patterns, q, k, v, out, lse, d_out, d_lse, scale: float, dq_sum=None):
    """``(dq, dk, dv)`` of the Triton backward from the forward's ``out`` and ``lse``; ``d_lse`` may
    be ``None`` (no gradient flows into the LSE); with ``dq_sum`` (float32, q's shape) dQ is added
    into it, which is returned as ``dq``. With ``dq_atomic`` the dK/dV kernel adds dQ."""
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    if structure.empty:
        return dq_sum if dq_sum is not None else torch.zeros_like(q), dk.zero_(), dv.zero_()
    atomic = dq_atomic()
    if dq_sum is not None:
        dq = dq_sum
    elif atomic:  # the float32 sum the dK/dV kernel adds into (zeroed by the row terms' kernel)
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    else:
        dq = torch.empty_like(q)
    # written for every row (``rows`` apart a head) by the dQ kernel or the row terms' kernel, read by dK/dV
    lse2, delta = (torch.empty(lse.shape, dtype=torch.float32, device=lse.device) for _ in range(2))
    lse = lse.contiguous()  # the kernels index rows bh * q_len + row
    if d_lse is not None:
        d_lse = d_lse.to(torch.float32).contiguous()
    qk_scale = scale * kernels.LOG2E.value
    aligned = _aligned(q, k, v, out, d_out)
    n_heads, n_kv_heads = q.shape[1], k.shape[1]

    def fixed(**more) -> dict:
        return dict(**_strides("q", q), **_strides("k", k, "bhnd"), **_strides("v", v, "bhnd"),
                    **_strides("do", d_out), q_len=structure.q_len, kv_len=structure.kv_len, n_heads=n_heads,
                    group=n_heads // n_kv_heads, **more)

    def build_dq(config: tuning.TileConfig) -> Launch:
        use_tma = _use_tma("dq", structure, aligned, k, v)
        grid = (structure.n_q_blocks * (structure.block_q // config.block_m), q.shape[0] * n_heads, 1)
        return Launch(kernels._attn_bwd_dq, grid,
                      fixed(**_strides("o", out), **_strides("dq", dq), n_q_blocks=structure.n_q_blocks, TMA=use_tma,
                            ADD_DQ=dq_sum is not None, **_constexprs(structure, "forward", config, q, v)),
                      ("Q", "K", "V", "K_desc", "V_desc", "Out", "dOut", "Lse", "dLse", "Lse2", "Delta", "dQ", "T",
                       "patterns", "qk_scale", "scale"), config,
                      {"K_desc": config.block_n, "V_desc": config.block_n} if use_tma else {}, aligned)

    def build_dkdv(config: tuning.TileConfig) -> Launch:
        use_tma = _use_tma("dkdv", structure, aligned, q, d_out)
        grid = (structure.n_kv_blocks * (structure.block_kv // config.block_n), q.shape[0] * n_kv_heads, 1)
        return Launch(kernels._attn_bwd_dkdv, grid,
                      fixed(**_strides("dk", dk, "bhnd"), **_strides("dv", dv, "bhnd"), **_strides("dq", dq),
                            n_kv_heads=n_kv_heads, n_kv_blocks=structure.n_kv_blocks, TMA=use_tma, DQ=atomic,
                            **_constexprs(structure, "backward", config, q, v)),
                      ("Q", "K", "V", "dOut", "Q_desc", "dO_desc", "Lse2", "Delta", "dK", "dV", "dQ", "T",
                       "patterns", "qk_scale", "scale"), config,
                      {"Q_desc": config.block_m, "dO_desc": config.block_m} if use_tma else {}, aligned)

    key = _key("dq", structure, aligned, q, k, v, out, d_out, dq)
    flags = (dq_sum is not None, d_lse is None)  # what else the dQ kernels are compiled for
    # the row terms first, which dK/dV reads: by the dQ kernel, or with atomics by their own
    if atomic:
        _launch_row_terms(structure, out, d_out, lse, d_lse, lse2, delta, dq, dq_sum is None)
    elif not _run_sm90("dq", structure, (q, k, v, out, d_out, dq),
                       (q, k, v, out, d_out, dq, lse, d_lse, lse2, delta, tables, qk_scale, scale), flags):
        launch("dq", key + flags,
               (q, k, v, k, v, out, d_out, lse, d_lse, lse2, delta, dq, tables, patterns, qk_scale, scale), build_dq,
               structure, q, v)
    if not atomic and _run_sm90("dkdv", structure, (q, k, v, d_out),
                                (q, d_out, k, v, dk, dv, lse2.view(-1), delta.view(-1), tables, qk_scale, scale)):
        return dq, dk, dv
    launch("dkdv", ("dkdv",) + key[1:] + (atomic,),
           (q, k, v, d_out, q, d_out, lse2, delta, dk, dv, dq, tables, patterns, qk_scale, scale), build_dkdv,
           structure, q, v)
    return dq if dq_sum is not None else dq.to(q.dtype), dk, dv
