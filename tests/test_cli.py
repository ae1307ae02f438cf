"""`cmv-cds` command line: argument parsing, gunicorn options, configuration errors, and a real server."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gunicorn.app.wsgiapp import WSGIApplication
from processes import free_loopback_port, stop_process_group

from service import cli, gunicorn_conf
from service.config import ENV_PREFIX, ConfigError, Settings
from service.draft_schema import draft_schema
from service.validation import SCHEMA_DIR, fast_validator

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CMV_CDS_* (or GUNICORN_CMD_ARGS) from the developer's shell leaks into these tests."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX) or name == "GUNICORN_CMD_ARGS":
            monkeypatch.delenv(name)


def options_for(argv: list[str]) -> dict[str, Any]:
    args = cli.build_parser().parse_args(argv)
    return cli.gunicorn_options(args, Settings.load())


class NotRun(Exception):
    pass


@pytest.fixture
def no_run(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Replace gunicorn's run(): record the configured application instead of starting a server."""
    started: list[Any] = []

    def fake_run(self: Any) -> None:
        started.append(self)

    monkeypatch.setattr(cli.CdsApplication, "run", fake_run)
    return started


# --- arguments → gunicorn options -------------------------------------------------------------------

# gunicorn's sync worker with a drain on SIGTERM (service/gunicorn_worker.py).
DRAINING_SYNC = "service.gunicorn_worker.DrainingSyncWorker"


def test_defaults_come_from_settings() -> None:
    options = options_for(["serve"])
    assert options["bind"] == "127.0.0.1:8080"
    assert options["workers"] == 2
    assert options["worker_class"] == DRAINING_SYNC


def test_static_gunicorn_settings() -> None:
    options = options_for(["serve"])
    assert options["timeout"] == 30
    assert options["keepalive"] == 2
    assert options["max_requests"] == 10_000
    assert options["max_requests_jitter"] > 0
    assert options["graceful_timeout"] < options["timeout"]
    assert options["accesslog"] is None
    assert options["preload_app"] is False
    assert options["post_worker_init"] is gunicorn_conf.post_worker_init
    assert options["control_socket_disable"] is True


def test_environment_sets_bind_and_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CMV_CDS_HOST", "0.0.0.0")
    monkeypatch.setenv("CMV_CDS_PORT", "9001")
    monkeypatch.setenv("CMV_CDS_WORKERS", "4")
    monkeypatch.setenv("CMV_CDS_LOG_LEVEL", "WARNING")
    options = options_for(["serve"])
    assert options["bind"] == "0.0.0.0:9001"
    assert options["workers"] == 4
    assert options["loglevel"] == "warning"


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CMV_CDS_HOST", "0.0.0.0")
    monkeypatch.setenv("CMV_CDS_PORT", "9001")
    monkeypatch.setenv("CMV_CDS_WORKERS", "4")
    options = options_for(["serve", "--host", "127.0.0.2", "--port", "9100", "--workers", "3"])
    assert options["bind"] == "127.0.0.2:9100"
    assert options["workers"] == 3
    assert options["worker_class"] == DRAINING_SYNC


def test_ipv6_host_is_bracketed() -> None:
    assert options_for(["serve", "--host", "::1", "--port", "8081"])["bind"] == "[::1]:8081"
    assert options_for(["serve", "--host", "[::]"])["bind"] == "[::]:8080"


def test_options_are_valid_gunicorn_settings() -> None:
    """Every option reaches gunicorn's Config (an unknown name or a bad value would raise)."""
    application = cli.CdsApplication(options_for(["serve", "--port", "8123", "--workers", "3"]))
    cfg = application.cfg
    assert cfg.bind == ["127.0.0.1:8123"]
    assert cfg.workers == 3
    assert cfg.worker_class_str == DRAINING_SYNC
    assert cfg.timeout == 30
    assert cfg.keepalive == 2
    assert cfg.max_requests == 10_000
    assert cfg.accesslog is None
    assert cfg.preload_app is False
    assert cfg.post_worker_init is gunicorn_conf.post_worker_init


def test_serve_runs_gunicorn_with_the_options(no_run: list[Any]) -> None:
    assert cli.main(["serve", "--port", "8124", "--workers", "1"]) == 0
    [application] = no_run
    assert application.cfg.bind == ["127.0.0.1:8124"]
    assert application.cfg.workers == 1
    assert application.cfg.worker_class_str == DRAINING_SYNC


def test_gunicorn_reads_the_conf_module_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    """`gunicorn -c python:service.gunicorn_conf 'service.wsgi:app'` gets the same settings."""
    monkeypatch.setattr(sys, "argv", ["gunicorn", "-c", "python:service.gunicorn_conf", "service.wsgi:app"])
    monkeypatch.chdir(REPO)
    cfg = WSGIApplication("%(prog)s [OPTIONS] [APP_MODULE]", prog="gunicorn").cfg
    assert cfg.worker_class_str == DRAINING_SYNC
    assert cfg.bind == [gunicorn_conf.bind]
    assert cfg.workers == gunicorn_conf.workers
    assert cfg.accesslog is None
    assert cfg.preload_app is False
    assert cfg.post_worker_init is gunicorn_conf.post_worker_init


def test_post_worker_init_compiles_the_schemas(caplog: pytest.LogCaptureFixture) -> None:
    draft_schema.cache_clear()
    fast_validator.cache_clear()
    with caplog.at_level(logging.INFO, logger="cmv_cds.gunicorn"):
        gunicorn_conf.post_worker_init(object())
    assert [r.getMessage() for r in caplog.records if r.name == "cmv_cds.gunicorn"] == ["worker warmed"]
    assert draft_schema.cache_info().currsize == 1
    assert fast_validator.cache_info().currsize == len(list(SCHEMA_DIR.glob("*.schema.json")))


# --- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CMV_CDS_PORT", "abc"),
        ("CMV_CDS_WORKERS", "0"),
        ("CMV_CDS_PORT", "70000"),
        ("CMV_CDS_DOSING_WEIGHT", "ideal"),
        ("CMV_CDS_REQUIRE_AUTH", "maybe"),
    ],
)
def test_config_error_exits_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_run: list[Any],
    name: str,
    value: str,
) -> None:
    monkeypatch.setenv(name, value)
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cmv-cds: configuration error: ")
    assert err.count("\n") == 1
    assert err.endswith("\n")
    assert name in err
    assert no_run == []


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["serve", "--port", "0"],
        ["serve", "--port", "http"],
        ["serve", "--workers", "0"],
        ["serve", "--workers", "two"],
        ["serve", "--bogus"],
        ["launch"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str], no_run: list[Any]) -> None:
    assert cli.main(argv) == 2
    assert "usage: cmv-cds" in capsys.readouterr().err
    assert no_run == []


# --- help -------------------------------------------------------------------------------------------


def test_help_names_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "serve" in out
    for name in Settings.__dataclass_fields__:
        assert ENV_PREFIX + name.upper() in out


def test_serve_help_describes_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    for flag, env in [
        ("--host", "CMV_CDS_HOST"),
        ("--port", "CMV_CDS_PORT"),
        ("--workers", "CMV_CDS_WORKERS"),
    ]:
        assert flag in out
        assert env in out
    assert "sync" in out


def test_console_script_points_at_main() -> None:
    with (REPO / "pyproject.toml").open("rb") as handle:
        scripts = tomllib.load(handle)["project"]["scripts"]
    assert scripts["cmv-cds"] == "service.cli:main"


# --- end to end: a real gunicorn server -------------------------------------------------------------


@pytest.fixture
def server_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX) and k != "GUNICORN_CMD_ARGS"}
    env["CMV_CDS_REQUIRE_AUTH"] = "false"
    env["CMV_CDS_DATABASE_URL"] = f"sqlite:///{tmp_path}/fb.sqlite3"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@pytest.fixture
def start_server(tmp_path: Path, server_env: dict[str, str]) -> Iterator[Any]:
    """Start a command in its own process group; always terminate the group and wait at the end."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(command: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
        log_path = tmp_path / f"server-{len(processes)}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        processes.append(process)
        return process, log_path

    yield start

    for process in processes:
        stop_process_group(process)


def wait_for_discovery(process: subprocess.Popen[bytes], port: int, log_path: Path) -> dict[str, Any]:
    """Poll GET /cds-services until it answers 200 (at most 20 s); fail early if the server exits."""
    url = f"http://127.0.0.1:{port}/cds-services"
    deadline = time.monotonic() + 20
    last_error = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    body: dict[str, Any] = json.loads(response.read())
                    return body
                last_error = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            last_error = f"HTTP {exc.code}"
        except OSError as exc:  # connection refused while gunicorn starts
            last_error = repr(exc)
        time.sleep(0.2)
    pytest.fail(f"no 200 from {url} within 20 s (last: {last_error}):\n{log_path.read_text()[-4000:]}")


CONSOLE_SCRIPT = Path(sys.executable).parent / "cmv-cds"


@pytest.mark.parametrize(
    "launcher", ["cmv-cds serve", "python -m service.cli serve", "gunicorn -c python:service.gunicorn_conf"]
)
def test_real_server_lists_the_services(launcher: str, start_server: Any, server_env: dict[str, str]) -> None:
    port = free_loopback_port()
    flags = ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if launcher == "cmv-cds serve":
        if not CONSOLE_SCRIPT.exists():
            pytest.skip("the project is not installed in this environment (pip install -e .)")
        command = [str(CONSOLE_SCRIPT), "serve", *flags]
    elif launcher == "python -m service.cli serve":
        command = [sys.executable, "-m", "service.cli", "serve", *flags]
    else:  # gunicorn itself, configured by the environment only
        server_env |= {"CMV_CDS_HOST": "127.0.0.1", "CMV_CDS_PORT": str(port), "CMV_CDS_WORKERS": "1"}
        command = [sys.executable, "-m", "gunicorn", "-c", "python:service.gunicorn_conf", "service.wsgi:app"]
    process, log_path = start_server(command, server_env)

    discovery = wait_for_discovery(process, port, log_path)

    services = discovery["services"]
    assert len(services) == 2
    assert {service["hook"] for service in services} == {"order-select", "order-sign"}
    # GET /metrics: prometheus_client's multiprocess mode, in a directory the master made (gunicorn_conf).
    metrics_dir = check_metrics(port, log_path)
    # SIGTERM to the process group: gunicorn shuts down gracefully and exits 0.
    assert stop_process_group(process) == 0
    assert not metrics_dir.exists(), "the master deletes the metrics directory it created"
    log = log_path.read_text()
    assert "worker warmed" in log  # post_worker_init ran in the worker
    assert f"Using worker: {DRAINING_SYNC}" in log


def check_metrics(port: int, log_path: Path) -> Path:
    """/metrics counts the discovery calls, read from the workers' files in the master's temporary directory."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    found = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    discovery = (("method", "GET"), ("route", "/cds-services"), ("service_id", ""), ("status", "200"))
    assert found.get(("cmv_cds_http_requests_total", discovery), 0) >= 1, text[-2000:]
    assert not any(name.startswith("process_") for name, _ in found), "per-process collectors: not multiprocess mode"
    match = re.search(r"Prometheus multiprocess directory: (\S+)", log_path.read_text())
    assert match, "gunicorn_conf.on_starting did not run"
    directory = Path(match.group(1))
    assert sorted(directory.glob("counter_*.db")), "no worker wrote metric files there"
    return directory


def test_a_fhir_budget_gunicorn_would_cut_short_is_a_configuration_error() -> None:
    gunicorn_conf.check_fhir_budget(Settings.load(environ={"CMV_CDS_FHIR_DEADLINE_SECONDS": "25"}))
    with pytest.raises(ConfigError, match="must be at most 25"):
        gunicorn_conf.check_fhir_budget(Settings.load(environ={"CMV_CDS_FHIR_DEADLINE_SECONDS": "26"}))
