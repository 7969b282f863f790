"""``Spec``: a mask with its sequence lengths, and its YAML/JSON form."""

from __future__ import annotations

import json
import os
import reprlib
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Tag, ValidationError

from ..errors import SpecError, TranslatingMeta, from_pydantic, join_path
from .nodes import MAX_POSITIONS, Mask, MaskNode, Positive, Predicate, walk


def _one_or_per_head(value: Any) -> str:
    return "per_head" if isinstance(value, (list, tuple)) else "shared"


class Spec(BaseModel, metaclass=TranslatingMeta):
    """What may attend to what, for ``q_len`` queries and ``kv_len`` keys.

    ``mask`` is one expression shared by every head, or a list with one
    expression per query head. ``q_len + kv_len`` must be below 2**30 (``MAX_POSITIONS``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    q_len: Positive
    kv_len: Positive
    mask: Annotated[
        Union[Annotated[MaskNode, Tag("shared")], Annotated[tuple[MaskNode, ...], Tag("per_head")]],
        Discriminator(_one_or_per_head),
    ]

    _path_is_root = True

    def model_post_init(self, _context: Any) -> None:
        if self.q_len + self.kv_len >= MAX_POSITIONS:
            field = "q_len" if self.q_len >= self.kv_len else "kv_len"
            raise SpecError(field, f"q_len + kv_len = {self.q_len + self.kv_len} must be below "
                                   f"MAX_POSITIONS = 2**30 = {MAX_POSITIONS}, the positions maskc can index")
        if isinstance(self.mask, tuple) and not self.mask:
            raise SpecError("mask", "a per-head mask list needs at least one head")
        for path, head in self.named_heads():
            head.check_scope(self.q_len, self.kv_len, path)

    @property
    def heads(self) -> tuple[Mask, ...]:
        """The per-head expressions (one entry for a head-shared mask)."""
        return self.mask if isinstance(self.mask, tuple) else (self.mask,)

    def named_heads(self) -> list[tuple[str, Mask]]:
        if isinstance(self.mask, tuple):
            return [(f"mask[{h}]", m) for h, m in enumerate(self.mask)]
        return [("mask", self.mask)]

    # -- text form ---------------------------------------------------------------
    def to_data(self) -> dict:
        """Plain data (dicts and lists) with default fields left out, ready for YAML/JSON."""
        for path, head in self.named_heads():
            for node in walk(head):
                if isinstance(node, Predicate):
                    raise SpecError(path, "a Predicate holds a Python callable and cannot be written to YAML or JSON")
        masks = [mask_to_data(m) for m in self.heads]
        return {"q_len": self.q_len, "kv_len": self.kv_len, "mask": masks if isinstance(self.mask, tuple) else masks[0]}

    def dumps(self, format: str = "yaml") -> str:
        """The spec as YAML (default) or JSON text that ``maskc.loads`` reads back."""
        data = self.to_data()
        if format == "json":
            return json.dumps(data, indent=2)
        if format == "yaml":
            return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
        raise ValueError(f"{format=} must be 'yaml' or 'json'")


def mask_to_data(mask: Mask) -> dict:
    """One node as plain data, defaults omitted except ``kind``."""
    out: dict[str, Any] = {"kind": mask.kind}
    for name, field in type(mask).model_fields.items():
        if name == "kind":
            continue
        value = getattr(mask, name)
        if not field.is_required() and value == field.get_default(call_default_factory=True):
            continue
        if isinstance(value, Mask):
            value = mask_to_data(value)
        elif isinstance(value, tuple) and value and isinstance(value[0], Mask):
            value = [mask_to_data(x) for x in value]
        else:
            value = mask.model_dump(mode="json", include={name})[name]
        out[name] = value
    return out


#: Levels of mappings and lists a spec's text may nest (the top mapping is level 1): far
#: past any mask written by hand (a node is one level, ``and``/``or`` two), and shallow
#: enough that reading and compiling the spec stays inside Python's recursion limit.
MAX_NESTING = 100


def _too_deep(data: Any) -> list | None:
    """The path to the first mapping or list of ``data`` past level ``MAX_NESTING``, if any."""
    stack = [(data, [], 1)]
    while stack:
        value, path, level = stack.pop()
        if level > MAX_NESTING:
            return path
        items = value.items() if isinstance(value, dict) else enumerate(value)
        stack.extend((x, [*path, key], level + 1) for key, x in items if isinstance(x, (dict, list)))
    return None


def _plain_data(text: str) -> Any:
    """The data of JSON or YAML text. JSON is read as JSON (YAML would read the number
    ``1e3`` as a string, and an escaped character past U+FFFF as two halves); YAML only
    through ``yaml.safe_load``."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SpecError("", f"malformed YAML{where}: {problem}") from None


def loads(text: str) -> Spec:
    """A ``Spec`` from YAML or JSON text: plain data only (``_plain_data``), nested at
    most ``MAX_NESTING`` levels deep."""
    try:
        data = _plain_data(text)
    except RecursionError:  # the readers recurse once per level of nesting
        raise SpecError("", f"the text nests deeper than the JSON and YAML readers can follow; a spec may "
                            f"nest {MAX_NESTING} levels") from None
    if isinstance(data, str):
        raise SpecError("", f"a spec must be a mapping with q_len, kv_len and mask, got the string "
                            f"{reprlib.repr(data)}; to read a spec file, pass its path to maskc.load")
    if not isinstance(data, dict):
        raise SpecError("", f"a spec must be a mapping with q_len, kv_len and mask, got {type(data).__name__}")
    deep = _too_deep(data)
    if deep is not None:
        raise SpecError(join_path(*deep), f"nested more than MAX_NESTING = {MAX_NESTING} levels of mappings "
                                          "and lists")
    try:
        return Spec.model_validate(data)
    except ValidationError as error:
        raise from_pydantic(error, Spec) from None


def load(path: str | Path) -> Spec:
    """A ``Spec`` from a YAML or JSON file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise SpecError("", f"cannot read {str(path)!r}: {error.strerror}") from None
    return loads(text)


def read_spec(source: str | Path) -> Spec:
    """A spec from a path or text: a ``Path``, or a ``str`` naming an existing file,
    is read as a spec file (``load``); any other ``str`` is YAML or JSON text (``loads``)."""
    if isinstance(source, Path) or os.path.isfile(source):
        return load(source)
    return loads(source)


def json_schema() -> dict:
    """The JSON Schema of a spec file, for editors that validate YAML."""
    schema = Spec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "maskc spec"
    return schema
