"""The service's OpenAPI 3.1 document, built once from ``service/openapi.json`` and its sources of truth.

``openapi.json`` holds the paths, responses and the schemas that exist nowhere else (discovery,
feedback result, OperationOutcome, probes). What already has a home is filled in here, so it can
never drift:

- ``components.schemas`` gets every ``service/schemas/*.schema.json`` (the schemas the service validates
  with), named after the file (``order-select-context.schema.json`` → ``OrderSelectContext``). OpenAPI 3.1
  schemas are JSON Schema 2020-12, so they are used as they are, except that ``$schema``/``$id`` are
  dropped, each root ``$defs`` entry becomes a component of its own (``Response`` + ``card`` →
  ``ResponseCard``) and every ``$ref`` is rewritten to ``#/components/schemas/...``: tools that consume
  OpenAPI resolve component references far more reliably than embedded ``$id`` resources.
- the ``ServiceId`` enum and the per-hook request bodies come from ``service.registry.SERVICES``.
- every response gets the ``X-Request-ID`` header the app sets on all responses.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any
from urllib.parse import urldefrag, urljoin

from service.registry import SERVICES
from service.validation import SCHEMA_DIR, load_schema

OPENAPI_FILE = Path(__file__).resolve().parent / "openapi.json"
_COMPONENTS = "#/components/schemas/"
_SCHEMA_SUFFIX = ".schema.json"


def component_name(file_name: str) -> str:
    """``order-select-context.schema.json`` → ``OrderSelectContext``."""
    stem = file_name.removesuffix(_SCHEMA_SUFFIX)
    return "".join(part[:1].upper() + part[1:] for part in stem.replace("_", "-").split("-"))


def _def_name(owner: str, definition: str) -> str:
    return owner + definition[:1].upper() + definition[1:]


def _rewrite_refs(node: Any, base_uri: str, targets: dict[str, str]) -> Any:
    """A copy of ``node`` with every ``$ref`` (resolved against ``base_uri``) pointing into components."""
    if isinstance(node, list):
        return [_rewrite_refs(item, base_uri, targets) for item in node]
    if not isinstance(node, dict):
        return node
    rewritten: dict[str, Any] = {}
    for key, value in node.items():
        if key == "$ref" and isinstance(value, str):
            document, fragment = urldefrag(urljoin(base_uri, value))
            owner = targets.get(document)
            if owner is None:
                raise ValueError(f"$ref {value!r} (in {base_uri}) does not name a schema in {SCHEMA_DIR}")
            if not fragment:
                rewritten[key] = _COMPONENTS + owner
            elif fragment.startswith("/$defs/") and fragment.count("/") == 2:
                rewritten[key] = _COMPONENTS + _def_name(owner, fragment.removeprefix("/$defs/"))
            else:
                raise ValueError(f"$ref {value!r} (in {base_uri}): only whole schemas and root $defs are supported")
        else:
            rewritten[key] = _rewrite_refs(value, base_uri, targets)
    return rewritten


def repository_schemas() -> dict[str, dict[str, Any]]:
    """``service/schemas/*.schema.json`` as OpenAPI components (name → schema), refs rewritten."""
    files = sorted(path.name for path in SCHEMA_DIR.glob("*" + _SCHEMA_SUFFIX))
    # A schema is reachable by its $id and, as in service.validation, by its bare file name.
    targets: dict[str, str] = {}
    for name in files:
        schema = load_schema(name)
        targets[schema["$id"]] = component_name(name)
        targets[urljoin(schema["$id"], name)] = component_name(name)
    components: dict[str, dict[str, Any]] = {}
    for name in files:
        schema = copy.deepcopy(load_schema(name))
        base_uri: str = schema.pop("$id")
        schema.pop("$schema", None)
        owner = component_name(name)
        definitions: dict[str, Any] = schema.pop("$defs", {})
        entries = {owner: schema} | {_def_name(owner, key): value for key, value in definitions.items()}
        for entry_name, entry in entries.items():
            if entry_name in components:
                raise ValueError(f"two schemas in {SCHEMA_DIR} map to the component name {entry_name}")
            components[entry_name] = _rewrite_refs(entry, base_uri, targets)
    return components


def _hook_request_branches() -> list[dict[str, Any]]:
    """One body shape per (hook, context schema) pair the registry serves."""
    pairs = sorted({(service.hook, service.context_schema) for service in SERVICES.values()})
    return [
        {
            "title": hook,
            "type": "object",
            "required": ["hook", "context"],
            "properties": {
                "hook": {"const": hook},
                "context": {"$ref": _COMPONENTS + component_name(context_schema)},
            },
        }
        for hook, context_schema in pairs
    ]


def _add_request_id_header(responses: dict[str, Any]) -> None:
    for response in responses.values():
        if "$ref" not in response:
            response.setdefault("headers", {})["X-Request-ID"] = {"$ref": "#/components/headers/X-Request-ID"}


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The complete OpenAPI 3.1 document (built once; callers must not mutate it)."""
    with OPENAPI_FILE.open(encoding="utf-8") as handle:
        document: dict[str, Any] = json.load(handle)
    components = document["components"]
    schemas: dict[str, Any] = components["schemas"]
    embedded = repository_schemas()
    clash = sorted(set(schemas) & set(embedded))
    if clash:
        raise ValueError(f"{OPENAPI_FILE.name} defines schemas that service/schemas also provides: {clash}")
    schemas.update(embedded)
    schemas["ServiceId"]["enum"] = sorted(SERVICES)
    schemas["HookRequest"]["allOf"].append({"anyOf": _hook_request_branches()})
    _add_request_id_header(components["responses"])
    for path_item in document["paths"].values():
        for operation in path_item.values():
            _add_request_id_header(operation["responses"])
    return document


__all__ = ["OPENAPI_FILE", "component_name", "openapi_document", "repository_schemas"]
