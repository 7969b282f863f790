"""The IR: text round trips, the JSON Schema, operators, hashing, and every bad
input of issue 2 raising an error that names what is wrong."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given

import maskc
from maskc.ir import nodes
from oracle import spec_masks
from strategies import specs

CONTRACT_EXAMPLE = """\
q_len: 12
kv_len: 12
mask:
  kind: and
  of:
    - {kind: documents, lengths: [5, 4, 3]}
    - {kind: causal}
"""


@pytest.fixture(scope="module")
def schema():
    jsonschema = pytest.importorskip("jsonschema")
    out = maskc.json_schema()
    jsonschema.Draft202012Validator.check_schema(out)
    return jsonschema.Draft202012Validator(out)


# -- text form -------------------------------------------------------------------------------


def test_contract_example_loads_as_the_python_spec():
    spec = maskc.loads(CONTRACT_EXAMPLE)
    assert spec == maskc.Spec(q_len=12, kv_len=12, mask=maskc.Documents(lengths=[5, 4, 3]) & maskc.Causal())


@given(specs(max_len=30, predicates=False, huge=True))
def test_yaml_and_json_round_trip_to_an_equal_spec(spec):
    for fmt in ("yaml", "json"):
        text = spec.dumps(fmt)
        again = maskc.loads(text)
        assert again == spec and hash(again) == hash(spec)
        assert again.dumps(fmt) == text
    np.testing.assert_array_equal(spec_masks(maskc.loads(spec.dumps())), spec_masks(spec))


@given(specs(max_len=12, predicates=False, huge=True))
def test_json_schema_accepts_every_dumped_spec(schema, spec):
    schema.validate(json.loads(spec.dumps("json")))


def test_dumps_leaves_out_defaults_and_reads_like_the_contract():
    spec = maskc.loads(CONTRACT_EXAMPLE)
    data = json.loads(spec.dumps("json"))
    assert data == {"q_len": 12, "kv_len": 12, "mask": {"kind": "and", "of": [
        {"kind": "documents", "lengths": [5, 4, 3]}, {"kind": "causal"}]}}
    with pytest.raises(ValueError, match="format"):
        spec.dumps("toml")


@pytest.mark.parametrize("data", [
    {"q_len": 4, "kv_len": 4, "mask": {"kind": "causal", "offset": -1, "align": "bottom_right"}},
    {"q_len": 4, "kv_len": 6, "mask": [{"kind": "full"}, {"kind": "sliding_window", "left": None, "right": 2}]},
    {"q_len": 2, "kv_len": 2, "mask": {"kind": "not", "of": {"kind": "dense", "values": [[True, False], [1, 1]]}}},
    {"q_len": 8, "kv_len": 9, "mask": {"kind": "documents", "lengths": [4, 0, 3], "kv_lengths": [2, 5, 1],
                                       "inner": {"kind": "or", "of": [{"kind": "chunked", "size": 2},
                                                                      {"kind": "prefix", "length": 1}]}}},
    {"q_len": 5, "kv_len": 5, "mask": {"kind": "range", "q": [0, 2], "kv": [1, 5]}},
    {"q_len": 5, "kv_len": 5, "mask": {"kind": "and", "of": []}},
], ids=["causal", "per-head", "dense", "documents", "range", "empty-and"])
def test_json_schema_validates_the_example_shapes(schema, data):
    schema.validate(data)
    spec = maskc.loads(json.dumps(data))
    assert maskc.loads(spec.dumps()) == spec


def test_load_reads_yaml_and_json_files(tmp_path):
    spec = maskc.loads(CONTRACT_EXAMPLE)
    (tmp_path / "spec.yaml").write_text(spec.dumps())
    (tmp_path / "spec.json").write_text(spec.dumps("json"))
    assert maskc.load(tmp_path / "spec.yaml") == maskc.load(str(tmp_path / "spec.json")) == spec
    with pytest.raises(maskc.SpecError, match="cannot read"):
        maskc.load(tmp_path / "missing.yaml")


# -- operators, hashing, immutability -------------------------------------------------------------------


def test_operators_build_and_or_not():
    a, b = maskc.Causal(), maskc.Prefix(length=2)
    assert a & b == maskc.And(of=[a, b])
    assert a | b == maskc.Or(of=[a, b])
    assert ~a == maskc.Not(of=a)
    assert (a & b) & a == maskc.And(of=[maskc.And(of=[a, b]), a])  # no implicit flattening: simplify does that


@pytest.mark.parametrize("use", [bool, lambda m: m and m, lambda m: not m, lambda m: m if m else None])
def test_a_mask_has_no_truth_value(use):
    with pytest.raises(TypeError, match="&, \\| and ~"):
        use(maskc.Causal())


@pytest.mark.parametrize("other", [True, 1, None, "causal"])
def test_combining_with_a_non_mask_raises(other):
    with pytest.raises(TypeError, match="cannot combine"):
        maskc.Causal() & other
    with pytest.raises(TypeError, match="cannot combine"):
        maskc.Causal() | other


def test_equal_structures_are_equal_and_hash_alike():
    values = np.eye(3, dtype=bool)
    pairs = [
        (maskc.Causal(), maskc.Causal(offset=0, align="top_left")),
        (maskc.Documents(lengths=[3, 1]), maskc.Documents(lengths=(3, 1), inner=maskc.Full())),
        (maskc.Dense(values=values), maskc.Dense(values=values.astype(int).tolist())),
        (maskc.Spec(q_len=3, kv_len=3, mask=[maskc.Full()]), maskc.Spec(q_len=3, kv_len=3, mask=(maskc.Full(),))),
    ]
    for a, b in pairs:
        assert a == b and hash(a) == hash(b)
    different = [maskc.Causal(), maskc.Causal(offset=1), maskc.Causal(align="bottom_right"),
                 maskc.SlidingWindow(left=None, right=0), maskc.Dense(values=~values), maskc.Dense(values=values)]
    assert len(set(different)) == len(different)
    assert maskc.Spec(q_len=3, kv_len=3, mask=maskc.Full()) != maskc.Spec(q_len=3, kv_len=3, mask=[maskc.Full()])


def test_cached_hash_and_starts_are_neither_compared_nor_copied():
    documents = maskc.Documents(lengths=[3, 1], inner=maskc.Causal())
    hash(documents)
    q_start, _ = documents.starts()
    assert q_start.tolist() == [0, 3, 4] and documents == maskc.Documents(lengths=[3, 1], inner=maskc.Causal())
    with pytest.raises(ValueError):
        q_start[0] = 1  # shared by every caller: read-only
    moved = documents.model_copy(update={"lengths": (2, 2), "q_start": 1})
    assert moved.starts()[0].tolist() == [1, 3, 5]
    assert hash(moved) == hash(maskc.Documents(lengths=[2, 2], inner=maskc.Causal(), q_start=1))
    assert pickle.loads(pickle.dumps(documents)) == documents
    assert "_hash" not in documents.model_dump()
    assert "_starts" not in maskc.Spec(q_len=4, kv_len=4, mask=documents).dumps()


def test_nodes_and_specs_are_immutable():
    causal = maskc.Causal()
    with pytest.raises(Exception):
        causal.offset = 3
    dense = maskc.Dense(values=np.eye(2, dtype=bool))
    with pytest.raises(ValueError):
        dense.values.array[0, 0] = False
    spec = maskc.Spec(q_len=2, kv_len=2, mask=dense)
    with pytest.raises(Exception):
        spec.q_len = 3


# -- bad specs: SpecError naming the field path ---------------------------------------------------------

BAD_SPECS = [  # (what, how to build it, the path the error must name)
    ("negative q_len", lambda: maskc.Spec(q_len=-1, kv_len=4, mask=maskc.Full()), "q_len"),
    ("zero kv_len", lambda: maskc.Spec(q_len=4, kv_len=0, mask=maskc.Full()), "kv_len"),
    ("zero chunk", lambda: maskc.Chunked(size=0), "Chunked.size"),
    ("negative prefix", lambda: maskc.Prefix(length=-1), "Prefix.length"),
    ("negative window", lambda: maskc.SlidingWindow(left=-1), "SlidingWindow.left"),
    ("negative document", lambda: maskc.Documents(lengths=[3, -1]), "Documents.lengths[1]"),
    ("kv_lengths count", lambda: maskc.Documents(lengths=[3, 1], kv_lengths=[4]), "Documents"),
    ("unknown align", lambda: maskc.Causal(align="middle"), "Causal.align"),
    ("reversed range", lambda: maskc.Range(q=(3, 2), kv=(0, 1)), "Range"),
    ("documents past the queries",
     lambda: maskc.Spec(q_len=4, kv_len=4, mask=maskc.Causal() & maskc.Documents(lengths=[3, 2])),
     "mask.of[1].lengths"),
    ("documents past the keys",
     lambda: maskc.Spec(q_len=4, kv_len=4, mask=maskc.Documents(lengths=[3, 1], kv_lengths=[4, 1])), "mask.kv_lengths"),
    ("nested documents past their document",
     lambda: maskc.Spec(q_len=8, kv_len=8, mask=maskc.Documents(lengths=[4, 4], inner=maskc.Documents(lengths=[3, 2]))),
     "mask.inner.lengths"),
    ("documents starting past the scope",
     lambda: maskc.Spec(q_len=4, kv_len=4, mask=maskc.Documents(lengths=[2], q_start=3)), "mask.lengths"),
    ("range past the keys",
     lambda: maskc.Spec(q_len=4, kv_len=4, mask=[maskc.Full(), maskc.Range(q=(0, 2), kv=(1, 5))]), "mask[1].kv"),
    ("range past the queries", lambda: maskc.Spec(q_len=4, kv_len=4, mask=~maskc.Range(q=(0, 5), kv=(0, 1))),
     "mask.of.q"),
    ("dense of the wrong shape",
     lambda: maskc.Spec(q_len=4, kv_len=4, mask=maskc.Dense(values=np.ones((4, 3), dtype=bool))), "mask.values"),
    ("dense of one dimension", lambda: maskc.Dense(values=[1, 0]), "Dense.values"),
    ("dense not boolean", lambda: maskc.Dense(values=[[2, 0]]), "Dense.values"),
    ("no heads", lambda: maskc.Spec(q_len=4, kv_len=4, mask=[]), "mask"),
]

BAD_TEXTS = [  # (what, YAML or JSON text, the path the error must name)
    ("negative q_len", "q_len: -3\nkv_len: 4\nmask: {kind: full}", "q_len"),
    ("q_len not a number", "q_len: many\nkv_len: 4\nmask: {kind: full}", "q_len"),
    ("zero chunk", "q_len: 4\nkv_len: 4\nmask: {kind: or, of: [{kind: full}, {kind: chunked, size: 0}]}",
     "mask.of[1].size"),
    ("negative document", "q_len: 4\nkv_len: 4\nmask: {kind: and, of: [{kind: documents, lengths: [1, -2]}]}",
     "mask.of[0].lengths[1]"),
    ("documents past the scope",
     "q_len: 4\nkv_len: 4\nmask: {kind: and, of: [{kind: causal}, {kind: documents, lengths: [3, 2]}]}",
     "mask.of[1].lengths"),
    ("range outside the scope", "q_len: 4\nkv_len: 4\nmask: [{kind: causal}, {kind: range, q: [0, 5], kv: [0, 1]}]",
     "mask[1].q"),
    ("dense of the wrong shape", "q_len: 2\nkv_len: 2\nmask: {kind: not, of: {kind: dense, values: [[1, 0]]}}",
     "mask.of.values"),
    ("unknown kind", "q_len: 4\nkv_len: 4\nmask: {kind: and, of: [{kind: causal}, {kind: diagonal}]}",
     "mask.of[1].kind"),
    ("missing kind", "q_len: 4\nkv_len: 4\nmask: {kind: not, of: {offset: 1}}", "mask.of"),
    ("unknown field", "q_len: 4\nkv_len: 4\nmask: {kind: causal, offest: 1}", "mask.offest"),
    ("missing mask", "q_len: 4\nkv_len: 4", "mask"),
    ("unknown kind in JSON", '{"q_len": 4, "kv_len": 4, "mask": {"kind": "causl"}}', "mask.kind"),
]

UNREADABLE_TEXTS = [  # (what, text, words the message must hold)
    ("malformed YAML", "q_len: 4\nkv_len: [4\nmask: {kind: full}", "malformed YAML at line 3"),
    ("malformed JSON", '{"q_len": 4, "kv_len": 4, "mask": {"kind": "full"}', "malformed YAML"),
    ("a python object tag", "q_len: 4\nkv_len: 4\nmask: !!python/object/apply:os.system ['echo hi']",
     "python/object/apply"),
    ("a python name tag", "q_len: 4\nkv_len: 4\nmask: !!python/name:maskc.Full", "python/name"),
    ("not a mapping", "- 1\n- 2", "must be a mapping"),
    ("an empty file", "", "must be a mapping"),
]


@pytest.mark.parametrize("build, path", [case[1:] for case in BAD_SPECS], ids=[case[0] for case in BAD_SPECS])
def test_bad_python_spec_raises_spec_error_naming_the_field(build, path):
    with pytest.raises(maskc.SpecError) as caught:
        build()
    assert isinstance(caught.value, ValueError)
    assert caught.value.path == path
    assert str(caught.value).startswith(f"{path}: ")


@pytest.mark.parametrize("text, path", [case[1:] for case in BAD_TEXTS], ids=[case[0] for case in BAD_TEXTS])
def test_bad_spec_text_raises_spec_error_naming_the_field(text, path):
    with pytest.raises(maskc.SpecError) as caught:
        maskc.loads(text)
    assert caught.value.path == path
    assert str(caught.value).startswith(f"{path}: ")


@pytest.mark.parametrize("text, words", [case[1:] for case in UNREADABLE_TEXTS],
                         ids=[case[0] for case in UNREADABLE_TEXTS])
def test_unreadable_text_raises_spec_error_and_builds_no_object(text, words):
    with pytest.raises(maskc.SpecError, match=words):
        maskc.loads(text)


def test_unknown_kind_error_lists_the_known_kinds():
    with pytest.raises(maskc.SpecError, match="unknown kind 'causl'.*sliding_window"):
        maskc.loads('{"q_len": 4, "kv_len": 4, "mask": {"kind": "causl"}}')


def test_predicate_refuses_to_be_written_as_text():
    spec = maskc.Spec(q_len=4, kv_len=4, mask=[maskc.Full(), maskc.Causal() & maskc.Predicate(fn=lambda i, j: i > j)])
    for fmt in ("yaml", "json"):
        with pytest.raises(maskc.SpecError, match="Predicate") as caught:
            spec.dumps(fmt)
        assert caught.value.path == "mask[1]"
    with pytest.raises(maskc.SpecError):
        maskc.loads("q_len: 4\nkv_len: 4\nmask: {kind: predicate, fn: 'lambda i, j: i > j'}")


def test_dense_node_too_large_refuses(monkeypatch):
    monkeypatch.setattr(nodes, "MAX_DENSE_ELEMENTS", 100)
    maskc.Dense(values=np.ones((10, 10), dtype=bool))
    with pytest.raises(maskc.SpecError, match="MAX_DENSE_ELEMENTS") as caught:
        maskc.Dense(values=np.ones((10, 11), dtype=bool))
    assert caught.value.path == "Dense.values"


def test_dense_call_refuses_past_the_size_limit():
    cm = maskc.compile(maskc.Spec(q_len=1 << 20, kv_len=1 << 20, mask=maskc.Causal()), 1024)
    with pytest.raises(ValueError, match="dense\\(\\) would hold"):
        cm.dense()


# -- bad tensor arguments: ValueError / TypeError naming the argument ---------------------------------------


@pytest.fixture(scope="module")
def op():
    return maskc.compile(maskc.Spec(q_len=8, kv_len=6, mask=maskc.Causal(align="bottom_right")), 4)


def qkv(hq=4, hkv=2, q_len=8, kv_len=6, d=16):
    return torch.randn(1, hq, q_len, d), torch.randn(1, hkv, kv_len, d), torch.randn(1, hkv, kv_len, d)


BAD_ARGUMENTS = [  # (what, call on (op, q, k, v), error type, words the message must hold)
    ("q not 4-D", lambda op, q, k, v: op(q[0], k, v), ValueError, "q must be 4-D"),
    ("q not a tensor", lambda op, q, k, v: op(q.tolist(), k, v), TypeError, "q must be a torch.Tensor"),
    ("k not 4-D", lambda op, q, k, v: op(q, k[0], v), ValueError, "k must be 4-D"),
    ("q_len mismatch", lambda op, q, k, v: op(q[:, :, :7], k, v), ValueError, "q has 7 queries"),
    ("kv_len mismatch in k", lambda op, q, k, v: op(q, k[:, :, :5], v), ValueError, "k has 5 keys"),
    ("kv_len mismatch in v", lambda op, q, k, v: op(q, k, v[:, :, :5]), ValueError, "v has 5 keys"),
    ("integer dtype", lambda op, q, k, v: op(q.int(), k.int(), v.int()), TypeError, "q.dtype=torch.int32"),
    ("mixed dtypes", lambda op, q, k, v: op(q, k.double(), v), TypeError, "q, k, v must share a dtype"),
    ("mixed devices", lambda op, q, k, v: op(q, k.to("meta"), v), ValueError, "one device"),
    ("heads not a multiple", lambda op, q, k, v: op(q[:, :3], k, v), ValueError, "q's 3 heads"),
    ("k and v heads differ", lambda op, q, k, v: op(q, k, v[:, :1]), ValueError, "k and v"),
    ("batch differs", lambda op, q, k, v: op(q, k.expand(2, -1, -1, -1), v), ValueError, "batch"),
    ("head_dim differs", lambda op, q, k, v: op(q, k[..., :8], v), ValueError, "head_dim"),
    ("scale not finite", lambda op, q, k, v: op(q, k, v, scale=float("nan")), TypeError, "scale"),
    ("scale not a number", lambda op, q, k, v: op(q, k, v, scale="1"), TypeError, "scale"),
    ("unknown backend", lambda op, q, k, v: op(q, k, v, backend="cuda"), ValueError, "backend"),
]


@pytest.mark.parametrize("call, error, words", [case[1:] for case in BAD_ARGUMENTS],
                         ids=[case[0] for case in BAD_ARGUMENTS])
def test_bad_tensor_argument_raises_naming_the_argument(op, call, error, words):
    with pytest.raises(error, match=words.replace("(", "\\(")):
        call(op, *qkv())


def test_per_head_mask_count_must_match_the_query_heads():
    cm = maskc.compile(maskc.Spec(q_len=8, kv_len=6, mask=[maskc.Full()] * 3), 4)
    with pytest.raises(ValueError, match="3 per-head masks but q has 4 heads"):
        cm(*qkv(hq=4))


def test_compile_refuses_what_is_not_a_spec():
    with pytest.raises(TypeError, match="maskc.Spec"):
        maskc.compile({"q_len": 4, "kv_len": 4, "mask": {"kind": "full"}})
    with pytest.raises(maskc.SpecError, match="q_len"):
        maskc.compile("q_len: 0\nkv_len: 4\nmask: {kind: full}")
