"""``attn_implementation="maskc"`` on the GPU in bf16: maskc's Triton kernels inside transformers models.

A packed batch (and a left-padded one) through a small random Llama and Mistral
(sliding window) in bf16 with maskc, against each document alone in float32
with ``sdpa``: maskc's error in the logits and in every gradient must be
within twice that of ``sdpa`` itself in bf16 on the same documents (plus a
small floor), so the bound is bf16 rounding, whatever the card.
"""

from __future__ import annotations

import pytest
import torch

# Only the package here: its models import Triton, which tests/test_triton.py (collected after this
# directory) must find not yet imported. The integration is imported when a test runs.
transformers = pytest.importorskip("transformers")

VOCAB = 1000
SMALL = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, head_dim=64, vocab_size=VOCAB)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "mistral": lambda: transformers.MistralConfig(**SMALL, sliding_window=256),  # smaller than most documents
}
LENGTHS = [300, 1000, 77, 700, 250]


def model(name: str, impl: str, dtype, state=None):
    import maskc.integrations.transformers  # noqa: F401 - registers attn_implementation="maskc"

    torch.manual_seed(0)
    out = transformers.AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation=impl, dtype=dtype).cuda()
    if state is not None:
        out.load_state_dict(state)
    return out


def run(m, inputs, w, rows=None):
    """Logits (those of the tokens ``rows``) and parameter gradients of ``sum(logits * w)``, in float32."""
    m.zero_grad()
    logits = m(**inputs).logits
    logits = logits if rows is None else logits[rows]
    (logits.float() * w).sum().backward()
    return logits.detach().float(), {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None}


def relative(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def alone(m, docs, w_of):
    """Each document by itself: logits concatenated, gradients summed."""
    logits, grads = [], {}
    for n, doc in enumerate(docs):
        out, g = run(m, {"input_ids": doc[None]}, w_of(n)[None])
        logits.append(out[0])
        for k, v in g.items():
            grads[k] = grads.get(k, 0) + v
    return torch.cat(logits), grads


def check(ours, sdpa16, want):
    (got, got_g), (bf, bf_g), (ref, ref_g) = ours, sdpa16, want
    assert relative(got, ref) <= 2 * relative(bf, ref) + 1e-3, (relative(got, ref), relative(bf, ref))
    for name in ref_g:
        mine, theirs = relative(got_g[name], ref_g[name]), relative(bf_g[name], ref_g[name])
        assert mine <= 2 * theirs + 1e-3, (name, mine, theirs)


def packed(docs) -> tuple[dict, torch.Tensor]:
    """The model's inputs, and which of its tokens are the documents' (in order)."""
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d), device="cuda") for d in docs])[None]
    return {"input_ids": ids, "position_ids": positions}, torch.ones_like(ids, dtype=torch.bool)


def left_padded(docs) -> tuple[dict, torch.Tensor]:
    length = max(len(d) for d in docs)
    ids = torch.zeros(len(docs), length, dtype=torch.long, device="cuda")
    mask, positions = torch.zeros_like(ids), torch.zeros_like(ids)
    for b, doc in enumerate(docs):
        ids[b, -len(doc):], mask[b, -len(doc):], positions[b, -len(doc):] = doc, 1, torch.arange(len(doc))
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}, mask.bool()


@pytest.mark.parametrize("layout", [packed, left_padded], ids=lambda f: f.__name__)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_batch_is_each_document_alone(name, layout):
    g = torch.Generator(device="cuda").manual_seed(1)
    docs = [torch.randint(0, VOCAB, (n,), device="cuda", generator=g) for n in LENGTHS]
    ref = model(name, "sdpa", torch.float32)
    state = ref.state_dict()
    w = torch.randn(sum(LENGTHS), VOCAB, device="cuda", generator=g)  # one weight row per token of the documents
    starts = torch.tensor([0] + LENGTHS).cumsum(0).tolist()
    w_of = lambda n: w[starts[n]:starts[n + 1]]  # noqa: E731
    want = alone(ref, docs, w_of)
    sdpa16 = alone(model(name, "sdpa", torch.bfloat16, state), docs, w_of)
    inputs, tokens = layout(docs)
    check(run(model(name, "maskc", torch.bfloat16, state), inputs, w, rows=tokens), sdpa16, want)
