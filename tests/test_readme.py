"""The README stays true: its two set-up commands, the CI command, every setting documented, the ``cmv-cds``
commands written the way the first command installs them, and those commands running as written.

The run-as-written tests execute the README's own ``bash`` blocks with bash, in a scratch directory holding
only links to this checkout's ``.venv`` and ``examples`` (so nothing is written into the repository), with two
changes a reader would not notice: a line that starts the service (``cmv-cds serve``) runs in the background
until the block ends, and the service listens on a free port instead of 8080 (``CMV_CDS_PORT``, which
``serve``, ``demo`` and ``token`` all follow; ``127.0.0.1:8080`` in a URL becomes that port).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from processes import free_loopback_port
from test_cli import CONSOLE_SCRIPT

from service.config import ENV_PREFIX, Settings
from service.hooks import validate_request
from service.registry import SERVICES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BASH_BLOCKS: list[str] = re.findall(r"```bash\n(.*?)```", README, re.DOTALL)
INSTALLED = ".venv/bin/cmv-cds"
SERVER_START_SECONDS = 30
BLOCK_SECONDS = 120


def test_readme_opens_with_the_two_commands() -> None:
    assert README.index("```bash") < README.index("\n## ")
    commands = BASH_BLOCKS[0].strip().splitlines()
    assert len(commands) == 2
    assert "cmv-cds serve" in commands[0]
    assert "CMV_CDS_REQUIRE_AUTH=false" in commands[0]
    assert commands[1] == "bash scripts/test.sh"


def test_ci_runs_the_readme_test_command() -> None:
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_every_setting_is_documented() -> None:
    for field in dataclasses.fields(Settings):
        assert f"{ENV_PREFIX}{field.name.upper()}" in README, field.name


def test_examples_are_valid_requests() -> None:
    for path in sorted((ROOT / "examples").glob("*.json")):
        body = json.loads(path.read_text(encoding="utf-8"))
        service = next(service for service in SERVICES.values() if service.hook == body["hook"])
        validate_request(service, body)


# --- cmv-cds as the first command installs it ----------------------------------------------------------

# Where a shell starts a new command: line start, after && || ; | or inside $( ).
_COMMAND_START = re.compile(r"(?:^|&&|\|\||;|\||\$\()\s*")
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=(?:\"[^\"]*\"|'[^']*'|\S)*\s+")


def commands_run(text: str) -> list[str]:
    """The program each command of a shell line runs (``VAR=value`` prefixes and ``export`` skipped)."""
    text = re.sub(r"\s#.*$", "", text)
    programs = []
    for match in _COMMAND_START.finditer(text):
        rest = text[match.end() :]
        if rest.startswith("export "):
            continue
        while assignment := _ASSIGNMENT.match(rest):
            rest = rest[assignment.end() :]
        if rest:
            programs.append(rest.split()[0].rstrip(")\"'"))
    return programs


def shell_lines() -> list[str]:
    """Every line of the README's bash blocks, and every inline code span that is a command line (a
    ``VAR=value`` prefix, or a program with a subcommand and arguments), not the name of a command."""
    lines = [line for block in BASH_BLOCKS for line in block.splitlines()]
    for span in re.findall(r"`([^`\n]+)`", README.replace("\n", " ")):
        if _ASSIGNMENT.match(span) or len(span.split()) >= 3:
            lines.append(span)
    return lines


def test_the_commands_are_written_the_way_the_first_command_installs_them() -> None:
    runs = [(line, program) for line in shell_lines() for program in commands_run(line)]
    assert sum(program == INSTALLED for _, program in runs) >= 8  # serve, report, demo, token: all found
    assert [line for line, program in runs if program == "cmv-cds"] == []


def test_the_command_finder_sees_every_form() -> None:
    assert commands_run('CMV_CDS_X=1 A="b c" cmv-cds serve   # comment cmv-cds x') == ["cmv-cds"]
    assert commands_run('export X="$(cmv-cds token --trusted-issuers)"') == ["cmv-cds"]
    assert commands_run('.venv/bin/cmv-cds demo x --token "$(cmv-cds token y)"') == [INSTALLED, "cmv-cds"]
    assert commands_run("python -m venv .venv && .venv/bin/pip install -e . && cmv-cds serve") == [
        "python",
        ".venv/bin/pip",
        "cmv-cds",
    ]


# --- ... and they run as written --------------------------------------------------------------------------


def block_with(text: str) -> str:
    [block] = [block for block in BASH_BLOCKS if text in block]
    return block


def as_script(lines: list[str], port: int) -> str:
    """The README lines as one bash script: each ``cmv-cds serve`` line backgrounded, then waited for (its port
    accepting connections, within a deadline); the port moved from 8080 to ``port``."""
    script = ["set -euo pipefail"]
    for line in lines:
        if "cmv-cds serve" in line:
            command = re.sub(r"\s+#.*$", "", line)
            script += [
                f'{command} >>"$README_SERVER_LOG" 2>&1 &',
                f"for _ in $(seq {SERVER_START_SECONDS * 10}); do "
                f"(exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null && break; sleep 0.1; done",
            ]
        else:
            script.append(line)
    return "\n".join(script).replace("127.0.0.1:8080", f"127.0.0.1:{port}") + "\n"


@dataclasses.dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str
    server_log: str


def run_as_written(lines: list[str], directory: Path) -> Ran:
    """Run the lines in ``directory``, a scratch working directory that links this checkout's .venv and examples."""
    if not CONSOLE_SCRIPT.exists():
        pytest.skip("the project is not installed in this environment (pip install -e .)")
    for name in (".venv", "examples"):
        (directory / name).symlink_to(ROOT / name)
    port = free_loopback_port()
    server_log = directory / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX) and k != "GUNICORN_CMD_ARGS"}
    env |= {"CMV_CDS_PORT": str(port), "README_SERVER_LOG": str(server_log), "COLUMNS": "120"}
    env.pop("NO_COLOR", None)
    process = subprocess.Popen(
        ["bash", "-c", as_script(lines, port)],
        cwd=directory,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the server the script starts is in this group, and stopped with it
    )
    try:
        stdout, stderr = process.communicate(timeout=BLOCK_SECONDS)
    finally:
        stop_group(process)
    log = server_log.read_text(encoding="utf-8", errors="replace") if server_log.exists() else ""
    return Ran(process.returncode, stdout, stderr, log)


def stop_group(process: subprocess.Popen[str], timeout_seconds: float = 20) -> None:
    """Stop what the script left running in its process group (the server it backgrounded): SIGTERM, then
    SIGKILL if any of it is still there after ``timeout_seconds``."""
    if process.poll() is None:
        process.kill()
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def first_command_serve() -> str:
    """The part of the README's first command that starts the service (after installing it)."""
    return BASH_BLOCKS[0].splitlines()[0].split(" && ")[-1]


def test_the_examples_report_and_demo_commands_run_as_written(tmp_path: Path) -> None:
    """The first command's service (auth off), then the worked examples, the report and the demo blocks."""
    lines = [first_command_serve()]
    markers = ("@examples/order-select-ganciclovir", "@examples/order-sign", "cmv-cds report ", "demo order-sign")
    for marker in markers:
        lines += [line for line in block_with(marker).splitlines() if line.strip()]
    ran = run_as_written(lines, tmp_path)
    assert ran.returncode == 0, f"{ran.stderr[-3000:]}\n--- server log:\n{ran.server_log[-3000:]}"
    out = ran.stdout
    # curl, order-select and order-sign: the JSON answers (the CrCl follows the patient's age, hence today's date).
    assert '"summary":"Adjust ganciclovir: 400 mg IV every 12 hours (CrCl ' in out
    assert '"summary":"Adjust valganciclovir: 450 mg PO once daily (CrCl ' in out
    # The report: the text table, then JSON for one service.
    assert "CDS governance report: all services, all time" in out
    assert '"serviceId": "cmv-antiviral-order-select"' in out
    # The demo: both examples' cards, for a person.
    assert "[WARNING] Adjust ganciclovir: 400 mg IV every 12 hours" in out
    assert "[WARNING] Adjust valganciclovir: 450 mg PO once daily" in out
    assert "AUTHENTICATION DISABLED" in ran.server_log


def test_trying_authentication_locally_runs_as_written(tmp_path: Path) -> None:
    lines = [line for line in block_with("token --trusted-issuers").splitlines() if line.strip()]
    ran = run_as_written(lines, tmp_path)
    assert ran.returncode == 0, f"{ran.stderr[-3000:]}\n--- server log:\n{ran.server_log[-3000:]}"
    assert "[WARNING] Adjust ganciclovir: 400 mg IV every 12 hours" in ran.stdout
    discovery = json.loads(ran.stdout.strip().splitlines()[-1])
    assert {service["id"] for service in discovery["services"]} == set(SERVICES)
    assert "AUTHENTICATION DISABLED" not in ran.server_log  # auth was on, and the tokens were accepted
    assert "made a development key in .cmv-cds-dev/" in ran.stderr
    assert (tmp_path / ".cmv-cds-dev" / "client-key.pem").is_file()


def test_epic_prefetch_configuration_matches_the_templates() -> None:
    """Epic's analysts type the prefetch in by hand from the README (Epic does not read discovery): every key
    and query must be there exactly as the service declares it."""
    from service.registry import prefetch_templates

    section = README[README.index("### Epic") : README.index("### The CDS Hooks sandbox")]
    block = re.search(r"```text\n(.*?)```", section, re.DOTALL)
    assert block is not None
    lines = [line.split(None, 1) for line in block.group(1).strip().splitlines()]
    assert [(key, query.strip()) for key, query in lines] == [(t.key, t.query) for t in prefetch_templates()]
