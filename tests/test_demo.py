"""``cmv-cds demo``: an example request sent to a real ``cmv-cds serve``, the cards printed for a person;
errors (no server, 4xx/5xx, a bad example) as one line and a non-zero exit status."""

from __future__ import annotations

import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import responses
from processes import free_loopback_port, stop_process_group
from test_cli import CONSOLE_SCRIPT, wait_for_discovery

from service import cli, demo
from service.config import ENV_PREFIX

REPO = Path(__file__).resolve().parents[1]
ANSI = "\033["


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``cmv-cds serve`` (auth off, one worker) on a free loopback port."""
    if not CONSOLE_SCRIPT.exists():
        pytest.skip("the project is not installed in this environment (pip install -e .)")
    directory = tmp_path_factory.mktemp("demo-server")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX) and k != "GUNICORN_CMD_ARGS"}
    env |= {"CMV_CDS_REQUIRE_AUTH": "false", "CMV_CDS_DATABASE_URL": f"sqlite:///{directory}/fb.sqlite3"}
    port = free_loopback_port()
    log_path = directory / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(CONSOLE_SCRIPT), "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_discovery(process, port, log_path)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(process)


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    """The console script, as a person runs it (stdout is a pipe, not a terminal)."""
    if not CONSOLE_SCRIPT.exists():
        pytest.skip("the project is not installed in this environment (pip install -e .)")
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | {"COLUMNS": "100"}
    return subprocess.run(
        [str(CONSOLE_SCRIPT), "demo", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )


# --- against a real server -----------------------------------------------------------------------------


def test_demo_prints_the_dose_card(server_url: str) -> None:
    result = run_demo("order-select-ganciclovir.json", "--url", server_url)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "[WARNING] Adjust ganciclovir: 400 mg IV every 12 hours" in out
    assert "400 mg" in out
    # The detail, as plain text: no Markdown emphasis left.
    assert "Selected order: dose 500 mg (computed 400 mg)." in out
    assert "**" not in out
    # The suggestion and its action: type, resource type, medication, dose, timing.
    assert "- Update order: ganciclovir 400 mg IV every 12 hours (recommended)" in out
    action = next(line.strip() for line in out.splitlines() if line.strip().startswith("- update MedicationRequest"))
    assert action.startswith("- update MedicationRequest draft-gcv: ganciclovir")
    flat = " ".join(out.split())  # lines are wrapped to the terminal width
    assert "draft-gcv: ganciclovir 500 mg injection, dose 400 mg, every 12 hours for 21 days" in flat
    assert "Source: Ganciclovir for injection label" in out
    assert ANSI not in out  # not a terminal: no colour
    assert result.stderr == ""


def test_demo_by_example_name_and_by_path(server_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "order-select-ganciclovir-neutropenia", "--url", server_url]) == 0
    out = capsys.readouterr().out
    assert "[CRITICAL]" in out
    assert "- delete MedicationRequest/draft-gcv" in out
    assert "- create MedicationRequest: foscarnet" in out
    path = REPO / "examples" / "order-select-valganciclovir-severe.json"
    assert cli.main(["demo", str(path), "--url", server_url + "/"]) == 0
    assert "ganciclovir" in capsys.readouterr().out


# --- errors: one line, non-zero ------------------------------------------------------------------------


def test_connection_refused_is_one_line_and_fails() -> None:
    url = f"http://127.0.0.1:{free_loopback_port()}"  # nothing listens there
    result = run_demo("order-select-ganciclovir.json", "--url", url)
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("cmv-cds demo: cannot reach the service at ")
    assert "connection refused" in result.stderr
    assert "Traceback" not in result.stderr


@responses.activate
@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (
            401,
            {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "login", "diagnostics": "no"}],
            },
            "HTTP 401 from http://cds.test/cds-services/cmv-antiviral-order-select: no",
        ),
        (
            400,
            {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "invalid", "diagnostics": "a\nb"}],
            },
            "HTTP 400 from http://cds.test/cds-services/cmv-antiviral-order-select: a b",
        ),
        (503, "<html>down</html>", "HTTP 503 from http://cds.test/cds-services/cmv-antiviral-order-select: "),
    ],
)
def test_error_answers_are_one_line_and_fail(
    status: int, body: object, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    kwargs = {"json": body} if isinstance(body, dict) else {"body": str(body)}
    responses.post("http://cds.test/cds-services/cmv-antiviral-order-select", status=status, **kwargs)
    assert cli.main(["demo", "order-select-ganciclovir.json", "--url", "http://cds.test"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("cmv-cds demo: " + expected)
    assert captured.err.count("\n") == 1


@responses.activate
def test_token_is_sent_as_bearer(capsys: pytest.CaptureFixture[str]) -> None:
    call = responses.post("http://cds.test/cds-services/cmv-antiviral-order-select", json={"cards": []})
    assert cli.main(["demo", "order-select-ganciclovir.json", "--url", "http://cds.test", "--token", "t.k.n"]) == 0
    assert call.calls[0].request.headers["Authorization"] == "Bearer t.k.n"
    assert "No cards" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "no-such-example.json"], "no example 'no-such-example.json'"),
        (["demo", "README.md"], "cannot read README.md"),
        (["demo", "pyproject.toml"], "cannot read pyproject.toml"),
        (["demo", "order-select-ganciclovir.json", "--url", "127.0.0.1:8080"], "invalid service URL"),
    ],
)
def test_unusable_example_or_url_exits_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cmv-cds demo: ")
    assert message in err
    assert err.count("\n") == 1


# --- rendering -----------------------------------------------------------------------------------------

CARD = {
    "summary": "Avoid ganciclovir",
    "indicator": "critical",
    "detail": "## Why\n**ANC** 410 < 500: see [the label](https://example.org/label) and *policy* `§6`\n* item",
    "source": {"label": "Label", "url": "https://example.org/label"},
    "suggestions": [
        {
            "label": "Replace",
            "isRecommended": False,
            "actions": [
                {"type": "delete", "description": "Remove the order", "resourceId": "MedicationRequest/d1"},
                {
                    "type": "create",
                    "description": "Foscarnet",
                    "resource": {
                        "resourceType": "MedicationRequest",
                        "medicationCodeableConcept": {"coding": [{"display": "foscarnet"}]},
                        "dosageInstruction": [
                            {
                                "timing": {"repeat": {"frequency": 2, "period": 1, "periodUnit": "d"}},
                                "doseAndRate": [{"doseQuantity": {"value": 5600.0, "unit": "mg"}}],
                            }
                        ],
                    },
                },
                {
                    "type": "create",
                    "description": "Weekly CMV PCR",
                    "resource": {"resourceType": "ServiceRequest", "code": {"text": "CMV DNA PCR"}},
                },
            ],
        }
    ],
}


def test_markdown_becomes_plain_text() -> None:
    text = demo.markdown_to_text(str(CARD["detail"]))
    assert text == "Why\nANC 410 < 500: see the label (https://example.org/label) and policy §6\n- item"


def test_render_cards_plain_and_coloured() -> None:
    plain = demo.render_cards({"cards": [CARD]}, colour=False)
    assert "1. [CRITICAL] Avoid ganciclovir" in plain
    assert "- delete MedicationRequest/d1: Remove the order" in plain
    assert "- create MedicationRequest: foscarnet, dose 5600 mg, 2 times per day" in plain
    assert "- create ServiceRequest: CMV DNA PCR" in plain
    assert "Source: Label <https://example.org/label>" in plain
    assert ANSI not in plain
    coloured = demo.render_cards({"cards": [CARD]}, colour=True)
    assert "\033[1;31m[CRITICAL]\033[0m" in coloured
    assert demo.render_cards({"cards": []}, colour=True).startswith("No cards")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colour_only_on_a_terminal_without_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert demo.use_colour(Terminal()) is True
    assert demo.use_colour(io.StringIO()) is False
    monkeypatch.setenv("NO_COLOR", "1")
    assert demo.use_colour(Terminal()) is False


def test_demo_help_names_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("EXAMPLE", "--url", "--token", "http://127.0.0.1:8080"):
        assert flag in out


def test_demo_stops_quietly_when_its_reader_goes(server_url: str, tmp_path: Path) -> None:
    """`cmv-cds demo ... | head`: no BrokenPipeError traceback, the exit status of a command ended by SIGPIPE."""
    from test_dev_token import run_into_a_closed_pipe

    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    result = run_into_a_closed_pipe(["demo", "order-select-ganciclovir.json", "--url", server_url], tmp_path, env)
    assert (result.returncode, result.stderr) == (cli.EXIT_BROKEN_PIPE, "")


def test_demo_runs_the_order_sign_example_against_the_order_sign_service(server_url: str) -> None:
    result = run_demo("order-sign-valganciclovir", "--url", server_url)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # Table 2 of the valganciclovir label for CrCl 25–39 mL/min, and the mycophenolate interaction (label §7).
    assert "[WARNING] Adjust valganciclovir: 450 mg PO once daily (CrCl " in out
    assert "- Update order: valganciclovir 450 mg PO once daily (recommended)" in out
    flat = " ".join(out.split())  # lines are wrapped to the terminal width
    assert (
        "- update MedicationRequest draft-vgc: valganciclovir 450 mg tablet, dose 450 mg, every day for 21 days" in flat
    )
    assert "[WARNING] 1 interacting medication(s)" in out
    assert "mycophenolate mofetil 500 mg tablet" in out
