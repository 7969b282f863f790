"""Specs in the dialects users already speak: sequence lengths, FlashAttention's
``cu_seqlens`` and xformers' padded KV cache.

Each constructor returns a plain ``Spec`` (a ``Documents`` node), so the result
prints, serialises, partitions and compiles like any hand-written spec.

* ``from_seqlens(lengths, causal=True, window=None)``: packed documents.
* ``from_cu_seqlens(cu_seqlens_q, cu_seqlens_k, causal=False, window=None)``:
  the mask of FlashAttention's ``flash_attn_varlen_func``. Sequence ``n`` holds
  queries ``cu_seqlens_q[n]:cu_seqlens_q[n+1]`` and keys
  ``cu_seqlens_k[n]:cu_seqlens_k[n+1]``; ``causal`` is aligned to the bottom
  right of each sequence (query ``i`` of ``lq`` sees key ``j`` of ``lk`` when
  ``j <= i + lk - lq``; flash-attn >= 2.1), and ``window=(left, right)`` keeps
  keys ``i + lk - lq - left <= j <= i + lk - lq + right`` (``-1`` or ``None``:
  unbounded).
* ``from_padded_kv_cache(q_seqlen, kv_padding, kv_seqlen)``: the mask of
  xformers' ``BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens``. The
  keys of sequence ``n`` live at ``n * kv_padding`` and only the first
  ``kv_seqlen[n]`` of them are in use; queries are packed. A query sees the
  in-use keys of its own sequence, causally from the bottom right.
* ``pack_batch(samples)``: a batch whose samples have different layouts, as one
  spec over the batch laid end to end (``[B, H, L, D] -> [1, H, B*L, D]``).
* ``from_paged_kv_cache(page_table, page_size, kv_lengths, q_per_seq)``: a
  paged cache (vLLM, FlexAttention's ``PagedAttention``) attended in place:
  the mask on the page pool's physical key axis.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from .errors import SpecError
from .ir.nodes import Causal, Documents, Empty, Full, Mask, Or, Range, SlidingWindow
from .ir.spec import Spec

Window = Union[None, int, tuple[Optional[int], Optional[int]]]


def _int_vector(value, name: str) -> list[int]:
    """A 1-D sequence, array or tensor of integers as a list (``SpecError`` at ``name`` otherwise)."""
    if hasattr(value, "detach"):  # a torch tensor, on any device
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except ValueError:  # ragged nesting
        raise SpecError(name, f"must be a 1-D sequence of integers, got {value!r}") from None
    if array.ndim != 1:
        raise SpecError(name, f"must be a 1-D sequence of integers, got shape {array.shape}")
    if array.size and not (np.issubdtype(array.dtype, np.integer) or array.dtype == object):
        raise SpecError(name, f"must hold integers, got dtype {array.dtype}")
    out = []
    for n, x in enumerate(array.tolist()):
        if isinstance(x, bool) or not isinstance(x, int):
            raise SpecError(f"{name}[{n}]", f"must be an integer, got {x!r}")
        out.append(x)
    return out


def _lengths(value, name: str) -> list[int]:
    lengths = _int_vector(value, name)
    for n, x in enumerate(lengths):
        if x < 0:
            raise SpecError(f"{name}[{n}]", f"lengths must be >= 0, got {x}")
    return lengths


def _bound(value, name: str) -> Optional[int]:
    """One side of a window: ``None`` or ``-1`` (FlashAttention's spelling) is unbounded."""
    if value is None or value == -1:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise SpecError(name, f"must be an int >= 0, or -1 / None for unbounded, got {value!r}")
    return int(value)


def _window_bounds(window: Window) -> tuple[Optional[int], Optional[int]]:
    """``(left, right)`` of a ``window`` argument: an int ``w`` is ``(w, w)``."""
    if window is None:
        return None, None
    pair = (window, window) if isinstance(window, (int, np.integer)) and not isinstance(window, bool) else window
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise SpecError("window", f"must be an int or a (left, right) pair, got {window!r}")
    return _bound(pair[0], "window[0]"), _bound(pair[1], "window[1]")


def _inner(causal: bool, window: Window, align: str) -> Mask:
    """The per-document expression. Causality cuts the window's right side at the
    diagonal, so causal with a window is one ``SlidingWindow(left, right=0)``."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    left, right = _window_bounds(window)
    if causal:
        return Causal(align=align) if left is None else SlidingWindow(left=left, right=0, align=align)
    if left is None and right is None:
        return Full()
    return SlidingWindow(left=left, right=right, align=align)


def _total(length: Optional[int], needed: int, name: str, source: str) -> int:
    if length is None:
        return needed
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)):
        raise TypeError(f"{name} must be an int or None, got {type(length).__name__}")
    if needed > length:
        raise SpecError(source, f"the sequences end at {needed}, past {name}={length}")
    return int(length)


def from_seqlens(
    lengths: Sequence[int],
    causal: bool = True,
    window: Window = None,
    kv_lengths: Optional[Sequence[int]] = None,
    q_len: Optional[int] = None,
    kv_len: Optional[int] = None,
) -> Spec:
    """Packed documents of ``lengths`` queries (and ``kv_lengths`` keys, default the same).

    Inside each document: ``causal`` (bottom-right aligned where a document has
    more keys than queries, as in FlashAttention), and ``window``, an int ``w``
    for ``(w, w)`` or a ``(left, right)`` pair of keys before and after the
    diagonal (``None`` or ``-1``: unbounded); with ``causal`` the right side is
    cut at the diagonal. ``q_len``/``kv_len`` (default: the totals) may be
    larger; the positions past the last document are padding and attend
    nothing.

    ``from_seqlens([3, 2])`` is ``Spec(q_len=5, kv_len=5, mask=Documents(lengths=[3, 2], inner=Causal()))``::

        #....
        ##...
        ###..
        ...#.
        ...##
    """
    q_lengths = _lengths(lengths, "lengths")
    k_lengths = q_lengths if kv_lengths is None else _lengths(kv_lengths, "kv_lengths")
    if len(k_lengths) != len(q_lengths):
        raise SpecError("kv_lengths", f"has {len(k_lengths)} entries but lengths has {len(q_lengths)}")
    align = "top_left" if k_lengths == q_lengths else "bottom_right"
    q_total = _total(q_len, sum(q_lengths), "q_len", "lengths")
    kv_total = _total(kv_len, sum(k_lengths), "kv_len", "lengths" if kv_lengths is None else "kv_lengths")
    mask = Documents(
        lengths=q_lengths,
        kv_lengths=None if k_lengths == q_lengths else k_lengths,
        inner=_inner(causal, window, align),
    )
    return Spec(q_len=q_total, kv_len=kv_total, mask=mask)


def _cu_lengths(cu_seqlens, name: str) -> list[int]:
    """Sequence lengths from cumulative offsets, which must start at 0 and never decrease."""
    offsets = _int_vector(cu_seqlens, name)
    if not offsets:
        raise SpecError(name, "needs at least one entry (0)")
    if offsets[0] != 0:
        raise SpecError(f"{name}[0]", f"cumulative sequence lengths must start at 0, got {offsets[0]}")
    steps = np.diff(offsets)
    down = np.flatnonzero(steps < 0)
    if len(down):
        n = int(down[0]) + 1
        raise SpecError(
            f"{name}[{n}]", f"cumulative sequence lengths must not decrease: {offsets[n - 1]} then {offsets[n]}"
        )
    return steps.tolist()


def from_cu_seqlens(
    cu_seqlens_q,
    cu_seqlens_k=None,
    causal: bool = False,
    window: Window = None,
    q_len: Optional[int] = None,
    kv_len: Optional[int] = None,
) -> Spec:
    """The mask ``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, ..., causal, window_size)`` applies.

    ``cu_seqlens_q``/``cu_seqlens_k``: ``[batch + 1]`` offsets (lists, arrays or
    int32 tensors), starting at 0 and non-decreasing; ``cu_seqlens_k`` defaults
    to ``cu_seqlens_q``. ``causal`` (default False, as in FlashAttention) is
    aligned to the bottom right of each sequence; ``window`` is FlashAttention's
    ``window_size=(left, right)`` with ``-1`` (or ``None``) for unbounded, or an
    int ``w`` for ``(w, w)``. ``q_len``/``kv_len`` default to the last offsets;
    larger values leave padding that attends nothing.

    With ``cu_seqlens_q=[0, 2]``, ``cu_seqlens_k=[0, 5]`` and ``causal=True``
    (FlashAttention's docstring example)::

        ####.
        #####
    """
    q_lengths = _cu_lengths(cu_seqlens_q, "cu_seqlens_q")
    if cu_seqlens_k is None:
        k_lengths = q_lengths
    else:
        k_lengths = _cu_lengths(cu_seqlens_k, "cu_seqlens_k")
        if len(k_lengths) != len(q_lengths):
            raise SpecError(
                "cu_seqlens_k", f"has {len(k_lengths) + 1} entries but cu_seqlens_q has {len(q_lengths) + 1}"
            )
    q_total = _total(q_len, sum(q_lengths), "q_len", "cu_seqlens_q")
    kv_total = _total(kv_len, sum(k_lengths), "kv_len", "cu_seqlens_q" if cu_seqlens_k is None else "cu_seqlens_k")
    return from_seqlens(q_lengths, causal, window, kv_lengths=k_lengths, q_len=q_total, kv_len=kv_total)


def from_padded_kv_cache(q_seqlen: Sequence[int], kv_padding: int, kv_seqlen: Sequence[int]) -> Spec:
    """xformers' ``BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(q_seqlen, kv_padding, kv_seqlen)``.

    Decoding with a padded KV cache: the cache holds ``len(kv_seqlen)`` slots of
    ``kv_padding`` keys, sequence ``n`` uses the first ``kv_seqlen[n]`` keys of
    slot ``n``, and its ``q_seqlen[n]`` new queries are packed one sequence
    after another. Query ``i`` of sequence ``n`` sees key ``j`` of its slot when
    ``j < kv_seqlen[n]`` and ``j <= i + kv_seqlen[n] - q_seqlen[n]`` (causal
    from the bottom right); padding is never attended. ``q_len = sum(q_seqlen)``,
    ``kv_len = len(kv_seqlen) * kv_padding``.

    The spec is a ``Documents`` whose unused key ranges are documents with no
    queries. ``from_padded_kv_cache([1, 2], 4, [2, 3])``::

        ##......
        ....##..
        ....###.
    """
    q_lengths = _lengths(q_seqlen, "q_seqlen")
    k_lengths = _lengths(kv_seqlen, "kv_seqlen")
    if isinstance(kv_padding, bool) or not isinstance(kv_padding, (int, np.integer)) or kv_padding <= 0:
        raise SpecError("kv_padding", f"must be a positive int, got {kv_padding!r}")
    if len(k_lengths) != len(q_lengths):
        raise SpecError("kv_seqlen", f"has {len(k_lengths)} entries but q_seqlen has {len(q_lengths)}")
    for n, lk in enumerate(k_lengths):
        if lk > kv_padding:
            raise SpecError(f"kv_seqlen[{n}]", f"{lk} keys do not fit a slot of kv_padding={kv_padding}")
    docs_q, docs_k = [], []
    for n, (lq, lk) in enumerate(zip(q_lengths, k_lengths)):
        docs_q.append(lq)
        docs_k.append(lk)
        if lk < kv_padding and n + 1 < len(k_lengths):  # the slot's unused keys: a document nobody queries
            docs_q.append(0)
            docs_k.append(int(kv_padding) - lk)
    mask = Documents(lengths=docs_q, kv_lengths=docs_k, inner=Causal(align="bottom_right"))
    return Spec(q_len=sum(q_lengths), kv_len=len(k_lengths) * int(kv_padding), mask=mask)


Sample = Union[Spec, Sequence[int]]


def pack_batch(samples: Sequence[Sample], causal: bool = True, window: Window = None,
               seq_len: Optional[int] = None) -> Spec:
    """One spec for a batch whose samples have different layouts.

    A ``Spec`` has no batch dimension: ``cm(q, k, v)`` with ``q [B, H, L, D]``
    applies the one mask to every sample. When the samples differ (documents
    of other lengths, other padding), lay the batch end to end and attend it
    as one sequence under the packed spec::

        spec = maskc.pack_batch([spec_0, spec_1, ...])         # or per-sample document lengths
        cm = maskc.compile(spec)
        B, H, L, D = q.shape                                   # k, v: [B, Hkv, L_kv, D]
        flat = lambda x: x.transpose(1, 2).reshape(1, B * x.shape[2], x.shape[1], D).transpose(1, 2)
        out = cm(flat(q), flat(k), flat(v))                    # [1, H, B*L, D]
        out = out.transpose(1, 2).reshape(B, L, H, D).transpose(1, 2)  # back to [B, H, L, D]

    (``flat`` is a view when ``x`` is a transposed ``[B, L, H, D]`` tensor, as
    in most models; otherwise ``reshape`` copies.)

    ``samples``: per-sample ``Spec`` s of one ``q_len`` and one ``kv_len``, or
    per-sample document lengths, each turned into
    ``from_seqlens(lengths, causal, window, q_len=seq_len, kv_len=seq_len)`` (``seq_len``
    defaults to the longest sample; a shorter one is padded at its end). Sample
    ``b`` holds queries ``[b*q_len, (b+1)*q_len)`` and keys
    ``[b*kv_len, (b+1)*kv_len)`` and attends nothing outside them. Per-head
    samples (one mask per head) must agree on the number of heads; a shared
    sample serves every head.

    Samples of documents with one ``inner`` give one ``Documents`` whose
    padding is documents with no keys or no queries;
    ``pack_batch([[2, 1], [3]])``::

        #.....
        ##....
        ..#...
        ...#..
        ...##.
        ...###
    """
    if isinstance(samples, (str, bytes)) or not isinstance(samples, Sequence) or not samples:
        raise SpecError("samples", f"must be a non-empty list of Specs or of document lengths, got {samples!r}")
    if seq_len is None:
        seq_len = max(x.q_len if isinstance(x, Spec) else sum(_lengths(x, f"samples[{b}]"))
                      for b, x in enumerate(samples))
    specs = [_sample_spec(x, b, causal, window, seq_len) for b, x in enumerate(samples)]
    q_len, kv_len = specs[0].q_len, specs[0].kv_len
    for b, spec in enumerate(specs):
        for name, value, first in (("q_len", spec.q_len, q_len), ("kv_len", spec.kv_len, kv_len)):
            if value != first:
                raise SpecError(f"samples[{b}].{name}", f"{value} differs from samples[0].{name}={first}: the "
                                "samples of a batch share one length (pad them, or pass seq_len)")
    n_heads = {len(s.mask) for s in specs if isinstance(s.mask, tuple)}
    if len(n_heads) > 1:
        b = next(b for b, s in enumerate(specs) if isinstance(s.mask, tuple) and len(s.mask) != min(n_heads))
        raise SpecError(f"samples[{b}].mask", f"per-head samples disagree on the number of heads: {sorted(n_heads)}")
    total = {"q_len": len(specs) * q_len, "kv_len": len(specs) * kv_len}
    if not n_heads:
        return Spec(**total, mask=_pack([s.mask for s in specs], q_len, kv_len))
    heads = [[s.mask[h] if isinstance(s.mask, tuple) else s.mask for s in specs] for h in range(n_heads.pop())]
    return Spec(**total, mask=[_pack(m, q_len, kv_len) for m in heads])


def _sample_spec(sample: Sample, b: int, causal: bool, window: Window, seq_len: int) -> Spec:
    if isinstance(sample, Spec):
        return sample
    try:
        return from_seqlens(sample, causal, window, q_len=seq_len, kv_len=seq_len)
    except SpecError as error:
        raise SpecError(f"samples[{b}].{error.path}", error.reason) from None


def _pack(masks: list[Mask], q_len: int, kv_len: int) -> Mask:
    """The masks of one head, sample ``b`` placed at ``(b * q_len, b * kv_len)``."""
    if all(isinstance(m, Documents) for m in masks) and len({m.inner for m in masks}) == 1:
        try:  # an inner that does not fit an empty padding scope (a Dense, say) takes the general form
            return _join_documents(masks, q_len, kv_len)
        except SpecError:
            pass
    if len(set(masks)) == 1:
        return Documents(lengths=[q_len] * len(masks), kv_lengths=None if q_len == kv_len else [kv_len] * len(masks),
                         inner=masks[0])
    one = [Documents(lengths=[q_len], kv_lengths=None if q_len == kv_len else [kv_len], inner=m,
                     q_start=b * q_len, kv_start=b * kv_len) for b, m in enumerate(masks)]
    return Or(of=one)


def _join_documents(masks: list[Documents], q_len: int, kv_len: int) -> Documents:
    """Samples of documents with one inner as one ``Documents``: the padding around each
    sample's documents becomes documents with no keys (or no queries), which allow nothing."""
    docs: list[tuple[int, int]] = []
    for m in masks:
        q, k = m.starts()
        q0, q1, k0, k1 = int(q[0]), int(q[-1]), int(k[0]), int(k[-1])
        docs += [(q0, 0), (0, k0), *zip(m.lengths, m.key_lengths), (q_len - q1, 0), (0, kv_len - k1)]
    # a run of documents with no keys or no queries allows nothing: only its sizes matter
    merged: list[tuple[int, int]] = []
    gap = [0, 0]
    for lq, lk in docs:  # the gap after the last document is padding past it: no document
        if lq and lk:
            merged += [x for x in ((gap[0], 0), (0, gap[1])) if any(x)] + [(lq, lk)]
            gap = [0, 0]
        else:
            gap = [gap[0] + lq, gap[1] + lk]
    q_start = kv_start = 0  # padding before the first document: its start
    if merged and merged[0][1] == 0:
        q_start = merged.pop(0)[0]
    if merged and merged[0][0] == 0:
        kv_start = merged.pop(0)[1]
    lengths, key_lengths = [x for x, _ in merged], [y for _, y in merged]
    spec_mask = Documents(lengths=lengths, kv_lengths=None if lengths == key_lengths else key_lengths,
                          inner=masks[0].inner, q_start=q_start, kv_start=kv_start)
    Spec(q_len=len(masks) * q_len, kv_len=len(masks) * kv_len, mask=spec_mask)  # the inner fits every scope
    return spec_mask


__all__ = ["from_cu_seqlens", "from_padded_kv_cache", "from_seqlens", "pack_batch"]



def _positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise SpecError(name, f"must be a positive int, got {value!r}")
    return int(value)


def _page_table(value) -> np.ndarray:
    """``int64[n_seq, max_pages]`` from a 2-D integer table (list, array or tensor on any device)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    try:
        table = np.asarray(value)
    except ValueError:  # ragged nesting
        raise SpecError("page_table", "must be a 2-D [n_seq, max_pages] table of integers") from None
    if table.ndim != 2:
        raise SpecError("page_table", f"must be a 2-D [n_seq, max_pages] table of integers, got shape {table.shape}")
    if table.size and not np.issubdtype(table.dtype, np.integer):
        raise SpecError("page_table", f"must hold integers, got dtype {table.dtype}")
    return table.astype(np.int64)


def from_paged_kv_cache(page_table, page_size: int, kv_lengths: Sequence[int], q_per_seq: Union[int, Sequence[int]] = 1,
                        causal: bool = True, n_pages: Optional[int] = None) -> Spec:
    """A paged KV cache, attended in place: the mask on the key axis of the page pool.

    The cache is a pool of ``n_pages`` pages of ``page_size`` keys; K and V are
    the pool as ``[batch, kv_heads, n_pages * page_size, head_dim]`` (the
    layout of FlexAttention's ``PagedAttention``; vLLM's ``[n_pages, page_size,
    kv_heads, head_dim]`` cache is ``cache.flatten(0, 1).transpose(0, 1)[None]``,
    a view). Sequence ``n`` keeps its logical key ``p`` at physical key
    ``page_table[n, p // page_size] * page_size + p % page_size``; its first
    ``kv_lengths[n]`` keys are filled, the new ones included, and its
    ``q_per_seq[n]`` new queries (an int: the same for every sequence) are
    packed one sequence after another, as in ``from_padded_kv_cache``. Query
    ``t`` of sequence ``n`` sees logical keys ``p < kv_lengths[n]`` with
    ``p <= t + kv_lengths[n] - q_per_seq[n]`` (causal from the bottom right:
    decoding and chunked prefill); ``causal=False``: every filled key. Entries
    of ``page_table`` past a sequence's filled pages are not read (vLLM pads
    them with anything). Pages may be shared between sequences (a common
    prefix), not within one. ``n_pages`` defaults to one past the largest page
    in use; give the pool's size so that ``kv_len`` matches K and V.

    ``q_len = sum(q_per_seq)``, ``kv_len = n_pages * page_size``. The mask is
    an ``Or`` of one ``Range`` per run of consecutive physical pages of a
    sequence, ``& Causal(offset)`` on the run holding its last
    ``q_per_seq[n]`` keys, so a pool allocated in order gives one term a
    sequence and a shuffled one a term a page at most. The kernels then read
    each sequence's pages through the block lists, without gathering them;
    compile with a key block that divides ``page_size`` (the default 128 for
    pages of 128 or more; ``block_size=(128, 64)`` for pages of 64), so that
    no block holds keys of two pages. Other page sizes are exact too, the
    decode kernel then reads a block once for each page in it
    (``codegen/decode_work.py``).

    Two sequences in pages of 2 keys, one query each,
    ``from_paged_kv_cache([[2, 0], [1, 3]], 2, [3, 4])`` (sequence 0: logical
    keys 0-1 in page 2, key 2 in page 0)::

        #...##..
        ..##..##
    """
    table = _page_table(page_table)
    page = _positive(page_size, "page_size")
    k_lengths = _lengths(kv_lengths, "kv_lengths")
    n_seq, max_pages = table.shape
    if len(k_lengths) != n_seq:
        raise SpecError("kv_lengths", f"has {len(k_lengths)} entries but page_table has {n_seq} rows")
    if isinstance(q_per_seq, (int, np.integer)) and not isinstance(q_per_seq, bool):
        q_lengths = _lengths([q_per_seq] * n_seq, "q_per_seq")
    else:
        q_lengths = _lengths(q_per_seq, "q_per_seq")
        if len(q_lengths) != n_seq:
            raise SpecError("q_per_seq", f"has {len(q_lengths)} entries but page_table has {n_seq} rows")
    if not sum(q_lengths):
        raise SpecError("q_per_seq", "no sequence has a new query (a spec needs q_len >= 1)")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    used = [-(-lk // page) for lk in k_lengths]
    for n, lk in enumerate(k_lengths):
        if lk > max_pages * page:
            raise SpecError(f"kv_lengths[{n}]", f"{lk} keys do not fit max_pages * page_size = {max_pages} * {page}")
    in_use = [table[n, :u] for n, u in enumerate(used)]
    largest = max((int(p.max()) for p in in_use if len(p)), default=-1)
    pool = largest + 1 if n_pages is None else _positive(n_pages, "n_pages")
    for n, pages in enumerate(in_use):
        outside = np.flatnonzero((pages < 0) | (pages >= pool))
        if len(outside):
            b = int(outside[0])
            raise SpecError(f"page_table[{n}, {b}]", f"page {pages[b]} is outside the pool's n_pages={pool} pages "
                                                     f"(sequence {n} fills {used[n]} pages)")
        distinct, counts = np.unique(pages, return_counts=True)
        if (counts > 1).any():
            twice = np.flatnonzero(pages == distinct[counts > 1][0])
            raise SpecError(f"page_table[{n}, {int(twice[1])}]",
                            f"page {pages[twice[1]]} is also sequence {n}'s page {int(twice[0])}")
    terms: list[Mask] = []
    q_start = 0
    for n, (lq, lk, pages) in enumerate(zip(q_lengths, k_lengths, in_use)):
        if lq and lk:
            terms += _page_runs(pages, page, lk, lq, q_start, causal)
        q_start += lq
    mask = Or(of=terms) if len(terms) > 1 else terms[0] if terms else Empty()
    return Spec(q_len=sum(q_lengths), kv_len=pool * page, mask=mask)


def _page_runs(pages: np.ndarray, page: int, kv_length: int, q_count: int, q_start: int, causal: bool) -> list[Mask]:
    """One sequence's terms: a ``Range`` per run of consecutive physical pages, clipped to its
    filled keys; the run holding logical keys past ``kv_length - q_count`` (not seen by every
    query) also ``& Causal(offset)``: logical key ``S + o`` of a run starting at physical ``P`` is
    physical ``P + o``, and ``S + o <= t + kv_length - q_count`` is ``j <= i + offset``."""
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    terms: list[Mask] = []
    for first, end in zip(np.r_[0, breaks], np.r_[breaks, len(pages)]):
        logical, physical = int(first) * page, int(pages[first]) * page
        stop = min(int(end) * page, kv_length)
        rows = (q_start, q_start + q_count)
        term: Mask = Range(q=rows, kv=(physical, physical + stop - logical))
        if causal and stop - 1 > kv_length - q_count:
            term = term & Causal(offset=kv_length - q_count - q_start + physical - logical)
        terms.append(term)
    return terms


__all__ = ["from_cu_seqlens", "from_padded_kv_cache", "from_paged_kv_cache", "from_seqlens"]
