"""What a mask *is*: the node vocabulary, ``Spec``, and their YAML/JSON form."""

from .nodes import (
    MAX_DENSE_ELEMENTS,
    MAX_POSITIONS,
    And,
    Causal,
    Chunked,
    Dense,
    Documents,
    Empty,
    Full,
    Mask,
    Not,
    Or,
    Predicate,
    Prefix,
    Range,
    SlidingWindow,
    is_opaque,
    walk,
)
from .spec import Spec, json_schema, load, loads

__all__ = [
    "MAX_DENSE_ELEMENTS", "MAX_POSITIONS", "And", "Causal", "Chunked", "Dense", "Documents", "Empty", "Full",
    "Mask", "Not", "Or", "Predicate", "Prefix", "Range", "SlidingWindow", "Spec", "is_opaque", "json_schema",
    "load", "loads", "walk",
]
