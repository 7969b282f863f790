"""A training step over packed documents whose lengths change every step.

Compiling the mask is linear in the tokens, so a new spec per batch is cheap;
the attention op is differentiable and gives zero output on padding rows.

    python examples/packed_documents_training_step.py
"""

import time

import numpy as np
import torch

import maskc

rng = np.random.default_rng(0)
seq, heads, head_dim = 2048, 4, 32
proj = torch.nn.Linear(head_dim, 3 * head_dim, dtype=torch.float32)
opt = torch.optim.SGD(proj.parameters(), lr=1e-2)

for step in range(3):
    lengths = rng.integers(64, 512, size=16)
    lengths = lengths[np.cumsum(lengths) <= seq - 32]  # leave some padding at the end
    spec = maskc.Spec(q_len=seq, kv_len=seq, mask=maskc.Documents(lengths=lengths.tolist(), inner=maskc.Causal()))
    start = time.perf_counter()
    cm = maskc.compile(spec)
    compile_ms = 1e3 * (time.perf_counter() - start)

    x = torch.randn(1, heads, seq, head_dim)
    q, k, v = proj(x).chunk(3, dim=-1)
    out = cm(q, k, v)
    loss = out.square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    padding = cm.empty_rows
    print(f"step {step}: {len(lengths)} documents, compile {compile_ms:.1f} ms, loss {loss.item():.4f}, "
          f"{len(padding)} padding rows, their output is zero: {bool((out[:, :, padding] == 0).all())}")
