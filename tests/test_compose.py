"""docker-compose.yml and Dockerfile, checked statically (no container runs here)."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from service.config import ENV_PREFIX, Settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment, from either the mapping or the list ("KEY=value") form."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


def interpolate_default(value: str) -> str:
    """`${NAME:-default}` as compose resolves it when NAME is unset."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", value)


def test_compose_spec_format(compose: dict[str, Any]) -> None:
    assert "version" not in compose
    assert set(compose["services"]) == {"cds", "postgres", "fhir"}


def test_cds_builds_from_the_repository(compose: dict[str, Any]) -> None:
    build = compose["services"]["cds"]["build"]
    if isinstance(build, str):
        build = {"context": build}
    assert build.get("context", ".") in (".", "./")
    assert (REPO / build.get("dockerfile", "Dockerfile")).is_file()


def test_cds_publishes_8080(compose: dict[str, Any]) -> None:
    ports = [str(port) for port in compose["services"]["cds"]["ports"]]
    assert "8080:8080" in ports


@pytest.mark.parametrize("name", ["cds", "postgres", "fhir"])
def test_healthchecks(compose: dict[str, Any], name: str) -> None:
    check = compose["services"][name]["healthcheck"]
    test = check["test"]
    assert test, "empty healthcheck test"
    if isinstance(test, list):
        assert test[0] in ("CMD", "CMD-SHELL")
        assert len(test) > 1
    assert re.fullmatch(r"\d+(\.\d+)?(ms|s|m|h)", str(check["interval"]))


def test_postgres_healthcheck_uses_pg_isready(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    test = postgres["healthcheck"]["test"]
    command = test if isinstance(test, str) else " ".join(test[1:])
    env = environment(postgres)
    assert "pg_isready" in command
    assert f"-U {env['POSTGRES_USER']}" in command
    assert f"-d {env['POSTGRES_DB']}" in command


def test_postgres_keeps_data_in_a_named_volume(compose: dict[str, Any]) -> None:
    volumes = compose["services"]["postgres"]["volumes"]
    names = {str(v).split(":", 1)[0] if isinstance(v, str) else v["source"] for v in volumes}
    assert names & set(compose.get("volumes") or {})


def test_cds_waits_for_healthy_postgres(compose: dict[str, Any]) -> None:
    depends_on = compose["services"]["cds"]["depends_on"]
    assert isinstance(depends_on, dict), "the list form of depends_on cannot wait for health"
    assert depends_on["postgres"]["condition"] == "service_healthy"


def test_database_url_points_at_the_postgres_service(compose: dict[str, Any]) -> None:
    cds_env = environment(compose["services"]["cds"])
    pg_env = environment(compose["services"]["postgres"])
    url = make_url(interpolate_default(cds_env["CMV_CDS_DATABASE_URL"]))
    assert url.drivername == "postgresql+psycopg"
    assert url.host == "postgres"
    assert url.port in (None, 5432)
    assert url.username == pg_env["POSTGRES_USER"]
    assert url.password == pg_env["POSTGRES_PASSWORD"]
    assert url.database == pg_env["POSTGRES_DB"]


def test_auth_is_required_by_default(compose: dict[str, Any]) -> None:
    value = environment(compose["services"]["cds"])["CMV_CDS_REQUIRE_AUTH"]
    assert value == "${CMV_CDS_REQUIRE_AUTH:-true}"
    assert Settings.load(environ={"CMV_CDS_REQUIRE_AUTH": interpolate_default(value)}).require_auth is True


def test_every_cmv_cds_variable_is_a_setting(compose: dict[str, Any]) -> None:
    fields = {ENV_PREFIX + field.name.upper() for field in dataclasses.fields(Settings)}
    used = {
        name for service in compose["services"].values() for name in environment(service) if name.startswith(ENV_PREFIX)
    }
    assert used, "the compose file sets no CMV_CDS_* variable"
    assert used <= fields, f"not settings: {sorted(used - fields)}"
    # ...and the values are accepted by Settings (defaults substituted for ${VAR:-default}).
    values = {name: interpolate_default(environment(compose["services"]["cds"])[name]) for name in used}
    Settings.load(environ=values)


# --- the optional FHIR server (profile "fhir") -----------------------------------------------------


def test_fhir_server_is_only_in_the_fhir_profile(compose: dict[str, Any]) -> None:
    """`docker compose up` starts cds and postgres; `docker compose --profile fhir up` adds HAPI FHIR."""
    services = compose["services"]
    assert services["fhir"]["profiles"] == ["fhir"]
    assert services["fhir"]["image"] == "hapiproject/hapi:latest"
    for name in ("cds", "postgres"):
        assert "profiles" not in services[name], name
    # A service that is not started by default must not be a dependency of one that is.
    for name in ("cds", "postgres"):
        assert "fhir" not in (services[name].get("depends_on") or {}), name


def test_fhir_server_publishes_8090(compose: dict[str, Any]) -> None:
    ports = [str(port) for port in compose["services"]["fhir"]["ports"]]
    assert ports == ["8090:8080"]
    cds_ports = {str(port).split(":", 1)[0] for port in compose["services"]["cds"]["ports"]}
    assert "8090" not in cds_ports


def test_fhir_server_healthcheck_runs_in_a_distroless_image(compose: dict[str, Any]) -> None:
    """hapiproject/hapi has no shell or curl: the check is `java <mounted single-file program> <metadata URL>`."""
    fhir = compose["services"]["fhir"]
    test = fhir["healthcheck"]["test"]
    assert isinstance(test, list)
    assert test[0] == "CMD", "no shell in the image: CMD-SHELL cannot run"
    assert test[1] == "java"
    assert not {"curl", "wget", "sh", "bash"} & set(test)
    assert test[-1] == "http://localhost:8080/fhir/metadata"
    program = next(part for part in test if part.endswith(".java"))
    mounts: dict[str, str] = {}
    for volume in fhir["volumes"]:
        host_path, container_path = str(volume).split(":")[:2]
        mounts[container_path] = host_path
    assert program in mounts, "the healthcheck program is not mounted into the container"
    java_file = REPO / mounts[program]
    assert java_file.is_file()
    assert f"public class {java_file.stem} " in java_file.read_text()
    assert re.fullmatch(r"\d+s", str(fhir["healthcheck"]["start_period"]))
    assert int(str(fhir["healthcheck"]["start_period"]).rstrip("s")) >= 60, "HAPI FHIR starts slowly"


# --- Dockerfile ---------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = (REPO / "Dockerfile").read_text()
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "Dockerfile ends with a continuation"
    result = []
    for line in logical:
        instruction, _, arguments = line.partition(" ")
        result.append((instruction.upper(), arguments.strip()))
    return result


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    starts = [i for i, (instruction, _) in enumerate(instructions) if instruction == "FROM"]
    return instructions[starts[-1] :]


def exec_form(arguments: str) -> list[str]:
    parsed = json.loads(arguments) if arguments.startswith("[") else shlex.split(arguments)
    assert isinstance(parsed, list)
    return [str(part) for part in parsed]


def test_dockerfile_base_and_stages() -> None:
    froms = [args for instruction, args in dockerfile_instructions() if instruction == "FROM"]
    assert len(froms) >= 2, "expected a multi-stage build"
    assert all(args.split()[0] == "python:3.11-slim" for args in froms)


def test_dockerfile_runs_as_non_root_user() -> None:
    stage = final_stage()
    users = [args for instruction, args in stage if instruction == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":", 1)[0]
    assert user not in ("root", "0")
    run_lines = " ".join(args for instruction, args in stage if instruction == "RUN")
    assert "useradd" in run_lines
    if not user.isdigit():
        assert user in run_lines


def test_dockerfile_cmd_runs_cmv_cds_serve() -> None:
    cmds = [args for instruction, args in final_stage() if instruction == "CMD"]
    assert cmds, "no CMD"
    assert cmds[-1].startswith("["), "CMD should use the exec form (signals reach gunicorn)"
    assert exec_form(cmds[-1]) == ["cmv-cds", "serve"]
    assert not any(instruction == "ENTRYPOINT" for instruction, _ in final_stage())


def test_dockerfile_listens_on_8080_with_a_healthcheck() -> None:
    stage = final_stage()
    assert ("EXPOSE", "8080") in stage
    env = " ".join(args for instruction, args in stage if instruction == "ENV")
    assert "CMV_CDS_HOST=0.0.0.0" in env
    assert "CMV_CDS_PORT=8080" in env
    healthchecks = [args for instruction, args in stage if instruction == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    assert "http://127.0.0.1:8080/healthz" in healthchecks[0]


def test_dockerfile_env_names_are_settings() -> None:
    fields = {ENV_PREFIX + field.name.upper() for field in dataclasses.fields(Settings)}
    env = " ".join(args for instruction, args in dockerfile_instructions() if instruction == "ENV")
    used = set(re.findall(rf"\b({ENV_PREFIX}[A-Z0-9_]+)=", env))
    assert used <= fields, f"not settings: {sorted(used - fields)}"


# What the image needs: the packages, the data they read next to them (cards.codes.FHIR_PROFILES_DIR,
# service.preview.EXAMPLES_DIR) and pyproject.toml (the editable install).
IMAGE_SOURCES = {"pyproject.toml", "service", "cards", "fhir_profiles", "examples"}


def test_dockerfile_copies_only_what_the_image_needs() -> None:
    sources: set[str] = set()
    for instruction, args in dockerfile_instructions():
        if instruction == "COPY" and not args.startswith("--from"):
            sources.update(part.rstrip("/") for part in args.split()[:-1])
    assert sources == IMAGE_SOURCES


def test_dockerignore_keeps_the_context_small() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == IMAGE_SOURCES
