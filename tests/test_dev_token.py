"""``cmv-cds token`` (service/dev_token.py): a local development key, the CMV_CDS_TRUSTED_ISSUERS value that trusts
it, and short-lived client JWTs that the service itself accepts with authentication on (aud = the endpoint
called, jti once); and every printing command stopping quietly when its reader goes away (``| head``)."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from flask import Flask
from test_cli import CONSOLE_SCRIPT
from test_report import populate

from service import cli, dev_token
from service.app import create_app
from service.config import ENV_PREFIX
from service.store import FeedbackStore

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = json.loads((REPO / "examples" / "order-select-ganciclovir.json").read_text(encoding="utf-8"))
SELECT = "/cds-services/cmv-antiviral-order-select"
BASE = "http://localhost"  # the Flask test client's base URL: what the app sees as the endpoint


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    return tmp_path / "keys"


@pytest.fixture
def auth_app(tmp_path: Path, key_dir: Path, capsys: pytest.CaptureFixture[str]) -> Any:
    status, issuers, _ = run_cli(capsys, "token", "--trusted-issuers", "--key-dir", str(key_dir))
    assert status == 0
    app = create_app(
        {"require_auth": True, "trusted_issuers": issuers.strip(), "database_url": f"sqlite:///{tmp_path / 'a.db'}"}
    )
    yield app
    app.extensions["cmv_cds"]["store"].dispose()


def token_for(capsys: pytest.CaptureFixture[str], key_dir: Path, target: str, *extra: str) -> str:
    status, out, err = run_cli(capsys, "token", target, "--url", BASE, "--key-dir", str(key_dir), *extra)
    assert status == 0, err
    assert out.count("\n") == 1  # the token alone, for "$(cmv-cds token ...)"
    return out.strip()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def refusal_reasons(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [str(getattr(r, "reason", "")) for r in caplog.records if r.getMessage() == "request refused"]


def test_the_service_accepts_the_token_once_for_its_endpoint(
    auth_app: Flask, key_dir: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cmv_cds")
    client = auth_app.test_client()
    token = token_for(capsys, key_dir, "cmv-antiviral-order-select")

    answer = client.post(SELECT, json=EXAMPLE, headers=bearer(token))
    assert answer.status_code == 200, answer.get_data(as_text=True)
    card, info = answer.get_json()["cards"]  # the dose, and reducing the transplant recipient's immunosuppression
    assert card["summary"].startswith("Adjust ganciclovir: 400 mg IV every 12 hours")
    assert info["source"]["topic"]["code"] == "reduce-immunosuppression"

    # The same token again: its jti was used.
    assert client.post(SELECT, json=EXAMPLE, headers=bearer(token)).status_code == 401
    assert refusal_reasons(caplog)[-1] == "authentication failed: replayed jti"

    # A token for another endpoint does not open this one (aud), and does open its own.
    discovery_token = token_for(capsys, key_dir, "/cds-services")
    assert client.post(SELECT, json=EXAMPLE, headers=bearer(discovery_token)).status_code == 401
    assert refusal_reasons(caplog)[-1] == "authentication failed: audience mismatch"
    assert client.get("/cds-services", headers=bearer(token_for(capsys, key_dir, "/cds-services"))).status_code == 200

    # Feedback has its own endpoint, hence its own token.
    feedback = {
        "feedback": [{"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-01-01T00:00:00Z"}]
    }
    feedback_token = token_for(capsys, key_dir, "/cds-services/cmv-antiviral-order-select/feedback")
    response = client.post(f"{SELECT}/feedback", json=feedback, headers=bearer(feedback_token))
    assert response.status_code == 200
    assert response.get_json() == {"stored": 1, "unknownCards": 0}


def test_an_expired_token_is_refused(
    auth_app: Flask, key_dir: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cmv_cds")
    key, _ = dev_token.load_or_create_key(key_dir)
    stale = dev_token.mint(key, BASE + SELECT, lifetime_seconds=60, now=time.time() - 600)
    assert auth_app.test_client().post(SELECT, json=EXAMPLE, headers=bearer(stale)).status_code == 401
    assert refusal_reasons(caplog)[-1] == "authentication failed: token expired"


def test_the_token_carries_what_cds_hooks_asks(key_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = token_for(capsys, key_dir, "cmv-antiviral-order-sign", "--lifetime", "120")
    second = token_for(capsys, key_dir, "cmv-antiviral-order-sign")
    header = jwt.get_unverified_header(first)
    claims = jwt.decode(first, options={"verify_signature": False})
    status, issuers, _ = run_cli(capsys, "token", "--trusted-issuers", "--key-dir", str(key_dir))
    assert status == 0
    (jwk,) = json.loads(issuers)[dev_token.DEV_ISSUER]["jwks"]["keys"]
    assert header == {"alg": "ES384", "typ": "JWT", "kid": jwk["kid"]}
    assert claims["iss"] == claims["sub"] == dev_token.DEV_ISSUER
    assert claims["aud"] == "http://localhost/cds-services/cmv-antiviral-order-sign"
    assert claims["exp"] - claims["iat"] == 120
    assert jwt.decode(second, options={"verify_signature": False})["jti"] != claims["jti"]
    # Verifiable with the published public key only.
    public = jwt.PyJWK(jwk).key
    assert jwt.decode(first, public, algorithms=["ES384"], audience=claims["aud"])["jti"] == claims["jti"]
    assert "d" not in jwk


def test_the_key_is_made_once_private_and_never_committed(key_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, first, err = run_cli(capsys, "token", "--trusted-issuers", "--key-dir", str(key_dir))
    assert status == 0
    assert "made a development key in" in err
    assert 'CMV_CDS_TRUSTED_ISSUERS="$(' in err
    status, again, err = run_cli(capsys, "token", "--trusted-issuers", "--key-dir", str(key_dir))
    assert (status, again, err) == (0, first, "")  # the same key, silently
    key_file = key_dir / "client-key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    ignored = subprocess.run(
        ["git", "init", "-q", str(key_dir.parent)], capture_output=True, text=True, timeout=30, check=False
    )
    if ignored.returncode == 0:  # git is there: it really ignores the key
        check = subprocess.run(
            ["git", "-C", str(key_dir.parent), "check-ignore", "-q", str(key_file)], timeout=30, check=False
        )
        assert check.returncode == 0
    assert (key_dir / ".gitignore").read_text().splitlines()[-1] == "*"


def test_a_users_own_gitignore_is_kept(tmp_path: Path) -> None:
    (tmp_path / ".gitignore").write_text("mine\n")
    dev_token.load_or_create_key(tmp_path)
    assert (tmp_path / ".gitignore").read_text() == "mine\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["token"], "cmv-cds token: name the ENDPOINT the token is for (e.g. cmv-antiviral-order-select)\n"),
        (["token", "x", "--lifetime", "0"], None),
        (["token", "x", "--lifetime", "3601"], None),
    ],
)
def test_usage_errors(argv: list[str], message: str | None, key_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_cli(capsys, *argv, "--key-dir", str(key_dir))
    assert status == 2
    assert out == ""
    if message is not None:
        assert err == message
    assert not key_dir.exists()


def test_an_unusable_key_file_is_one_line(key_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_dir.mkdir()
    (key_dir / "client-key.pem").write_text("not a key")
    status, out, err = run_cli(capsys, "token", "x", "--key-dir", str(key_dir))
    assert (status, out) == (2, "")
    assert err == f"cmv-cds token: {key_dir}/client-key.pem is not a readable PEM private key (ValueError)\n"


def test_default_url_follows_the_port_serve_listens_on(
    key_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def audience() -> str:
        status, out, err = run_cli(capsys, "token", "/cds-services", "--key-dir", str(key_dir))
        assert status == 0, err
        return str(jwt.decode(out.strip(), options={"verify_signature": False})["aud"])

    assert audience() == "http://127.0.0.1:8080/cds-services"
    monkeypatch.setenv("CMV_CDS_PORT", "9137")
    assert audience() == "http://127.0.0.1:9137/cds-services"
    monkeypatch.setenv("CMV_CDS_PORT", "http")
    status, _, err = run_cli(capsys, "token", "/cds-services", "--key-dir", str(key_dir))
    assert status == 2
    assert err == "cmv-cds token: CMV_CDS_PORT: not a port number: 'http'\n"


# --- a reader that goes away ---------------------------------------------------------------------------


def run_into_a_closed_pipe(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The console script with stdout a pipe whose reader has already gone, as `cmv-cds ... | head` ends up."""
    if not CONSOLE_SCRIPT.exists():
        pytest.skip("the project is not installed in this environment (pip install -e .)")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [str(CONSOLE_SCRIPT), *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)


def printing_commands(tmp_path: Path) -> list[list[str]]:
    url = f"sqlite:///{tmp_path / 'report.sqlite3'}"
    store = FeedbackStore(url)
    store.create_schema()
    populate(store)
    store.dispose()
    dev_token.load_or_create_key(tmp_path / "keys")
    return [
        ["--help"],
        ["report", "--database-url", url],
        ["report", "--database-url", url, "--format", "json"],
        ["token", "--trusted-issuers", "--key-dir", str(tmp_path / "keys")],
        ["token", "cmv-antiviral-order-select", "--key-dir", str(tmp_path / "keys")],
    ]


def test_printing_commands_stop_quietly_when_the_reader_goes(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    for argv in printing_commands(tmp_path):
        result = run_into_a_closed_pipe(argv, tmp_path, env)
        assert "Traceback" not in result.stderr, argv
        assert "BrokenPipeError" not in result.stderr, argv
        assert result.stderr == "", argv
        # argparse itself drops a failed write of --help (and exits 0); everything else stops as `cat` would.
        assert result.returncode == (0 if argv == ["--help"] else cli.EXIT_BROKEN_PIPE), argv
