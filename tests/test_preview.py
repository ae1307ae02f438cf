"""The card preview (``GET /preview``, service/preview.py).

Flask-client tests: the setting (default follows ``CMV_CDS_REQUIRE_AUTH``), 404 when disabled, the page and
its assets (self-contained, strict CSP, no HTML sinks in the script), the examples listing and files,
path traversal, and the OpenAPI document's description of these routes.

The ``browser`` test starts the real service (``cmv-cds serve`` on a free loopback port, auth off, a
throwaway SQLite file), drives the page in Debian's headless Chromium with playwright-core
(``tests/preview/run_preview.mjs``) and checks what a clinician would see; the screenshot goes to
``test-artifacts/preview.png``. It is skipped only when node or /usr/bin/chromium is absent
(``bash scripts/test.sh`` installs both, and the npm package).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from processes import free_loopback_port, stop_process_group

from service.app import create_app
from service.config import ENV_PREFIX, ConfigError, Settings
from service.openapi import openapi_document
from service.preview import EXAMPLES_DIR, STATIC_DIR, example_files
from service.registry import SERVICES

REPO = Path(__file__).resolve().parents[1]
PREVIEW_DIR = REPO / "tests" / "preview"
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts"
GANCICLOVIR = "order-select-ganciclovir.json"


def make_app(tmp_path: Path, **config: Any) -> Flask:
    return create_app({"database_url": f"sqlite:///{tmp_path / 'preview.sqlite3'}"} | config)


@pytest.fixture
def preview_app(tmp_path: Path) -> Iterator[Flask]:
    application = make_app(tmp_path, require_auth=False)
    yield application
    application.extensions["cmv_cds"]["store"].dispose()


@pytest.fixture
def client(preview_app: Flask) -> FlaskClient:
    return preview_app.test_client()


# --- the setting ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("require_auth", "preview_enabled", "active"),
    [
        (False, None, True),
        (True, None, False),
        (True, True, True),
        (False, False, False),
        (True, False, False),
        (False, True, True),
    ],
)
def test_default_follows_require_auth_and_explicit_values_override(
    require_auth: bool, preview_enabled: bool | None, active: bool
) -> None:
    settings = Settings.load({"require_auth": require_auth, "preview_enabled": preview_enabled}, environ={})
    assert settings.preview_active is active


@pytest.mark.parametrize(("raw", "value"), [("true", True), ("FALSE", False), ("1", True), ("off", False), ("", None)])
def test_environment_values(raw: str, value: bool | None) -> None:
    assert Settings.load(environ={f"{ENV_PREFIX}PREVIEW_ENABLED": raw}).preview_enabled is value


def test_an_invalid_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="CMV_CDS_PREVIEW_ENABLED"):
        Settings.load(environ={f"{ENV_PREFIX}PREVIEW_ENABLED": "maybe"})


PREVIEW_PATHS = ["/preview", "/preview/examples", f"/preview/examples/{GANCICLOVIR}", "/preview/assets/preview.js"]


@pytest.mark.parametrize("config", [{"require_auth": True}, {"require_auth": False, "preview_enabled": False}])
def test_disabled_preview_is_404(tmp_path: Path, config: dict[str, Any]) -> None:
    """Off by default with auth on (a 404, not a 401: no route exists), and off when set so with auth off."""
    app = make_app(tmp_path, **config)
    try:
        client = app.test_client()
        for path in PREVIEW_PATHS:
            response = client.get(path)
            assert response.status_code == 404, path
            assert response.get_json()["resourceType"] == "OperationOutcome"
        assert not [rule for rule in app.url_map.iter_rules() if rule.rule.startswith("/preview")]
    finally:
        app.extensions["cmv_cds"]["store"].dispose()


def test_enabled_with_auth_on_the_page_needs_no_token_but_the_hook_call_does(tmp_path: Path) -> None:
    app = make_app(tmp_path, require_auth=True, preview_enabled=True)
    try:
        client = app.test_client()
        for path in PREVIEW_PATHS:
            assert client.get(path).status_code == 200, path
        listing = client.get("/preview/examples").get_json()
        assert listing["authRequired"] is True  # the page shows its token field
        example = client.get(f"/preview/examples/{GANCICLOVIR}").get_json()
        response = client.post("/cds-services/cmv-antiviral-order-select", json=example)
        assert response.status_code == 401
        assert client.get("/cds-services").status_code == 401
        assert client.get("/previewx").status_code == 401  # only /preview and below are open
    finally:
        app.extensions["cmv_cds"]["store"].dispose()


# --- the page and its assets ----------------------------------------------------------------------------


def test_page_is_served_with_a_strict_policy(client: FlaskClient) -> None:
    response = client.get("/preview")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    assert response.data == (STATIC_DIR / "index.html").read_bytes()
    csp = response.headers["Content-Security-Policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"):
        assert directive in csp
    assert "unsafe-inline" not in csp
    assert "unsafe-eval" not in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-store"
    html = response.get_data(as_text=True)
    assert 'src="preview/assets/preview.js"' in html
    assert 'href="preview/assets/preview.css"' in html


@pytest.mark.parametrize(("name", "mimetype"), [("preview.js", "text/javascript"), ("preview.css", "text/css")])
def test_assets(client: FlaskClient, name: str, mimetype: str) -> None:
    response = client.get(f"/preview/assets/{name}")
    assert response.status_code == 200
    assert response.mimetype == mimetype
    assert response.data == (STATIC_DIR / name).read_bytes()
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_page_is_self_contained() -> None:
    """No CDN: nothing is loaded from another origin, and the page has no inline script or style."""
    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:[a-z]+:)?//""", html, re.IGNORECASE)
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)
    assert "<style" not in html
    assert not re.search(r"\son[a-z]+\s*=", html)  # no inline event handlers
    css = (STATIC_DIR / "preview.css").read_text(encoding="utf-8")
    assert "@import" not in css
    assert "url(" not in css


def test_script_has_no_html_sinks() -> None:
    """Card content is untrusted: the script builds DOM nodes and text only."""
    lines = (STATIC_DIR / "preview.js").read_text(encoding="utf-8").splitlines()
    script = "\n".join(line for line in lines if not line.lstrip().startswith(("//", "*", "/*")))  # code only
    assert "renderMarkdown" in script
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink


# --- examples -------------------------------------------------------------------------------------------


def test_examples_listing(client: FlaskClient) -> None:
    response = client.get("/preview/examples")
    assert response.status_code == 200
    body = response.get_json()
    names = sorted(path.name for path in EXAMPLES_DIR.glob("*.json"))
    assert GANCICLOVIR in names
    assert [example["name"] for example in body["examples"]] == names
    # Both hooks have an example to pick (the page calls the service whose hook the example names).
    assert {"name": "order-sign-valganciclovir.json", "hook": "order-sign"} in body["examples"]
    for example in body["examples"]:
        expected = json.loads((EXAMPLES_DIR / example["name"]).read_text(encoding="utf-8"))["hook"]
        assert example["hook"] == expected
    assert body["services"] == [{"id": s.id, "hook": s.hook, "title": s.title} for s in SERVICES.values()]
    assert body["authRequired"] is False


def test_each_example_is_served_as_stored(client: FlaskClient) -> None:
    for path in EXAMPLES_DIR.glob("*.json"):
        response = client.get(f"/preview/examples/{path.name}")
        assert response.status_code == 200
        assert response.mimetype == "application/json"
        assert response.data == path.read_bytes()


@pytest.mark.parametrize(
    "path",
    [
        "/preview/examples/..%2Fpyproject.toml",
        "/preview/examples/..%2F..%2F..%2Fetc%2Fpasswd",
        "/preview/examples/..%2Fexamples%2Forder-select-ganciclovir.json",
        "/preview/examples/%2Fetc%2Fpasswd",
        "/preview/examples//etc/passwd",
        "/preview/examples/%2F" + str(EXAMPLES_DIR).lstrip("/").replace("/", "%2F") + "%2F" + GANCICLOVIR,
        "/preview/examples/../pyproject.toml",
        "/preview/examples/..",
        "/preview/examples/.",
        "/preview/examples/README.md",
        "/preview/examples/order-select-ganciclovir",
        "/preview/examples/order-select-ganciclovir.json%00",
        "/preview/examples/order-select-ganciclovir.json%2F",
        "/preview/examples/%2e%2e%2fpyproject.toml",
        "/preview/examples/..%5Cpyproject.toml",
        "/preview/examples/no-such-example.json",
        "/preview/assets/index.html",
        "/preview/assets/..%2Fpreview.py",
        "/preview/assets/..%2F..%2Fpreview.py",
        "/preview/assets/%2Fetc%2Fpasswd",
        "/preview/assets/../../preview.py",
        "/preview/assets/",
    ],
)
def test_traversal_and_unknown_names_are_404(client: FlaskClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404, (path, response.status_code)
    assert response.get_json()["resourceType"] == "OperationOutcome"
    for secret in (b"root:", b"[project]", b"import ", b'"hookInstance"'):
        assert secret not in response.data


def test_only_plain_json_files_directly_in_the_directory_are_examples(tmp_path: Path) -> None:
    examples = tmp_path / "examples"
    examples.mkdir()
    (examples / "good.json").write_text('{"hook": "order-sign"}')
    (examples / "broken.json").write_text("{not json")
    (examples / "notes.txt").write_text("x")
    (examples / ".hidden.json").write_text("{}")
    (examples / "sub.json").mkdir()
    (examples / "sub.json" / "inner.json").write_text("{}")
    outside = tmp_path / "secret.json"
    outside.write_text('{"secret": true}')
    (examples / "link.json").symlink_to(outside)
    assert list(example_files(examples)) == ["broken.json", "good.json"]
    assert example_files(tmp_path / "absent") == {}


# --- the OpenAPI document -------------------------------------------------------------------------------


def test_the_document_describes_what_the_preview_routes_answer(client: FlaskClient) -> None:
    paths = openapi_document()["paths"]
    cases = [
        ("/preview", "/preview", 200),
        ("/preview/assets/{name}", "/preview/assets/preview.js", 200),
        ("/preview/assets/{name}", "/preview/assets/preview.css", 200),
        ("/preview/assets/{name}", "/preview/assets/nope.js", 404),
        ("/preview/examples", "/preview/examples", 200),
        ("/preview/examples/{name}", f"/preview/examples/{GANCICLOVIR}", 200),
        ("/preview/examples/{name}", "/preview/examples/nope.json", 404),
    ]
    for documented, path, status in cases:
        operation = paths[documented]["get"]
        assert operation["security"] == []
        response = client.get(path)
        assert response.status_code == status, path
        documented_response = operation["responses"][str(status)]
        assert response.mimetype in documented_response["content"], (path, response.mimetype)


def test_the_documented_assets_are_the_files() -> None:
    parameter = openapi_document()["paths"]["/preview/assets/{name}"]["get"]["parameters"][0]
    files = sorted(path.name for path in STATIC_DIR.iterdir() if path.suffix in (".js", ".css"))
    assert sorted(parameter["schema"]["enum"]) == files


# --- the page in a real headless Chromium ---------------------------------------------------------------


@pytest.fixture
def preview_server(tmp_path: Path) -> Iterator[str]:
    """``cmv-cds serve`` on a free loopback port (auth off, so the preview is on by default); its /preview URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX) and k != "GUNICORN_CMD_ARGS"}
    env["CMV_CDS_REQUIRE_AUTH"] = "false"
    env["CMV_CDS_DATABASE_URL"] = f"sqlite:///{tmp_path}/feedback.sqlite3"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    console_script = Path(sys.executable).parent / "cmv-cds"
    launcher = [str(console_script)] if console_script.exists() else [sys.executable, "-m", "service.cli"]
    port = free_loopback_port()
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*launcher, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/preview"
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no 200 from {url} within 20 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.2)
        yield url
    finally:
        stop_process_group(process)


@dataclass(frozen=True)
class ExampleFacts:
    age: int
    repeat_labels: list[str]


def example_facts(path: Path, today: dt.date) -> ExampleFacts:
    """The patient's age in completed years and the suggestions after "Update order" the example earns on
    ``today``: blood counts older than 7 days are ordered anew (policy §9), then a serum creatinine older than 7
    days is repeated (policy §2; a stale weight is flagged but not ordered)."""
    request = json.loads(path.read_text(encoding="utf-8"))
    [patient] = [value for value in request["prefetch"].values() if value.get("resourceType") == "Patient"]
    birth = dt.date.fromisoformat(patient["birthDate"])
    age = today.year - birth.year - ((today.month, today.day) < (birth.month, birth.day))

    def latest(loinc: str) -> dt.date:
        return dt.date.fromisoformat(
            max(
                entry["resource"]["effectiveDateTime"][:10]
                for bundle in request["prefetch"].values()
                if bundle.get("resourceType") == "Bundle"
                for entry in bundle.get("entry", [])
                if any(c.get("code") == loinc for c in entry.get("resource", {}).get("code", {}).get("coding", []))
            )
        )

    counts_stale = any((today - latest(loinc)).days > 7 for loinc in ("751-8", "777-3", "718-7"))
    creatinine = latest("2160-0")
    labels = ["Order blood counts now"] if counts_stale else []
    if (today - creatinine).days > 7:
        labels.append(f"Repeat serum creatinine (last {creatinine.isoformat()})")
    return ExampleFacts(age, labels)


@pytest.mark.browser
def test_the_page_renders_the_cards_in_headless_chromium(preview_server: str) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (bash scripts/test.sh uses the machine's Node.js)")
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is absent (bash scripts/test.sh installs Debian's chromium as root)")
    if not (PREVIEW_DIR / "node_modules" / "playwright-core").is_dir():
        pytest.fail("playwright-core is not installed: run `npm ci --prefix tests/preview` (bash scripts/test.sh does)")
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "preview.png"
    screenshot.unlink(missing_ok=True)

    completed = subprocess.run(
        [node, str(PREVIEW_DIR / "run_preview.mjs"), preview_server, str(screenshot)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(completed.stdout)

    # Self-contained: the page loaded its own files and called only the service's own hook endpoint.
    assert result["consoleErrorsBeforeRefusal"] == []  # no CSP violation, no failed asset, no script error
    assert set(result["requests"]) == {
        "GET /preview",
        "GET /preview/assets/preview.css",
        "GET /preview/assets/preview.js",
        "GET /preview/examples",
        f"GET /preview/examples/{GANCICLOVIR}",
        "POST /cds-services/cmv-antiviral-order-select",
    }
    assert "script-src 'self'" in result["pageHeaders"]["content-security-policy"]
    assert result["tokenFieldVisible"] is False  # auth is off
    assert result["selectedService"] == "cmv-antiviral-order-select"
    # The example patient is a kidney-transplant recipient on tacrolimus: the dose card, then the information card
    # on reducing immunosuppression (most urgent first).
    assert result["summaryLine"].startswith("2 cards from cmv-antiviral-order-select · HTTP 200")
    card, info = result["cards"]
    assert info["indicator"] == "info"
    assert info["summary"].startswith("CMV on immunosuppressive therapy")

    # The dose card as an EHR shows it.
    assert card["indicator"] == "warning"
    assert card["badge"] == "Warning"
    assert card["borderLeftColor"] == "rgb(178, 106, 0)"  # amber (--warning in preview.css)
    assert card["summary"].startswith("Adjust ganciclovir: 400 mg IV every 12 hours")
    assert "<strong>Proposed:</strong> ganciclovir 400 mg IV every 12 hours" in card["detailHtml"]
    assert card["strong"][:2] == ["Proposed:", "Selected order:"]
    assert "**" not in card["detailText"]
    assert card["paragraphs"] >= 3
    # The example's dates are fixed and the service runs on the real clock: the age and any staleness follow
    # from the example and today's date, computed here the way the service must.
    example = example_facts(EXAMPLES_DIR / GANCICLOVIR, dt.date.today())
    assert f"Age: {example.age} years; sex: male" in card["listItems"]
    assert any(item.startswith("Dose: 5 mg/kg × 80.0 kg = 400.0 mg") for item in card["listItems"])
    label, *repeats = card["suggestions"]
    assert label == "Update order: ganciclovir 400 mg IV every 12 hours"
    assert "400 mg" in label
    assert repeats == example.repeat_labels
    assert card["sourceHref"].startswith("https://dailymed.nlm.nih.gov/")
    assert card["sourceText"].startswith("Ganciclovir for injection label")
    assert card["sourceRel"] == "noopener noreferrer"
    # Pressing the suggestion shows the action it would send.
    assert "update MedicationRequest/draft-gcv" in result["actionsText"]
    assert '"value": 400' in result["actionsText"]

    # Hostile markdown stays text: no element but the renderer's own, nothing executed.
    hostile = result["hostile"]
    assert set(hostile["tags"]) <= {"p", "br", "strong", "ul", "ol", "li"}
    assert "&lt;img src=x" in hostile["html"]
    assert "&lt;script&gt;" in hostile["html"]
    assert hostile["pwned"] is None
    assert hostile["cardAnchors"] == 0  # javascript: and data: URLs never become links
    assert hostile["cardIndicator"] == "info"
    assert hostile["cardSummaryHtml"] == "&lt;i&gt;s&lt;/i&gt;"

    # A refused request: the OperationOutcome, readable.
    assert result["errorText"].startswith("The service answered 400 Bad Request")
    assert "missing required field 'context'" in result["errorText"]
    assert result["errorSummary"].startswith("HTTP 400")

    assert screenshot.stat().st_size > 10_000
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
