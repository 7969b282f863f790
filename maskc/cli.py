"""The ``maskc`` command: inspect, split and plan masks from YAML/JSON specs.

    maskc demo                                   the embedded example, end to end
    maskc show SPEC [--block-size B] [--png P]   block map, statistics, empty rows/cols
    maskc partition SPEC --q-splits P --kv-splits P
    maskc plan SPEC --world-size P [--strategy S] [--kv-heads H] [--head-dim D] [--dtype T] [--png P]
    maskc schema                                 JSON Schema of spec files

``SPEC`` is a path, or ``-`` for standard input. Errors print one line and exit
with status 2 (a bad spec or argument, saying what is allowed) or 1 (anything
else that went wrong).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

from . import __version__
from .errors import SpecError

DEMO_SPEC = """\
# Three packed documents of 5, 4 and 3 tokens, causal inside each: the mask of
# xformers issue 995, split 3 x 3 as ring attention over 3 ranks would split it.
q_len: 12
kv_len: 12
mask:
  kind: and
  of:
    - {kind: documents, lengths: [5, 4, 3]}
    - {kind: causal}
"""


#: Bytes of one K/V element, by the names ``plan --dtype`` takes.
KV_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}


class _Parser(argparse.ArgumentParser):
    """Usage errors print one line, saying what is allowed, and exit with status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _at_least(least: int):
    """An argparse type: an integer >= ``least``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {text!r}")
        return value

    return parse


def _block_size(text: str):
    try:
        parts = [int(x) for x in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"must be N or Q,KV with integers >= 1, got {text!r}")
    return parts[0] if len(parts) == 1 else tuple(parts)


def _split(text: str):
    try:
        parts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"split {text!r} must be a count P or part sizes a,b,c") from None
    return parts[0] if len(parts) == 1 else parts


def _read_spec(path: str):
    from .ir.spec import load, loads

    return loads(sys.stdin.read()) if path == "-" else load(path)


def _show(args) -> None:
    from .compiler import compile

    cm = compile(_read_spec(args.spec), block_size=args.block_size)
    if args.head is not None and args.head >= cm.n_heads:
        allowed = f"0 to {cm.n_heads - 1} (one mask per head)" if cm.n_heads > 1 else "0 (one mask for every head)"
        args.parser.error(f"argument --head: {args.head} is not a mask head of this spec; allowed: {allowed}")
    heads = range(cm.n_heads) if args.head is None else [args.head]
    for head in heads:
        cm.show(head=head, max_width=args.width)
    if args.png:
        cm.plot(args.png, head=args.head or 0)
        print(f"wrote {args.png}")


def _partition(args) -> None:
    from .compiler import compile
    from .partitioning import partition

    tiles = partition(_read_spec(args.spec), args.q_splits, args.kv_splits)
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            print(f"== tile ({i}, {j}): q_len={tile.q_len} kv_len={tile.kv_len}")
            print(textwrap.indent(tile.dumps().rstrip(), "   "))
            compile(tile, block_size=args.block_size).show(max_width=args.width)
            print()


def _plan(args) -> None:
    from .distributed import plan_report

    print(plan_report(_read_spec(args.spec), args.world_size, args.strategy, png=args.png, kv_heads=args.kv_heads,
                      head_dim=args.head_dim, dtype_bytes=KV_DTYPE_BYTES[args.dtype]))


def _schema(args) -> None:
    from .ir.spec import json_schema

    print(json.dumps(json_schema(), indent=2))


def _demo(args) -> None:
    """Compile the embedded spec, split it 3 x 3, run every tile and check the merge."""
    import torch

    from .compiler import compile
    from .ir.spec import loads
    from .partitioning import merge_partials, partition, split_points

    spec = loads(DEMO_SPEC)
    print(DEMO_SPEC)
    cm = compile(spec, block_size=4)
    cm.show()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, 16, dtype=torch.float64) for _ in range(3))
    whole = cm(q, k, v)
    bounds = split_points(3, 12)
    merged = []
    for i, row in enumerate(partition(spec, 3, 3)):
        outs, lses = [], []
        for j, tile in enumerate(row):
            tile_cm = compile(tile, block_size=2)
            print(f"\ntile ({i}, {j}) of the 3 x 3 split: {tile.mask}")
            tile_cm.show()
            rows, cols = slice(bounds[i], bounds[i + 1]), slice(bounds[j], bounds[j + 1])
            out, lse = tile_cm(q[:, :, rows], k[:, :, cols], v[:, :, cols], return_lse=True)
            outs.append(out)
            lses.append(lse)
        merged.append(merge_partials(outs, lses)[0])
    error = (torch.cat(merged, dim=2) - whole).abs().max().item()
    nan = any(torch.isnan(x).any().item() for x in merged)
    print(f"\nmerged 9 tiles vs unsplit attention: max |difference| = {error:.2e}, NaN: {nan}")
    if error > 1e-6 or nan:
        raise RuntimeError("the merged tiles do not reproduce the unsplit attention")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="maskc", description="A mask compiler for attention.")
    parser.add_argument("--version", action="version", version=f"maskc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    spec_help = "YAML/JSON spec file, or - for stdin"
    block_help = "tile size: N or Q,KV (default 128)"
    width_help = "widest text picture, in characters (default 96)"

    demo = sub.add_parser("demo", help="run the embedded example end to end")
    demo.set_defaults(run=_demo)

    show = sub.add_parser("show", help="print the block map of a spec")
    show.add_argument("spec", help=spec_help)
    show.add_argument("--block-size", type=_block_size, default=128, help=block_help)
    show.add_argument("--png", help="also write a PNG picture of the block map here")
    show.add_argument("--head", type=_at_least(0), help="only this head of a per-head mask (0, 1, ...)")
    show.add_argument("--width", type=_at_least(1), default=96, help=width_help)
    show.set_defaults(run=_show, parser=show)

    part = sub.add_parser("partition", help="split a spec into tiles and show each")
    part.add_argument("spec", help=spec_help)
    part.add_argument("--q-splits", type=_split, required=True, help="P parts, or part sizes a,b,c")
    part.add_argument("--kv-splits", type=_split, required=True, help="P parts, or part sizes a,b,c")
    part.add_argument("--block-size", type=_block_size, default=128, help=block_help)
    part.add_argument("--width", type=_at_least(1), default=96, help=width_help)
    part.set_defaults(run=_partition)

    plan = sub.add_parser("plan", help="context-parallel sharding plans for P ranks")
    plan.add_argument("spec", help=spec_help)
    plan.add_argument("--world-size", type=_at_least(1), required=True, help="ranks P sharing the sequence")
    plan.add_argument("--strategy", choices=["contiguous", "zigzag", "balanced"], action="append",
                      help="strategy to report (repeatable; default all)")
    plan.add_argument("--kv-heads", type=_at_least(1), default=8, help="K/V heads, for bytes sent (default 8)")
    plan.add_argument("--head-dim", type=_at_least(1), default=128, help="head dim, for bytes sent (default 128)")
    plan.add_argument("--dtype", choices=list(KV_DTYPE_BYTES), default="bfloat16",
                      help="K/V element type, for bytes sent (default bfloat16)")
    plan.add_argument("--png", help="write the rank-by-step tile grid here")
    plan.set_defaults(run=_plan)

    schema = sub.add_parser("schema", help="print the JSON Schema of spec files")
    schema.set_defaults(run=_schema)
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.run(args)
    except SystemExit as done:  # a usage error (status 2), --help or --version (0)
        return done.code
    except SpecError as error:
        print(f"maskc: bad spec: {error}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as error:
        print(f"maskc: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into a reader that stopped early (| head)
        sys.stderr.close()
        return 0
    except (OSError, RuntimeError) as error:
        print(f"maskc: failed: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
