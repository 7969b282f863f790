"""What users look at when they debug a mask: the block map as text and as a picture."""

from __future__ import annotations

import numpy as np

from .compiler import PARTIAL, CompiledMask

GLYPHS = {0: ".", 1: "+", 2: "#"}


def ranges(positions, limit: int = 8) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"`` (at most ``limit`` ranges shown)."""
    p = np.asarray(positions, dtype=np.int64)
    if len(p) == 0:
        return "none"
    breaks = np.flatnonzero(np.diff(p) != 1)
    starts = np.concatenate([[p[0]], p[breaks + 1]])
    stops = np.concatenate([p[breaks], [p[-1]]])
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in zip(starts.tolist(), stops.tolist())]
    shown = ", ".join(parts[:limit])
    more = f", ... ({len(parts) - limit} more ranges)" if len(parts) > limit else ""
    return f"{shown}{more} ({len(p)} position{'s' if len(p) > 1 else ''})"


def _head_empties(cm: CompiledMask, head: int):
    if isinstance(cm.empty_rows, tuple):
        return cm.empty_rows[head], cm.empty_cols[head]
    return cm.empty_rows, cm.empty_cols


def _pooled(kinds: np.ndarray, max_size: int) -> tuple[np.ndarray, int]:
    """Tiles pooled ``f x f`` so that the picture fits: FULL or EMPTY only if every tile is."""
    f = max(1, -(-max(kinds.shape) // max_size))
    if f == 1:
        return kinds, 1
    rows, cols = -(-kinds.shape[0] // f), -(-kinds.shape[1] // f)
    padded = np.zeros((rows * f, cols * f), dtype=kinds.dtype)
    padded[: kinds.shape[0], : kinds.shape[1]] = kinds
    blocks = padded.reshape(rows, f, cols, f)
    lo, hi = blocks.min(axis=(1, 3)), blocks.max(axis=(1, 3))
    return np.where(lo == hi, lo, PARTIAL).astype(np.uint8), f


def statistics(cm: CompiledMask, head: int = 0) -> dict:
    """The numbers that matter when debugging one head's mask."""
    bm = cm.block_maps[int(cm.table.head_slot[head])]
    visited = cm.tile_area(bm.full) + cm.tile_area(bm.partial)
    allowed = cm.allowed_pairs(head)
    pairs = cm.q_len * cm.kv_len
    tiles = bm.n_q_blocks * bm.n_kv_blocks
    return {
        "tiles": tiles,
        "full": bm.full.tiles,
        "partial": bm.partial.tiles,
        "empty": tiles - bm.full.tiles - bm.partial.tiles,
        "allowed_pairs": allowed,
        "density": allowed / pairs,
        "flops_skipped": 1 - visited / pairs,
        "useful_in_visited": allowed / visited if visited else 1.0,
    }


def render_text(cm: CompiledMask, head: int = 0, max_width: int = 96) -> str:
    kinds = cm.block_kinds[head if cm.block_kinds.shape[0] > 1 else 0].numpy()
    pooled, f = _pooled(kinds, max_width)
    s = statistics(cm, head)
    rows, cols = _head_empties(cm, head)
    bq, bk = cm.block_size
    lines = [
        f"maskc block map: q_len={cm.q_len} kv_len={cm.kv_len}, tiles {bq}x{bk}, "
        f"{kinds.shape[0]} x {kinds.shape[1]} tiles" + (f", head {head} of {cm.n_heads}" if cm.n_heads > 1 else ""),
        "legend: # FULL (no mask code)   + PARTIAL (masked)   . EMPTY (never visited)"
        + (f"   [each character is {f}x{f} tiles]" if f > 1 else ""),
    ]
    width = len(str(kinds.shape[0] - 1))
    for r, row in enumerate(pooled):
        lines.append(f"q{r * f:>{width}} " + "".join(GLYPHS[int(x)] for x in row))
    lines += [
        f"tiles: {s['full']} full, {s['partial']} partial, {s['empty']} empty of {s['tiles']}",
        f"density: {100 * s['density']:.2f}% of pairs allowed; attention FLOPs skipped: "
        f"{100 * s['flops_skipped']:.2f}%; useful work in visited tiles: {100 * s['useful_in_visited']:.2f}%",
        f"empty rows (queries attending nothing): {ranges(rows.numpy())}",
        f"empty cols (keys nobody attends): {ranges(cols.numpy())}",
        kernels_line(cm),
    ]
    return "\n".join(lines)


def kernels_line(cm: CompiledMask) -> str:
    """What the GPU kernels run for this mask: how PARTIAL tiles are tested, and whether the
    forward can take the sm_90 Gluon kernel (``cm.kernel_paths(q, k, v)`` says it per call)."""
    from .codegen.plan import USE_SPANS
    from .codegen.spans import spans

    if not (USE_SPANS and spans(cm) is not None):
        return "kernels: PARTIAL tiles call the generated predicate; the forward runs Triton on every GPU"
    if any(size % 128 for size in cm.block_size):
        return (f"kernels: PARTIAL tiles test per-row spans; the forward runs Triton (the sm_90 Gluon kernel "
                f"needs a block_size of multiples of 128, not {cm.block_size})")
    return ("kernels: PARTIAL tiles test per-row spans; on sm_90 GPUs the forward runs the Gluon kernel "
            "(fp16/bf16, head dims 64/128/256, 16M pairs or more), and the backward too with "
            "MASKC_GLUON_BACKWARD=1; elsewhere Triton")


def render_png(cm: CompiledMask, path, head: int = 0, max_size: int = 1024) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    kinds = cm.block_kinds[head if cm.block_kinds.shape[0] > 1 else 0].numpy()
    pooled, f = _pooled(kinds, max_size)
    rows, cols = (x.numpy() for x in _head_empties(cm, head))
    bq, bk = cm.block_size
    s = statistics(cm, head)
    fig, ax = plt.subplots(figsize=(6, 6 * min(2.0, max(0.25, pooled.shape[0] / pooled.shape[1]))), dpi=100)
    cmap = ListedColormap(["#f4f4f4", "#f0a030", "#2060c0"])
    ax.imshow(pooled, cmap=cmap, vmin=0, vmax=2, interpolation="nearest", aspect="auto",
              extent=(0, kinds.shape[1], kinds.shape[0], 0))
    # empty rows and columns as red marks on the margins, in tile coordinates
    if len(rows):
        ax.scatter(np.full(len(rows), -0.02 * kinds.shape[1]), (rows + 0.5) / bq, s=4, c="red", marker="s",
                   clip_on=False, label="empty rows / cols")
    if len(cols):
        ax.scatter((cols + 0.5) / bk, np.full(len(cols), -0.02 * kinds.shape[0]), s=4, c="red", marker="s",
                   clip_on=False, label=None if len(rows) else "empty rows / cols")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if max(pooled.shape) <= 64:  # tile borders, while they are still visible
        for x in range(1, pooled.shape[1]):
            ax.axvline(x * f, color="white", linewidth=0.8)
        for y in range(1, pooled.shape[0]):
            ax.axhline(y * f, color="white", linewidth=0.8)
    ax.set_xlabel(f"key block ({bk} keys each)")
    ax.set_ylabel(f"query block ({bq} queries each)")
    ax.set_title(
        f"q_len={cm.q_len} kv_len={cm.kv_len}: {s['full']} full, {s['partial']} partial, {s['empty']} empty tiles\n"
        f"density {100 * s['density']:.1f}%, FLOPs skipped {100 * s['flops_skipped']:.1f}%"
        + (f", pooled {f}x{f}" if f > 1 else ""), fontsize=9)
    from matplotlib.patches import Patch

    handles = [Patch(color="#2060c0", label="FULL"), Patch(color="#f0a030", label="PARTIAL"),
               Patch(color="#f4f4f4", label="EMPTY")]
    if len(rows) or len(cols):
        handles.append(Patch(color="red", label="empty rows / cols"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(handles), fontsize=7,
              frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
