"""The errors maskc raises on purpose. They are part of the public API."""

from __future__ import annotations

from typing import Iterable

from pydantic import BaseModel, ValidationError


class SpecError(ValueError):
    """A mask specification is malformed.

    ``path`` is the dotted field path of the offending value, for example
    ``mask.of[0].lengths[2]``; the message starts with it.
    """

    def __init__(self, path: str, message: str):
        self.path = path
        self.reason = message
        super().__init__(f"{path}: {message}" if path else message)


def join_path(*parts: str | int) -> str:
    """``join_path("mask", "of", 0, "lengths")`` -> ``"mask.of[0].lengths"``."""
    out = ""
    for part in parts:
        if part == "":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif out:
            out += f".{part}"
        else:
            out = str(part)
    return out


class TranslatingMeta(type(BaseModel)):
    """Metaclass of maskc's models: a direct Python construction with bad values
    raises ``SpecError`` naming the field (``Causal.align: ...``) instead of
    pydantic's ``ValidationError``. Nested validation inside pydantic does not go
    through here, so paths are reported once, from the outermost model."""

    def __call__(cls, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as error:
            prefix = () if getattr(cls, "_path_is_root", False) else (cls.__name__,)
            raise from_pydantic(error, prefix) from None


def from_pydantic(error, prefix: Iterable[str | int] = ()) -> SpecError:
    """The first problem of a pydantic ``ValidationError`` as a ``SpecError``.

    Pydantic's locations include the tag of a discriminated union (``causal``
    in ``of.0.causal.offset``); those tags are dropped from the path because
    the user wrote ``kind: causal``, not a field named ``causal``.
    """
    from .ir.nodes import NODE_KINDS

    first = error.errors()[0]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, SpecError):  # raised by a scope check with its own full path
        return SpecError(join_path(*prefix, cause.path), cause.reason)
    loc = []
    for item in first["loc"]:
        if isinstance(item, str) and item in NODE_KINDS and loc and loc[-1] != "kind":
            continue
        if item in ("shared", "per_head") or (isinstance(item, str) and item.startswith("function-")):
            continue
        loc.append(item)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "union_tag_invalid":
        message = f"unknown kind {first['input'].get('kind')!r}; expected one of {sorted(NODE_KINDS)}"
        loc.append("kind")
    elif first["type"] == "union_tag_not_found":
        message = "a mask node needs a 'kind' field"
    elif first["type"] == "extra_forbidden":
        message = "unknown field"
    return SpecError(join_path(*prefix, *loc), message)
