"""The forms users write and the errors they can act on (issue 15): every case is
a user's exact input, and a fuzz test throws random spec text at ``maskc.loads``."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

import maskc
from maskc.ir.nodes import NODE_KINDS
from maskc.ir.spec import MAX_NESTING
from strategies import specs

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
    node = maskc.Predicate(lambda i, j: (i + j) % 2 == 0)
    assert node == maskc.Predicate(fn=node.fn)


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


@pytest.mark.parametrize("text, path, message", [
    ("q_len: 4\nkv_len: 4\nmask: {kind: full}\n0: 1", "0", "a field name must be text, got 0 (int)"),
    ('{"q_len": 4, "kv_len": 4, "mask": {"kind": "full"}, "\\ud800": 1}', "'\\ud800'",
     "a field name must be Unicode text"),
    ('{"q_len": 1e3, "kv_len": 4, "mask": {"kind": "full"}}', "q_len", "must be an integer, got 1000.0 (float)"),
    ('{"q_len": 4, "kv_len": 4, "mask": {"kind": "full", "\\ud83d\\ude00": 1}}', "mask.\U0001f600",
     "unknown field '\U0001f600' (fields: kind)"),
])
def test_keys_and_numbers_of_json_are_read_as_json(text, path, message):
    with pytest.raises(maskc.SpecError) as caught:
        maskc.loads(text)
    assert caught.value.path == path
    assert caught.value.reason == message


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


# -- nesting -------------------------------------------------------------------------------------------------------


def nested_nots(levels: int) -> str:
    """A spec whose mask is ``levels - 1`` nested ``not`` nodes (the top mapping is level 1)."""
    return "q_len: 4\nkv_len: 4\nmask: " + "{kind: not, of: " * (levels - 2) + "{kind: causal}" + "}" * (levels - 2)


def test_specs_nest_up_to_max_nesting_levels():
    assert maskc.compile(maskc.loads(nested_nots(MAX_NESTING))).allowed_pairs() == 10
    with pytest.raises(maskc.SpecError, match=f"nested more than MAX_NESTING = {MAX_NESTING} levels") as caught:
        maskc.loads(nested_nots(MAX_NESTING + 1))
    assert caught.value.path == "mask" + ".of" * (MAX_NESTING - 1)  # the mapping at level MAX_NESTING + 1


def test_text_nested_past_what_the_yaml_reader_follows_is_a_spec_error():
    with pytest.raises(maskc.SpecError, match="nests deeper than the JSON and YAML readers can follow"):
        maskc.loads("q_len: " + "[" * 5_000 + "]" * 5_000)


# -- fuzz: random spec text is a Spec or a SpecError with a path, never another exception ---------------------

FIELDS = sorted({"q_len", "kv_len", "mask"} | {name for node in NODE_KINDS.values() for name in node.model_fields})
NUMBERS = (st.integers(-3, 20) | st.sampled_from([2**30 - 1, 2**30, 2**63, 10**20, -(10**20)])
           | st.integers(-(2**70), 2**70))
SCALARS = (NUMBERS | st.booleans() | st.none() | st.floats() | st.sampled_from(sorted(NODE_KINDS))
           | st.sampled_from(["top_left", "bottom_right", "12", "1e3", "true"]) | st.text(max_size=6))
KEYS = (st.sampled_from(FIELDS) | st.sampled_from(FIELDS).map(lambda name: name.replace("_", ""))
        | st.sampled_from(FIELDS).map(lambda name: name[:-1]) | st.text(max_size=6) | st.integers(0, 3))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
                      max_leaves=12)


def places(data, path=()):
    """``(container, key)`` of every value inside ``data``, parents first."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in list(items):
        yield data, key
        yield from places(value, (*path, key))


def nested(value, levels: int, wrap: str):
    for _ in range(levels):
        value = {"not": {"kind": "not", "of": value}, "and": {"kind": "and", "of": [value]}, "list": [value],
                 "documents": {"kind": "documents", "lengths": [4], "inner": value}}[wrap]
    return value


@st.composite
def spec_data(draw):
    """The data of a valid spec (``strategies.specs``) with 0 to 3 mutations: a value replaced by
    one of any type or size, a key misspelt or dropped or added, a value nested around
    ``MAX_NESTING`` levels deep; or any data at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(VALUES)
    data = draw(specs(max_len=40, predicates=False, huge=True)).to_data()
    for _ in range(draw(st.integers(0, 3))):
        container, key = draw(st.sampled_from(list(places(data))))
        change = draw(st.sampled_from(["value", "misspell", "drop", "add", "nest"]))
        if change == "value":
            container[key] = draw(SCALARS | VALUES)
        elif change == "nest":
            container[key] = nested(container[key], draw(st.integers(MAX_NESTING - 5, MAX_NESTING + 5)),
                                    draw(st.sampled_from(["not", "and", "list", "documents"])))
        elif isinstance(container, dict) and change in ("misspell", "drop"):
            value = container.pop(key)
            if change == "misspell":
                container[draw(KEYS)] = value
        elif isinstance(container, dict):
            container[draw(KEYS)] = draw(SCALARS | VALUES)
    return data


def loads_or_spec_error(text: str, data):
    """``maskc.loads(text)``; a ``SpecError`` must start its path at a key of the text (or a missing field)."""
    try:
        return maskc.loads(text)
    except maskc.SpecError as error:
        if isinstance(data, dict):
            roots = {str(key) for key in data} | {"q_len", "kv_len", "mask"}
            assert any(error.path == root or error.path.startswith((f"{root}.", f"{root}[")) for root in roots), error
        return None


@given(spec_data(), st.sampled_from(["yaml", "json"]))
def test_random_spec_data_loads_or_raises_a_spec_error_with_a_path(data, form):
    text = yaml.safe_dump(data) if form == "yaml" else json.dumps(data)
    spec = loads_or_spec_error(text, data)
    if spec is not None:
        assert maskc.loads(spec.dumps()) == spec
        maskc.compile(spec, block_size=8)


@given(st.text(max_size=60))
def test_random_text_loads_or_raises_a_spec_error(text):
    loads_or_spec_error(text, None)
