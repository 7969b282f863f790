"""The decode path on a GPU: bf16 against a float32 reference, paged against padded caches, graphs.

Sizes are a small serving batch: 8 sequences in cache slots of 1024 keys (or
pools of pages of 128), 1 to 16 new queries each, GQA.
"""

import numpy as np
import pytest
import torch

import maskc
from test_runtime import close, reference

DEVICE = "cuda"
SEQS, SLOT, PAGE = 8, 1024, 128
LENGTHS = [1000, 3, 517, 1024, 129, 64, 880, 300]  # 3 keys for up to 16 queries: empty rows
#: lengths of decode steps 0-3 (one key more a step) whose masks share one structure: the same grids
DECODING = [[n + step for n in [100, 300, 517, 700, 129, 64, 880, 900]] for step in range(4)]


def caches(heads, kv_heads, n_q, head_dim=128, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(1, heads, SEQS * n_q, head_dim, device=DEVICE, dtype=torch.bfloat16)
    k, v = (torch.randn(1, kv_heads, SEQS * SLOT, head_dim, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    return q, k, v


def page_pool(padded: torch.Tensor, page_table: np.ndarray) -> torch.Tensor:
    """The padded cache's page ``b`` of slot ``n`` at the pool's page ``page_table[n, b]``."""
    pool = torch.empty_like(padded)
    order = torch.as_tensor(page_table.reshape(-1), device=padded.device)
    pool.view(*padded.shape[:2], -1, PAGE, padded.shape[-1])[:, :, order] = padded.view(
        *padded.shape[:2], -1, PAGE, padded.shape[-1])
    return pool


def shuffled_pages(seed=1) -> np.ndarray:
    return np.random.default_rng(seed).permutation(SEQS * SLOT // PAGE).reshape(SEQS, SLOT // PAGE)


@pytest.mark.parametrize("heads, kv_heads", [(32, 8), (8, 8), (16, 2)])
@pytest.mark.parametrize("n_q", [1, 4, 16])
def test_padded_cache_decode_against_float32(n_q, heads, kv_heads):
    cm = maskc.compile(maskc.from_padded_kv_cache([n_q] * SEQS, SLOT, LENGTHS), device=DEVICE)
    assert cm.plan(DEVICE).structure.decode
    q, k, v = caches(heads, kv_heads, n_q)
    out, lse = cm(q, k, v, return_lse=True)
    want, want_lse = reference(cm, q, k, v)
    close(out, want, 2e-2)
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite) and (out[~finite] == 0).all()
    close(lse[finite], want_lse[finite], 2e-2)


@pytest.mark.parametrize("n_q", [1, 16])
def test_paged_cache_equals_the_padded_one(n_q):
    table = shuffled_pages()
    padded = maskc.compile(maskc.from_padded_kv_cache([n_q] * SEQS, SLOT, LENGTHS), device=DEVICE)
    paged = maskc.compile(maskc.from_paged_kv_cache(table, PAGE, LENGTHS, n_q, n_pages=table.size), device=DEVICE)
    assert paged.plan(DEVICE).structure.decode
    q, k, v = caches(32, 8, n_q)
    out, lse = padded(q, k, v, return_lse=True)
    paged_out, paged_lse = paged(q, page_pool(k, table), page_pool(v, table), return_lse=True)
    close(paged_out, out, 1e-2)  # the same sums in another order of blocks
    assert torch.equal(torch.isfinite(paged_lse), torch.isfinite(lse))
    close(paged_lse[torch.isfinite(lse)], lse[torch.isfinite(lse)], 1e-4)


def test_vllm_layout_is_attended_in_place():
    # vLLM's cache [n_pages, page_size, kv_heads, head_dim] viewed as [1, kv_heads, n_pages * page_size, head_dim]
    table = shuffled_pages()
    q, k, v = caches(32, 8, 1)
    vllm_k, vllm_v = (page_pool(x, table)[0].transpose(0, 1).reshape(-1, PAGE, 8, 128).contiguous() for x in (k, v))
    pool_k, pool_v = (x.flatten(0, 1).transpose(0, 1)[None] for x in (vllm_k, vllm_v))
    assert pool_k.data_ptr() == vllm_k.data_ptr()  # a view, no copy
    paged = maskc.compile(maskc.from_paged_kv_cache(table, PAGE, LENGTHS, 1, n_pages=table.size), device=DEVICE)
    padded = maskc.compile(maskc.from_padded_kv_cache([1] * SEQS, SLOT, LENGTHS), device=DEVICE)
    close(paged(q, pool_k, pool_v), padded(q, k, v), 1e-2)


def test_decode_masks_stay_differentiable():
    cm = maskc.compile(maskc.from_padded_kv_cache([4] * SEQS, SLOT, LENGTHS), device=DEVICE)
    q, k, v = (x.requires_grad_() for x in caches(8, 2, 4, head_dim=64))
    out = cm(q, k, v)
    want, _ = reference(cm, q, k, v)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad.float())):
        close(a, b, 3e-2)


def test_cuda_graph_replays_decode_steps_with_new_lengths():
    # one decode step a replay: every sequence one key longer, the same structure (grids, tables' length)
    compiled = [maskc.compile(maskc.from_padded_kv_cache([1] * SEQS, SLOT, lengths), device=DEVICE)
                for lengths in DECODING]
    assert len({cm.plan(DEVICE).key for cm in compiled}) == 1
    cm = compiled[0]
    q, k, v = caches(32, 8, 1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cm(q, k, v)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cm(q, k, v)
    for new in compiled[1:]:
        cm.load_(new)
        graph.replay()
        close(out, new(q, k, v), 1e-3)


def test_torch_compile_takes_new_lengths_without_recompiling():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    attend = torch.compile(lambda q, k, v, cm: cm(q, k, v), fullgraph=True)
    q, k, v = caches(32, 8, 1)
    for step, lengths in enumerate(DECODING):  # torch.compile may compile once more at the second step
        cm = maskc.compile(maskc.from_padded_kv_cache([1] * SEQS, SLOT, lengths), device=DEVICE)
        assert cm.plan(DEVICE).structure.decode
        close(attend(q, k, v, cm), cm(q, k, v), 1e-3)
        if step == 1:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs, "a new decode step compiled a new graph"
