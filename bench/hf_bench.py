#!/usr/bin/env python3
"""One training step of a ~1B-parameter Llama in Hugging Face transformers, per attention implementation (issue 19).

    python bench/hf_bench.py                          # 8K and 32K packed tokens, 16 layers; prints the table
    python bench/hf_bench.py --seq 8192 --layers 4    # a short run
    python bench/hf_bench.py --write                  # also adds the run to bench/RESULTS.md

The model has Llama 3.2 1B's shape (hidden 2048, MLP 8192, 32 query heads and
8 key/value heads of dim 64) with a 32000-token vocabulary, random weights,
bf16, on one GPU. A step is a forward and a backward (no optimizer step) of one
packed row: documents of random lengths (256 to 4096 tokens, the last one cut)
whose ``position_ids`` restart at 0, labels as ``DataCollatorWithFlattening``
makes them. Every step draws new lengths, the same ones for every
implementation, so each step builds its mask anew, as training does:
transformers builds a dense mask for ``sdpa`` and a ``BlockMask`` for
``flex_attention`` (compiled by transformers), ``flash_attention_2`` reads the
``position_ids`` (when flash-attn is installed), and maskc compiles its spec
once per step and checks it against transformers' definition of the mask. One
model serves every implementation (``set_attn_implementation``), so the losses
of the first step must agree to bf16 rounding. Step times are medians of the
timed steps after the warm-up steps; the table comes last.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import maskc  # noqa: E402 - after the path setup, to bench this checkout
import maskc.integrations.transformers  # noqa: E402,F401 - registers attn_implementation="maskc"
from results import add_run  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

SECTION = "## Hugging Face transformers training step (issue 19)"
IMPLEMENTATIONS = ("maskc", "flex_attention", "sdpa", "flash_attention_2")
SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
             vocab_size=32000, max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True)
DOC_MIN, DOC_MAX = 256, 4096


def batch(seq: int, seed: int, device) -> tuple[dict, list[int]]:
    """One packed row: documents of random lengths, position_ids restarting, a label per next token."""
    rng = np.random.default_rng(seed)
    lengths, used = [], 0
    while used < seq:
        n = min(int(rng.integers(DOC_MIN, DOC_MAX + 1)), seq - used)
        lengths.append(n)
        used += n
    ids = torch.as_tensor(rng.integers(0, SHAPE["vocab_size"], seq), device=device)[None]
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
    labels = ids.clone()
    labels[positions == 0] = -100  # DataCollatorWithFlattening: no label across a document boundary
    return {"input_ids": ids, "position_ids": positions, "labels": labels, "use_cache": False}, lengths


def available(impl: str) -> str:
    """Why ``impl`` cannot run here ('' if it can)."""
    if impl == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed"
    return ""


def step(model, inputs) -> float:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.item()


def run(model, impl: str, seq: int, warmup: int, steps: int) -> dict:
    model.set_attn_implementation(impl)
    device = next(model.parameters()).device
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for s in range(warmup + steps):
        inputs, _ = batch(seq, seed=s, device=device)
        torch.cuda.synchronize()
        start = time.perf_counter()
        losses.append(step(model, inputs))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    ms = statistics.median(times[warmup:]) * 1e3
    return {"impl": impl, "seq": seq, "ms": ms, "tokens_s": seq / ms * 1e3, "first_ms": times[0] * 1e3,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": losses[0]}


def table(rows: list[dict], skipped: dict) -> str:
    lines = ["| tokens | implementation | step (ms) | tokens/s | vs fastest other | first step (ms) | peak GiB | "
             "loss, step 1 |", "|---|---|---|---|---|---|---|---|"]
    for seq in sorted({r["seq"] for r in rows}):
        here = [r for r in rows if r["seq"] == seq]
        for r in here:
            others = [o["ms"] for o in here if o is not r]
            versus = f"{min(others) / r['ms']:.2f}x" if others else "-"
            lines.append(f"| {seq} | {r['impl']} | {r['ms']:.1f} | {r['tokens_s']:,.0f} | {versus} | "
                         f"{r['first_ms']:.0f} | {r['peak_gib']:.1f} | {r['loss']:.4f} |")
    for impl, why in skipped.items():
        lines.append(f"| - | {impl} | not run: {why} | | | | | |")
    return "\n".join(lines)


def machine() -> str:
    import transformers
    import triton

    return (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
            f"transformers {transformers.__version__}, CUDA {torch.version.cuda}, {platform.node() or 'unknown host'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[8192, 32768], help="packed tokens per step")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (kernel compiles happen here)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--write", action="store_true", help="add the run to bench/RESULTS.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("hf_bench needs a CUDA GPU")

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPE, num_hidden_layers=args.layers)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16).cuda().train()
    params = sum(p.numel() for p in model.parameters())
    print(f"Llama, {args.layers} layers, {params / 1e9:.2f}B parameters, bf16; {machine()}", flush=True)

    skipped = {impl: why for impl in args.impls if (why := available(impl))}
    rows = []
    for seq in args.seq:
        _, lengths = batch(seq, seed=0, device="cpu")
        print(f"{seq} tokens: first step's {len(lengths)} documents {lengths}", flush=True)
        for impl in args.impls:
            if impl in skipped:
                continue
            try:
                rows.append(run(model, impl, seq, args.warmup, args.steps))
            except Exception as error:  # one implementation failing (memory, say) leaves the others' numbers
                skipped[f"{impl} at {seq}"] = f"{type(error).__name__}: {str(error)[:200]}"
                torch.cuda.empty_cache()
                continue
            r = rows[-1]
            print(f"  {impl:18s} {r['ms']:8.1f} ms  {r['tokens_s']:10,.0f} tokens/s  peak {r['peak_gib']:.1f} GiB  "
                  f"loss {r['loss']:.4f}", flush=True)

    text = table(rows, skipped)
    command = "python bench/hf_bench.py " + " ".join(sys.argv[1:])
    header = (f"Command: `{command.strip()}`  \nDate: {datetime.date.today().isoformat()}  \nMachine: {machine()}  \n"
              f"Model: Llama 3.2 1B's shape, {args.layers} layers, {params / 1e9:.2f}B parameters, bf16, random "
              f"weights; one packed row of documents of {DOC_MIN}-{DOC_MAX} tokens, new lengths every step; step = "
              f"forward + backward, median of {args.steps} after {args.warmup} warm-up steps.")
    print()
    print(header)
    print()
    print(text)
    if args.write:
        add_run(SECTION, header + "\n\n" + text)


if __name__ == "__main__":
    main()
