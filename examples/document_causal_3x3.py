"""The case that started maskc: document-causal attention split 3 x 3.

Three packed documents (5, 4, 3 tokens), causal inside each, split into 3 query
parts and 3 key parts as ring attention over 3 ranks would. Some tiles have
queries that attend nothing and keys nobody attends; other tools answer NaN
there. Each tile is compiled and run on its own, then the tiles of each query
part are merged by log-sum-exp and compared with the unsplit attention,
forward and backward.

    python examples/document_causal_3x3.py
"""

import torch

import maskc

spec = maskc.Spec(q_len=12, kv_len=12, mask=maskc.Documents(lengths=[5, 4, 3]) & maskc.Causal())
torch.manual_seed(0)
q, k, v = (torch.randn(1, 4, 12, 32, dtype=torch.float64, requires_grad=True) for _ in range(3))

whole = maskc.compile(spec, block_size=4)(q, k, v)

bounds = maskc.split_points(3, spec.q_len)
tiles = maskc.partition(spec, q_splits=3, kv_splits=3)
parts = []
for i, row in enumerate(tiles):
    outs, lses = [], []
    for j, tile in enumerate(row):
        cm = maskc.compile(tile, block_size=2)
        print(f"tile ({i}, {j}): {tile.mask}")
        print(f"  empty rows {cm.empty_rows.tolist()}, empty cols {cm.empty_cols.tolist()}")
        rows, cols = slice(bounds[i], bounds[i + 1]), slice(bounds[j], bounds[j + 1])
        out, lse = cm(q[:, :, rows], k[:, :, cols], v[:, :, cols], return_lse=True)
        outs.append(out)
        lses.append(lse)
    parts.append(maskc.merge_partials(outs, lses)[0])
merged = torch.cat(parts, dim=2)

grads_whole = torch.autograd.grad(whole.square().sum(), (q, k, v))
grads_merged = torch.autograd.grad(merged.square().sum(), (q, k, v))
print(f"forward:  max |merged - whole| = {(merged - whole).abs().max().item():.1e}")
for name, a, b in zip("qkv", grads_merged, grads_whole):
    print(f"d{name}:       max |merged - whole| = {(a - b).abs().max().item():.1e}, NaN: {bool(a.isnan().any())}")
