"""Validate JSON bodies against OpenAI's published OpenAPI document (shared/data/schemas)."""

from __future__ import annotations

import functools
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.support.shared_data import schema_path


def _nullable(node: Any) -> Any:
    """OpenAPI 3.0 `nullable: true` -> JSON Schema's null type."""
    if isinstance(node, dict):
        node = {k: _nullable(v) for k, v in node.items()}
        if node.pop("nullable", False):
            if "type" in node:
                t = node["type"]
                node["type"] = [*t, "null"] if isinstance(t, list) else [t, "null"]
                if "enum" in node:
                    node["enum"] = [*node["enum"], None]
            else:
                node = {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    return node


@functools.cache
def _spec() -> dict[str, Any]:
    with open(schema_path("openai-openapi.yaml")) as f:
        return _nullable(yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))


@functools.cache
def _registry() -> Registry:
    return Registry().with_resource("urn:openai", Resource.from_contents(_spec(), default_specification=DRAFT202012))


def validate(body: Any, schema_name: str) -> None:
    """Raise jsonschema.ValidationError when `body` does not match components/schemas/<schema_name>."""
    if schema_name not in _spec()["components"]["schemas"]:
        raise KeyError(schema_name)
    schema = {"$ref": f"urn:openai#/components/schemas/{schema_name}"}
    jsonschema.Draft202012Validator(schema, registry=_registry()).validate(body)


@functools.cache
def response_event_schemas() -> dict[str, str]:
    """Each Responses API stream event type -> the name of its schema in OpenAI's spec (the
    members of `ResponseStreamEvent`), e.g. "error" -> "ResponseErrorEvent"."""
    schemas = _spec()["components"]["schemas"]
    out = {}
    for ref in schemas["ResponseStreamEvent"]["anyOf"]:
        name = ref["$ref"].rsplit("/", 1)[1]
        for kind in schemas[name]["properties"]["type"].get("enum", []):
            out[kind] = name
    return out


def validate_response_event(event: Any) -> None:
    """Raise when a Responses stream event is not one of the spec's events or breaks its schema."""
    kind = event.get("type") if isinstance(event, dict) else None
    schema = response_event_schemas().get(kind)  # type: ignore[arg-type]
    if schema is None:
        raise jsonschema.ValidationError(f"{kind!r} is not a Responses stream event type: {str(event)[:200]}")
    validate(event, schema)
