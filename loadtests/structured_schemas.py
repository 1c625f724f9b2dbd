"""The validity suite of loadtests/bench_structured.py: 30 JSON Schemas, easiest first.

Each :class:`Case` says whether the embedded engine should accept it (``refuse=False``) or
answer 400; lengths and item counts are bounded so that answers end well within 256 tokens.
The last six are meant to be refused: nesting past 24 levels, over 64 KiB, a ``$ref`` to
nothing, and what llguidance cannot enforce under ``strict: true`` (``not``,
``uniqueItems``, a ``oneOf`` whose branches overlap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Schema = dict[str, Any]


@dataclass(frozen=True)
class Case:
    name: str
    schema: Schema
    refuse: bool = False


def _obj(properties: Schema, required: list[str] | None = None) -> Schema:
    """A closed object; every property required unless ``required`` says otherwise."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


def _name(n: int = 16) -> Schema:
    return {"type": "string", "maxLength": n}


def _nested(levels: int) -> Schema:
    """``levels`` objects inside one another; each level adds 2 to the schema's depth."""
    node: Schema = _obj({"leaf": {"type": "integer", "minimum": 0, "maximum": 9}})
    for _ in range(levels - 1):
        node = _obj({"child": node})
    return node


_TREE: Schema = {
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "label": _name(8),
                "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2},
            },
            "required": ["label"],
            "additionalProperties": False,
        }
    },
    "$ref": "#/$defs/node",
}

_ADDRESS: Schema = _obj({"street": _name(24), "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})

CASES: list[Case] = [
    Case("flat_string", _obj({"name": _name()})),
    Case(
        "flat_mixed",
        _obj(
            {
                "name": _name(),
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "active": {"type": "boolean"},
            }
        ),
    ),
    Case("string_lengths", _obj({"code": {"type": "string", "minLength": 4, "maxLength": 8}})),
    Case(
        "integer_bounds",
        _obj(
            {
                "small": {"type": "integer", "minimum": -5, "maximum": 5},
                "big": {"type": "integer", "minimum": 1000, "maximum": 1999},
                "excl": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
            }
        ),
    ),
    Case(
        "number_bounds",
        _obj(
            {
                "ratio": {"type": "number", "minimum": 0, "maximum": 1},
                "temp": {"type": "number", "minimum": -40.5, "maximum": 60.5},
            }
        ),
    ),
    Case("enum_strings", _obj({"colour": {"enum": ["red", "green", "blue"]}})),
    Case("enum_mixed", _obj({"value": {"enum": [1, "two", None, True, 3.5]}})),
    Case("const", _obj({"version": {"const": "v1"}, "kind": {"const": 7}, "name": _name()})),
    Case(
        "nullable_type",
        _obj(
            {
                "nickname": {"type": ["string", "null"], "maxLength": 12},
                "score": {"type": ["integer", "null"], "minimum": 0, "maximum": 100},
            }
        ),
    ),
    Case(
        "required_subset",
        _obj(
            {
                "a": _name(8),
                "b": {"type": "integer", "minimum": 0, "maximum": 9},
                "c": {"type": "boolean"},
                "d": _name(8),
            },
            required=["a", "c"],
        ),
    ),
    Case(
        "array_min_max",
        _obj(
            {
                "ids": {
                    "type": "array",
                    "minItems": 2,
                    "maxItems": 4,
                    "items": {"type": "integer", "minimum": 0, "maximum": 99},
                }
            }
        ),
    ),
    Case(
        "array_of_objects",
        _obj(
            {
                "people": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 3,
                    "items": _obj(
                        {"name": _name(12), "age": {"type": "integer", "minimum": 0, "maximum": 99}}
                    ),
                }
            }
        ),
    ),
    Case(
        "tuple_prefix_items",
        _obj(
            {
                "point": {
                    "type": "array",
                    "prefixItems": [
                        _name(8),
                        {"type": "integer", "minimum": 0, "maximum": 9},
                        {"type": "boolean"},
                    ],
                    "items": False,
                    "minItems": 3,
                }
            }
        ),
    ),
    Case("nested_2", _obj({"owner": _obj({"name": _name(), "address": _ADDRESS})})),
    Case("nested_6", _nested(6)),
    Case(
        "any_of_objects",
        _obj(
            {
                "shape": {
                    "anyOf": [
                        _obj(
                            {
                                "kind": {"const": "circle"},
                                "r": {"type": "integer", "minimum": 1, "maximum": 9},
                            }
                        ),
                        _obj(
                            {
                                "kind": {"const": "rect"},
                                "w": {"type": "integer", "minimum": 1, "maximum": 9},
                                "h": {"type": "integer", "minimum": 1, "maximum": 9},
                            }
                        ),
                    ]
                }
            }
        ),
    ),
    Case(
        "nullable_any_of",
        _obj(
            {
                "parent": {
                    "anyOf": [{"type": "integer", "minimum": 0, "maximum": 999}, {"type": "null"}]
                }
            }
        ),
    ),
    Case(
        "one_of_disjoint",
        _obj(
            {
                "id": {
                    "oneOf": [
                        {"type": "integer", "minimum": 0, "maximum": 999},
                        {"type": "string", "pattern": "^[a-z]{3}$"},
                    ]
                }
            }
        ),
    ),
    Case(
        "all_of",
        {
            "allOf": [
                _obj(
                    {"a": _name(8), "b": {"type": "integer", "minimum": 0, "maximum": 9}},
                    required=["a"],
                ),
                {"required": ["b"]},
            ]
        },
    ),
    Case(
        "ref_defs",
        {
            "$defs": {"address": _ADDRESS},
            **_obj({"home": {"$ref": "#/$defs/address"}, "work": {"$ref": "#/$defs/address"}}),
        },
    ),
    Case("string_pattern", _obj({"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}})),
    Case(
        "string_formats",
        _obj(
            {
                "day": {"type": "string", "format": "date"},
                "mail": {"type": "string", "format": "email", "maxLength": 32},
                "id": {"type": "string", "format": "uuid"},
                "ip": {"type": "string", "format": "ipv4"},
            }
        ),
    ),
    Case(
        "additional_properties_map",
        {
            "type": "object",
            "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 9},
            "maxProperties": 3,
        },
    ),
    Case("recursive_tree", _TREE),
    # Meant to be refused.
    Case("nested_15_over_depth_24", _nested(15), refuse=True),
    Case(
        "enum_over_64_kib",
        _obj({"pick": {"enum": [f"item-{i:05d}-padding" for i in range(4000)]}}),
        refuse=True,
    ),
    Case("ref_to_nothing", _obj({"a": {"$ref": "#/$defs/missing"}}), refuse=True),
    Case("not_keyword", _obj({"a": {"type": "integer", "not": {"const": 3}}}), refuse=True),
    Case(
        "unique_items",
        _obj({"tags": {"type": "array", "items": _name(8), "maxItems": 4, "uniqueItems": True}}),
        refuse=True,
    ),
    # Overlapping branches (5 is both a number and an integer, which oneOf forbids): llguidance
    # enforces oneOf only when its branches cannot both match.
    Case(
        "one_of_overlapping",
        _obj(
            {
                "x": {
                    "oneOf": [
                        {"type": "number", "minimum": 0, "maximum": 9},
                        {"type": "integer", "minimum": 0, "maximum": 9},
                    ]
                }
            }
        ),
        refuse=True,
    ),
]
