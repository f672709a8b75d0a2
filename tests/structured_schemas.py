"""The JSON schema suite for structured-output tests and benchmarks: every kind of constraint document
extraction uses (nested objects, bounded arrays, enums, bounded numbers, string patterns, optional fields, $ref).
Strings and arrays are bounded so a short max_tokens always suffices."""

from __future__ import annotations

S = {"type": "string", "maxLength": 12}

SCHEMAS: dict[str, dict] = {
    "flat": {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
             "required": ["name", "age"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
             "additionalProperties": False},
    "bool_null": {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": "null"}},
                  "required": ["ok", "note"], "additionalProperties": False},
    "int_bounds": {"type": "object", "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 5},
                                                    "m": {"type": "integer", "exclusiveMinimum": 10,
                                                          "exclusiveMaximum": 20}},
                   "required": ["n", "m"], "additionalProperties": False},
    "number_bounds": {"type": "object", "properties": {"price": {"type": "number", "minimum": 0, "maximum": 100}},
                      "required": ["price"], "additionalProperties": False},
    "pattern": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                                 "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
                "required": ["zip", "code"], "additionalProperties": False},
    "date_pattern": {"type": "object", "properties": {"date": {"type": "string",
                                                               "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}},
                     "required": ["date"], "additionalProperties": False},
    "array_bounds": {"type": "object", "properties": {"tags": {"type": "array", "items": S, "minItems": 2,
                                                               "maxItems": 3}},
                     "required": ["tags"], "additionalProperties": False},
    "array_enum": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 4},
    "array_of_objects": {"type": "object", "properties": {"items": {
        "type": "array", "minItems": 1, "maxItems": 2,
        "items": {"type": "object", "properties": {"sku": S, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                  "required": ["sku", "qty"], "additionalProperties": False}}},
        "required": ["items"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "person": {"type": "object", "properties": {
            "name": S, "address": {"type": "object", "properties": {"city": S, "country": {"enum": ["FR", "DE", "US"]}},
                                   "required": ["city", "country"], "additionalProperties": False}},
            "required": ["name", "address"], "additionalProperties": False}},
        "required": ["person"], "additionalProperties": False},
    "optional": {"type": "object", "properties": {"title": S, "subtitle": S, "pages": {"type": "integer",
                                                                                    "minimum": 1, "maximum": 999}},
                 "required": ["title"], "additionalProperties": False},
    "ref": {"$defs": {"money": {"type": "object", "properties": {"amount": {"type": "integer", "minimum": 0,
                                                                            "maximum": 10000},
                                                                 "currency": {"enum": ["EUR", "USD"]}},
                                "required": ["amount", "currency"], "additionalProperties": False}},
            "type": "object", "properties": {"total": {"$ref": "#/$defs/money"}, "tax": {"$ref": "#/$defs/money"}},
            "required": ["total", "tax"], "additionalProperties": False},
    "anyof": {"type": "object", "properties": {"id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 999},
                                                                {"type": "string", "pattern": "^ID[0-9]{3}$"}]}},
              "required": ["id"], "additionalProperties": False},
    "const": {"type": "object", "properties": {"kind": {"const": "invoice"}, "n": {"type": "integer", "minimum": 0,
                                                                                   "maximum": 99}},
              "required": ["kind", "n"], "additionalProperties": False},
    "string_len": {"type": "object", "properties": {"code": {"type": "string", "minLength": 3, "maxLength": 5}},
                   "required": ["code"], "additionalProperties": False},
    "top_enum": {"enum": ["yes", "no", "unsure"]},
    "top_integer": {"type": "integer", "minimum": 1, "maximum": 10},
    "nullable": {"type": "object", "properties": {"due": {"type": ["string", "null"], "maxLength": 10}},
                 "required": ["due"], "additionalProperties": False},
    "invoice": {"type": "object", "properties": {
        "vendor": S, "invoice_no": {"type": "string", "pattern": "^INV-[0-9]{4}$"},
        "date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
        "lines": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "object", "properties": {"desc": S, "amount": {"type": "integer", "minimum": 0, "maximum": 9999}},
            "required": ["desc", "amount"], "additionalProperties": False}},
        "paid": {"type": "boolean"}},
        "required": ["vendor", "invoice_no", "date", "lines", "paid"], "additionalProperties": False},
    "contract": {"type": "object", "properties": {
        "parties": {"type": "array", "items": S, "minItems": 2, "maxItems": 2},
        "term_months": {"type": "integer", "minimum": 1, "maximum": 60},
        "governing_law": {"enum": ["FR", "DE", "UK", "US-NY"]},
        "auto_renew": {"type": "boolean"}},
        "required": ["parties", "term_months", "governing_law"], "additionalProperties": False},
    "extra_props_typed": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
                          "required": ["a"], "additionalProperties": False, "maxProperties": 1},
}
