"""The op under torch.compile on the CPU (the reference backend): one graph for new masks."""

import pytest
import torch

import maskc


def doc_causal(lengths):
    total = sum(lengths)
    return maskc.Spec(q_len=total, kv_len=total, mask=maskc.Documents(lengths=lengths) & maskc.Causal())


class Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x, cm):
        return cm(self.proj(x), x, x)


STEPS = [[10, 30, 24], [3, 5, 40, 16], [20, 20, 24], [64], [1, 2, 3, 58], [30, 34]]


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_a_new_mask_every_step_compiles_no_new_graph_after_two_steps(backend):
    from torch._dynamo.utils import counters  # imports triton: not before test_triton sets TRITON_INTERPRET

    torch._dynamo.reset()
    layer = Layer()
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    graphs = []
    for step, lengths in enumerate(STEPS):
        cm = maskc.compile(doc_causal(lengths), block_size=16)
        x = torch.randn(1, 2, 64, 16, requires_grad=True)
        got = compiled(x, cm)
        grads = torch.autograd.grad(got.square().sum(), (x, *layer.parameters()))
        want = layer(x, cm)
        want_grads = torch.autograd.grad(want.square().sum(), (x, *layer.parameters()))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for a, b in zip(grads, want_grads):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[2:] == [graphs[1]] * (len(STEPS) - 2), graphs


@pytest.mark.parametrize("lse_in_loss", [False, True])
def test_compiled_gradients_with_and_without_the_lse_in_the_loss(lse_in_loss):
    """Compiled forward and backward equal eager whether the LSE feeds the loss (a gradient for it
    reaches the backward op) or not (none does, and the backward op takes ``None``)."""
    cm = maskc.compile(doc_causal([10, 30, 24]), block_size=16)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16, requires_grad=True) for _ in range(3))

    def loss(q, k, v):
        out, lse = cm(q, k, v, return_lse=True)
        return out.square().sum() + (lse.sum() if lse_in_loss else 0)

    got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(q, k, v), (q, k, v))
    want = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
