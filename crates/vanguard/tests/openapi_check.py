#!/usr/bin/env python3
"""Checks the daemon's responses against the OpenAPI document it serves (tests/daemon.rs).

stdin: {"doc": <openapi.json>, "samples": [{"schema": "<component name>", "value": <JSON>}]}.
Each value is validated with jsonschema (JSON Schema 2020-12, which OpenAPI 3.1 uses) against
#/components/schemas/<name> of the document. Prints "<n> responses valid" or the failures.
"""
import json
import sys

import jsonschema

data = json.load(sys.stdin)
doc = data["doc"]
failures = []

if not str(doc.get("openapi", "")).startswith("3."):
    failures.append("not an OpenAPI 3 document: openapi=%r" % doc.get("openapi"))
paths = doc.get("paths", {})
for path in ["/v1/vms", "/v1/vms/{name}", "/v1/vms/{name}/start", "/v1/vms/{name}/stop",
             "/v1/operations/{id}", "/v1/operations/{id}/wait", "/v1/events", "/v1/host",
             "/metrics"]:
    if path not in paths:
        failures.append("path %s is not in the document" % path)
for path, methods in paths.items():
    for method, operation in methods.items():
        if not operation.get("responses"):
            failures.append("%s %s has no responses" % (method.upper(), path))

schemas = doc.get("components", {}).get("schemas", {})
for i, sample in enumerate(data["samples"]):
    name = sample["schema"]
    if name not in schemas:
        failures.append("sample %d: no schema %s in the document" % (i, name))
        continue
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": "#/components/schemas/" + name,
        "components": doc["components"],
    }
    validator = jsonschema.Draft202012Validator(schema)
    for error in validator.iter_errors(sample["value"]):
        failures.append("sample %d (%s): %s at %s" % (i, name, error.message, list(error.path)))

if failures:
    print("\n".join(failures))
    sys.exit(1)
print("%d responses valid" % len(data["samples"]))
