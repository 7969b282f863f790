"""The op on a GPU: the Triton path against a float32 reference, torch.compile, CUDA graphs."""

import math

import pytest
import torch

import maskc

DEVICE = "cuda"


def reference(cm, q, k, v, scale=None):
    """float32 attention under the dense mask (0 and LSE -inf on empty rows)."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    k, v = (x.float().repeat_interleave(groups, dim=1) for x in (k, v))
    masks = torch.stack([cm.dense(h) for h in range(cm.n_heads)]).to(q.device)
    s = (q.float() @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~masks[None], -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.where(torch.isfinite(lse)[..., None], torch.exp(s - lse.nan_to_num(0, 0, 0)[..., None]), 0.0)
    return p @ v, lse


def inputs(q_len, kv_len, heads=4, kv_heads=2, head_dim=64, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(2, heads, q_len, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(2, kv_heads, kv_len, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(2, kv_heads, kv_len, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
    return q, k, v


def close(got, want, tol):
    scale = want.abs().max().clamp_min(1)
    assert not got.isnan().any()
    assert (got.float() - want.float()).abs().max() <= tol * scale, (got.float() - want.float()).abs().max()


MASKS = {
    "causal": lambda n: maskc.Causal(),
    "document_causal": lambda n: maskc.Documents(lengths=[n // 3, n // 2, n - n // 3 - n // 2]) & maskc.Causal(),
    "window": lambda n: maskc.SlidingWindow(left=100),
    "prefix_lm": lambda n: maskc.Prefix(length=n // 4) | maskc.Causal(),
    "ring_tile": lambda n: maskc.Documents(lengths=[0, n // 3, n - n // 3], kv_lengths=[n // 2, n - n // 2, 0]),
}


@pytest.mark.parametrize("dq_atomic", [False, True], ids=["dq-kernel", "dq-atomic"])
@pytest.mark.parametrize("head_dim", [64, 96, 128])
@pytest.mark.parametrize("name", MASKS)
def test_forward_and_backward_against_float32(name, head_dim, dq_atomic, monkeypatch):
    """... with the backward's dQ by its own kernel, or added with atomics by the dK/dV kernel
    (``MASKC_DQ_ATOMIC=1``)."""
    monkeypatch.setenv("MASKC_DQ_ATOMIC", "1" if dq_atomic else "0")
    n = 700
    cm = maskc.compile(maskc.Spec(q_len=n, kv_len=n, mask=MASKS[name](n)))
    q, k, v = inputs(n, n, head_dim=head_dim)
    out, lse = cm(q, k, v, return_lse=True)
    want, want_lse = reference(cm, q, k, v)
    close(out, want, 2e-2)
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    close(lse[finite], want_lse[finite], 2e-2)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = torch.autograd.grad(want, (q, k, v), grad.float())
    for a, b in zip(got, ref):
        close(a, b, 3e-2)


class Layer(torch.nn.Module):
    """A projection then attention under a mask passed in, as a packed-training layer is."""

    def __init__(self, dim=64):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim, device=DEVICE, dtype=torch.bfloat16)

    def forward(self, x, k, v, cm):
        return cm(self.proj(x), k, v)


def doc_causal(lengths):
    return maskc.Spec(q_len=sum(lengths), kv_len=sum(lengths), mask=maskc.Documents(lengths=lengths) & maskc.Causal())


STEPS = [[300, 424, 300], [100, 900, 24], [1024], [512, 256, 256], [17, 1000, 7]]


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_torch_compile_takes_a_new_mask_every_step_without_recompiling(mode):
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    layer = Layer()
    compiled = torch.compile(layer, fullgraph=True, mode=mode)
    for step, lengths in enumerate(STEPS):
        cm = maskc.compile(doc_causal(lengths), device=DEVICE)
        x, k, v = inputs(1024, 1024, heads=4, kv_heads=4, seed=step)
        out = compiled(x, k, v, cm)
        grads = torch.autograd.grad(out.float().square().sum(), (x, k, v, *layer.parameters()))
        want = layer(x, k, v, cm)
        want_grads = torch.autograd.grad(want.float().square().sum(), (x, k, v, *layer.parameters()))
        close(out, want, 1e-2)
        for a, b in zip(grads, want_grads):
            close(a, b, 2e-2)
        if step == 1:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs, "a new mask compiled a new graph after step 2"


def test_cuda_graph_replays_forward_and_backward_and_takes_a_new_mask():
    cm = maskc.compile(doc_causal(STEPS[0]), device=DEVICE)
    q, k, v = inputs(1024, 1024)
    grad = torch.randn(q.shape, device=DEVICE, dtype=q.dtype)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up: compile the kernels outside capture
        for _ in range(2):
            out = cm(q, k, v)
            torch.autograd.grad(out, (q, k, v), grad)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cm(q, k, v)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    for lengths in STEPS[1:]:
        new = maskc.compile(doc_causal(lengths), device=DEVICE)
        cm.load_(new)  # the captured tables take the new mask's values
        with torch.no_grad():
            q.copy_(torch.randn_like(q))
        graph.replay()
        want = new(q, k, v)
        want_grads = torch.autograd.grad(want, (q, k, v), grad)
        close(out, want, 1e-3)
        for a, b in zip((dq, dk, dv), want_grads):
            close(a, b, 1e-3)


def test_host_path_skips_checks_after_the_first_call():
    cm = maskc.compile(doc_causal(STEPS[0]))
    q, k, v = inputs(1024, 1024)
    cm(q, k, v)
    assert len(cm.calls) == 1
    cm(q, k, v)
    assert len(cm.calls) == 1
