#!/usr/bin/env python3
"""Decoding and chunked prefill over a KV cache on one GPU (issue 16): maskc, padded and paged, SDPA, FlexAttention.

    python bench/decode_bench.py              # the table (about 2 minutes)
    python bench/decode_bench.py --write      # and add the run to bench/RESULTS.md
    python bench/decode_bench.py --sweep      # also maskc with other key chunks and decode tile configs

The issue's case: 32 sequences, KV cache slots of 8192 keys filled to random
lengths 1024-8191 (seed 0), 32 query heads, 8 KV heads, head dim 128, bf16;
1 and 16 new queries per sequence (their keys are in the cache, causal from
the bottom right). Forward only, in one process:

* maskc padded: ``maskc.from_padded_kv_cache`` over the packed queries
  ``[1, 32, 32 * q, 128]`` and the cache ``[1, 8, 32 * 8192, 128]``;
* maskc paged: ``maskc.from_paged_kv_cache`` over a pool of 2048 pages of 128
  keys (the same memory), each sequence's pages at shuffled places (seed 1),
  holding the padded cache's values: the results must agree;
* SDPA on the padded batch ``[32, H, q, 8192]`` with a boolean mask (padding
  and causality), as a new user would call it: with ``enable_gqa=True``, and
  with K/V repeated to 32 heads beforehand (untimed); the faster counts;
* FlexAttention on the packed mask, ``torch.compile``'d, its block mask built once.

Times are medians of ``triton.testing.do_bench``. "Allowed K/V" is the bytes
of the keys and values the mask allows, read once per KV head
(``sum(lengths) * 8 * 128 * 2 bytes * 2``); TB/s is that over the time (the
H200 copies about 4.3 TB/s). "Read" is what maskc's decode programs load:
whole key blocks of 128, each once per KV head.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import triton
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import maskc  # noqa: E402 - after the path setup, to bench this checkout
from maskc.codegen import launch, tuning  # noqa: E402
from maskc.codegen.plan import Section  # noqa: E402
from results import add_command_run, gpu_machine  # noqa: E402

SEQS, SLOT, HEADS, KV_HEADS, DIM, PAGE = 32, 8192, 32, 8, 128, 128
SHORTEST = 1024  # filled lengths are drawn from [SHORTEST, SLOT)
DTYPE, DEVICE = torch.bfloat16, "cuda"
QUERIES = (1, 16)
SECTION = "## Decoding and chunked prefill over KV caches (issue 16)"

torch._dynamo.config.cache_size_limit = 64
flex = torch.compile(flex_attention, dynamic=False)


def median_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


class Cache:
    """The issue's cache, padded and paged, with the same values."""

    def __init__(self):
        self.lengths = np.random.default_rng(0).integers(SHORTEST, SLOT, SEQS).tolist()
        torch.manual_seed(0)
        self.k, self.v = (torch.randn(1, KV_HEADS, SEQS * SLOT, DIM, device=DEVICE, dtype=DTYPE) for _ in range(2))
        pages = SLOT // PAGE
        self.page_table = np.random.default_rng(1).permutation(SEQS * pages).reshape(SEQS, pages)
        order = torch.as_tensor(self.page_table.reshape(-1), device=DEVICE)
        self.pool_k, self.pool_v = (torch.empty_like(x) for x in (self.k, self.v))
        for pool, padded in ((self.pool_k, self.k), (self.pool_v, self.v)):
            pool.view(1, KV_HEADS, -1, PAGE, DIM)[:, :, order] = padded.view(1, KV_HEADS, -1, PAGE, DIM)

    @property
    def allowed_bytes(self) -> int:
        return sum(self.lengths) * KV_HEADS * DIM * 2 * 2

    def padded_batch(self, x: torch.Tensor) -> torch.Tensor:
        """``[1, H, SEQS * SLOT, D]`` as the padded batch ``[SEQS, H, SLOT, D]`` (a copy)."""
        return x[0].view(x.shape[1], SEQS, -1, DIM).transpose(0, 1).contiguous()


def timed_compile(spec) -> tuple[maskc.CompiledMask, float]:
    start = time.perf_counter()
    cm = maskc.compile(spec, device=DEVICE)
    return cm, time.perf_counter() - start


def maskc_tools(cache: Cache, n_q: int, report: dict) -> dict:
    padded, padded_s = timed_compile(maskc.from_padded_kv_cache([n_q] * SEQS, SLOT, cache.lengths))
    start = time.perf_counter()
    paged_spec = maskc.from_paged_kv_cache(cache.page_table, PAGE, cache.lengths, n_q, n_pages=SEQS * SLOT // PAGE)
    spec_s = time.perf_counter() - start
    paged, paged_s = timed_compile(paged_spec)
    for name, cm in (("padded", padded), ("paged", paged)):
        plan = cm.plan(DEVICE)
        read = len(plan.section(Section.DECODE_BLOCKS)) * cm.block_size[1] * KV_HEADS * DIM * 2 * 2
        report[name] = dict(decode=plan.structure.decode, read=read, items=plan.structure.decode_items)
    terms = len(paged_spec.mask.of) if isinstance(paged_spec.mask, maskc.Or) else 1
    report["compile"] = (f"maskc.compile: padded {padded_s * 1e3:.0f} ms; paged {paged_s * 1e3:.0f} ms for an Or of "
                         f"{terms} page runs (building the spec {spec_s * 1e3:.0f} ms)")
    return {"maskc padded": (padded, cache.k, cache.v), "maskc paged": (paged, cache.pool_k, cache.pool_v)}


def sdpa_tools(cache: Cache, n_q: int) -> dict:
    """SDPA on the padded batch: K/V shared by query heads (``enable_gqa``), and repeated."""
    k, v = cache.padded_batch(cache.k), cache.padded_batch(cache.v)
    length = torch.as_tensor(cache.lengths, device=DEVICE)[:, None, None, None]
    t = torch.arange(n_q, device=DEVICE)[:, None]
    o = torch.arange(SLOT, device=DEVICE)[None, :]
    mask = (o < length) & (o <= t + length - n_q)  # [SEQS, 1, q, SLOT]

    def attend(q, k, v, **gqa):
        batch_q = q[0].view(HEADS, SEQS, n_q, DIM).transpose(0, 1)
        out = F.scaled_dot_product_attention(batch_q, k, v, attn_mask=mask, **gqa)
        return out.transpose(0, 1).reshape(q.shape)

    repeated = [x.repeat_interleave(HEADS // KV_HEADS, dim=1) for x in (k, v)]
    return {"enable_gqa": lambda q: attend(q, k, v, enable_gqa=True), "K/V repeated": lambda q: attend(q, *repeated)}


def flex_tool(cache: Cache, n_q: int):
    rows = torch.arange(SEQS * n_q, device=DEVICE)
    seq_of, step_of = rows // n_q, rows % n_q
    length = torch.as_tensor(cache.lengths, device=DEVICE)

    def mask_mod(b, h, i, j):
        n = seq_of[i]
        o = j - n * SLOT
        return (o >= 0) & (o < length[n]) & (o <= step_of[i] + length[n] - n_q)

    block_mask = create_block_mask(mask_mod, None, None, SEQS * n_q, SEQS * SLOT, device=DEVICE, _compile=True)
    return lambda q: flex(q, cache.k, cache.v, block_mask=block_mask, enable_gqa=True)


def run(cache: Cache, n_q: int, rows: list, notes: list) -> None:
    torch.manual_seed(n_q)
    q = torch.randn(1, HEADS, SEQS * n_q, DIM, device=DEVICE, dtype=DTYPE)
    report = {}
    outs, times = {}, {}
    for name, (cm, k, v) in maskc_tools(cache, n_q, report).items():
        outs[name] = cm(q, k, v)
        times[name] = median_us(lambda: cm(q, k, v))
        print(f"q={n_q} {name}: {times[name]:.0f} us", flush=True)
    others = {f"SDPA {variant}": attend for variant, attend in sdpa_tools(cache, n_q).items()}
    others["FlexAttention"] = flex_tool(cache, n_q)
    for name, attend in others.items():
        try:
            outs[name] = attend(q)
            times[name] = median_us(lambda: attend(q))
        except Exception as error:  # noqa: BLE001 - report a tool that cannot run this case
            print(f"q={n_q} {name} failed: {type(error).__name__}: {error}", flush=True)
            times[name] = float("nan")
        print(f"q={n_q} {name}: {times[name]:.0f} us", flush=True)
    sdpa = min(("SDPA enable_gqa", "SDPA K/V repeated"), key=lambda name: np.nan_to_num(times[name], nan=np.inf))
    times["SDPA padded batch"], outs["SDPA padded batch"] = times.pop(sdpa), outs.pop(sdpa, None)
    other = next(name for name in times if name.startswith("SDPA ") and name != "SDPA padded batch")
    notes.append(f"q={n_q}: SDPA padded batch is SDPA {sdpa[5:]} ({times['SDPA padded batch']:.0f} us; "
                 f"{other[5:]} {times.pop(other):.0f} us)")
    outs.pop(other, None)
    for name in ("maskc padded", "maskc paged", "SDPA padded batch", "FlexAttention"):
        tb_s = cache.allowed_bytes / (times[name] * 1e-6) / 1e12
        rows.append((n_q, name, times[name], tb_s, times["SDPA padded batch"] / times[name],
                     times["FlexAttention"] / times[name]))
    want = outs.get("SDPA padded batch")
    differences = ", ".join(f"{name} {(out.float() - want.float()).abs().max().item():.4f}"
                            for name, out in outs.items() if want is not None and out is not want)
    paged_vs_padded = (outs["maskc paged"].float() - outs["maskc padded"].float()).abs().max().item()
    notes.append(f"q={n_q}: decode path padded {report['padded']['decode']}, paged {report['paged']['decode']} "
                 f"({report['padded']['items']} items a KV head); maskc read {report['padded']['read'] / 1e9:.3f} GB "
                 f"for {cache.allowed_bytes / 1e9:.3f} GB allowed; {report['compile']}; largest |out - SDPA|: "
                 f"{differences}; paged - padded {paged_vs_padded:.4f}")


def sweep(cache: Cache, notes: list) -> None:
    """maskc padded with other key chunks (``tuning.DECODE_CHUNK_KEYS``) and decode tile configs."""
    default_chunk, default_config = tuning.DECODE_CHUNK_KEYS, tuning.DECODE_16BIT["decode"]
    for n_q in QUERIES:
        q = torch.randn(1, HEADS, SEQS * n_q, DIM, device=DEVICE, dtype=DTYPE)
        spec = maskc.from_padded_kv_cache([n_q] * SEQS, SLOT, cache.lengths)
        tried = [(c, default_config) for c in (256, 512, 1024, 2048)]
        tried += [(default_chunk, c) for c in tuning.CANDIDATES["decode"] if c != default_config]
        for chunk, config in tried:
            tuning.DECODE_CHUNK_KEYS, tuning.DECODE_16BIT["decode"] = chunk, config
            launch._launches.clear()
            launch._fitted.clear()
            cm = maskc.compile(spec, device=DEVICE)
            took = median_us(lambda: cm(q, cache.k, cache.v))
            line = (f"sweep q={n_q} chunk {chunk} keys (x{tuning.DECODE_CHUNK_KEYS_PER_ROW} a row), {config}: "
                    f"{took:.0f} us, {cache.allowed_bytes / took / 1e6:.2f} TB/s")
            print(line, flush=True)
            notes.append(line)
    tuning.DECODE_CHUNK_KEYS, tuning.DECODE_16BIT["decode"] = default_chunk, default_config
    launch._launches.clear()
    launch._fitted.clear()


def table(rows: list, notes: list) -> str:
    out = ["32 sequences, KV slots of 8192 keys filled to 1024-8191, 32 query heads, 8 KV heads, head dim 128, "
           "bf16, forward: us (median); TB/s = allowed K/V bytes / time; ratios = other tool's time / this "
           "tool's, same run.", "",
           "| new queries a sequence | tool | time (us) | allowed K/V / time (TB/s) | SDPA padded / tool | "
           "FlexAttention / tool |", "|---|---|---|---|---|---|"]
    out += [f"| {n_q} | {name} | {us:.0f} | {tb_s:.2f} | {sdpa:.2f}x | {flex_ratio:.2f}x |"
            for n_q, name, us, tb_s, sdpa, flex_ratio in rows]
    return "\n".join(out + [""] + [f"- {note}" for note in notes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="add the run to bench/RESULTS.md")
    parser.add_argument("--sweep", action="store_true", help="also time other key chunks and decode tile configs")
    args = parser.parse_args()
    print(gpu_machine(), flush=True)
    cache = Cache()
    rows, notes = [], []
    for n_q in QUERIES:
        run(cache, n_q, rows, notes)
    if args.sweep:
        sweep(cache, notes)
    text = table(rows, notes)
    if args.write:
        add_command_run(SECTION, gpu_machine(), text)
    print(text)


if __name__ == "__main__":
    main()
