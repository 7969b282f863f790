"""The sm_90 Gluon kernels (``codegen/hopper.py``) against a float32 reference and the Triton kernels.

The forward's output and LSE, and the gradients of a backward whose dQ and dK/dV run
the sm_90 kernels, are compared with float32 attention under the dense mask and with
the same call on the Triton path.

Skipped on GPUs other than sm_90. Problems here are small, so the size threshold
that keeps small problems on the Triton path is lifted for these tests.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import maskc
from maskc.codegen import launch

from test_runtime import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                                reason="needs an sm_90 GPU")


@pytest.fixture(autouse=True)
def small_problems_take_the_path(monkeypatch):
    monkeypatch.setattr(launch, "TMA_MIN_PAIRS", 0)
    monkeypatch.delenv("MASKC_GLUON", raising=False)
    monkeypatch.setenv("MASKC_GLUON_BACKWARD", "1")  # the backward's kernels are opt-in


def inputs(q_len, kv_len, heads, kv_heads, head_dim, dtype, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(2, heads, q_len, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(2, kv_heads, kv_len, head_dim, device="cuda", dtype=dtype)
    v = torch.randn(2, kv_heads, kv_len, head_dim, device="cuda", dtype=dtype)
    return q, k, v


def triton_forward(cm, q, k, v, monkeypatch):
    with monkeypatch.context() as m:
        m.setenv("MASKC_GLUON", "0")
        assert cm.kernel_paths(q, k, v)["forward"].startswith("triton")
        return cm(q, k, v, return_lse=True)


def check(cm, q, k, v, monkeypatch):
    assert cm.kernel_paths(q, k, v)["forward"] == "sm90-gluon"
    out, lse = cm(q, k, v, return_lse=True)
    again = cm(q, k, v)  # the second call launches the compiled kernel directly
    assert torch.equal(again, out)
    # a kernel that failed to compile falls back to Triton's (with a warning): not what is tested here
    assert cm.kernel_paths(q, k, v)["forward"] == "sm90-gluon"
    want, want_lse = reference(cm, q, k, v)
    finite = torch.isfinite(want_lse)
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(torch.isfinite(lse), finite)
    assert (out[~finite] == 0).all()
    tol = 2e-2 * max(1.0, want.abs().max().item())
    assert (out.float() - want).abs().max() <= tol
    assert (lse[finite] - want_lse[finite]).abs().max() <= 2e-2
    triton_out, triton_lse = triton_forward(cm, q, k, v, monkeypatch)
    assert (out.float() - triton_out.float()).abs().max() <= tol
    assert torch.equal(torch.isfinite(lse), torch.isfinite(triton_lse))


def check_backward(cm, q, k, v, monkeypatch):
    """dQ, dK, dV with the sm_90 dQ and dK/dV kernels against float32 autograd and the Triton
    backward."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    paths = cm.kernel_paths(q, k, v)
    assert paths["dq"] == "sm90-gluon"
    if q.shape[2] % 4:  # the rows' LSE and delta are copied with TMA, 16 bytes aligned
        assert "multiple of 4" in paths["dkdv"]
    else:
        assert paths["dkdv"] == "sm90-gluon"
    out = cm(q, k, v)
    grad = torch.randn(out.shape, device=out.device, generator=torch.Generator(out.device).manual_seed(1)).to(out.dtype)
    got = torch.autograd.grad(out, (q, k, v), grad)
    again = torch.autograd.grad(cm(q, k, v), (q, k, v), grad)  # launched directly; no atomics: the same bits
    want = torch.autograd.grad(reference(cm, q, k, v)[0], (q, k, v), grad.float())
    assert cm.kernel_paths(q, k, v) == paths  # still the sm_90 kernels: none failed to compile
    with monkeypatch.context() as m:
        m.setenv("MASKC_GLUON", "0")
        assert all(path.startswith("triton") for path in cm.kernel_paths(q, k, v).values())
        triton_grads = torch.autograd.grad(cm(q, k, v), (q, k, v), grad)
    for name, a, b, c, d in zip(("dq", "dk", "dv"), got, again, want, triton_grads):
        assert torch.equal(a, b), name
        assert not a.isnan().any(), name
        tol = 2e-2 * max(1.0, c.abs().max().item())
        assert (a.float() - c).abs().max() <= tol, (name, (a.float() - c).abs().max().item())
        assert (a.float() - d.float()).abs().max() <= tol, (name, (a.float() - d.float()).abs().max().item())


def check_both(cm, q, k, v, monkeypatch):
    check(cm, q, k, v, monkeypatch)
    if q.shape[-1] in launch._hopper().DQ_CONFIGS:
        check_backward(cm, q, k, v, monkeypatch)


CASES = {
    "causal, short rows": (lambda n: maskc.Causal(), 1000, 1000),
    "causal, long rows": (lambda n: maskc.Causal(), 6000, 6000),
    "document-causal, ragged": (lambda n: maskc.Documents(lengths=[700, 1333, 1]) & maskc.Causal(), 2034, 2034),
    "document-causal, cut short": (lambda n: maskc.Documents(lengths=[517, 1001, 2]) & maskc.Causal(), 1520, 1520),
    "window, cross attention": (lambda n: maskc.SlidingWindow(left=300, align="bottom_right"), 900, 2500),
    "prefix-lm": (lambda n: maskc.Prefix(length=n // 4) | maskc.Causal(), 1500, 1500),
    "ring tile with empty rows": (lambda n: maskc.Documents(lengths=[0, 500, 524], kv_lengths=[600, 424, 0]),
                                  1024, 1024),
    "chunked causal": (lambda n: maskc.Chunked(size=384) & maskc.Causal(), 3000, 3000),
}


@pytest.mark.parametrize("pingpong", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("name", CASES)
def test_against_float32_and_triton(name, head_dim, pingpong, monkeypatch):
    monkeypatch.setattr(launch._hopper(), "PINGPONG", pingpong)
    monkeypatch.setattr(launch._hopper(), "DKDV_PINGPONG", pingpong)
    monkeypatch.setattr(launch._hopper(), "DQ_PINGPONG", pingpong)
    monkeypatch.setattr(launch, "_launches", {})
    mask, q_len, kv_len = CASES[name]
    cm = maskc.compile(maskc.Spec(q_len=q_len, kv_len=kv_len, mask=mask(q_len)))
    q, k, v = inputs(q_len, kv_len, 4, 2, head_dim, torch.bfloat16)
    check_both(cm, q, k, v, monkeypatch)


@pytest.mark.parametrize("head_dim, pingpong, programs", [(64, True, 3), (128, True, 3), (256, True, 3),
                                                      (128, False, 3), (128, True, None)])
@pytest.mark.parametrize("name", ["causal, long rows", "document-causal, ragged", "window, cross attention",
                                  "ring tile with empty rows"])
def test_persistent_kernels(name, head_dim, pingpong, programs, monkeypatch):
    """The persistent forward, dQ and dK/dV kernels (``PERSISTENT``, ``DQ_PERSISTENT``,
    ``DKDV_PERSISTENT``) with a program per multiprocessor, or with 3 programs, each of which then
    takes many tiles: every buffer, record and ring stage goes round many times, and tiles with
    no step come between others."""
    for setting in ("PERSISTENT", "DQ_PERSISTENT", "DKDV_PERSISTENT"):
        monkeypatch.setattr(launch._hopper(), setting, True)
    for setting in ("PINGPONG", "DQ_PINGPONG", "DKDV_PINGPONG"):
        monkeypatch.setattr(launch._hopper(), setting, pingpong)
    if programs is not None:
        monkeypatch.setattr(launch, "multiprocessors", lambda device: programs)
    monkeypatch.setattr(launch, "_launches", {})
    mask, q_len, kv_len = CASES[name]
    cm = maskc.compile(maskc.Spec(q_len=q_len, kv_len=kv_len, mask=mask(q_len)))
    check_both(cm, *inputs(q_len, kv_len, 4, 2, head_dim, torch.bfloat16), monkeypatch)


#: The schedule variants the benchmark times (``hopper.py`` settings), which must give the same results.
SCHEDULES = {"no overlap": {"OVERLAP": False, "DQ_OVERLAP": False, "DKDV_OVERLAP": False},
             "FMA softmax": {"FMA_SOFTMAX": True}, "turns": {"TURNS": True},
             "persistent, turns": {"PERSISTENT": True, "TURNS": True, "DQ_PERSISTENT": True,
                                   "DKDV_PERSISTENT": True}}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("case", ["causal, long rows", "document-causal, cut short"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_schedule_variants(schedule, case, head_dim, monkeypatch):
    for name, value in SCHEDULES[schedule].items():
        monkeypatch.setattr(launch._hopper(), name, value)
    monkeypatch.setattr(launch, "_launches", {})
    mask, q_len, kv_len = CASES[case]
    cm = maskc.compile(maskc.Spec(q_len=q_len, kv_len=kv_len, mask=mask(q_len)))
    check_both(cm, *inputs(q_len, kv_len, 4, 2, head_dim, torch.bfloat16), monkeypatch)


@pytest.mark.parametrize("heads, kv_heads", [(8, 8), (8, 1)])
def test_float16_and_head_layouts(heads, kv_heads, monkeypatch):
    cm = maskc.compile(maskc.Spec(q_len=1500, kv_len=1500, mask=maskc.Documents(lengths=[900, 600]) & maskc.Causal()))
    check_both(cm, *inputs(1500, 1500, heads, kv_heads, 128, torch.float16), monkeypatch)


def test_per_head_masks(monkeypatch):
    heads = [maskc.Causal(), maskc.SlidingWindow(left=200), maskc.Causal(), maskc.SlidingWindow(left=50)]
    cm = maskc.compile(maskc.Spec(q_len=1200, kv_len=1200, mask=heads))
    check_both(cm, *inputs(1200, 1200, 4, 2, 64, torch.bfloat16), monkeypatch)


def test_strided_inputs(monkeypatch):
    """``[B, N, H, D]`` storage seen as ``[B, H, N, D]`` (what transformers passes)."""
    cm = maskc.compile(maskc.Spec(q_len=1000, kv_len=1000, mask=maskc.Causal()))
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in inputs(1000, 1000, 4, 4, 128,
                                                                                torch.bfloat16))
    check_both(cm, q, k, v, monkeypatch)


def test_the_backward_kernels_are_opt_in(monkeypatch):
    cm = maskc.compile(maskc.Spec(q_len=512, kv_len=512, mask=maskc.Causal()))
    q, k, v = inputs(512, 512, 2, 2, 128, torch.bfloat16)
    monkeypatch.delenv("MASKC_GLUON_BACKWARD")
    paths = cm.kernel_paths(q, k, v)
    assert "MASKC_GLUON_BACKWARD=1" in paths["dq"] and "MASKC_GLUON_BACKWARD=1" in paths["dkdv"]
    assert paths["forward"] == "sm90-gluon"


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_dq_added_into_a_float32_sum(head_dim):
    """Ring attention's backward: each tile's dQ added into one float32 ``dq_sum`` from the merged
    ``out`` and ``lse``, here of two halves of the keys, equals the Triton kernel's sum; rows a
    half's mask leaves empty keep what the sum holds."""
    cm = maskc.compile(maskc.Spec(q_len=2000, kv_len=2000, mask=maskc.Documents(lengths=[1200, 800]) & maskc.Causal()))
    halves = [maskc.compile(maskc.Spec(q_len=2000, kv_len=1000, mask=m)) for m in (
        maskc.Documents(lengths=[1200, 800], kv_lengths=[1000, 0]) & maskc.Causal(),
        maskc.Documents(lengths=[1200, 800], kv_lengths=[200, 800]) & maskc.Causal(offset=-1000))]
    q, k, v = inputs(2000, 2000, 4, 2, head_dim, torch.bfloat16)
    out, lse = cm(q, k, v, return_lse=True)
    d_out = torch.randn_like(out)
    sums = {}
    for gluon in ("1", "0"):
        with pytest.MonkeyPatch.context() as m:
            m.setenv("MASKC_GLUON", gluon)
            dq_sum = torch.zeros(q.shape, device="cuda")
            for i, half in enumerate(halves):
                keys = slice(1000 * i, 1000 * (i + 1))
                assert (half.kernel_paths(q, k[:, :, keys], v[:, :, keys])["dq"] == "sm90-gluon") == (gluon == "1")
                half.backward(q, k[:, :, keys], v[:, :, keys], out, lse, d_out, dq_sum=dq_sum)
            sums[gluon] = dq_sum
    want = cm.backward(q, k, v, out, lse, d_out)[0].float()
    tol = 2e-2 * max(1.0, want.abs().max().item())
    assert (sums["1"] - sums["0"]).abs().max() <= tol
    assert (sums["1"] - want).abs().max() <= tol
    held = torch.zeros(q.shape, device="cuda")
    held[:, :, :896] = float("nan")  # rows 0-895 attend no key of the second half: not touched
    halves[1].backward(q, k[:, :, 1000:], v[:, :, 1000:], out, lse, d_out, dq_sum=held)
    assert held[:, :, :896].isnan().all() and not held[:, :, 896:].isnan().any()


def test_what_falls_back_says_why():
    dense = maskc.Dense(values=np.random.default_rng(0).random((512, 512)) < 0.3)
    cm = maskc.compile(maskc.Spec(q_len=512, kv_len=512, mask=dense))
    q, k, v = inputs(512, 512, 2, 2, 128, torch.bfloat16)
    assert "generated predicate" in cm.kernel_paths(q, k, v)["forward"]
    causal = maskc.compile(maskc.Spec(q_len=512, kv_len=512, mask=maskc.Causal()))
    assert "head dims" in causal.kernel_paths(*inputs(512, 512, 2, 2, 96, torch.bfloat16))["forward"]
    wide = causal.kernel_paths(*inputs(512, 512, 2, 2, 256, torch.bfloat16))
    assert set(wide.values()) == {"sm90-gluon"}
    assert "float32" in causal.kernel_paths(*inputs(512, 512, 2, 2, 128, torch.float32))["forward"]


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(lengths=st.lists(st.integers(1, 900), min_size=1, max_size=6), window=st.none() | st.integers(0, 700),
       head_dim=st.sampled_from([64, 128, 256]), seed=st.integers(0, 2**16))
def test_random_document_masks(lengths, window, head_dim, seed):
    n = sum(lengths)
    mask = maskc.Documents(lengths=lengths) & (maskc.Causal() if window is None else maskc.SlidingWindow(left=window))
    cm = maskc.compile(maskc.Spec(q_len=n, kv_len=n, mask=mask))
    q, k, v = inputs(n, n, 2, 1, head_dim, torch.bfloat16, seed)
    assume(cm.kernel_paths(q, k, v)["forward"] != "triton-decode")  # few rows: the decode kernel's
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(launch, "TMA_MIN_PAIRS", 0)
        monkeypatch.setenv("MASKC_GLUON_BACKWARD", "1")
        check_both(cm, q, k, v, monkeypatch)
    assert math.isfinite(cm(q, k, v).float().abs().max().item())


def test_cuda_graph_capture_and_replay(monkeypatch):
    """Forward and backward captured in one CUDA graph with the sm_90 kernels, replayed on new
    inputs copied into the captured tensors, equal the eager call."""
    cm = maskc.compile(maskc.Spec(q_len=2048, kv_len=2048, mask=maskc.Documents(lengths=[1000, 1048]) & maskc.Causal()))
    q, k, v = (x.requires_grad_() for x in inputs(2048, 2048, 4, 2, 128, torch.bfloat16))
    assert set(cm.kernel_paths(q, k, v).values()) == {"sm90-gluon"}
    grad = torch.randn_like(q)

    def step():
        out = cm(q, k, v)
        return (out, *torch.autograd.grad(out, (q, k, v), grad))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    fresh = inputs(2048, 2048, 4, 2, 128, torch.bfloat16, seed=1)
    with torch.no_grad():
        for x, new in zip((q, k, v), fresh):
            x.copy_(new)
    graph.replay()
    want = step()
    for got, expected in zip(captured, want):
        assert torch.equal(got, expected)
