"""The ``maskc`` command and the example specs it is pointed at in the README."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import maskc
from maskc.cli import main

EXAMPLES = sorted(Path(__file__).parent.parent.joinpath("examples").glob("*.yaml"))


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_demo_checks_the_merged_split(capsys):
    code, out, _ = run(capsys, "demo")
    assert code == 0
    assert "merged 9 tiles vs unsplit attention" in out and "NaN: False" in out


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_spec_compiles_and_shows(capsys, path, tmp_path):
    code, out, err = run(capsys, "show", path, "--block-size", "64", "--png", tmp_path / "map.png")
    assert code == 0, err
    assert "tiles:" in out and "empty rows" in out
    assert (tmp_path / "map.png").read_bytes().startswith(b"\x89PNG")


def test_show_reports_padding_as_empty_rows_and_cols(capsys):
    code, out, _ = run(capsys, "show", Path(__file__).parent.parent / "examples/packed_document_causal.yaml")
    assert code == 0
    assert "empty rows (queries attending nothing): 8000-8191 (192 positions)" in out
    assert "empty cols (keys nobody attends): 8000-8191 (192 positions)" in out


def test_partition_prints_every_tile(capsys):
    spec = Path(__file__).parent.parent / "examples/document_causal_3x3.yaml"
    code, out, _ = run(capsys, "partition", spec, "--q-splits", "3", "--kv-splits", "4,4,4", "--block-size", "2")
    assert code == 0
    assert out.count("== tile") == 9
    assert "empty rows (queries attending nothing): 1-3 (3 positions)" in out


def test_schema_is_the_json_schema(capsys):
    code, out, _ = run(capsys, "schema")
    assert code == 0 and json.loads(out) == maskc.json_schema()


@pytest.mark.parametrize("text, message", [
    ("q_len: 4\nkv_len: 4\nmask: {kind: range, q: [0, 9], kv: [0, 1]}", "mask.q: range (0, 9) lies outside"),
    ("q_len: 4\nkv_len: 4\nmask: {kind: windowed}", "mask.kind: unknown kind 'windowed'"),
    ("q_len: 4\nkv_len: [4\n", "malformed YAML at line 3"),
])
def test_bad_specs_print_one_line_and_exit_2(capsys, tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, out, err = run(capsys, "show", path)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err


def test_missing_file_is_a_clear_error(capsys, tmp_path):
    code, _, err = run(capsys, "show", tmp_path / "nope.yaml")
    assert code == 2 and "cannot read" in err and "No such file" in err


PER_HEAD = "q_len: 16\nkv_len: 16\nmask: [" + ", ".join(["{kind: causal}", "{kind: sliding_window, left: 3}"] * 4) + "]"

USAGE_ERRORS = [  # (the user's exact arguments, words of the one line; PER_HEAD: a spec of 8 head masks)
    (["show", "docs/specs/document_causal.yaml", "--head", "3"],
     "argument --head: 3 is not a mask head of this spec; allowed: 0 (one mask for every head)"),
    (["show", "PER_HEAD", "--head", "8"], "allowed: 0 to 7 (one mask per head)"),
    (["show", "docs/specs/document_causal.yaml", "--head", "-1"],
     "argument --head: must be an integer >= 0, got '-1'"),
    (["show", "docs/specs/document_causal.yaml", "--width", "0"], "argument --width: must be an integer >= 1, got '0'"),
    (["show", "docs/specs/document_causal.yaml", "--block-size", "0,4"],
     "argument --block-size: must be N or Q,KV with integers >= 1, got '0,4'"),
    (["partition", "docs/specs/document_causal.yaml", "--q-splits", "3", "--kv-splits", "3", "--width", "-2"],
     "argument --width: must be an integer >= 1"),
    (["plan", "docs/specs/document_causal.yaml", "--world-size", "0"],
     "argument --world-size: must be an integer >= 1"),
    (["plan", "docs/specs/document_causal.yaml", "--world-size", "2", "--dtype", "int4"],
     "argument --dtype: invalid choice: 'int4' (choose from 'float32', 'bfloat16', 'float16', 'float8')"),
    (["plan", "docs/specs/document_causal.yaml", "--world-size", "2", "--head-dim", "x"],
     "argument --head-dim: must be an integer >= 1, got 'x'"),
]


@pytest.mark.parametrize("argv, words", USAGE_ERRORS)
def test_usage_errors_print_one_line_saying_what_is_allowed_and_exit_2(capsys, monkeypatch, tmp_path, argv, words):
    monkeypatch.chdir(Path(__file__).parent.parent)
    (tmp_path / "per_head.yaml").write_text(PER_HEAD)
    code, out, err = run(capsys, *[tmp_path / "per_head.yaml" if a == "PER_HEAD" else a for a in argv])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and words in err and "--help" in err


def test_head_picks_one_head_of_a_per_head_mask(capsys, tmp_path):
    (tmp_path / "per_head.yaml").write_text(PER_HEAD)
    code, out, _ = run(capsys, "show", tmp_path / "per_head.yaml", "--head", "7", "--width", "1")
    assert code == 0 and out.count("maskc block map") == 1 and "head 7 of 8" in out


def test_every_argument_has_help():
    from maskc.cli import build_parser

    parser = build_parser()
    for command in parser._subparsers._group_actions[0].choices.values():
        for action in command._actions:
            assert action.help, f"{command.prog} {action.dest} has no help"


def test_plan_counts_bytes_for_the_kv_heads_head_dim_and_dtype_given(capsys, tmp_path):
    spec = Path(__file__).parent.parent / "examples/document_causal_3x3.yaml"
    code, out, _ = run(capsys, "plan", spec, "--world-size", "3", "--kv-heads", "2", "--head-dim", "64",
                       "--dtype", "float32", "--png", tmp_path / "plan.png")
    assert code == 0
    assert "bytes per token: K+V 1024, dK+dV 1024 (2 KV heads x 64, 4-byte K/V;" in out
    assert (tmp_path / "plan.png").read_bytes().startswith(b"\x89PNG")
