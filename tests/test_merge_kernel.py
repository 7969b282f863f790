"""``codegen/merge.py``'s one-pass merge kernel (Triton's interpreter) against ``maskc.merge_partials``."""

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel is defined (tests/conftest.py sets it too)

import pytest  # noqa: E402
import torch  # noqa: E402

import maskc  # noqa: E402
from maskc.codegen.merge import merge  # noqa: E402


def _part(shape, dtype, empty_rows, seed):
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(shape, generator=g).to(dtype)
    lse = torch.randn(shape[:-1], generator=g) * 3
    lse[..., empty_rows] = -math.inf
    out[..., empty_rows, :] = 0
    return out, lse


@pytest.mark.parametrize("head_dim", [16, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_equals_merge_partials_with_empty_rows(head_dim, dtype):
    shape = (2, 3, 37, head_dim)  # rows not a multiple of the kernel's 32, a head dim not a power of two
    a = _part(shape, dtype, [0, 5, 6], seed=0)
    b = _part(shape, dtype, [5, 6, 9, 36], seed=1)
    out, lse = merge(*a, *b)
    want_out, want_lse = maskc.merge_partials([a[0].float(), b[0].float()], [a[1], b[1]])
    assert out.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-6)
    assert torch.equal(lse[..., 5], torch.full_like(lse[..., 5], -math.inf))  # empty in both: -inf, out 0
    assert not out.isnan().any() and (out[..., 5, :] == 0).all()


def test_in_place_merge_keeps_rows_the_new_part_leaves_empty():
    shape = (1, 2, 45, 16)
    a_out, a_lse = merge(*_part(shape, torch.float32, [3], 0), *_part(shape, torch.float32, [3, 4], 1))
    before_out, before_lse = a_out.clone(), a_lse.clone()
    c = _part(shape, torch.bfloat16, list(range(20, 45)), seed=2)
    out, lse = merge(a_out, a_lse, *c, in_place=True)
    assert out.data_ptr() == a_out.data_ptr() and lse.data_ptr() == a_lse.data_ptr()
    want_out, want_lse = maskc.merge_partials([before_out, c[0].float()], [before_lse, c[1]])
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[..., 20:, :], before_out[..., 20:, :])


def test_in_place_merge_needs_a_float32_result():
    a = _part((1, 1, 4, 16), torch.bfloat16, [], 0)
    with pytest.raises(ValueError, match="float32"):
        merge(*a, *a, in_place=True)
