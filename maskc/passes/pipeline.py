"""The pass manager: passes declare what they need and provide; a networkx graph orders them.

A pass is a small frozen dataclass with a ``name``, the state keys it ``needs``
and ``provides``, and ``run(state) -> {key: value}``. ``run_pipeline`` orders
the passes topologically by those keys, so adding a pass never means editing a
hand-written sequence. Set ``MASKC_DEBUG_PASSES=1`` (or pass ``debug=print``)
to see each pass's name, time and what it provided.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import networkx as nx


@dataclass(frozen=True)
class Pass:
    name: str = "pass"
    needs: tuple = ()
    provides: tuple = ()

    def run(self, state: dict) -> dict:
        raise NotImplementedError


def order(passes: Iterable[Pass], given: Iterable[str]) -> list[Pass]:
    """The passes in an order where every need is provided before it is used."""
    passes = list(passes)
    graph = nx.DiGraph()
    provider = {key: "<input>" for key in given}
    for p in passes:
        graph.add_node(p.name)
        for key in p.provides:
            if key in provider:
                raise ValueError(f"{key!r} is provided by both {provider[key]!r} and {p.name!r}")
            provider[key] = p.name
    for p in passes:
        for key in p.needs:
            if key not in provider:
                raise ValueError(f"pass {p.name!r} needs {key!r}, which no pass provides")
            if provider[key] != "<input>":
                graph.add_edge(provider[key], p.name)
    by_name = {p.name: p for p in passes}
    return [by_name[name] for name in nx.lexicographical_topological_sort(graph)]


def run_pipeline(passes: Iterable[Pass], state: dict[str, Any], debug: Callable[[str], None] | None = None) -> dict:
    """Run ``passes`` in dependency order over ``state`` (updated and returned)."""
    if debug is None and os.environ.get("MASKC_DEBUG_PASSES"):
        debug = print
    for p in order(passes, state):
        start = time.perf_counter()
        state.update(p.run(state))
        if debug is not None:
            shown = ", ".join(f"{k}={_summary(state[k])}" for k in p.provides)
            debug(f"[maskc] {p.name:<10} {1e3 * (time.perf_counter() - start):8.2f} ms  {shown}")
    return state


def _summary(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 160 else text[:157] + "..."
