"""maskc's kernels compile for sm_90 with the installed Triton.

The sm_90 Gluon kernels (``codegen/hopper.py``) run on GPUs only
(``tests/gpu/test_hopper.py`` checks their results there), and the Triton kernels
run here in Triton's interpreter, which compiles nothing. So here, on the CPU,
Triton compiles both down to cubins for an sm_90 target that a stand-in driver
reports, in a subprocess so that no other test sees that driver. This catches
what a Triton release changes in the Gluon API or in its code generation before
a GPU run does.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")

SM90_DRIVER = textwrap.dedent("""
    import contextlib
    import os
    from unittest import mock

    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class Sm90(DriverBase):  # reports an sm_90 GPU; compiles, never launches
        def is_active(self): return True
        def map_python_to_cpp_type(self, ty): return ty
        def get_current_target(self): return GPUTarget("cuda", 90, 32)
        def get_active_torch_device(self): return torch.device("cpu")
        def get_benchmarker(self): raise RuntimeError("no GPU")
        def get_current_device(self): return 0
        def get_current_stream(self, device=None): return 0

    triton.runtime.driver.set_active(Sm90())
""")

SCRIPT = SM90_DRIVER + textwrap.dedent("""
    import maskc
    from maskc.codegen import launch

    CASES = [  # long rows (FULL and PARTIAL lists), short rows (one list), a cut sequence, GQA
        (maskc.Causal(), 16384, 128, 4, 4),
        (maskc.Documents(lengths=[1000, 3000, 96]) & maskc.Causal(), 4096, 64, 4, 2),
        (maskc.SlidingWindow(left=1024), 4000, 256, 4, 1),
    ]
    PERSISTENT = {"PERSISTENT": True, "DQ_PERSISTENT": True, "DKDV_PERSISTENT": True}
    ONE_PARTITION = {"PINGPONG": False, "DQ_PINGPONG": False, "DKDV_PINGPONG": False}
    # hopper.py settings: the defaults and the persistent kernels at every head dim; the GPU suite's
    # other schedules at the first (one consumer partition; the forward's turns)
    SCHEDULES = [{}, PERSISTENT]
    MORE = [ONE_PARTITION, {**ONE_PARTITION, **PERSISTENT}, {"TURNS": True}, {"TURNS": True, "PERSISTENT": True}]
    for number, (mask, n, head_dim, heads, kv_heads) in enumerate(CASES):
        plan = maskc.compile(maskc.Spec(q_len=n, kv_len=n, mask=mask)).plan("cpu")
        q = torch.empty(1, heads, n, head_dim, dtype=torch.bfloat16)
        k = torch.empty(1, kv_heads, n, head_dim, dtype=torch.bfloat16)
        lse = torch.empty(1, heads, n)
        builds = []
        for settings in SCHEDULES + (MORE if number == 0 else []):
            with mock.patch.multiple(launch._hopper(), **settings) if settings else contextlib.nullcontext(), \
                    mock.patch.object(launch, "multiprocessors", lambda device: 132):  # an H100's, H200's
                builds.append((launch._sm90_forward_launch(plan.structure, q, k, k),
                               (q, k, k, torch.empty_like(q), lse, plan.tables, 0.1)))
                if "TURNS" in settings:  # the forward's alone
                    continue
                # dQ into a 16-bit tensor with no LSE gradient, and (once) into ring attention's float32 sum
                sums = [] if settings else [(torch.empty(q.shape), lse)]
                for dq, d_lse in [(torch.empty_like(q), None)] + sums:
                    builds.append((launch._sm90_dq_launch(plan.structure, q, k, k, q, q, dq),
                                   (q, k, k, q, q, dq, lse, d_lse, lse, lse, plan.tables, 0.1, 0.1)))
                builds.append((launch._sm90_dkdv_launch(plan.structure, q, k, k, q),
                               (q, q, k, k, torch.empty_like(k), torch.empty_like(k), lse.view(-1), lse.view(-1),
                                plan.tables, 0.1, 0.1)))
        for built, values in builds:
            arguments = dict(built.fixed, **dict(zip(built.names, built._wrapped(values))))
            kernel = built.kernel.warmup(grid=built.grid, num_warps=built.config.num_warps, **arguments)
            assert "cubin" in kernel.asm and kernel.metadata.shared <= 232448, kernel.metadata.shared
            print("compiled", built.kernel.fn.__name__, head_dim, plan.structure.one_loop, plan.structure.cut,
                  built.fixed.get("ADD_DQ", ""), kernel.metadata.shared)
""")


TRITON_SCRIPT = SM90_DRIVER + textwrap.dedent("""
    import maskc
    from maskc.codegen import launch, tuning

    launch.tma = lambda kernel, *tensors: False  # asks the GPU, which is not there: pointer loads


    def gpu_config(kernel, device, dtype, head_dim, bq, bk, short_rows=False, bench=None):
        key = (kernel, tuning.head_bucket(head_dim))  # the GPU's tiles, not the interpreter's
        return tuning.fit((tuning.SHORT_ROWS_16BIT if short_rows else {}).get(key, tuning.DEFAULTS_16BIT[key]), bq, bk)


    def compile_instead(self, values):  # each launch compiles its kernel and runs nothing
        arguments = dict(self.fixed, **dict(zip(self.names, values)))
        kernel = self.kernel.warmup(grid=self.grid, num_warps=self.config.num_warps,
                                    num_stages=self.config.num_stages, **arguments)
        print("compiled", self.kernel.fn.__name__, self.config, kernel.metadata.shared)


    tuning.config_for = gpu_config
    launch.Launch.__call__ = compile_instead
    CASES = [(maskc.Causal(), 8192, 128), (maskc.Documents(lengths=[1000, 3000, 96]) & maskc.Causal(), 4096, 64)]
    for mask, n, head_dim in CASES:  # long rows (two loops), short rows (one loop, a cut sequence)
        plan = maskc.compile(maskc.Spec(q_len=n, kv_len=n, mask=mask)).plan("cpu")
        q = torch.empty(1, 4, n, head_dim, dtype=torch.bfloat16)
        launch.forward(plan.structure, plan.tables, plan.patterns, q, q, q, 0.1)
        for atomic in ("0", "1"):  # dQ by its kernel; dQ added by dK/dV after the row terms' kernel
            os.environ["MASKC_DQ_ATOMIC"] = atomic
            launch.backward(plan.structure, plan.tables, plan.patterns, q, q, q, q, torch.empty(1, 4, n), q, None,
                            0.1)
""")


def compiled_for_sm90(script: str, tmp_path) -> str:
    """What ``script`` prints, run with Triton compiling afresh (``tmp_path``) for sm_90, ptxas's
    log shown."""
    compiling = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    compiling.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DUMP_PTXAS_LOG="1")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=compiling)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout + done.stderr


def test_the_sm90_kernels_compile_for_sm90(tmp_path):
    """... and ptxas keeps their ``wgmma`` asynchronous: it serializes them (and says so in its
    log) where a product's registers are read before it is waited for, or are too many for a
    pipeline, which cost the first dK/dV kernel its overlap on the GPU."""
    log = compiled_for_sm90(SCRIPT, tmp_path)
    serialized = [line for line in log.splitlines() if "serialized" in line]
    assert not serialized, serialized
    # per head dim: the forward, dQ into 16 bits and into float32, dK/dV, and the persistent three;
    # at the first, the three kernels of one partition, persistent or not, and the forward's turns
    assert log.count("compiled ") == 29, log


def test_the_triton_kernels_compile_for_sm90(tmp_path):
    """The portable kernels as a GPU runs them (CI's interpreter compiles none): per mask the
    forward, then the backward's dQ and dK/dV kernels, then the row terms' and dK/dV adding dQ."""
    log = compiled_for_sm90(TRITON_SCRIPT, tmp_path)
    assert log.count("compiled ") == 10, log
    assert log.count("compiled _attn_bwd_rows") == 2 and log.count("compiled _attn_bwd_dkdv") == 4, log


def test_kernel_paths_name_the_kernels_and_why_not_the_fast_path():
    import maskc
    import torch

    cm = maskc.compile(maskc.Spec(q_len=256, kv_len=256, mask=maskc.Causal()))
    q = torch.randn(1, 2, 256, 64)
    assert cm.kernel_paths(q, q, q) == {"forward": "reference", "dq": "reference", "dkdv": "reference"}
    paths = cm.kernel_paths(q, q, q, backend="triton")  # the interpreter runs Triton's kernels on the CPU
    assert paths == dict.fromkeys(("forward", "dq", "dkdv"), "triton (not on a CUDA GPU)")
