"""A fixed corpus of JSON schemas for constrained decoding: nesting, enums, arrays,
bounded numbers, optional fields, references — each with a prompt that asks for it."""

from __future__ import annotations

_STR = {"type": "string"}
_INT = {"type": "integer"}

SCHEMAS: list[tuple[str, dict]] = [
    (
        "a person",
        {
            "type": "object",
            "properties": {"name": _STR, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
            "required": ["name", "age"],
            "additionalProperties": False,
        },
    ),
    (
        "a colour",
        {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"]},
    ),
    ("a yes or no answer", {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"]}),
    (
        "a temperature",
        {
            "type": "object",
            "properties": {"celsius": {"type": "number", "minimum": -50, "maximum": 60}},
            "required": ["celsius"],
        },
    ),
    (
        "three fruits",
        {
            "type": "object",
            "properties": {"fruits": {"type": "array", "items": _STR, "minItems": 3, "maxItems": 3}},
            "required": ["fruits"],
        },
    ),
    (
        "a city with its country",
        {
            "type": "object",
            "properties": {"city": _STR, "country": _STR},
            "required": ["city", "country"],
            "additionalProperties": False,
        },
    ),
    (
        "a book",
        {
            "type": "object",
            "properties": {
                "title": _STR,
                "author": _STR,
                "year": {"type": "integer", "minimum": 1400, "maximum": 2030},
            },
            "required": ["title", "author", "year"],
        },
    ),
    (
        "a point",
        {
            "type": "object",
            "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
            "required": ["x", "y"],
            "additionalProperties": False,
        },
    ),
    ("a list of numbers", {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 5}),
    ("a single word", {"type": "string", "pattern": "^[a-z]{2,12}$"}),
    ("a rating", {"type": "integer", "minimum": 1, "maximum": 5}),
    (
        "an address",
        {
            "type": "object",
            "properties": {"street": _STR, "city": _STR, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"],
        },
    ),
    (
        "a user with an optional email",
        {
            "type": "object",
            "properties": {"username": {"type": "string", "minLength": 3, "maxLength": 16}, "email": _STR},
            "required": ["username"],
            "additionalProperties": False,
        },
    ),
    (
        "an order",
        {
            "type": "object",
            "properties": {
                "id": _INT,
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"product": _STR, "quantity": {"type": "integer", "minimum": 1, "maximum": 10}},
                        "required": ["product", "quantity"],
                        "additionalProperties": False,
                    },
                    "minItems": 1,
                    "maxItems": 3,
                },
            },
            "required": ["id", "items"],
        },
    ),
    (
        "a weather report",
        {
            "type": "object",
            "properties": {
                "city": _STR,
                "conditions": {"enum": ["sunny", "cloudy", "rainy", "snowy"]},
                "high": {"type": "integer", "minimum": -40, "maximum": 50},
                "low": {"type": "integer", "minimum": -40, "maximum": 50},
            },
            "required": ["city", "conditions", "high", "low"],
        },
    ),
    (
        "a company with its employees",
        {
            "type": "object",
            "properties": {
                "company": _STR,
                "employees": {
                    "type": "array",
                    "maxItems": 2,
                    "items": {
                        "type": "object",
                        "properties": {"name": _STR, "role": {"enum": ["engineer", "manager", "designer"]}},
                        "required": ["name", "role"],
                    },
                },
            },
            "required": ["company", "employees"],
        },
    ),
    (
        "a recipe",
        {
            "type": "object",
            "properties": {
                "name": _STR,
                "minutes": {"type": "integer", "minimum": 1, "maximum": 240},
                "vegetarian": {"type": "boolean"},
                "ingredients": {"type": "array", "items": _STR, "maxItems": 4},
            },
            "required": ["name", "minutes", "vegetarian", "ingredients"],
        },
    ),
    (
        "a date",
        {
            "type": "object",
            "properties": {
                "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                "month": {"type": "integer", "minimum": 1, "maximum": 12},
                "day": {"type": "integer", "minimum": 1, "maximum": 31},
            },
            "required": ["year", "month", "day"],
        },
    ),
    (
        "a sentiment",
        {
            "type": "object",
            "properties": {
                "label": {"enum": ["positive", "negative", "neutral"]},
                "score": {"type": "number", "minimum": 0, "maximum": 1},
            },
            "required": ["label", "score"],
        },
    ),
    (
        "a movie",
        {
            "type": "object",
            "properties": {
                "title": _STR,
                "genres": {
                    "type": "array",
                    "items": {"enum": ["action", "comedy", "drama", "horror"]},
                    "minItems": 1,
                    "maxItems": 2,
                },
            },
            "required": ["title", "genres"],
        },
    ),
    (
        "a nullable nickname",
        {"type": "object", "properties": {"nickname": {"type": ["string", "null"]}}, "required": ["nickname"]},
    ),
    (
        "a shape",
        {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"kind": {"const": "circle"}, "radius": {"type": "number", "minimum": 0}},
                    "required": ["kind", "radius"],
                    "additionalProperties": False,
                },
                {
                    "type": "object",
                    "properties": {"kind": {"const": "square"}, "side": {"type": "number", "minimum": 0}},
                    "required": ["kind", "side"],
                    "additionalProperties": False,
                },
            ]
        },
    ),
    (
        "a tree node",
        {
            "$defs": {"leaf": {"type": "object", "properties": {"value": _INT}, "required": ["value"]}},
            "type": "object",
            "properties": {
                "value": _INT,
                "children": {"type": "array", "items": {"$ref": "#/$defs/leaf"}, "maxItems": 2},
            },
            "required": ["value", "children"],
        },
    ),
    (
        "a product",
        {
            "type": "object",
            "properties": {
                "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                "price": {"type": "number", "minimum": 0, "maximum": 1000},
                "in_stock": {"type": "boolean"},
            },
            "required": ["sku", "price", "in_stock"],
            "additionalProperties": False,
        },
    ),
    (
        "a meeting",
        {
            "type": "object",
            "properties": {
                "title": _STR,
                "attendees": {"type": "array", "items": _STR, "minItems": 1, "maxItems": 3},
                "room": {"type": "integer", "minimum": 100, "maximum": 999},
            },
            "required": ["title", "attendees"],
        },
    ),
    (
        "a key-value setting",
        {
            "type": "object",
            "properties": {"key": {"enum": ["theme", "language", "timezone"]}, "value": _STR},
            "required": ["key", "value"],
        },
    ),
    (
        "an HTTP response",
        {
            "type": "object",
            "properties": {"status": {"enum": [200, 201, 404, 500]}, "ok": {"type": "boolean"}},
            "required": ["status", "ok"],
        },
    ),
    (
        "a student's grades",
        {
            "type": "object",
            "properties": {
                "student": _STR,
                "grades": {
                    "type": "object",
                    "properties": {
                        "math": {"type": "integer", "minimum": 0, "maximum": 100},
                        "english": {"type": "integer", "minimum": 0, "maximum": 100},
                    },
                    "required": ["math", "english"],
                    "additionalProperties": False,
                },
            },
            "required": ["student", "grades"],
        },
    ),
    (
        "a flight",
        {
            "type": "object",
            "properties": {
                "from": {"type": "string", "pattern": "^[A-Z]{3}$"},
                "to": {"type": "string", "pattern": "^[A-Z]{3}$"},
                "stops": {"type": "integer", "minimum": 0, "maximum": 3},
            },
            "required": ["from", "to", "stops"],
        },
    ),
    (
        "a to-do item",
        {
            "type": "object",
            "properties": {
                "task": {"type": "string", "maxLength": 40},
                "priority": {"enum": ["low", "medium", "high"]},
                "done": {"type": "boolean"},
                "due": {"type": "string", "pattern": "^2026-[01][0-9]-[0-3][0-9]$"},
            },
            "required": ["task", "priority", "done"],
            "additionalProperties": False,
        },
    ),
    (
        "a pair of coordinates",
        {
            "type": "array",
            "prefixItems": [
                {"type": "number", "minimum": -90, "maximum": 90},
                {"type": "number", "minimum": -180, "maximum": 180},
            ],
            "items": False,
            "minItems": 2,
        },
    ),
    (
        "an animal",
        {
            "type": "object",
            "properties": {"species": _STR, "legs": {"enum": [0, 2, 4, 6, 8]}, "can_fly": {"type": "boolean"}},
            "required": ["species", "legs", "can_fly"],
        },
    ),
    (
        "a version",
        {
            "type": "object",
            "properties": {
                "major": {"type": "integer", "minimum": 0, "maximum": 99},
                "minor": {"type": "integer", "minimum": 0, "maximum": 99},
                "label": {"type": "string", "enum": ["alpha", "beta", "stable"]},
            },
            "required": ["major", "minor"],
        },
    ),
]
