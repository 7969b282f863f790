"""The user guide runs: every code block in ``docs/*.md``, its pictures, and the committed schema.

* ```` ```python ```` blocks of one page run in order in one namespace;
* ```` ```yaml ```` blocks are specs and load with ``maskc.loads``;
* ```` ```console ```` blocks: each ``$ maskc ...`` line runs through the CLI,
  and the lines shown after it must be its output (a ``--png`` goes to a
  temporary file, so the committed picture is not rewritten);
* every picture a page shows is committed, small, and has the command that
  renders it on the page;
* ``schema/maskc-spec.schema.json`` is what ``maskc schema`` prints, and the
  spec files in the repo validate against it.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import types
from pathlib import Path

import pytest
import yaml

import maskc
from maskc.cli import main

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md"))
SCHEMA = ROOT / "schema" / "maskc-spec.schema.json"
SCHEMA_LINE = "# yaml-language-server: $schema=../schema/maskc-spec.schema.json"
SPEC_FILES = sorted((ROOT / "examples").glob("*.yaml")) + sorted((ROOT / "docs" / "specs").glob("*.yaml"))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
MAX_PICTURE_BYTES = 100_000


def blocks(page: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(page.read_text()) if lang == language]


def cases(language: str):
    return [pytest.param(page, n, id=f"{page.name}-{n}")
            for page in PAGES for n in range(len(blocks(page, language)))]


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # the pages refer to files as docs/specs/..., examples/...


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p, "python")], ids=lambda p: p.name)
def test_python_blocks_run(page, in_repo, monkeypatch):
    # a real module, because torch.compile (inside flex_attention) looks functions' globals up by module name
    module = types.ModuleType(f"maskc_docs_{page.stem}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for n, code in enumerate(blocks(page, "python")):
        exec(compile(code, f"{page.name}, python block {n}", "exec"), module.__dict__)


@pytest.mark.parametrize("page, n", cases("yaml"))
def test_yaml_blocks_are_specs(page, n):
    text = blocks(page, "yaml")[n]
    assert isinstance(maskc.loads(text), maskc.Spec)
    validator().validate(yaml.safe_load(text))


def commands(body: str) -> list[tuple[list[str], str]]:
    """``$ maskc ...`` lines of a console block, each with the output shown under it."""
    out: list[tuple[list[str], str]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            argv = shlex.split(line[2:])
            assert argv[0] == "maskc", f"only maskc commands run in the docs: {line!r}"
            out.append((argv[1:], ""))
        else:
            assert out, f"output before any command: {line!r}"
            out[-1] = (out[-1][0], out[-1][1] + line + "\n")
    return out


@pytest.mark.parametrize("page, n", cases("console"))
def test_console_blocks_print_what_they_show(page, n, in_repo, capsys, tmp_path):
    for argv, shown in commands(blocks(page, "console")[n]):
        if "--png" in argv:
            at = argv.index("--png") + 1
            picture, argv[at] = argv[at], str(tmp_path / "picture.png")
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 0, err
        if "--png" in argv:
            assert (tmp_path / "picture.png").read_bytes().startswith(b"\x89PNG")
            out = out.replace(argv[at], picture)
        if shown:
            assert out == shown


def test_pictures_are_committed_small_and_reproducible():
    shown, rendered = set(), set()
    for page in PAGES:
        text = page.read_text()
        shown |= {(page.parent / p).resolve() for p in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)}
        for body in blocks(page, "console"):
            for argv, _ in commands(body):
                if "--png" in argv:
                    rendered.add((ROOT / argv[argv.index("--png") + 1]).resolve())
    committed = {p.resolve() for p in (ROOT / "docs" / "img").glob("*.png")}
    assert shown, "the guide shows no pictures"
    assert shown == committed, "a picture is shown but not committed, or committed but not shown"
    assert shown <= rendered, "every picture needs the command that renders it on its page"
    for path in committed:
        assert path.read_bytes().startswith(b"\x89PNG")
        assert path.stat().st_size < MAX_PICTURE_BYTES, f"{path.name} is {path.stat().st_size} bytes"


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_local_links_resolve():
    for page in PAGES:
        for target, anchor in re.findall(r"\]\(([^)#:]*)(?:#([^)]*))?\)", page.read_text()):
            linked = (page.parent / target) if target else page
            assert linked.exists(), f"{page.name} links to missing {target}"
            if anchor:
                assert anchor in anchors(linked), f"{page.name} links to missing #{anchor} in {linked.name}"


# -- the JSON Schema of spec files ---------------------------------------------------------


def validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_committed_schema_is_what_maskc_schema_prints(capsys):
    assert json.loads(SCHEMA.read_text()) == maskc.json_schema()
    assert main(["schema"]) == 0
    assert capsys.readouterr().out == SCHEMA.read_text(), "regenerate: maskc schema > schema/maskc-spec.schema.json"


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_spec_files_name_the_schema_and_validate(path):
    text = path.read_text()
    relative = Path("..") if path.parent.parent == ROOT else Path("..", "..")
    assert text.splitlines()[0] == SCHEMA_LINE.replace("../", f"{relative.as_posix()}/", 1)
    assert (path.parent / relative / "schema" / SCHEMA.name).resolve() == SCHEMA
    maskc.loads(text)
    validator().validate(yaml.safe_load(text))


@pytest.mark.parametrize("mask", [
    {"kind": "causl"},
    {"kind": "causal", "ofset": 1},
    {"kind": "documents", "lengths": [3, -1]},
    {"kind": "and", "of": [{"kind": "prefix"}]},
])
def test_schema_rejects_what_maskc_rejects(mask):
    schema = validator()
    data = {"q_len": 8, "kv_len": 8, "mask": mask}
    with pytest.raises(maskc.SpecError):
        maskc.loads(json.dumps(data))
    assert not schema.is_valid(data)
