"""The errors maskc raises on purpose. They are part of the public API."""

from __future__ import annotations

import difflib
import reprlib
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
            raise from_pydantic(error, cls, prefix) from None


def _closest(name, known: Iterable[str]) -> str | None:
    """The known name that ``name`` is most likely a misspelling of, if any is close."""
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.75)
    return close[0] if close else None


def _unknown(what: str, name, known: Iterable[str]) -> str:
    """``unknown field 'kvlen': did you mean 'kv_len'? (fields: q_len, kv_len, mask)``;
    the guess is left out when no known name is close."""
    known = list(known)
    close = _closest(name, known)
    guess = f": did you mean {close!r}?" if close else ""
    return f"unknown {what} {reprlib.repr(name)}{guess} ({what}s: {', '.join(known)})"


def from_pydantic(error, model: type[BaseModel], prefix: Iterable[str | int] = ()) -> SpecError:
    """The first problem of a pydantic ``ValidationError`` of ``model`` as a ``SpecError``.

    An unknown field is reported before any other problem, with the field it is
    closest to, because a misspelt field also makes the field meant look
    missing (``kvlen: 12`` is a missing ``kv_len`` too).

    Pydantic's locations include the tag of a discriminated union (``causal``
    in ``of.0.causal.offset``); those tags are dropped from the path because
    the user wrote ``kind: causal``, not a field named ``causal``.
    """
    from .ir.nodes import NODE_KINDS

    problems = error.errors()
    first = next((p for p in problems if p["type"] == "extra_forbidden"), problems[0])
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, SpecError):  # raised by a scope check with its own full path
        return SpecError(join_path(*prefix, cause.path), cause.reason)
    key = first["loc"][-1] if first["type"] in ("extra_forbidden", "invalid_key") else None
    loc = []
    for item in first["loc"][:-1] if key is not None else first["loc"]:
        if isinstance(item, str) and item in NODE_KINDS and loc and loc[-1] != "kind":
            model = NODE_KINDS[item]  # a union's tag: the node whose fields follow
            continue
        if item in ("shared", "per_head") or (isinstance(item, str) and item.startswith("function-")):
            continue
        loc.append(item)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "union_tag_invalid":
        message = _unknown("kind", first["input"].get("kind"), sorted(NODE_KINDS))
        loc.append("kind")
    elif first["type"] == "union_tag_not_found":
        message = "a mask node needs a 'kind' field"
        misspelt = [name for name in first["input"] if _closest(name, ["kind"])]
        if misspelt:
            message += f": did you mean 'kind' instead of {misspelt[0]!r}?"
            loc.append(str(misspelt[0]))
    elif first["type"] == "invalid_key":
        message = f"a field name must be text, got {key!r} ({type(key).__name__})"
        loc.append(str(key))
    elif key is not None:
        message = _unknown("field", key, model.model_fields)
        loc.append(str(key))
    elif first["type"] == "string_unicode" and (not first["loc"] or first["loc"][-1] in NODE_KINDS):
        message = "a field name must be Unicode text"  # a key such as "\ud800", which YAML escapes allow
        loc.append(ascii(first["input"]))
    return SpecError(join_path(*prefix, *loc), message)
