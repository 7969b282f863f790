"""The forms users write and the errors they can act on (issue 15): every case is
a user's exact input, and a fuzz test throws random spec text at ``maskc.loads``."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import maskc

# -- nodes take their fields by position, in the contract's order ------------------------------------------

POSITIONAL = [  # (what the user wrote, what it means)
    (lambda: maskc.Prefix(4), maskc.Prefix(length=4)),
    (lambda: maskc.Chunked(64), maskc.Chunked(size=64)),
    (lambda: maskc.Causal(2, "bottom_right"), maskc.Causal(offset=2, align="bottom_right")),
    (lambda: maskc.SlidingWindow(255), maskc.SlidingWindow(left=255)),
    (lambda: maskc.SlidingWindow(64, 64), maskc.SlidingWindow(left=64, right=64)),
    (lambda: maskc.SlidingWindow(None, 0, "bottom_right"), maskc.SlidingWindow(left=None, align="bottom_right")),
    (lambda: maskc.Range((0, 4), (2, 8)), maskc.Range(q=(0, 4), kv=(2, 8))),
    (lambda: maskc.Documents([5, 4, 3]), maskc.Documents(lengths=[5, 4, 3])),
    (lambda: maskc.Documents([5, 4], [2, 2], maskc.Causal()),
     maskc.Documents(lengths=[5, 4], kv_lengths=[2, 2], inner=maskc.Causal())),
    (lambda: maskc.Dense([[1, 0], [1, 1]]), maskc.Dense(values=[[1, 0], [1, 1]])),
    (lambda: maskc.Not(maskc.Causal()), ~maskc.Causal()),
    (lambda: maskc.And([maskc.Causal(), maskc.Prefix(2)]), maskc.Causal() & maskc.Prefix(length=2)),
    (lambda: maskc.Chunked(size=64), maskc.Chunked(size=64)),  # keywords still work
]


@pytest.mark.parametrize("written, meant", POSITIONAL)
def test_nodes_take_their_fields_by_position_in_the_contracts_order(written, meant):
    assert written() == meant


def test_a_predicate_takes_its_function_by_position():
    fn = lambda i, j: (i + j) % 2 == 0  # noqa: E731 - the user's exact input
    assert maskc.Predicate(fn) == maskc.Predicate(fn=fn)


def test_positional_nodes_write_the_same_yaml():
    spec = maskc.Spec(q_len=12, kv_len=12, mask=maskc.Documents([5, 4, 3]) & maskc.SlidingWindow(3))
    assert spec.dumps() == maskc.Spec(
        q_len=12, kv_len=12, mask=maskc.Documents(lengths=[5, 4, 3]) & maskc.SlidingWindow(left=3)).dumps()


@pytest.mark.parametrize("build, words", [
    (lambda: maskc.Prefix(4, 5), r"Prefix\(\) takes at most 1 positional fields \(length\), got 2"),
    (lambda: maskc.Full(1), r"Full\(\) takes at most 0 positional fields \(none\), got 1"),
    (lambda: maskc.Prefix(4, length=3), "'length' both by position and by name"),
])
def test_too_many_or_repeated_positional_fields_are_a_type_error(build, words):
    with pytest.raises(TypeError, match=words):
        build()


def test_signatures_show_the_positional_order():
    assert list(inspect.signature(maskc.SlidingWindow).parameters) == ["left", "right", "align", "kind"]
    assert inspect.signature(maskc.Documents).parameters["kind"].kind is inspect.Parameter.KEYWORD_ONLY
