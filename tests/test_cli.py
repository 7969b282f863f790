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
