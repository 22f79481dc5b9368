"""Every example in an OpenAPI 3.1 document is valid by the schema beside it.

Usage: openapi_examples.py DOCUMENT...; prints one line per document ("<path>: N examples
OK") or each invalid example with the schema's complaint, and exits 1 if there was one.
Checked: a media type's `example` and each of its `examples` against its `schema`, a
parameter's and a header's against theirs, and an `example` inside a schema against that
schema. `$ref`s resolve within the document. Run by tests/tests/it/openapi.rs with the
tests' virtualenv (scripts/requirements.txt).
"""

import json
import sys

from jsonschema.exceptions import best_match
from openapi_schema_validator import OAS31Validator, oas31_format_checker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

ROOT = "urn:document"


def validator(registry, pointer):
    """A validator of the schema at `pointer` in the document, whose `#/...` references
    resolve within the document."""
    return OAS31Validator(
        {"$ref": f"{ROOT}#{pointer}"}, registry=registry, format_checker=oas31_format_checker
    )


def step(pointer, key):
    return pointer + "/" + str(key).replace("~", "~0").replace("/", "~1")


def pairs(node, pointer):
    """(pointer of the example, example, pointer of its schema) for every example in
    `node` that has a schema beside it."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            yield from pairs(item, step(pointer, i))
        return
    if not isinstance(node, dict):
        return
    if isinstance(node.get("schema"), dict):
        schema = step(pointer, "schema")
        if "example" in node:
            yield step(pointer, "example"), node["example"], schema
        for name, ex in (node.get("examples") or {}).items():
            if isinstance(ex, dict) and "value" in ex:
                yield step(step(pointer, "examples"), name), ex["value"], schema
    elif "example" in node and ("type" in node or "properties" in node or "$ref" in node):
        # An example inside a schema (a property's, or a component schema's own).
        yield step(pointer, "example"), node["example"], pointer
    for key, value in node.items():
        yield from pairs(value, step(pointer, key))


def main(paths):
    failed = False
    for path in paths:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
        registry = Registry().with_resource(
            ROOT, Resource.from_contents(document, default_specification=DRAFT202012)
        )
        checked, invalid = 0, 0
        for where, example, schema in pairs(document, ""):
            error = best_match(validator(registry, schema).iter_errors(example))
            checked += 1
            if error is not None:
                invalid += 1
                print(f"{path}: #{where}: {error.message}")
        print(f"{path}: {checked} examples, {invalid} invalid" if invalid else f"{path}: {checked} examples OK")
        failed = failed or invalid > 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
