"""The Triton kernels, forward and backward, in Triton's CPU interpreter against a float64 oracle.

``TRITON_INTERPRET=1`` must be set before maskc's kernels are defined, so it is
set here, before anything imports ``maskc.codegen.kernels``. Sizes are
small (tens of tokens, head dims 16 to 40, table blocks of 16 or 32) because the
interpreter runs every program in numpy.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402 - the interpreter switch above must come first

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import maskc  # noqa: E402
from maskc.codegen import kernels, launch, tuning  # noqa: E402
from maskc.codegen import plan as plans  # noqa: E402

CPU = torch.device("cpu")


def dense_attention(masks, q, k, v, scale):
    """Plain float64 attention under explicit ``bool`` masks ``[H or 1, q_len, kv_len]``.

    Rows with no allowed key give output 0 and LSE -inf; written with ``where`` so
    that autograd gives them zero gradients instead of NaN."""
    groups = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(groups, dim=1)
    v = v.double().repeat_interleave(groups, dim=1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    allowed = masks[None]
    lse = torch.logsumexp(s.masked_fill(~allowed, -math.inf), dim=-1)
    finite = torch.isfinite(lse)
    p = torch.exp(s - torch.where(finite, lse, torch.zeros_like(lse))[..., None])
    p = torch.where(allowed & finite[..., None], p, torch.zeros_like(p))
    return p @ v, lse


def masks_of(cm, n_heads):
    heads = [cm.dense(h) for h in range(cm.n_heads)]
    return torch.stack(heads if len(heads) > 1 else heads * n_heads)


def loss(out, lse, g_out, g_lse):
    """A scalar using both outputs; the gradient into the LSE must be honoured (ring merges)."""
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return (out.double() * g_out).sum() + (lse.double() * g_lse).sum()


def check(spec, block_size=16, batch=1, heads=2, kv_heads=None, head_dim=16, v_dim=None, dtype=torch.float32,
          scale=None, atol=2e-5):
    """Forward (out, LSE) and backward (dQ, dK, dV) of the Triton path against the oracle."""
    cm = maskc.compile(spec, block_size=block_size)
    kv_heads = kv_heads or heads
    v_dim = v_dim or head_dim
    torch.manual_seed(hash(repr(spec)) % 1000)
    q = torch.randn(batch, heads, spec.q_len, head_dim, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, kv_heads, spec.kv_len, head_dim, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, kv_heads, spec.kv_len, v_dim, dtype=dtype, requires_grad=True)
    out, lse = cm(q, k, v, scale=scale, return_lse=True, backend="triton")
    used_scale = 1 / math.sqrt(head_dim) if scale is None else scale
    ref_out, ref_lse = dense_attention(masks_of(cm, heads), q, k, v, used_scale)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=atol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=atol, rtol=atol)

    g_out = torch.randn(ref_out.shape, dtype=torch.float64)
    g_lse = torch.randn(ref_lse.shape, dtype=torch.float64)
    grads = torch.autograd.grad(loss(out, lse, g_out, g_lse), (q, k, v))
    ref_grads = torch.autograd.grad(loss(ref_out, ref_lse, g_out, g_lse), (q, k, v))
    for name, got, want in zip("qkv", grads, ref_grads):
        assert not got.isnan().any(), f"d{name} has NaN"
        torch.testing.assert_close(got.double(), want.double(), atol=atol * 10, rtol=atol * 10, msg=f"d{name}")
    return cm


S = maskc.Spec
rng = np.random.default_rng(0)

# one spec per predicate kind and combination the code generator handles
PREDICATE_SPECS = {
    "full": S(q_len=40, kv_len=40, mask=maskc.Full()),
    "causal": S(q_len=40, kv_len=40, mask=maskc.Causal()),
    "causal_offset": S(q_len=40, kv_len=40, mask=maskc.Causal(offset=-3)),
    "causal_bottom_right": S(q_len=24, kv_len=40, mask=maskc.Causal(align="bottom_right")),
    "window": S(q_len=40, kv_len=40, mask=maskc.SlidingWindow(left=5, right=2)),
    "window_left_unbounded": S(q_len=40, kv_len=33, mask=maskc.SlidingWindow(left=None, right=4)),
    "window_bottom_right": S(q_len=20, kv_len=45, mask=maskc.SlidingWindow(left=7, align="bottom_right")),
    "chunked": S(q_len=40, kv_len=40, mask=maskc.Chunked(size=12) & maskc.Causal()),
    "prefix_lm": S(q_len=40, kv_len=40, mask=maskc.Prefix(length=11) | maskc.Causal()),
    "range": S(q_len=40, kv_len=40, mask=maskc.Range(q=(5, 30), kv=(3, 21))),
    "documents": S(q_len=45, kv_len=45, mask=maskc.Documents(lengths=[7, 20, 13]) & maskc.Causal()),
    "documents_kv": S(q_len=30, kv_len=48, mask=maskc.Documents(
        lengths=[10, 0, 19], kv_lengths=[17, 5, 20], inner=maskc.Causal(align="bottom_right"))),
    "documents_nested": S(q_len=40, kv_len=40, mask=maskc.Documents(
        lengths=[18, 22], inner=maskc.Documents(lengths=[6, 9]) | maskc.Prefix(length=2))),
    "documents_window": S(q_len=40, kv_len=40, mask=maskc.Documents(
        lengths=[25, 15], inner=maskc.SlidingWindow(left=4) & ~maskc.Range(q=(0, 10), kv=(0, 2)))),
    "not_or": S(q_len=40, kv_len=40, mask=~maskc.Chunked(size=10) | maskc.Causal(offset=2)),
    "dense": S(q_len=40, kv_len=37, mask=maskc.Dense(values=rng.random((40, 37)) < 0.3)),
    "predicate_and_causal": S(q_len=40, kv_len=40, mask=maskc.Predicate(fn=lambda i, j: (i + j) % 3 != 0)
                              & maskc.Causal()),
}


#: the specs above whose rows or columns are not each one interval, or that hold Dense/Predicate
#: nodes: they have no spans and always run the generated predicate
NO_SPANS = {"documents_nested", "not_or", "dense", "predicate_and_causal"}


@pytest.mark.parametrize("use_spans", [True, False], ids=["spans", "generated"])
@pytest.mark.parametrize("name", PREDICATE_SPECS)
def test_every_predicate_kind_forward_and_backward(monkeypatch, name, use_spans):
    # masks with spans (codegen/spans.py) run their generated predicate too when spans are off
    monkeypatch.setattr(plans, "USE_SPANS", use_spans)
    cm = check(PREDICATE_SPECS[name])
    assert cm.plan(CPU).structure.spans == (use_spans and name not in NO_SPANS)


def test_lengths_that_are_multiples_of_the_table_blocks_skip_bounds_checks():
    even = maskc.compile(S(q_len=64, kv_len=32, mask=maskc.Causal()), block_size=16)
    odd = maskc.compile(S(q_len=64, kv_len=33, mask=maskc.Causal()), block_size=16)
    assert not even.plan(CPU).structure.cut and odd.plan(CPU).structure.cut
    check(even.spec)


def test_backward_is_bitwise_repeatable():
    # no atomics: dQ and dK/dV each have one writer per element
    cm = maskc.compile(PREDICATE_SPECS["documents"], block_size=16)
    q, k, v = (torch.randn(1, 2, 45, 16, requires_grad=True) for _ in range(3))
    runs = [torch.autograd.grad(cm(q, k, v, backend="triton").sum(), (q, k, v)) for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("name", ["causal", "documents", "window_bottom_right", "dense", "documents_nested"])
def test_dq_added_with_atomics_by_the_dkdv_kernel(monkeypatch, name):
    """``MASKC_DQ_ATOMIC=1``: no dQ kernel; the row terms' kernel, then the dK/dV kernel adding each
    step's dQ into a float32 sum; gradients as the oracle's, with spans and with the generated
    predicate."""
    monkeypatch.setenv("MASKC_DQ_ATOMIC", "1")
    launched, real_launch = [], launch.launch
    monkeypatch.setattr(launch, "launch", lambda name, *rest: launched.append(name) or real_launch(name, *rest))
    cm = check(PREDICATE_SPECS[name])
    assert set(launched) == {"forward", "dkdv"}
    q = torch.randn(1, 2, cm.q_len, 16)
    k = torch.randn(1, 2, cm.kv_len, 16)
    paths = cm.kernel_paths(q, k, k, backend="triton")
    assert paths["forward"].startswith("triton") and paths["dq"] == paths["dkdv"]
    assert "MASKC_DQ_ATOMIC=1" in paths["dq"]


def test_dq_added_with_atomics_gqa_float16_empty_rows_and_a_ring_sum(monkeypatch):
    monkeypatch.setenv("MASKC_DQ_ATOMIC", "1")
    spec = S(q_len=37, kv_len=51, mask=maskc.Causal(align="bottom_right") & maskc.SlidingWindow(
        left=20, align="bottom_right"))
    check(spec, batch=2, heads=4, kv_heads=1, head_dim=24, v_dim=40, scale=0.3)
    check(PREDICATE_SPECS["documents"], dtype=torch.float16, atol=2e-3)
    check(S(q_len=32, kv_len=32, mask=maskc.Documents(lengths=[0, 9, 23], kv_lengths=[20, 12, 0])))
    # ring attention's float32 sum: added into, rows no tile visits left alone
    spec = S(q_len=70, kv_len=50, mask=maskc.Range(q=(32, 70), kv=(0, 50)) & maskc.Causal(offset=-20))
    cm = maskc.compile(spec, block_size=16)
    torch.manual_seed(0)
    q, d_out = torch.randn(2, 1, 2, 70, 16).unbind(0)
    k, v = torch.randn(2, 1, 2, 50, 16).unbind(0)
    out, lse = cm(q, k, v, return_lse=True, backend="triton")
    want = cm.backward(q, k, v, out, lse, d_out, backend="reference")
    dq_sum = torch.cat([torch.full_like(q[:, :, :32], float("nan")), torch.ones_like(q[:, :, 32:])], dim=2)
    got = cm.backward(q, k, v, out, lse, d_out, backend="triton", dq_sum=dq_sum)
    assert got[0] is dq_sum and dq_sum[:, :, :32].isnan().all()
    torch.testing.assert_close(dq_sum[:, :, 32:], want[0][:, :, 32:] + 1, atol=1e-5, rtol=1e-5)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_row_terms_kernel_zeroes_the_dq_the_dkdv_kernel_adds_into():
    plan = maskc.compile(PREDICATE_SPECS["causal"], block_size=16).plan(CPU)
    n = plan.structure.q_len
    torch.manual_seed(0)
    out, d_out = torch.randn(2, 1, 2, n, 16).unbind(0)
    lse = torch.randn(1, 2, n)
    lse2, delta = torch.empty_like(lse), torch.empty_like(lse)
    for zero in (True, False):
        dq = torch.full((1, 2, n, 16), float("nan"))
        launch._launch_row_terms(plan.structure, out, d_out, lse, None, lse2, delta, dq, zero)
        assert (dq == 0).all() if zero else dq.isnan().all()
        torch.testing.assert_close(delta, (out * d_out).sum(-1))
        torch.testing.assert_close(lse2, lse * math.log2(math.e))


def test_per_head_masks_of_several_structures_dispatch_per_slot():
    heads = [maskc.Causal(), maskc.Dense(values=rng.random((40, 40)) < 0.4),
             maskc.Documents(lengths=[9, 31]) & maskc.Causal(), maskc.SlidingWindow(left=3)]
    cm = check(S(q_len=40, kv_len=40, mask=heads), heads=4, kv_heads=2)
    assert "structure = tl.load(args)" in cm.kernel_source


def test_gqa_mqa_batch_scale_odd_head_dims():
    spec = S(q_len=37, kv_len=51, mask=maskc.Causal(align="bottom_right") & maskc.SlidingWindow(
        left=20, align="bottom_right"))
    check(spec, batch=2, heads=4, kv_heads=1, head_dim=24, v_dim=40, scale=0.3)


def test_negative_and_zero_scale():
    check(PREDICATE_SPECS["prefix_lm"], scale=-0.7)
    check(PREDICATE_SPECS["window"], scale=0.0)


@pytest.mark.parametrize("tiles", [(16, 16), (16, 32)])
def test_tiles_smaller_than_table_blocks(monkeypatch, tiles):
    # kernel tiles inside table blocks of (32, 64): programs own slices of a block, a listed
    # block takes several steps; (16, 32) has the proportions of the GPU's dK/dV tiles (64 x 128)
    monkeypatch.setattr(tuning, "INTERPRETER", tuning.TileConfig(*tiles, 1, 1))
    spec = S(q_len=70, kv_len=90, mask=maskc.Documents(lengths=[30, 35], kv_lengths=[40, 45]) & maskc.Causal(
        align="bottom_right"))
    check(spec, block_size=(32, 64), heads=2, kv_heads=1)


@pytest.mark.parametrize("name", sorted(set(PREDICATE_SPECS) - NO_SPANS))
def test_programs_smaller_than_table_blocks_walk_only_the_steps_that_meet_their_spans(monkeypatch, name):
    # tiles of 16 in table blocks of 32: PARTIAL steps outside a program's spans are left out
    monkeypatch.setattr(tuning, "INTERPRETER", tuning.TileConfig(16, 16, 1, 1))
    check(PREDICATE_SPECS[name], block_size=32)


@pytest.mark.parametrize("name", ["causal", "documents", "window_bottom_right"])
def test_masks_with_spans_and_long_rows_walk_full_and_partial_tiles_in_two_loops(monkeypatch, name):
    monkeypatch.setattr(tuning, "SHORT_ROWS", 0)  # every mask has long rows
    cm = check(PREDICATE_SPECS[name], block_size=32)
    structure = cm.plan(CPU).structure
    assert structure.spans and not structure.short_rows and not structure.one_loop


def test_the_causal_diagonal_block_loses_its_empty_step():
    cm = maskc.compile(S(q_len=64, kv_len=64, mask=maskc.Causal()), block_size=32)
    plan = cm.plan(CPU)
    rows = plan.trimmed("forward", 16, 16)
    keys = plan.trimmed("backward", 16, 16)
    # one list per program (FULL and PARTIAL blocks, ONE_LOOP): rows 0-15 meet one of the two steps
    # of their diagonal block; rows 32-47 its first step after the two of the FULL block before it
    assert plan.structure.one_loop
    assert (rows[0, :, 1] - rows[0, :, 0]).tolist() == [1, 2, 3, 4]
    assert (keys[0, :, 1] - keys[0, :, 0]).tolist() == [4, 3, 2, 1]


def test_masks_of_short_rows_take_their_own_tiles():
    causal = maskc.compile(S(q_len=1024, kv_len=1024, mask=maskc.Causal()), block_size=16)  # 32.5 tiles a row
    window = maskc.compile(S(q_len=1024, kv_len=1024, mask=maskc.SlidingWindow(left=100)), block_size=16)
    assert not causal.plan(CPU).structure.short_rows
    assert window.plan(CPU).structure.short_rows


def test_default_tiles_are_those_the_guide_names():
    """docs/guide.md, "Running on a GPU": at head dim 128 in 16 bits, long rows run forward 128 x 128,
    dQ 128 x 64 and dK/dV 64 x 128 tiles; short rows forward 64 x 64 and dK/dV programs of 64 keys."""
    gpu = torch.device("cuda")  # a device object needs no GPU

    def tiles(kernel, dtype=torch.bfloat16, head_dim=128, short_rows=False):
        config = tuning.default_config(kernel, gpu, dtype, head_dim, short_rows)
        return config.block_m, config.block_n

    assert [tiles(k) for k in tuning.KERNELS] == [(128, 128), (128, 64), (64, 128)]
    assert [tiles(k, short_rows=True) for k in tuning.KERNELS] == [(64, 64), (128, 64), (32, 64)]
    assert tiles("forward", torch.float16, head_dim=100) == tiles("forward")  # head dims pad to 128
    assert tiles("forward", torch.float32) == (64, 32)
    assert tuning.default_config("forward", torch.device("cpu"), torch.bfloat16, 128) == tuning.INTERPRETER
    fitted = tuning.config_for("forward", gpu, torch.bfloat16, 128, bq=64, bk=48)  # tiles divide the table blocks
    assert (fitted.block_m, fitted.block_n) == (64, 16)


def test_autotuning_keeps_the_fastest_config_that_runs(monkeypatch):
    from triton.runtime.errors import OutOfResources

    gpu = torch.device("cuda")
    monkeypatch.setenv("MASKC_AUTOTUNE", "1")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "a GPU of the test")
    monkeypatch.setattr(tuning, "_tuned", {})
    fastest, too_big = tuning.CANDIDATES["dq"][3], tuning.CANDIDATES["dq"][4]
    timed = []

    def bench(config):
        timed.append(config)
        if config == too_big:
            raise OutOfResources(300_000, 232_448, "shared memory")
        return 1.0 if config == fastest else 2.0

    assert tuning.config_for("dq", gpu, torch.bfloat16, 128, 128, 128, bench=bench) == fastest
    assert too_big in timed and len(timed) == len(set(tuning.CANDIDATES["dq"]))
    assert tuning.config_for("dq", gpu, torch.bfloat16, 128, 128, 128, bench=bench) == fastest
    assert len(timed) == len(set(tuning.CANDIDATES["dq"]))  # timed once per process
    default = tuning.default_config("dkdv", gpu, torch.bfloat16, 128)
    assert tuning.config_for("dkdv", gpu, torch.bfloat16, 128, 128, 128, bench=bench) == default  # ties keep it
    monkeypatch.delenv("MASKC_AUTOTUNE")
    assert tuning.config_for("dq", gpu, torch.float16, 128, 128, 128, bench=bench) == \
        tuning.default_config("dq", gpu, torch.float16, 128)


def test_short_rows_launch_in_sequence_order_long_rows_heaviest_first():
    causal = maskc.compile(S(q_len=1024, kv_len=1024, mask=maskc.Causal()), block_size=16).plan(CPU)
    q_order, kv_order = causal.orders()
    assert q_order[0].tolist() == list(range(63, -1, -1))  # the last query block has the most keys
    assert kv_order.tolist() == list(range(64))  # the first key block has the most queries
    spec = S(q_len=1024, kv_len=1024, mask=maskc.Range(q=(200, 1024), kv=(0, 1024)) & maskc.SlidingWindow(left=40))
    window = maskc.compile(spec, block_size=16).plan(CPU)
    q_order, kv_order = window.orders()
    assert window.structure.short_rows
    # blocks with work in sequence order, then those with none (every block has a program)
    assert q_order[0].tolist() == list(range(12, 64)) + list(range(12))
    assert kv_order.tolist() == list(range(10, 64)) + list(range(10))


@pytest.mark.parametrize("tma_kernels", [(), tuning.KERNELS], ids=["pointers", "tma_everywhere"])
def test_tma_copies_and_pointer_loads_both_match_the_oracle(monkeypatch, tma_kernels):
    # by default the forward and dQ copy K/V tiles through descriptors (the interpreter runs them
    # too) and dK/dV loads Q/dO with pointers; here every kernel does one or the other. Cut
    # sequences, a head dim padded from 24 to 32, GQA, spans in one loop, and a generated predicate.
    monkeypatch.setattr(launch, "USE_TMA", frozenset(tma_kernels))
    check(PREDICATE_SPECS["documents_kv"], heads=4, kv_heads=2, head_dim=24)
    check(PREDICATE_SPECS["window"], block_size=32)
    check(PREDICATE_SPECS["dense"])


def test_tma_takes_any_layout_a_descriptor_can_describe():
    spec = PREDICATE_SPECS["documents"]
    cm = maskc.compile(spec, block_size=16)
    torch.manual_seed(0)
    qkv = [torch.randn(2, spec.q_len, 2, 24, dtype=torch.float16) for _ in range(3)]  # [batch, seq, heads, dim]

    def run(q, k, v):
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        out = cm(q, k, v, backend="triton")
        return [out, *torch.autograd.grad(out.float().square().sum(), (q, k, v))]

    transposed = [t.transpose(1, 2) for t in qkv]  # strides (seq * 48, 24, 48, 1): descriptors allowed
    assert launch.tma("forward", *transposed)
    for got, want in zip(run(*transposed), run(*(t.contiguous() for t in transposed))):
        assert torch.equal(got, want)


def test_tensors_a_descriptor_cannot_describe_load_with_pointers():
    half = torch.float16
    assert launch.tma("dq", torch.zeros(1, 2, 8, 24, dtype=half))
    assert not launch.tma("dq", torch.zeros(1, 2, 8, 20, dtype=half))  # rows of 40 bytes
    assert not launch.tma("dq", torch.zeros(1, 1, 8, 24, dtype=half).expand(1, 3, 8, 24))  # heads at stride 0
    assert not launch.tma("dq", torch.zeros(1, 2, 24, 8, dtype=half).transpose(2, 3))  # head dim not contiguous
    assert not launch.tma("dq", torch.zeros(1, 2, 8, 25, dtype=half)[..., 1:])  # base off 16 bytes
    assert not launch.tma("dkdv", torch.zeros(1, 2, 8, 24, dtype=half))  # not in USE_TMA
    # a dimension of size 1 may have any stride: the descriptor gets one past the tensor
    single = torch.zeros(2 * 8 * 24, dtype=half).as_strided((1, 2, 8, 24), (7, 8 * 24, 24, 1))
    assert launch.tma("dq", single) and launch.strides(single) == [2 * 8 * 24, 8 * 24, 24, 1]


def test_float16():
    check(PREDICATE_SPECS["documents"], dtype=torch.float16, atol=2e-3)


def test_ring_tile_with_empty_rows_and_columns():
    # a sub-diagonal tile of a document-causal mask split in parts: most queries and keys are empty
    spec = S(q_len=32, kv_len=32, mask=maskc.Documents(lengths=[0, 9, 23], kv_lengths=[20, 12, 0]))
    cm = check(spec)
    assert len(cm.empty_rows) and len(cm.empty_cols)


def _listed(lists, slot: int, group: int) -> tuple[list, list]:
    full = lists.full_idx[lists.full_ptr[slot, group]:lists.full_ptr[slot, group + 1]].tolist()
    part = lists.part_idx[lists.part_ptr[slot, group]:lists.part_ptr[slot, group + 1]].tolist()
    return full, part


def test_block_lists_hold_every_tile_once_full_tiles_cut_short_as_partial():
    heads = [maskc.Documents(lengths=[30, 40]) & maskc.Causal(),
             maskc.Prefix(length=5) | maskc.Range(q=(32, 70), kv=(40, 90))]
    cm = maskc.compile(S(q_len=70, kv_len=90, mask=heads), block_size=(32, 16))
    forward, backward = (cm.plan(CPU).block_lists(d) for d in ("forward", "backward"))
    kinds = cm.block_kinds.numpy()
    ragged_q, ragged_kv = 70 // 32, 90 // 16  # the blocks that the ends cut short
    for slot, head in enumerate(cm.table.head_slot.tolist()):
        for qb in range(cm.n_q_blocks):
            full, part = _listed(forward, slot, qb)
            row = kinds[head, qb]
            assert full == [kb for kb in range(cm.n_kv_blocks) if row[kb] == maskc.FULL and kb != ragged_kv]
            assert part == [kb for kb in range(cm.n_kv_blocks) if row[kb] == maskc.PARTIAL
                            or (row[kb] == maskc.FULL and kb == ragged_kv)]
        for kb in range(cm.n_kv_blocks):
            full, part = _listed(backward, slot, kb)
            col = kinds[head, :, kb]
            assert full == [qb for qb in range(cm.n_q_blocks) if col[qb] == maskc.FULL and qb != ragged_q]
            assert part == [qb for qb in range(cm.n_q_blocks) if col[qb] == maskc.PARTIAL
                            or (col[qb] == maskc.FULL and qb == ragged_q)]
    assert (kinds[:, :, ragged_kv] == maskc.FULL).any() and (kinds[:, ragged_q] == maskc.FULL).any()


def test_one_loop_lists_hold_every_tile_with_work_once_in_order():
    spec = S(q_len=70, kv_len=90, mask=maskc.Documents(lengths=[30, 40], kv_lengths=[50, 40])
             & maskc.Causal(align="bottom_right"))
    cm = maskc.compile(spec, block_size=(32, 16))
    plan = cm.plan(CPU)
    assert plan.structure.one_loop
    kinds = cm.block_kinds.numpy()[0]
    forward, backward = plan.block_lists("forward"), plan.block_lists("backward")
    for qb in range(cm.n_q_blocks):
        assert _listed(forward, 0, qb) == ([], [kb for kb in range(cm.n_kv_blocks) if kinds[qb, kb]])
    for kb in range(cm.n_kv_blocks):
        assert _listed(backward, 0, kb) == ([], [qb for qb in range(cm.n_q_blocks) if kinds[qb, kb]])


def test_full_tiles_cut_short_in_a_bit_pattern_slot():
    # the last query and key blocks allow every pair: FULL tiles that the ends cut short, listed as
    # PARTIAL with pattern -1 in a slot whose other PARTIAL tiles read bit patterns
    spec = S(q_len=40, kv_len=37, mask=maskc.Predicate(fn=lambda i, j: (i >= 32) | (j >= 32) | ((i + j) % 3 != 0)))
    cm = check(spec)
    for lists in (cm.plan(CPU).block_lists(d) for d in ("forward", "backward")):
        assert -1 in lists.part_pattern.tolist() and (lists.part_pattern >= 0).any()


def test_empty_mask_launches_nothing(monkeypatch):
    cm = maskc.compile(S(q_len=32, kv_len=48, mask=maskc.Range(q=(0, 0), kv=(0, 48))), block_size=16)

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("a kernel was launched for an empty mask")

    for name in ("_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv"):
        monkeypatch.setattr(kernels, name, NoLaunch())
    q = torch.randn(1, 2, 32, 16, requires_grad=True)
    k = torch.randn(1, 2, 48, 16, requires_grad=True)
    v = torch.randn(1, 2, 48, 16, requires_grad=True)
    out, lse = cm(q, k, v, return_lse=True, backend="triton")
    assert (out == 0).all() and (lse == -math.inf).all()
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()


def test_new_document_lengths_reuse_the_kernels():
    def compiled(lengths):
        return maskc.compile(S(q_len=64, kv_len=64, mask=maskc.Documents(lengths=lengths) & maskc.Causal()),
                             block_size=16)

    first, second = compiled([10, 30, 24]), compiled([3, 5, 40, 16])
    assert first.kernel_source.splitlines()[1:] == second.kernel_source.splitlines()[1:]
    assert first.plan(CPU).key == second.plan(CPU).key  # one structure: the same kernels
    assert launch.predicate(first.plan(CPU).structure.source) is launch.predicate(second.plan(CPU).structure.source)
    for number in ("10", "30", "24", "40"):
        assert f" {number})" not in first.kernel_source and f"< {number}" not in first.kernel_source


def test_kernel_source_shows_the_generated_predicate():
    cm = maskc.compile(PREDICATE_SPECS["documents"].model_copy(), block_size=16)
    source = cm.kernel_source
    assert "def partial_mask(" in source and "@triton.jit" in source
    compile(source, "kernel_source", "exec")


def test_runs_under_torch_compile_without_graph_break():
    cm = maskc.compile(PREDICATE_SPECS["documents"], block_size=16, device="cpu")

    def attend(q, k, v):
        out, lse = cm(q, k, v, return_lse=True, backend="triton")
        return out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()

    q, k, v = (torch.randn(1, 2, 45, 16, requires_grad=True) for _ in range(3))
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    want = torch.autograd.grad(attend(q, k, v), (q, k, v))
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_under_torch_compile_the_plan_must_exist_before_the_call():
    cm = maskc.compile(S(q_len=64, kv_len=64, mask=maskc.Causal()), block_size=16)
    x = torch.randn(1, 1, 64, 16)
    with pytest.raises(Exception, match=r"cm.to\('cpu'\)"):
        torch.compile(lambda q: cm(q, q, q, backend="triton"), fullgraph=True, backend="eager")(x)


@pytest.mark.parametrize("bad, error, words", [
    (dict(dtype=torch.float64), TypeError, "q.dtype=torch.float64"),
    (dict(head_dim=512), ValueError, "head_dim=512"),
    (dict(block_size=8), ValueError, "block_size=(8, 8)"),
])
def test_unsupported_inputs_are_refused_before_launch(bad, error, words):
    cm = maskc.compile(S(q_len=32, kv_len=32, mask=maskc.Causal()), block_size=bad.get("block_size", 16))
    x = torch.randn(1, 1, 32, bad.get("head_dim", 16), dtype=bad.get("dtype", torch.float32))
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        cm(x, x, x, backend="triton")


def test_more_batch_heads_than_the_grid_holds_are_refused_before_launch():
    cm = maskc.compile(S(q_len=32, kv_len=32, mask=maskc.Causal()), block_size=16)
    x = torch.randn(1, 1, 32, 16).expand(2, 40000, 32, 16)  # checked by shape, never allocated
    with pytest.raises(ValueError, match="batch \\* heads = 2 \\* 40000"):
        cm(x, x, x, backend="triton")


def test_a_config_short_of_shared_memory_falls_back_to_a_smaller_one(monkeypatch):
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(tuning, "INTERPRETER", tuning.TileConfig(16, 32, 1, 2))
    monkeypatch.setattr(launch, "_fitted", {})
    monkeypatch.setattr(launch, "_launches", {})
    kernel, tried = kernels._attn_fwd, []

    class SharedMemoryLimit:  # as a GPU whose shared memory holds one pipeline stage only
        arg_names = kernel.arg_names

        def __getitem__(self, grid):
            def launch(*args, BLOCK_N, num_stages, **kwargs):
                tried.append((BLOCK_N, num_stages))
                if num_stages > 1:
                    raise OutOfResources(262144, 232448, "shared memory")
                return kernel[grid](*args, BLOCK_N=BLOCK_N, num_stages=num_stages, **kwargs)

            return launch

    monkeypatch.setattr(kernels, "_attn_fwd", SharedMemoryLimit())
    cm = check(PREDICATE_SPECS["window"], block_size=32)
    x = torch.randn(1, 1, 40, 16)
    cm(x, x, x, backend="triton")  # the config that fitted is remembered
    assert tried == [(32, 2), (32, 1), (32, 1)]


def test_backward_works_after_the_compiled_mask_is_dropped():
    """``maskc.compile(spec)(q, k, v)`` used inline: the graph keeps the mask alive."""
    import gc

    spec = maskc.Spec(q_len=20, kv_len=20, mask=maskc.Causal())
    q, k, v = (torch.randn(1, 2, 20, 16, requires_grad=True) for _ in range(3))
    out = maskc.compile(spec, block_size=16)(q, k, v, backend="triton")
    gc.collect()
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_documents_placed_by_kv_start_leave_earlier_keys_unmatched():
    """A ring tile's document starting at ``kv_start``: keys before it are in no
    document and must not match query padding (the GPU ring check caught this)."""
    spec = maskc.Spec(q_len=40, kv_len=128, mask=maskc.Documents(
        lengths=[29], kv_lengths=[89], inner=maskc.Causal(offset=89), kv_start=39))
    cm = maskc.compile(spec, block_size=32)
    torch.manual_seed(0)
    q = torch.randn(1, 2, 40, 16, requires_grad=True)
    k, v = (torch.randn(1, 2, 128, 16, requires_grad=True) for _ in range(2))
    got = cm(q, k, v, return_lse=True, backend="triton")
    want = cm(q, k, v, return_lse=True, backend="reference")
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)
    for a, b in zip(torch.autograd.grad(got[0].sum(), (q, k, v)), torch.autograd.grad(want[0].sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_backward_adds_dq_into_a_sum_and_leaves_empty_rows_alone(backend):
    """``CompiledMask.backward(..., dq_sum=)``, as ring attention sums its tiles' dQ: the sum gains
    this mask's dQ, and rows of blocks with no tile (rows 0-31 here) are not written at all."""
    spec = maskc.Spec(q_len=70, kv_len=50, mask=maskc.Range(q=(32, 70), kv=(0, 50)) & maskc.Causal(offset=-20))
    cm = maskc.compile(spec, block_size=16)
    torch.manual_seed(0)
    q, d_out = torch.randn(2, 1, 2, 70, 16).unbind(0)
    k, v = torch.randn(2, 1, 2, 50, 16).unbind(0)
    out, lse = cm(q, k, v, return_lse=True, backend=backend)
    want = cm.backward(q, k, v, out, lse, d_out, backend=backend)
    held = torch.full_like(q, float("nan"))[:, :, :32]  # a sum whose untouched rows would show NaN
    dq_sum = torch.cat([held, torch.ones_like(q[:, :, 32:])], dim=2)
    got = cm.backward(q, k, v, out, lse, d_out, backend=backend, dq_sum=dq_sum)
    assert got[0] is dq_sum
    assert dq_sum[:, :, :32].isnan().all()
    torch.testing.assert_close(dq_sum[:, :, 32:], want[0][:, :, 32:] + 1, atol=1e-5, rtol=1e-5)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="dq_sum must be torch.float32"):
        cm.backward(q.half(), k.half(), v.half(), out.half(), lse, d_out.half(), backend=backend,
                    dq_sum=torch.zeros_like(q, dtype=torch.float16))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_an_unused_output_gets_no_gradient_made_for_it(backend):
    """A training step that uses ``out`` alone passes the op no LSE gradient (nor, using the LSE
    alone, an output gradient): nothing is filled with zeros for it, and the gradients are those
    of a zero gradient, to the bit."""
    cm = maskc.compile(maskc.Spec(q_len=40, kv_len=40, mask=maskc.Documents(lengths=[25, 15]) & maskc.Causal()),
                       block_size=16)
    torch.manual_seed(0)
    q, k, v, d_out = (x.requires_grad_() for x in torch.randn(4, 1, 2, 40, 16).unbind(0))
    out, lse = cm(q, k, v, return_lse=True, backend=backend)
    zero_lse, zero_out = torch.zeros_like(lse), torch.zeros_like(out)
    pairs = [(torch.autograd.grad(out, (q, k, v), d_out, retain_graph=True),
              torch.autograd.grad((out, lse), (q, k, v), (d_out, zero_lse), retain_graph=True)),
             (torch.autograd.grad(lse, (q, k, v), d_out[..., 0], retain_graph=True),
              torch.autograd.grad((out, lse), (q, k, v), (zero_out, d_out[..., 0]), retain_graph=True)),
             (cm.backward(q, k, v, out, lse, d_out, backend=backend),
              cm.backward(q, k, v, out, lse, d_out, zero_lse, backend=backend))]
    for got, want in pairs:
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_backward_takes_saved_tensors_in_any_layout(backend):
    """``out``, ``lse`` and ``d_out`` kept in a caller's own layout (``[batch, seq, heads]`` storage
    seen as ``[batch, heads, seq]``) give the gradients their contiguous copies give."""
    cm = maskc.compile(maskc.Spec(q_len=64, kv_len=64, mask=maskc.Causal()))
    torch.manual_seed(0)
    q, k, v, d_out = torch.randn(4, 1, 2, 64, 16).unbind(0)
    out, lse = cm(q, k, v, return_lse=True, backend=backend)
    want = cm.backward(q, k, v, out, lse, d_out, backend=backend)
    out, lse, d_out = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (out, lse, d_out))
    assert not lse.is_contiguous()
    for a, b in zip(cm.backward(q, k, v, out, lse, d_out, backend=backend), want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
