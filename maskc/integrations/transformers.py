"""maskc as a Hugging Face transformers attention backend: ``attn_implementation="maskc"``.

The three lines (``pip install maskc[transformers]``)::

    import maskc.integrations.transformers  # registers "maskc" with transformers
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="maskc")
    loss = model(input_ids, position_ids=position_ids, labels=labels).loss

What is read, for each forward and each kind of layer (full, sliding window):

* packed documents: ``cu_seq_lens_q``/``cu_seq_lens_k`` keyword arguments where
  given (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``), else
  ``position_ids`` that restart (a new document wherever a position is not its
  predecessor's plus one, as transformers reads them), in any row of the batch;
* padding: the 2-D ``attention_mask`` (left, right or both); padding queries
  give 0;
* the layer: ``sliding_window`` (a query sees itself and the ``window - 1``
  keys before it, transformers' definition), ``is_causal``, ``scaling``; GQA
  runs natively (``key`` keeps its ``num_key_value_heads``);
* a 4-D mask the caller made: boolean or float 0/-inf, read when each query
  attends a run of keys ending at itself (causal documents, windows,
  padding) and refused otherwise, as is a float bias of other values.

When the samples of a batch differ, ``maskc.pack_batch`` joins their specs and
the batch runs as one sequence (``[B, H, L, D] -> [1, H, B*L, D]``, a view).

Compiled once per forward and kind of layer. transformers builds one mask per
forward for each kind of layer through its mask interface and gives that one
object to every layer of the kind. maskc's mask function builds no dense mask:
it returns a ``LayerMask`` (the padding and offsets transformers read, and
transformers' own definition of the mask). The first layer that receives it
reads the layout, compiles it, checks it against transformers' definition on a
few rows per sample, and keeps the compiled mask on the ``LayerMask``; the other
layers of the kind reuse it. The cache is the object of that forward: it cannot
go stale, and it is freed with the forward. (A tensor given in its place, a 4-D
mask or ``None``, is read once and cached by the identity and version of the
tensors it was read from, held weakly.)

A mask transformers cannot express (a bidirectional prefix in a causal model,
say) is passed directly: ``model(input_ids, maskc_spec=spec)`` with a
``maskc.Spec`` for every sample, a list of them (one per sample) or a
``CompiledMask``; it replaces what transformers passes, for every layer.

Refused with an error that says what to use instead: attention dropout while
training, ``softcap``, attention sinks (``s_aux``), a position bias, masks a
model extends with its own functions (``or_mask_function``/``and_mask_function``,
e.g. image tokens), and layouts whose reading disagrees with transformers'
definition (chunked attention, say).
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

import maskc
from maskc import And, Causal, CompiledMask, Documents, Full, Mask, Or, Range, SlidingWindow, Spec

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as error:  # pragma: no cover - the extra is missing
    raise ImportError("maskc.integrations.transformers needs transformers: "
                      "pip install 'maskc[transformers]'") from error

NAME = "maskc"
VERIFY_ROWS = 16  # query rows per sample checked against transformers' definition of the mask
VERIFY_ELEMENTS = 1 << 22  # at most this many (row, key) pairs per check: a few MB, far below one step
RAW_CACHE_SIZE = 8  # layouts kept for masks given as tensors (or None): a few kinds of layer, a forward or two
USE_SDPA = "use attn_implementation='sdpa' for this model, or build the mask as a maskc Spec (docs/guide.md)"


@dataclass(frozen=True)
class Options:
    """``register``'s options: the tables' ``block_size``, whether to ``verify`` each reading
    against transformers' definition of the mask, and a ``backend`` to force."""

    block_size: int = 128
    verify: bool = True
    backend: Optional[str] = None


_OPTIONS: dict[str, Options] = {}


def register(name: str = NAME, block_size: int = 128, verify: bool = True, backend: Optional[str] = None) -> str:
    """Register maskc with transformers as ``attn_implementation=name`` (importing this module
    registers ``"maskc"`` with the defaults). Returns ``name``."""
    _OPTIONS[name] = Options(block_size=block_size, verify=verify, backend=backend)
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, layer_mask)
    return name


# -- what transformers passes each layer --------------------------------------------------------


@dataclass(eq=False)
class LayerMask:
    """maskc's answer to transformers' mask interface: one per forward and kind of layer,
    passed to every layer of that kind as its ``attention_mask``.

    ``padding``: ``bool[batch, kv_offset + kv_length]``, False at padding tokens, or ``None``;
    ``mask_function``: transformers' definition, ``(batch, head, q_idx, kv_idx) -> bool``
    on broadcast index tensors; ``layouts``: what this forward compiled, by layer kind.
    """

    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    padding: Optional[torch.Tensor]
    mask_function: Optional[Callable]
    options: Options
    layouts: dict = field(default_factory=dict)


def layer_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
               mask_function: Optional[Callable] = None, attention_mask: Optional[torch.Tensor] = None,
               use_vmap: bool = False, config=None, **_) -> LayerMask:
    """transformers' mask interface for maskc: a ``LayerMask``, no dense mask."""
    if use_vmap:  # transformers sets it exactly when a model adds or_mask_function / and_mask_function
        raise ValueError(
            "maskc attention: this model extends its attention mask with its own functions (or_mask_function / "
            "and_mask_function, e.g. image tokens that attend each other both ways), which maskc cannot read; "
            + USE_SDPA)
    padding = None
    if attention_mask is not None:
        padding = attention_mask.to(torch.bool)
        missing = int(kv_offset) + kv_length - padding.shape[-1]
        if missing > 0:  # as transformers does: positions past the 2-D mask are padding
            padding = torch.nn.functional.pad(padding, (0, missing), value=False)
    options = _OPTIONS.get(getattr(config, "_attn_implementation", NAME), Options())
    return LayerMask(batch_size, q_length, kv_length, int(q_offset), int(kv_offset), padding, mask_function, options)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, dropout: float = 0.0, scaling: Optional[float] = None,
                      sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface for maskc: ``query [B, Hq, L, D]``, ``key``/``value
    [B, Hkv, L_kv, D]`` -> ``(out [B, L, Hq, D], None)``, as ``sdpa_attention_forward``."""
    _refuse(module, dropout, softcap, kwargs)
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    window = None if sliding_window is None else int(sliding_window)
    if window is not None and window <= 0:
        raise ValueError(f"maskc attention: sliding_window={sliding_window} must be a positive number of keys")
    layout = _layout(module, attention_mask, query, key, causal, window, kwargs)
    return layout.attend(query, key, value, scaling), None


def _refuse(module, dropout, softcap, kwargs) -> None:
    if dropout:
        raise ValueError(
            f"maskc attention has no attention dropout, and this layer asks for dropout={dropout} while training: "
            "set the config's attention_dropout to 0.0, or use attn_implementation='sdpa'")
    if softcap is not None:
        raise ValueError(f"maskc attention does not cap attention logits (softcap={softcap}); "
                         "use attn_implementation='eager' or 'flex_attention' for this model")
    if kwargs.get("s_aux") is not None:
        raise ValueError("maskc attention does not support attention sinks (s_aux); "
                         "use attn_implementation='eager' or 'flex_attention' for this model")
    if kwargs.get("position_bias") is not None:
        raise ValueError("maskc attention adds no position bias (position_bias); " + USE_SDPA)
    if kwargs.get("output_attentions"):
        warnings.warn("maskc attention returns no attention weights (output_attentions=True gives None); "
                      "use attn_implementation='eager' to see them", stacklevel=3)


# -- the layout of a batch ------------------------------------------------------------------------


@dataclass
class _Sample:
    """One sample's reading: its ``spec`` over ``[q_len, kv_len]``, the query ``rows`` of tokens
    (not padding), the valid keys (``None``: all) and, where documents came from
    ``position_ids``/``cu_seq_lens``, the document of each query and key (-1: none)."""

    spec: Spec
    rows: np.ndarray
    keys: Optional[np.ndarray] = None
    q_doc: Optional[np.ndarray] = None
    k_doc: Optional[np.ndarray] = None


@dataclass
class _Layout:
    """A compiled mask for the batch; ``packed``: the samples differ, and run laid end to end."""

    cm: CompiledMask
    packed: bool
    backend: Optional[str]

    def attend(self, query, key, value, scale) -> torch.Tensor:
        batch, heads, length = query.shape[:3]
        if self.packed:
            query, key, value = (_flat(x) for x in (query, key, value))
        out = self.cm(query, key, value, scale=scale, backend=self.backend).transpose(1, 2)
        if self.packed:
            out = out.reshape(batch, length, heads, out.shape[-1])
        return out.contiguous()


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, D] -> [1, H, B*L, D]``: a view of the ``[B, L, H, D]`` tensors models project."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(1, b * n, h, d).transpose(1, 2)


def _compile(samples: list[_Sample], options: Options) -> _Layout:
    specs = [s.spec for s in samples]
    packed = any(s != specs[0] for s in specs)
    spec = maskc.pack_batch(specs) if packed else specs[0]
    return _Layout(maskc.compile(spec, block_size=options.block_size), packed, options.backend)


_RAW: dict = {}  # key -> (weak references to the tensors it was read from, the layout)


def _identity(t) -> Optional[tuple]:
    return None if t is None else (id(t), t._version, t.data_ptr(), tuple(t.shape))


def _remember(lm: Optional[LayerMask], key: tuple, tensors: tuple, build: Callable[[], _Layout]) -> _Layout:
    """The layout under ``key``: on the forward's ``LayerMask``, or in a small cache of recent ones
    whose entries hold the tensors they were read from weakly (a new tensor may reuse a freed
    one's id: the reference then no longer points to it, and the layout is read again)."""
    if lm is not None:
        if key not in lm.layouts:
            lm.layouts[key] = build()
        return lm.layouts[key]
    hit = _RAW.get(key)
    if hit is None or any((r() if r is not None else None) is not t for r, t in zip(hit[0], tensors)):
        while len(_RAW) >= RAW_CACHE_SIZE:
            _RAW.pop(next(iter(_RAW)))
        _RAW[key] = hit = (tuple(None if t is None else weakref.ref(t) for t in tensors), build())
    return hit[1]


def _layout(module, attention_mask, query, key, causal: bool, window: Optional[int], kwargs) -> _Layout:
    batch, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
    lm = attention_mask if isinstance(attention_mask, LayerMask) else None
    options = lm.options if lm is not None else _OPTIONS.get(
        getattr(getattr(module, "config", None), "_attn_implementation", NAME), Options())
    given = kwargs.get("maskc_spec")
    if given is not None:  # the caller's own mask replaces what transformers passes
        by = tuple(given) if isinstance(given, list) else given
        return _remember(lm, ("maskc_spec", by, batch, q_len, kv_len, options), (),
                         lambda: _given(given, batch, q_len, kv_len, options))
    position_ids, cu_q, cu_k = (kwargs.get(n) for n in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k"))

    def build() -> _Layout:
        if lm is not None:
            samples = _read(batch, q_len, kv_len, lm.q_offset, lm.kv_offset, causal, window, lm.padding,
                            position_ids, cu_q, cu_k)
            if options.verify and lm.mask_function is not None:
                _verify(lm, samples, query.device)
        elif attention_mask is not None and attention_mask.dim() == 4:
            samples = _read_4d(attention_mask, batch, q_len, kv_len, causal, window)
        else:  # a 2-D padding mask, or none; queries are the last q_len positions of the keys
            padding = None if attention_mask is None else attention_mask.to(torch.bool)
            samples = _read(batch, q_len, kv_len, kv_len - q_len, 0, causal, window, padding, position_ids, cu_q, cu_k)
        return _compile(samples, options)

    if lm is not None:
        return _remember(lm, (causal, window, batch, q_len, kv_len), (), build)
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"maskc attention: attention_mask of type {type(attention_mask).__name__} cannot be read; "
                        + USE_SDPA)
    tensors = (attention_mask, position_ids, cu_q, cu_k)
    return _remember(None, (causal, window, batch, q_len, kv_len, options, *map(_identity, tensors)), tensors, build)


def _given(given, batch: int, q_len: int, kv_len: int, options: Options) -> _Layout:
    """The layout of a ``maskc_spec``: a ``Spec`` for every sample, one ``Spec`` per sample, or a
    ``CompiledMask`` of one sample or of the whole batch laid end to end."""
    if isinstance(given, CompiledMask):
        cm = given
    else:
        specs = list(given) if isinstance(given, (list, tuple)) else [given]
        if not specs or not all(isinstance(s, Spec) for s in specs):
            raise TypeError(f"maskc_spec must be a maskc.Spec, a list of them (one per sample) or a CompiledMask, "
                            f"got {given!r:.200}")
        if len(specs) > 1 and len(specs) != batch:
            raise ValueError(f"maskc_spec holds {len(specs)} specs for a batch of {batch} samples")
        spec = specs[0] if len(set(specs)) == 1 else maskc.pack_batch(specs)
        cm = maskc.compile(spec, block_size=options.block_size)
    if (cm.q_len, cm.kv_len) not in ((q_len, kv_len), (batch * q_len, batch * kv_len)):
        raise ValueError(f"maskc_spec has q_len={cm.q_len}, kv_len={cm.kv_len}, but this layer attends {q_len} "
                         f"queries to {kv_len} keys in each of {batch} samples")
    return _Layout(cm, packed=cm.q_len != q_len, backend=options.backend)


def _window_mask(causal: bool, window: Optional[int], offset: int, q_len: int, kv_len: int) -> Mask:
    """transformers' mask of one layer in a scope where query ``i`` sits at key ``i + offset``:
    causal ``j <= i + offset``, a window keeps ``j > i + offset - window``; not causal, a window
    keeps ``|i + offset - j| <= window``. ``offset`` 0 or ``kv_len - q_len`` is an alignment."""
    align = "top_left" if offset == 0 else "bottom_right" if offset == kv_len - q_len else None
    if causal:
        left = None if window is None else window - 1
        if align is not None:
            return Causal(align=align) if left is None else SlidingWindow(left=left, align=align)
        upto = Causal(offset=offset)
        return upto if left is None else upto & ~Causal(offset=offset - left - 1)
    if window is None:
        return Full()
    if align is not None:
        return SlidingWindow(left=window, right=window, align=align)
    return Causal(offset=offset + window) & ~Causal(offset=offset - window - 1)


def _runs(valid: np.ndarray) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], valid.astype(np.int8), [0]])))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def _documents(lengths: list[int], total: int) -> np.ndarray:
    """The document of each of ``total`` positions (-1 past the last)."""
    out = np.full(total, -1, dtype=np.int64)
    ids = np.repeat(np.arange(len(lengths)), lengths)
    out[:len(ids)] = ids
    return out


def _read(batch: int, q_len: int, kv_len: int, q_offset: int, kv_offset: int, causal: bool, window: Optional[int],
          padding: Optional[torch.Tensor], position_ids, cu_q, cu_k) -> list[_Sample]:
    """Each sample's spec, from (in this order) cu_seq_lens, padding, restarting position_ids."""
    offset = q_offset - kv_offset  # query i is the token of key i + offset
    if cu_q is not None:
        if batch != 1:
            raise ValueError(f"maskc attention: cu_seq_lens_q is given for a batch of {batch}; packed sequences "
                             "come as a batch of 1")
        spec = maskc.from_cu_seqlens(cu_q, cu_q if cu_k is None else cu_k, causal=causal,
                                     window=_doc_window(causal, window),
                                     q_len=q_len, kv_len=kv_len)
        q_doc, k_doc = _documents(spec.mask.lengths, q_len), _documents(spec.mask.key_lengths, kv_len)
        return [_Sample(spec, np.flatnonzero(q_doc >= 0), None, q_doc, k_doc)]
    if padding is not None:
        valid_k = padding[:, kv_offset:kv_offset + kv_len].cpu().numpy()
        valid_q = padding[:, q_offset:q_offset + q_len].cpu().numpy()
        if valid_k.shape != (batch, kv_len) or valid_q.shape != (batch, q_len):
            raise ValueError(f"maskc attention: the 2-D attention_mask of shape {tuple(padding.shape)} does not "
                             f"cover {batch} samples of {kv_len} keys at offset {kv_offset}")
        if not (valid_k.all() and valid_q.all()):
            return [_padded(valid_q[b], valid_k[b], offset, causal, window) for b in range(batch)]
    if position_ids is not None and q_len == kv_len and offset == 0:
        positions = position_ids.expand(batch, -1).cpu().numpy()
        if positions.shape == (batch, q_len) and (np.diff(positions, axis=1) != 1).any():
            return [_packed(row, causal, window) for row in positions]
    whole = Spec(q_len=q_len, kv_len=kv_len, mask=_window_mask(causal, window, offset, q_len, kv_len))
    return [_Sample(whole, np.arange(q_len))] * batch


def _packed(positions: np.ndarray, causal: bool, window: Optional[int]) -> _Sample:
    """Documents start wherever a position is not its predecessor's plus one."""
    starts = np.flatnonzero(np.diff(positions) != 1) + 1
    lengths = np.diff(np.concatenate([[0], starts, [len(positions)]])).tolist()
    spec = maskc.from_seqlens(lengths, causal=causal, window=_doc_window(causal, window))
    doc = _documents(lengths, len(positions))
    return _Sample(spec, np.arange(len(positions)), None, doc, doc)


def _doc_window(causal: bool, window: Optional[int]):
    """transformers' window inside one document, as ``from_seqlens``'s ``(left, right)``."""
    return None if window is None else (window - 1, 0) if causal else (window, window)


def _padded(valid_q: np.ndarray, valid_k: np.ndarray, offset: int, causal: bool, window: Optional[int]) -> _Sample:
    """A sample with padding: one run of tokens is one document (the usual left or right
    padding); runs with gaps between them keep the layer's mask over the tokens of all runs."""
    q_len, kv_len = len(valid_q), len(valid_k)
    q_runs, k_runs = _runs(valid_q), _runs(valid_k)
    if len(q_runs) <= 1 and len(k_runs) <= 1:
        (qa, qb), (ka, kb) = (q_runs or [(0, 0)])[0], (k_runs or [(0, 0)])[0]
        inner = _window_mask(causal, window, qa + offset - ka, qb - qa, kb - ka)
        mask = Documents(lengths=[qb - qa], kv_lengths=None if qb - qa == kb - ka else [kb - ka], inner=inner,
                         q_start=qa, kv_start=ka)
    else:
        mask = And(of=[_window_mask(causal, window, offset, q_len, kv_len),
                       Or(of=[Range(q=(0, q_len), kv=r) for r in k_runs]),
                       Or(of=[Range(q=r, kv=(0, kv_len)) for r in q_runs])])
    return _Sample(Spec(q_len=q_len, kv_len=kv_len, mask=mask), np.flatnonzero(valid_q), valid_k)


# -- checking the reading against transformers' definition ----------------------------------------


def _rows_to_check(sample: _Sample) -> np.ndarray:
    """A few query rows of tokens: spread over the sequence, and the first and last of a few documents."""
    rows = sample.rows
    if not len(rows):
        return rows
    picks = [rows[np.linspace(0, len(rows) - 1, VERIFY_ROWS // 2).astype(np.int64)]]
    if sample.q_doc is not None:
        edges = np.flatnonzero(np.diff(sample.q_doc[rows]))  # the last row of a document, then the first of the next
        picks += [rows[edges[:VERIFY_ROWS // 4]], rows[np.minimum(edges[:VERIFY_ROWS // 4] + 1, len(rows) - 1)]]
    return np.unique(np.concatenate(picks))


def _verify(lm: LayerMask, samples: list[_Sample], device: torch.device) -> None:
    """Raise where maskc's reading of a row differs from transformers' definition of it (on a few
    rows per sample; rows of padding queries are not compared: maskc gives them 0)."""
    kv_len = lm.kv_length
    keys = np.arange(kv_len)
    checked = 0
    for b, sample in enumerate(samples):
        rows = _rows_to_check(sample)
        if not len(rows) or checked + len(rows) * kv_len > VERIFY_ELEMENTS:
            continue
        checked += len(rows) * kv_len
        with torch.no_grad():
            theirs = lm.mask_function(
                torch.full((len(rows), 1), b, device=device), torch.zeros((1, 1), dtype=torch.long, device=device),
                torch.as_tensor(rows + lm.q_offset, device=device)[:, None],
                torch.arange(kv_len, device=device)[None, :] + lm.kv_offset)
        theirs = np.broadcast_to(theirs.cpu().numpy(), (len(rows), kv_len)).copy()
        if sample.keys is not None:  # transformers applies the 2-D padding mask after its mask function
            theirs &= sample.keys[None, :]
        if sample.q_doc is not None:  # documents from position_ids or cu_seq_lens: transformers may not see them
            theirs &= (sample.q_doc[rows][:, None] == sample.k_doc[None, :]) & (sample.q_doc[rows][:, None] >= 0)
        spec = sample.spec
        ours = np.broadcast_to(spec.heads[0].allowed(rows[:, None], keys[None, :], spec.q_len, spec.kv_len),
                               theirs.shape)
        wrong = np.argwhere(theirs != ours)
        if len(wrong):
            r, j = wrong[0]
            raise ValueError(
                f"maskc attention: maskc's reading of this layer's mask differs from transformers' definition at "
                f"sample {b}, query {rows[r]}, key {j} (transformers: {'attend' if theirs[r, j] else 'masked'}, "
                f"maskc: {'attend' if ours[r, j] else 'masked'}); maskc read {spec.mask}. The model uses a pattern "
                "maskc does not read from transformers (chunked attention, say); " + USE_SDPA)


# -- 4-D masks given as tensors ---------------------------------------------------------------------


def _allowed_4d(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask, or a float one of 0 (attend) and -inf / the dtype's minimum (masked)."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise TypeError(f"maskc attention: a 4-D attention_mask of dtype {mask.dtype} cannot be read; maskc reads "
                        "boolean masks and float masks of 0 and -inf")
    blocked = mask <= torch.finfo(mask.dtype).min / 2  # -inf, or the minimum of this or a wider dtype
    other = ~(blocked | (mask == 0))
    if other.any():
        value = float(mask[other][0])
        raise ValueError(
            f"maskc attention: the 4-D attention_mask is a float bias with values other than 0 and -inf "
            f"(such as {value:g}); maskc reads masks, not biases: use attn_implementation='sdpa' for this model")
    return ~blocked


def _read_4d(mask: torch.Tensor, batch: int, q_len: int, kv_len: int, causal: bool,
             window: Optional[int]) -> list[_Sample]:
    """Each sample of a 4-D ``[batch, 1 or heads, q_len, kv_len]`` mask as documents: a query that
    may not attend itself is padding (its output is 0); every other query must attend exactly the
    keys from its document's start (or its window's) up to itself."""
    if mask.shape[0] not in (1, batch) or tuple(mask.shape[-2:]) != (q_len, kv_len):
        raise ValueError(f"maskc attention: the 4-D attention_mask has shape {tuple(mask.shape)}; expected "
                         f"[{batch}, 1, {q_len}, {kv_len}]")
    if not causal or q_len != kv_len:
        raise ValueError("maskc attention reads 4-D attention masks of causal self-attention only (is_causal, "
                         f"q_len == kv_len; here is_causal={causal}, q_len={q_len}, kv_len={kv_len}); " + USE_SDPA)
    allowed = _allowed_4d(mask)
    if allowed.shape[1] > 1 and not bool((allowed == allowed[:, :1]).all()):
        raise ValueError("maskc attention: the 4-D attention_mask differs between heads; " + USE_SDPA)
    allowed = allowed[:, 0].expand(batch, -1, -1)
    diagonal = torch.arange(q_len, device=mask.device)
    own = allowed[:, diagonal, diagonal].cpu().numpy()
    count = allowed.sum(-1).cpu().numpy()
    first = allowed.to(torch.int8).argmax(-1).cpu().numpy()
    last = kv_len - 1 - allowed.flip(-1).to(torch.int8).argmax(-1).cpu().numpy()
    return [_documents_of_rows(b, own[b], first[b], last[b], count[b], window) for b in range(batch)]


def _documents_of_rows(b: int, own, first, last, count, window: Optional[int]) -> _Sample:
    length = len(own)
    i = np.arange(length)
    start = own & (first == i)  # a document starts where a query attends only itself
    after_padding = np.concatenate([[True], ~own[:-1]])
    start_of = np.maximum.accumulate(np.where(start, i, -1))  # each row's document start
    expected = start_of if window is None else np.maximum(start_of, i - window + 1)
    ok = ~own | ((start | ~after_padding) & (first == expected) & (last == i) & (count == i - first + 1))
    if not ok.all():
        r = int(np.flatnonzero(~ok)[0])
        raise ValueError(
            f"maskc attention: the 4-D attention_mask cannot be read: in sample {b}, query {r} attends {count[r]} "
            f"keys between {first[r]} and {last[r]}, where causal documents, padding and a window of {window} "
            f"would allow keys {max(int(expected[r]), 0)} to {r}; " + USE_SDPA)
    label = np.where(own, np.cumsum(start) - 1, -1)  # the document of each row, -1 for padding
    cuts = np.flatnonzero(np.diff(label)) + 1
    lengths, key_lengths = [], []
    for a, z in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [length]])):
        pad = label[a] < 0  # padding: queries with no keys, then keys with no queries
        lengths += [int(z - a), 0] if pad else [int(z - a)]
        key_lengths += [0, int(z - a)] if pad else [int(z - a)]
    spec = Spec(q_len=length, kv_len=length, mask=Documents(
        lengths=lengths, kv_lengths=key_lengths, inner=_window_mask(True, window, 0, 0, 0)))
    return _Sample(spec, np.flatnonzero(own))


register()

__all__ = ["LayerMask", "NAME", "Options", "attention_forward", "layer_mask", "register"]
