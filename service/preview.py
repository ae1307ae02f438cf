"""Card preview for integrators and clinicians: ``GET /preview`` and what the page needs.

A self-contained page (``service/static/preview/``: HTML, one script, one style sheet; no CDN) where an
integrator pastes a CDS Hooks request, or picks one of the repository's ``examples/*.json``, presses
"Run", and sees the cards this service answers rendered as an EHR shows them. The page calls the
service's own hook endpoint (same origin), so what it shows is exactly what an EHR would get.

Routes (a blueprint, registered only when ``Settings.preview_active``; otherwise they are 404):

- ``GET /preview``: the page.
- ``GET /preview/assets/<name>``: its script and style sheet (only the files in ``static/preview``).
- ``GET /preview/examples``: the example requests (``examples/*.json`` names and their hook), the
  services the page can call, and whether the hook call needs a token.
- ``GET /preview/examples/<name>``: one example, as stored. Only a name that the listing of
  ``examples/`` itself yields is served: no path is ever built from the URL.

These routes need no token (``is_preview_path``): they hold no patient data (the examples are
synthetic). The hook call the page makes is an ordinary call and is authenticated as usual; the page
has a token field for it. The card content is untrusted: the page renders it with DOM text nodes only,
and every response of these routes carries a strict Content-Security-Policy (same-origin script, style
and fetch; no inline script; no framing).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
from flask import Blueprint, Response

from service.config import Settings
from service.errors import NotFound, json_response
from service.registry import SERVICES

PREVIEW_PREFIX = "/preview"
STATIC_DIR = Path(__file__).resolve().parent / "static" / "preview"
# The repository's examples/ (next to the packages, as fhir_profiles/ is); absent from a plain wheel.
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"

_ASSET_TYPES = {".js": "text/javascript", ".css": "text/css"}
_EXAMPLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.json$")
_MAX_EXAMPLE_BYTES = 1024 * 1024
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def is_preview_path(path: str) -> bool:
    """``/preview`` and everything under it: served without a token (or 404 when the preview is off)."""
    return path == PREVIEW_PREFIX or path.startswith(PREVIEW_PREFIX + "/")


def example_files(directory: Path = EXAMPLES_DIR) -> dict[str, Path]:
    """``name → path`` of the example requests: regular ``*.json`` files directly in ``directory``."""
    if not directory.is_dir():
        return {}
    root = directory.resolve()
    found: dict[str, Path] = {}
    for path in directory.glob("*.json"):
        if not _EXAMPLE_NAME.match(path.name) or path.is_symlink() or not path.is_file():
            continue
        if path.resolve().parent != root:
            continue
        found[path.name] = path
    return dict(sorted(found.items()))


def _hook_of(path: Path) -> str | None:
    try:
        body = orjson.loads(path.read_bytes()[:_MAX_EXAMPLE_BYTES])
    except (OSError, orjson.JSONDecodeError):
        return None
    hook = body.get("hook") if isinstance(body, dict) else None
    return hook if isinstance(hook, str) else None


def _with_security_headers(response: Response) -> Response:
    for name, value in _SECURITY_HEADERS.items():
        response.headers[name] = value
    return response


def preview_blueprint(settings: Settings, examples_dir: Path = EXAMPLES_DIR) -> Blueprint:
    """The /preview routes. The page and its assets are read once, here."""
    blueprint = Blueprint("preview", __name__, url_prefix=PREVIEW_PREFIX)
    page = (STATIC_DIR / "index.html").read_bytes()
    assets = {
        path.name: (path.read_bytes(), _ASSET_TYPES[path.suffix])
        for path in sorted(STATIC_DIR.iterdir())
        if path.suffix in _ASSET_TYPES and path.is_file()
    }
    services = [{"id": s.id, "hook": s.hook, "title": s.title} for s in SERVICES.values()]

    @blueprint.after_request
    def _headers(response: Response) -> Response:
        return _with_security_headers(response)

    @blueprint.get("")
    def preview_page() -> Response:
        return Response(page, mimetype="text/html")

    @blueprint.get("/assets/<name>")
    def preview_asset(name: str) -> Response:
        asset = assets.get(name)
        if asset is None:
            raise NotFound("no such preview asset", expression="name")
        content, mimetype = asset
        return Response(content, mimetype=mimetype)

    @blueprint.get("/examples")
    def preview_examples() -> Response:
        examples: list[dict[str, Any]] = [
            {"name": name, "hook": _hook_of(path)} for name, path in example_files(examples_dir).items()
        ]
        return json_response({"examples": examples, "services": services, "authRequired": settings.require_auth})

    @blueprint.get("/examples/<name>")
    def preview_example(name: str) -> Response:
        path = example_files(examples_dir).get(name)
        if path is None:
            raise NotFound("no such example", expression="name")
        content = path.read_bytes()
        if len(content) > _MAX_EXAMPLE_BYTES:
            raise NotFound("no such example", expression="name")
        return Response(content, mimetype="application/json")

    return blueprint


__all__ = ["EXAMPLES_DIR", "PREVIEW_PREFIX", "STATIC_DIR", "example_files", "is_preview_path", "preview_blueprint"]
