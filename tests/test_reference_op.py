"""The attention op on CPU tensors (the reference path) against float64 attention
from the dense oracle mask: output, log-sum-exp and every gradient."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import maskc
from oracle import attention, spec_masks
from strategies import block_sizes, specs

TOLERANCE = {  # (rtol, atol) against float64
    torch.float64: (1e-9, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def inputs(q_len, kv_len, batch=2, hq=4, hkv=2, d=8, dtype=torch.float64, seed=0):
    """Random leaf tensors ``q [batch, hq, q_len, d]``, ``k``, ``v [batch, hkv, kv_len, d]``."""
    g = torch.Generator().manual_seed(seed)

    def make(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()

    return make(batch, hq, q_len, d), make(batch, hkv, kv_len, d), make(batch, hkv, kv_len, d)


def loss_of(out, lse, seed=1):
    """A loss with a gradient into both the output and the (finite) log-sum-exp."""
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    w_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    return (out.double() * w_out).sum() + (torch.where(torch.isfinite(lse), lse.double(), 0.0) * w_lse).sum()


def run_both(spec, block_size, q, k, v, scale=None):
    """``((out, lse, dq, dk, dv) of the op, the same of the float64 oracle)``."""
    cm = maskc.compile(spec, block_size)
    out, lse = cm(q, k, v, scale=scale, return_lse=True)
    got = (out, lse, *torch.autograd.grad(loss_of(out, lse), (q, k, v)))
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = attention(*leaves, spec_masks(spec), scale)
    want = (ref_out, ref_lse, *torch.autograd.grad(loss_of(ref_out, ref_lse), leaves))
    return got, want


def assert_close(got, want, dtype):
    rtol, atol = TOLERANCE[dtype]
    names = ("out", "lse", "dq", "dk", "dv")
    for name, a, b in zip(names, got, want):
        assert not torch.isnan(a).any(), f"NaN in {name}"
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@st.composite
def problems(draw):
    """A spec with head counts that fit it: ``(spec, block_size, batch, hq, hkv, d)``."""
    spec = draw(specs(max_len=40, huge=True))
    n_mask_heads = len(spec.mask) if isinstance(spec.mask, tuple) else 0
    hq = n_mask_heads or draw(st.sampled_from([1, 2, 4]))
    hkv = draw(st.sampled_from([h for h in (1, 2, 4) if hq % h == 0]))
    return spec, draw(block_sizes), draw(st.integers(1, 2)), hq, hkv, draw(st.sampled_from([1, 3, 8]))


@given(problems(), st.integers(0, 2**16))
def test_output_lse_and_gradients_match_float64_attention(problem, seed):
    spec, block_size, batch, hq, hkv, d = problem
    q, k, v = inputs(spec.q_len, spec.kv_len, batch, hq, hkv, d, seed=seed)
    got, want = run_both(spec, block_size, q, k, v)
    assert got[1].shape == (batch, hq, spec.q_len)
    assert_close(got, want, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_each_dtype_matches_float64_attention_within_its_tolerance(dtype):
    spec = maskc.Spec(q_len=45, kv_len=53, mask=maskc.Documents(lengths=[20, 0, 17], kv_lengths=[25, 3, 20],
                                                                 inner=maskc.Causal(align="bottom_right"))
                      | maskc.Prefix(length=2))
    q, k, v = inputs(45, 53, dtype=dtype)
    got, want = run_both(spec, (16, 8), q, k, v)
    assert got[0].dtype == dtype
    assert got[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)  # float64 stays exact
    assert all(g.dtype == dtype for g in got[2:])
    assert_close(got, want, dtype)


@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2), (4, 1), (3, 1)], ids=["MHA", "GQA", "MQA", "MQA-3"])
def test_grouped_query_heads_share_their_key_value_head(hq, hkv):
    spec = maskc.Spec(q_len=33, kv_len=33, mask=maskc.SlidingWindow(left=5) | maskc.Prefix(length=3))
    q, k, v = inputs(33, 33, batch=3, hq=hq, hkv=hkv)
    got, want = run_both(spec, 8, q, k, v)
    assert got[3].shape == k.shape and got[4].shape == v.shape
    assert_close(got, want, torch.float64)


def test_per_head_masks_with_gqa_apply_each_head_its_own_mask():
    heads = [maskc.Causal(), maskc.Empty(), maskc.Chunked(size=5), maskc.Causal()]
    spec = maskc.Spec(q_len=21, kv_len=21, mask=heads)
    q, k, v = inputs(21, 21, hq=4, hkv=2)
    got, want = run_both(spec, 4, q, k, v)
    assert_close(got, want, torch.float64)
    assert (got[0][:, 1] == 0).all() and torch.isneginf(got[1][:, 1]).all()


@pytest.mark.parametrize("scale", [None, 0.05, 1.0, 3.0])
def test_scale_multiplies_the_scores(scale):
    spec = maskc.Spec(q_len=19, kv_len=27, mask=maskc.Causal(align="bottom_right"))
    q, k, v = inputs(19, 27, hq=2, hkv=2, d=6)
    got, want = run_both(spec, 8, q, k, v, scale=scale)
    assert_close(got, want, torch.float64)
    if scale is None:  # the default is 1 / sqrt(head_dim)
        again, _ = run_both(spec, 8, q, k, v, scale=1 / math.sqrt(6))
        torch.testing.assert_close(got[0], again[0], rtol=0, atol=0)


def test_return_lse_false_returns_the_output_alone():
    cm = maskc.compile(maskc.Spec(q_len=9, kv_len=9, mask=maskc.Causal()), 4)
    q, k, v = inputs(9, 9)
    out = cm(q, k, v)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape
    torch.testing.assert_close(out, cm(q, k, v, return_lse=True)[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_rows_give_zero_and_minus_inf_and_empty_columns_zero_gradients(dtype):
    # document-causal 5/4/3 with padding: rows 12-15 and keys 12-15 belong to no document;
    # with a negative offset the first row of every document is empty too
    spec = maskc.Spec(q_len=16, kv_len=16, mask=maskc.Documents(lengths=[5, 4, 3], inner=maskc.Causal(offset=-1)))
    cm = maskc.compile(spec, 4)
    rows, cols = cm.empty_rows.tolist(), cm.empty_cols.tolist()
    assert rows == [0, 5, 9, 12, 13, 14, 15] and cols == [4, 8, 11, 12, 13, 14, 15]
    q, k, v = inputs(16, 16, dtype=dtype)
    with torch.no_grad():  # large values make NaN from exp(-inf - -inf) or 0/0 likelier
        q.mul_(30)
    out, lse = cm(q, k, v, return_lse=True)
    dq, dk, dv = torch.autograd.grad(loss_of(out, lse), (q, k, v))
    for x in (out, lse, dq, dk, dv):
        assert not torch.isnan(x).any()
    assert (out[:, :, rows] == 0).all() and torch.isneginf(lse[:, :, rows]).all()
    assert torch.isfinite(lse[:, :, [r for r in range(16) if r not in rows]]).all()
    assert (dq[:, :, rows] == 0).all()
    assert (dk[:, :, cols] == 0).all() and (dv[:, :, cols] == 0).all()


def test_an_all_empty_mask_gives_zero_everywhere():
    cm = maskc.compile(maskc.Spec(q_len=7, kv_len=5, mask=maskc.Empty()), 4)
    q, k, v = inputs(7, 5)
    out, lse = cm(q, k, v, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()
    out.sum().backward()
    assert all((x.grad == 0).all() for x in (q, k, v))


def test_gradient_into_lse_alone_matches_float64():
    spec = maskc.Spec(q_len=12, kv_len=12, mask=maskc.Documents(lengths=[5, 4, 3]) & maskc.Causal())
    q, k, v = inputs(12, 12)
    _, lse = maskc.compile(spec, 4)(q, k, v, return_lse=True)
    got = torch.autograd.grad(lse.sum(), (q, k))
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    _, ref = attention(*leaves, spec_masks(spec))
    want = torch.autograd.grad(ref.sum(), leaves[:2])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # lse is float32


def test_dense_and_predicate_partial_tiles_use_their_stored_patterns():
    rng = np.random.default_rng(0)
    values = rng.random((30, 30)) < 0.4
    spec = maskc.Spec(q_len=30, kv_len=30, mask=[
        maskc.Dense(values=values), maskc.Predicate(fn=lambda i, j: (i * j) % 3 == 1) & maskc.Causal()])
    q, k, v = inputs(30, 30, hq=2, hkv=1)
    got, want = run_both(spec, 8, q, k, v)
    assert_close(got, want, torch.float64)


def test_head_dim_0_is_refused_by_name():
    """The user's input from issue 15: q, k, v with head dim 0 (no ZeroDivisionError from inside)."""
    cm = maskc.compile(maskc.Spec(q_len=8, kv_len=8, mask=maskc.Causal()), block_size=16)
    x = torch.zeros(1, 2, 8, 0)
    for backend in (None, "reference"):
        with pytest.raises(ValueError, match="head_dim 0"):
            cm(x, x, x, backend=backend)
