"""``attn_implementation="maskc"`` in Hugging Face transformers, against the model itself.

Tiny random Llama, Mistral (sliding window) and Qwen2 (sliding and full layers)
models in float32 on the CPU: a packed batch of documents gives the logits and
the gradients of each document run alone with ``sdpa``; a padded batch gives
those of the unpadded runs; one forward compiles once per kind of layer; what
maskc cannot read is refused by name.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

import maskc

# Only the package here: its models import Triton, and tests/test_triton.py must switch Triton's
# interpreter on before anything does (it is collected after this file). The integration and the
# models are imported when a test runs (``hf()``, ``models()``).
transformers = pytest.importorskip("transformers")


def hf():
    """``maskc.integrations.transformers`` (importing it registers ``attn_implementation="maskc"``)."""
    import maskc.integrations.transformers as maskc_hf

    return maskc_hf

VOCAB = 128
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**TINY),
    "mistral": lambda: transformers.MistralConfig(**TINY, sliding_window=4),  # smaller than the documents
}
LENGTHS = [5, 9, 3, 7]  # four documents


def models(name, **config):
    """``(maskc model, sdpa model)`` with the same random weights, of ``CONFIGS[name]`` or a config."""
    torch.manual_seed(0)
    cfg = CONFIGS[name]() if isinstance(name, str) else name
    for key, value in config.items():
        setattr(cfg, key, value)
    hf()
    ref = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa",
                                                        dtype=torch.float32)
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="maskc",
                                                         dtype=torch.float32)
    ours.load_state_dict(ref.state_dict())
    assert (ours.config._attn_implementation, ref.config._attn_implementation) == ("maskc", "sdpa")
    return ours, ref


def documents(lengths=LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


def packed_row(docs) -> dict:
    """The documents in one row, ``position_ids`` restarting at each."""
    return {"input_ids": torch.cat(docs)[None], "position_ids": torch.cat([torch.arange(len(d)) for d in docs])[None]}


def weights(logits: torch.Tensor, seed=2) -> torch.Tensor:
    return torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed))


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def alone(ref, docs, w_of) -> tuple[list[torch.Tensor], dict]:
    """Each document run by itself through ``ref``; the gradient of the sum of their losses."""
    ref.zero_grad()
    logits = []
    for n, doc in enumerate(docs):
        out = ref(input_ids=doc[None]).logits[0]
        (out * w_of(n)).sum().backward()
        logits.append(out.detach())
    return logits, grads(ref)


def assert_same(got: dict, want: dict) -> None:
    """Gradients equal to 1e-5 of each tensor's largest entry: a packed batch sums over its tokens in
    another order than separate runs do (sdpa packed with a 4-D mask differs from them by as much)."""
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5 * float(want[name].abs().max()),
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("source", ["position_ids", "collator"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_documents_are_each_document_alone(name, source):
    ours, ref = models(name)
    docs = documents()
    if source == "collator":  # cu_seq_lens_q/k, max_length_q/k and position_ids, as in packed training
        batch = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
            [{"input_ids": d.tolist()} for d in docs], return_tensors="pt")
        batch.pop("labels")
        assert "cu_seq_lens_q" in batch
    else:
        batch = packed_row(docs)
    packed = ours(**batch).logits[0]
    w = weights(packed)
    (packed * w).sum().backward()
    starts = torch.tensor([0] + LENGTHS).cumsum(0).tolist()
    want, want_grads = alone(ref, docs, lambda n: w[starts[n]:starts[n + 1]])
    torch.testing.assert_close(packed.detach(), torch.cat(want), rtol=1e-5, atol=1e-6)
    assert_same(grads(ours), want_grads)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_padded_batch_is_the_unpadded_runs(name, side):
    ours, ref = models(name)
    docs = documents()
    length = max(LENGTHS)
    ids = torch.zeros(len(docs), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    positions = torch.zeros_like(ids)
    for b, doc in enumerate(docs):
        at = slice(length - len(doc), length) if side == "left" else slice(0, len(doc))
        ids[b, at], mask[b, at], positions[b, at] = doc, 1, torch.arange(len(doc))
    logits = ours(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    w = weights(logits) * mask[..., None]  # padding takes no part in the loss
    (logits * w).sum().backward()
    want, want_grads = alone(ref, docs, lambda b: w[b][mask[b].bool()])
    for b in range(len(docs)):
        torch.testing.assert_close(logits[b][mask[b].bool()].detach(), want[b], rtol=1e-5, atol=1e-6)
    assert_same(grads(ours), want_grads)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_rows_packed_differently_and_padding_with_gaps(name):
    """Each row of a batch packed its own way (joined with pack_batch), and 2-D masks with gaps
    (the tokens on both sides of a gap attend each other, as in transformers' mask)."""
    ours, ref = models(name)
    rows = [documents([5, 9, 6], seed=10), documents([12, 8], seed=11)]
    ids = torch.stack([torch.cat(docs) for docs in rows])
    positions = torch.stack([torch.cat([torch.arange(len(d)) for d in docs]) for docs in rows])
    want = torch.stack([torch.cat([ref(input_ids=d[None]).logits[0] for d in docs]) for docs in rows])
    torch.testing.assert_close(ours(input_ids=ids, position_ids=positions).logits, want, rtol=1e-5, atol=1e-6)
    mask = torch.tensor([[1, 1, 0, 1, 1, 1, 0, 1], [0, 1, 1, 1, 1, 1, 1, 1]])
    got, want = (m(input_ids=ids[:, :8], attention_mask=mask).logits for m in (ours, ref))
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-6)


def test_generate_with_left_padding_matches_sdpa():
    ours, ref = models("mistral")
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    args = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert ours.generate(ids, **args).tolist() == ref.generate(ids, **args).tolist()


def qwen2_sliding_and_full(layers: int):
    kinds = ["sliding_attention", "full_attention"] * (layers // 2)
    return transformers.Qwen2Config(**{**TINY, "num_hidden_layers": layers}, use_sliding_window=True,
                                    sliding_window=3, layer_types=kinds)


@pytest.mark.parametrize("config, kinds", [
    (lambda: transformers.LlamaConfig(**{**TINY, "num_hidden_layers": 4}), 1),
    (lambda: qwen2_sliding_and_full(4), 2),  # Gemma-style: sliding and full layers alternate
], ids=["llama", "qwen2-sliding-and-full"])
def test_one_compile_per_forward_and_kind_of_layer(config, kinds, monkeypatch):
    ours, ref = models(config())
    compiled = []

    def counting(spec, *args, **kwargs):
        compiled.append(spec)
        return real(spec, *args, **kwargs)

    real = maskc.compile
    monkeypatch.setattr(maskc, "compile", counting)
    docs = documents()
    batch = packed_row(docs)
    packed = ours(**batch).logits[0]
    assert len(compiled) == kinds
    assert all(spec.mask.lengths == tuple(LENGTHS) for spec in compiled)
    ours(**batch)  # a new batch: compiled again, once per kind
    assert len(compiled) == 2 * kinds
    torch.testing.assert_close(packed, torch.cat([ref(input_ids=d[None]).logits[0] for d in docs]),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_maskc_spec_passed_directly_replaces_the_mask(name):
    """A bidirectional prefix in a causal model, which transformers' masks do not express: against
    sdpa with the same mask as a 4-D boolean tensor, one spec for the batch and one per sample."""
    ours, ref = models(name)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(4))
    prefix_lm = [maskc.Spec(q_len=10, kv_len=10, mask=maskc.Causal() | maskc.Prefix(length=p)) for p in (4, 6)]
    dense = torch.stack([maskc.compile(s).dense() for s in prefix_lm])[:, None]
    for given, want_mask in ((prefix_lm[0], dense[:1].expand(2, -1, -1, -1)), (prefix_lm, dense)):
        got = ours(input_ids=ids, maskc_spec=given).logits
        torch.testing.assert_close(got, ref(input_ids=ids, attention_mask=want_mask).logits, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"maskc_spec has q_len=10, kv_len=10, but this layer attends 8 queries"):
        ours(input_ids=ids[:, :8], maskc_spec=prefix_lm[0])


# -- 4-D masks and what is refused --------------------------------------------------------------


def four_d(length: int, lengths: list[int], pad: int, window=None) -> torch.Tensor:
    """``bool[1, 1, length, length]``: causal documents after ``pad`` padding tokens."""
    doc = torch.full((length,), -1)
    start = pad
    for n, size in enumerate(lengths):
        doc[start:start + size] = n
        start += size
    i = torch.arange(length)
    allowed = (doc[:, None] == doc[None, :]) & (doc[:, None] >= 0) & (i[None, :] <= i[:, None])
    if window is not None:
        allowed &= i[None, :] > i[:, None] - window
    return allowed[None, None]


def test_4d_masks_of_documents_and_padding_are_read():
    ours, ref = models("mistral")
    docs = documents([5, 9])
    ids = torch.cat([torch.zeros(2, dtype=torch.long), *docs])[None]
    positions = torch.cat([torch.zeros(2, dtype=torch.long), torch.arange(5), torch.arange(9)])[None]
    mask = four_d(16, [5, 9], pad=2, window=4)
    want = torch.cat([ref(input_ids=d[None]).logits[0] for d in docs])
    for given in (mask, torch.where(mask, 0.0, torch.finfo(torch.float32).min), torch.where(mask, 0.0, -torch.inf)):
        got = ours(input_ids=ids, attention_mask=given, position_ids=positions).logits[0, 2:]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_float_bias_is_refused_by_name():
    ours, _ = models("llama")
    ids = torch.randint(0, VOCAB, (1, 8))
    bias = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"4-D attention_mask is a float bias .* attn_implementation='sdpa'"):
        ours(input_ids=ids, attention_mask=bias)
    crossing = four_d(8, [4, 4], pad=0).clone()
    crossing[..., 6, 1] = True  # a query of the second document sees a key of the first
    with pytest.raises(ValueError, match=r"cannot be read: in sample 0, query 6 attends 4 keys between 1 and 6"):
        ours(input_ids=ids, attention_mask=crossing)


def test_what_maskc_cannot_run_is_refused():
    ours, _ = models("llama", attention_dropout=0.1)
    ids = torch.randint(0, VOCAB, (1, 8))
    ours.train()
    with pytest.raises(ValueError, match=r"no attention dropout.*dropout=0.1"):
        ours(input_ids=ids)
    ours.eval()
    ours(input_ids=ids)  # no dropout outside training
    layer = ours.model.layers[0].self_attn
    q, kv = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"softcap=30.0.*'eager' or 'flex_attention'"):
        hf().attention_forward(layer, q, kv, kv, None, softcap=30.0)
    with pytest.raises(ValueError, match=r"or_mask_function.*attn_implementation='sdpa'"):
        hf().layer_mask(batch_size=1, q_length=8, kv_length=8, use_vmap=True)


def test_a_reading_that_disagrees_with_transformers_is_refused():
    """Llama 4's chunked attention, say: transformers' own definition of the mask is the check."""
    def chunked(batch, head, q, kv):
        return (kv <= q) & (q // 4 == kv // 4)

    lm = hf().layer_mask(batch_size=1, q_length=8, kv_length=8, mask_function=chunked)
    layer = models("llama")[0].model.layers[0].self_attn
    q, kv = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"differs from transformers' definition at sample 0, query 4, key 0 "
                                         r"\(transformers: masked, maskc: attend\)"):
        hf().attention_forward(layer, q, kv, kv, lm)


def test_the_installed_transformers_is_in_the_pinned_range():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    (pin,) = [Requirement(r) for r in pyproject["project"]["optional-dependencies"]["transformers"]]
    assert pin.name == "transformers" and re.search(r"<", str(pin.specifier))
    assert transformers.__version__ in pin.specifier
