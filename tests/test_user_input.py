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


# -- integers are integers; lengths stop where maskc can index -----------------------------------------------

WRONG_TYPES = [  # (the user's exact text, the path, words of the message)
    ("q_len: 4\nkv_len: 4\nmask: {kind: prefix, length: true}", "mask.length", "must be an integer, got True (bool)"),
    ("q_len: '12'\nkv_len: 12\nmask: {kind: causal}", "q_len", "must be an integer, got '12' (str)"),
    ("q_len: 12\nkv_len: 12.0\nmask: {kind: causal}", "kv_len", "must be an integer, got 12.0 (float)"),
    ("q_len: 8\nkv_len: 8\nmask: {kind: documents, lengths: [4, '4']}", "mask.lengths[1]", "got '4' (str)"),
    ("q_len: 8\nkv_len: 8\nmask: {kind: range, q: [0, false], kv: [0, 1]}", "mask.q[1]", "got False (bool)"),
    ("q_len: 8\nkv_len: 8\nmask: {kind: causal, offset: .nan}", "mask.offset", "got nan (float)"),
    ("q_len: 8\nkv_len: 8\nmask: {kind: sliding_window, left: 1e3}", "mask.left", "got '1e3' (str)"),  # YAML 1.1
    ("q_len: 99999999999999999999\nkv_len: 12\nmask: {kind: causal}", "q_len",
     "q_len + kv_len = 100000000000000000011 must be below MAX_POSITIONS = 2**30 = 1073741824"),
    ("q_len: 16\nkv_len: 1073741808\nmask: {kind: causal}", "kv_len", "must be below MAX_POSITIONS = 2**30"),
]


@pytest.mark.parametrize("text, path, words", WRONG_TYPES)
def test_values_of_the_wrong_type_or_size_are_spec_errors(text, path, words):
    with pytest.raises(maskc.SpecError) as caught:
        maskc.loads(text)
    assert caught.value.path == path
    assert words in str(caught.value)


def test_the_largest_lengths_load_and_one_more_is_refused():
    maskc.Spec(q_len=16, kv_len=maskc.ir.MAX_POSITIONS - 17, mask=maskc.Causal())
    with pytest.raises(maskc.SpecError, match="kv_len: q_len \\+ kv_len"):
        maskc.Spec(q_len=16, kv_len=maskc.ir.MAX_POSITIONS - 16, mask=maskc.Causal())


def test_numpy_and_torch_integers_are_integers():
    import torch

    spec = maskc.Spec(q_len=np.int64(12), kv_len=torch.tensor(12),
                      mask=maskc.Documents(lengths=np.array([5, 4, 3], dtype=np.int32)) & maskc.Prefix(np.uint8(2)))
    assert spec == maskc.Spec(q_len=12, kv_len=12, mask=maskc.Documents([5, 4, 3]) & maskc.Prefix(2))
    assert type(spec.q_len) is int and type(spec.mask.of[0].lengths[0]) is int
    for not_an_integer in (True, np.bool_(False), 2.0, "2", torch.tensor(2.0)):
        with pytest.raises(maskc.SpecError, match="Prefix.length: must be an integer"):
            maskc.Prefix(not_an_integer)


# -- a misspelt field is named, with the field meant --------------------------------------------------------

MISSPELT = [  # (the user's exact text, the path, the message)
    ("q_len: 12\nkvlen: 12\nmask: {kind: causal}", "kvlen",
     "unknown field 'kvlen': did you mean 'kv_len'? (fields: q_len, kv_len, mask)"),
    ("q_len: 12\nkv_len: 12\nmask: {kind: prefix, lenght: 3}", "mask.lenght",
     "unknown field 'lenght': did you mean 'length'? (fields: kind, length)"),
    ("q_len: 12\nkv_len: 12\nmask: [{kind: causal}, {kind: and, of: [{kind: documents, lenghts: [12]}]}]",
     "mask[1].of[0].lenghts", "unknown field 'lenghts': did you mean 'lengths'?"),
    ("q_len: 12\nkv_len: 12\nmask: {kind: causal, window: 3}", "mask.window",
     "unknown field 'window' (fields: kind, offset, align)"),
    ("q_len: 12\nkv_len: 12\nmask: {knd: causal}", "mask.knd",
     "a mask node needs a 'kind' field: did you mean 'kind' instead of 'knd'?"),
    ("q_len: 12\nkv_len: 12\nmask: {kind: slidingwindow, left: 3}", "mask.kind",
     "unknown kind 'slidingwindow': did you mean 'sliding_window'? (kinds: and, causal,"),
]


@pytest.mark.parametrize("text, path, message", MISSPELT)
def test_a_misspelt_field_is_named_with_the_one_meant(text, path, message):
    with pytest.raises(maskc.SpecError) as caught:
        maskc.loads(text)
    assert caught.value.path == path
    assert caught.value.reason.startswith(message)


def test_a_misspelt_keyword_is_named_in_python_too():
    with pytest.raises(maskc.SpecError, match="Prefix.lenght: unknown field 'lenght': did you mean 'length'"):
        maskc.Prefix(lenght=3)
    with pytest.raises(maskc.SpecError, match="^kvlen: unknown field 'kvlen': did you mean 'kv_len'"):
        maskc.Spec(q_len=12, kvlen=12, mask=maskc.Causal())


# -- a predicate returns booleans ------------------------------------------------------------------------------


@pytest.mark.parametrize("fn, dtype", [
    (lambda i, j: i - j, "torch.int64"),  # the user's exact input
    (lambda i, j: (i - j).float(), "torch.float32"),
    (lambda i, j: (i - j).numpy(), "int64"),
    (lambda i, j: 1, "int64"),
])
def test_a_predicate_returning_numbers_is_refused_with_its_dtype(fn, dtype):
    spec = maskc.Spec(q_len=8, kv_len=8, mask=maskc.Predicate(fn))
    with pytest.raises(TypeError, match=f"must return booleans, got dtype {dtype}"):
        maskc.compile(spec, block_size=4)


def test_a_predicate_returning_booleans_of_any_kind_is_read():
    for fn in (lambda i, j: i >= j, lambda i, j: (i >= j).numpy(), lambda i, j: True):
        cm = maskc.compile(maskc.Spec(q_len=8, kv_len=8, mask=maskc.Causal() & maskc.Predicate(fn)), block_size=4)
        assert cm.allowed_pairs() == 36


# -- compile takes a spec file's path ----------------------------------------------------------------------------


def test_compile_reads_a_spec_file_given_its_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = maskc.Spec(q_len=12, kv_len=12, mask=maskc.Documents([5, 4, 3]) & maskc.Causal())
    (tmp_path / "spec.yaml").write_text(spec.dumps())
    for source in ("spec.yaml", tmp_path / "spec.yaml", str(tmp_path / "spec.yaml")):
        assert maskc.compile(source).spec == spec
    assert maskc.compile(spec.dumps("json")).spec == spec  # text is still text


def test_compile_of_a_missing_file_says_to_use_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(maskc.SpecError, match="got the string 'spec.yaml'; to read a spec file, pass its path "
                                             "to maskc.load"):
        maskc.compile("spec.yaml")
    with pytest.raises(maskc.SpecError, match="cannot read .*missing.yaml"):
        maskc.compile(tmp_path / "missing.yaml")
