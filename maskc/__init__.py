"""maskc: a mask compiler for attention.

Describe *what* may attend to *what* as an expression (``maskc.ir``), compile it
(``maskc.compile``) into a block map, empty rows and columns, block-sparse index
tables and an attention op. See README.md and docs/contract.md.
"""

from .compiler import EMPTY, FULL, PARTIAL, CompiledMask, TileKind, compile
from .constructors import from_cu_seqlens, from_padded_kv_cache, from_paged_kv_cache, from_seqlens, pack_batch
from .distributed import plan_report, ring_attention, shard_plan
from .errors import SpecError
from .partitioning import merge_partials, partition, split_points
from .passes.shard import ShardPlan
from .ir import (
    And,
    Causal,
    Chunked,
    Dense,
    Documents,
    Empty,
    Full,
    Mask,
    Not,
    Or,
    Predicate,
    Prefix,
    Range,
    SlidingWindow,
    Spec,
    json_schema,
    load,
    loads,
)

__version__ = "0.1.0"

__all__ = [
    "EMPTY", "FULL", "PARTIAL", "And", "Causal", "Chunked", "CompiledMask", "Dense", "Documents", "Empty",
    "Full", "Mask", "Not", "Or", "Predicate", "Prefix", "Range", "ShardPlan", "SlidingWindow", "Spec",
    "SpecError", "TileKind", "compile", "from_cu_seqlens", "from_padded_kv_cache", "from_paged_kv_cache",
    "from_seqlens", "json_schema", "load", "loads", "merge_partials", "pack_batch", "partition", "plan_report",
    "ring_attention", "shard_plan", "split_points",
]
