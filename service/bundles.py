"""Reading FHIR R4 Bundles (searchset pages) defensively: the resources of their entries and the next page's link.

Its own module, apart from the FHIR client, so that it is compiled with the hook call's hot path
(scripts/compile_hot_path.py): the prefetched Bundles are read on every hook call.
"""

from __future__ import annotations

from typing import Any


def bundle_resources(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    """The resources of a Bundle's entries, skipping search-outcome entries and malformed ones."""
    entries = bundle.get("entry")
    if not isinstance(entries, list):
        return []
    found = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        search = entry.get("search")
        if isinstance(search, dict) and search.get("mode") == "outcome":
            continue
        resource = entry.get("resource")
        if isinstance(resource, dict) and isinstance(resource.get("resourceType"), str):
            if resource["resourceType"] == "OperationOutcome":
                continue
            found.append(resource)
    return found


def next_link(bundle: dict[str, Any]) -> str | None:
    """The ``link[relation=next].url`` of a Bundle, if any."""
    links = bundle.get("link")
    if not isinstance(links, list):
        return None
    for link in links:
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            return str(link["url"])
    return None
