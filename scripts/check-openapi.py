#!/usr/bin/env python3
"""Checks Drover's OpenAPI description with independent tools (openapi-spec-validator and
jsonschema, from PyPI; scripts/install-deps.sh installs them).

usage: check-openapi.py DOCUMENT.json [OBSERVED.json]

- DOCUMENT is validated as OpenAPI 3.1 (openapi-spec-validator);
- every example in it (media types, parameters) is validated against its schema;
- OBSERVED, when given, is a JSON list of {"schema": "<JSON pointer into DOCUMENT>",
  "value": <JSON>, "what": "<label>"}: real replies of a running engine, each validated
  against the schema it is documented with.

Exit status: 0 valid, 1 invalid (the reasons on stderr), 3 the Python modules are missing.
"""

import json
import sys

try:
    from jsonschema import Draft202012Validator
    from openapi_spec_validator import validate
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012
except ImportError as e:
    print(f"missing Python module: {e}", file=sys.stderr)
    sys.exit(3)

BASE = "urn:drover:openapi"
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def escape(key):
    return key.replace("~", "~0").replace("/", "~1")


def resolve(doc, node):
    """Follows a local `$ref` chain (`#/a/b`), returning the node and its pointer."""
    pointer = None
    while isinstance(node, dict) and "$ref" in node:
        pointer = node["$ref"][1:]
        node = doc
        for part in pointer.split("/")[1:]:
            node = node[part.replace("~1", "/").replace("~0", "~")]
    return node, pointer


def examples(doc):
    """(label, schema pointer, value) of every example of a media type or parameter."""
    for path, item in doc["paths"].items():
        base = f"/paths/{escape(path)}"
        for method, op in item.items():
            if method not in METHODS:
                continue
            where = f"{base}/{method}"
            places = []
            body = op.get("requestBody")
            if body:
                body, pointer = resolve(doc, body)
                places.append((f"{method} {path} request", pointer or f"{where}/requestBody", body))
            for status, response in op.get("responses", {}).items():
                response, pointer = resolve(doc, response)
                places.append(
                    (f"{method} {path} {status}", pointer or f"{where}/responses/{status}", response)
                )
            for label, pointer, holder in places:
                for media, content in holder.get("content", {}).items():
                    if "schema" not in content:
                        continue
                    schema = f"{pointer}/content/{escape(media)}/schema"
                    if "example" in content:
                        yield f"{label} {media} example", schema, content["example"], media
                    for name, ex in content.get("examples", {}).items():
                        ex, _ = resolve(doc, ex)
                        yield f"{label} {media} example {name}", schema, ex["value"], media
            for param in item.get("parameters", []) + op.get("parameters", []):
                param, _ = resolve(doc, param)
                if "example" in param:
                    yield f"{method} {path} parameter {param['name']}", None, param, "param"


def main():
    with open(sys.argv[1]) as f:
        doc = json.load(f)
    validate(doc)
    registry = Registry().with_resource(
        BASE, Resource.from_contents(doc, default_specification=DRAFT202012)
    )

    def check(label, pointer, value):
        validator = Draft202012Validator({"$ref": f"{BASE}#{pointer}"}, registry=registry)
        return [f"{label}: {e.message} (at {list(e.absolute_path)})" for e in validator.iter_errors(value)]

    problems = []
    count = 0
    for label, pointer, value, media in examples(doc):
        count += 1
        if media == "param":
            validator = Draft202012Validator(value["schema"], registry=registry)
            problems += [f"{label}: {e.message}" for e in validator.iter_errors(value["example"])]
        else:
            problems += check(label, pointer, value)
    observed = []
    if len(sys.argv) > 2:
        with open(sys.argv[2]) as f:
            observed = json.load(f)
    for case in observed:
        problems += check(case["what"], case["schema"], case["value"])
    for p in problems:
        print(p, file=sys.stderr)
    print(f"{count} examples, {len(observed)} observed replies, {len(problems)} problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
