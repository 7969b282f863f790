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

transformers = pytest.importorskip("transformers")

import maskc.integrations.transformers  # noqa: E402,F401 - registers "maskc"
from transformers import AutoModelForCausalLM  # noqa: E402

VOCAB = 1000
SMALL = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, head_dim=64, vocab_size=VOCAB)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "mistral": lambda: transformers.MistralConfig(**SMALL, sliding_window=256),  # smaller than most documents
}
LENGTHS = [300, 1000, 77, 700, 250]


def model(name: str, impl: str, dtype, state=None):
    torch.manual_seed(0)
    out = AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation=impl, dtype=dtype).cuda()
    if state is not None:
        out.load_state_dict(state)
    return out


def run(m, inputs, w, rows=None):
    """Logits (the ``rows`` of them) and parameter gradients of ``sum(logits * w)``, in float32."""
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


@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_bf16_is_each_document_alone(name):
    g = torch.Generator(device="cuda").manual_seed(1)
    docs = [torch.randint(0, VOCAB, (n,), device="cuda", generator=g) for n in LENGTHS]
    ref = model(name, "sdpa", torch.float32)
    state = ref.state_dict()
    w = torch.randn(sum(LENGTHS), VOCAB, device="cuda", generator=g)
    starts = torch.tensor([0] + LENGTHS).cumsum(0).tolist()
    w_of = lambda n: w[starts[n]:starts[n + 1]]  # noqa: E731
    want = alone(ref, docs, w_of)
    sdpa16 = alone(model(name, "sdpa", torch.bfloat16, state), docs, w_of)
    packed = {"input_ids": torch.cat(docs)[None],
              "position_ids": torch.cat([torch.arange(n, device="cuda") for n in LENGTHS])[None]}
    ours = model(name, "maskc", torch.bfloat16, state)
    got_logits, got_grads = run(ours, packed, w[None])
    check((got_logits[0], got_grads), sdpa16, want)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_left_padded_bf16_is_the_unpadded_runs(name):
    g = torch.Generator(device="cuda").manual_seed(2)
    docs = [torch.randint(0, VOCAB, (n,), device="cuda", generator=g) for n in LENGTHS]
    length = max(LENGTHS)
    ids = torch.zeros(len(docs), length, dtype=torch.long, device="cuda")
    mask, positions = torch.zeros_like(ids), torch.zeros_like(ids)
    for b, doc in enumerate(docs):
        ids[b, -len(doc):], mask[b, -len(doc):], positions[b, -len(doc):] = doc, 1, torch.arange(len(doc))
    ref = model(name, "sdpa", torch.float32)
    state = ref.state_dict()
    w = torch.randn(sum(LENGTHS), VOCAB, device="cuda", generator=g)
    starts = torch.tensor([0] + LENGTHS).cumsum(0).tolist()
    w_of = lambda n: w[starts[n]:starts[n + 1]]  # noqa: E731
    want = alone(ref, docs, w_of)
    sdpa16 = alone(model(name, "sdpa", torch.bfloat16, state), docs, w_of)
    ours = model(name, "maskc", torch.bfloat16, state)
    got_logits, got_grads = run(ours, {"input_ids": ids, "attention_mask": mask, "position_ids": positions}, w,
                                rows=mask.bool())
    check((got_logits, got_grads), sdpa16, want)
