"""docker-compose.yml and Dockerfile, checked statically (no container runs here)."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from service.auth import load_trusted_issuers
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


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """`${NAME:-default}` / `${NAME}` as compose resolves them from ``env`` (its .env file): the value when set and
    not empty, else the default (empty without one). ``$$`` is a literal ``$``, left for the container's shell."""
    env = env or {}
    resolved = _VARIABLE.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value.replace("$$", "\0"))
    return resolved.replace("\0", "$")


def interpolate_default(value: str) -> str:
    """`${NAME:-default}` as compose resolves it when NAME is unset."""
    return interpolate(value)


def variables(compose_text: str) -> set[str]:
    """Names of the variables compose interpolates in the file (``$${...}`` is the container's, not compose's)."""
    return {m.group(1) for m in _VARIABLE.finditer(compose_text.replace("$$", ""))}


def env_file(path: Path) -> dict[str, str]:
    """KEY=value lines of a compose env file (comments and blank lines skipped, single quotes taken literally)."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, separator, value = stripped.partition("=")
        assert separator, f"not KEY=value: {line!r}"
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        values[key] = value
    return values


def test_compose_spec_format(compose: dict[str, Any]) -> None:
    assert "version" not in compose
    assert set(compose["services"]) == {"migrate", "cds", "postgres", "fhir"}


def test_cds_builds_from_the_repository(compose: dict[str, Any]) -> None:
    build = compose["services"]["cds"]["build"]
    if isinstance(build, str):
        build = {"context": build}
    assert build.get("context", ".") in (".", "./")
    assert (REPO / build.get("dockerfile", "Dockerfile")).is_file()


def test_cds_publishes_8080_on_loopback_unless_told_otherwise(compose: dict[str, Any]) -> None:
    [port] = [str(port) for port in compose["services"]["cds"]["ports"]]
    assert interpolate(port) == "127.0.0.1:8080:8080"
    assert interpolate(port, env_file(REPO / ".env.example")) == "127.0.0.1:8080:8080"
    assert interpolate(port, {"CDS_PUBLISH_ADDRESS": "0.0.0.0", "CDS_PUBLISH_PORT": "9000"}) == "0.0.0.0:9000:8080"


def test_no_stale_notes_in_the_compose_file() -> None:
    assert "will be added" not in (REPO / "docker-compose.yml").read_text()


# --- .env.example: every setting the compose file passes on ------------------------------------------------


def test_env_example_lists_exactly_the_variables_compose_reads(compose: dict[str, Any]) -> None:
    used = variables((REPO / "docker-compose.yml").read_text())
    listed = set(env_file(REPO / ".env.example"))
    assert used == listed, {"not in .env.example": used - listed, "not used by compose": listed - used}
    assert "CMV_CDS_TRUSTED_ISSUERS" in listed


def test_env_example_values_are_valid_settings(compose: dict[str, Any]) -> None:
    example = env_file(REPO / ".env.example")
    cds_env = {name: interpolate(value, example) for name, value in environment(compose["services"]["cds"]).items()}
    settings = Settings.load(environ=cds_env)
    assert settings.require_auth is True
    assert settings.trusted_issuers == ""
    assert example["CDS_PUBLISH_ADDRESS"] == "127.0.0.1"


def test_trusted_issuers_reach_the_service_from_the_env_file(compose: dict[str, Any], tmp_path: Path) -> None:
    """The newcomer's trap: auth on and no way to trust an issuer but editing the compose file. The .env value is
    passed through to the service unchanged (and parsed by it)."""
    issuers = '{"https://ehr.example.org": {"jku": ["https://ehr.example.org/.well-known/jwks.json"]}}'
    env_path = tmp_path / ".env"
    env_path.write_text(
        (REPO / ".env.example").read_text().replace("CMV_CDS_TRUSTED_ISSUERS=", f"CMV_CDS_TRUSTED_ISSUERS='{issuers}'")
    )
    cds_env = {
        name: interpolate(value, env_file(env_path)) for name, value in environment(compose["services"]["cds"]).items()
    }
    assert cds_env["CMV_CDS_TRUSTED_ISSUERS"] == issuers
    assert "https://ehr.example.org" in load_trusted_issuers(Settings.load(environ=cds_env).trusted_issuers)


# --- the schema step ---------------------------------------------------------------------------------------


def test_migrate_runs_once_before_the_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    migrate = services["migrate"]
    assert migrate["command"][:2] == ["cmv-cds", "migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["cds"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert environment(migrate)["CMV_CDS_DATABASE_URL"] == environment(services["cds"])["CMV_CDS_DATABASE_URL"]
    assert "ports" not in migrate


def test_the_spool_is_a_named_volume(compose: dict[str, Any]) -> None:
    """Audit rows waiting for the database survive a container restart (Dockerfile: CMV_CDS_SPOOL_DIR)."""
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in compose["services"]["cds"]["volumes"]}
    assert mounts["/var/lib/cmv-cds"] in (compose.get("volumes") or {})
    env = " ".join(args for instruction, args in final_stage() if instruction == "ENV")
    assert "CMV_CDS_SPOOL_DIR=/var/lib/cmv-cds/spool" in env


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
    """The user and database from the container's own environment (``$$``: not compose's interpolation)."""
    postgres = compose["services"]["postgres"]
    test = postgres["healthcheck"]["test"]
    command = interpolate(test if isinstance(test, str) else " ".join(test[1:]))
    assert "pg_isready" in command
    assert "-U ${POSTGRES_USER}" in command
    assert "-d ${POSTGRES_DB}" in command
    assert set(environment(postgres)) >= {"POSTGRES_USER", "POSTGRES_DB"}


def test_postgres_keeps_data_in_a_named_volume(compose: dict[str, Any]) -> None:
    volumes = compose["services"]["postgres"]["volumes"]
    names = {str(v).split(":", 1)[0] if isinstance(v, str) else v["source"] for v in volumes}
    assert names & set(compose.get("volumes") or {})


def test_cds_waits_for_healthy_postgres(compose: dict[str, Any]) -> None:
    depends_on = compose["services"]["cds"]["depends_on"]
    assert isinstance(depends_on, dict), "the list form of depends_on cannot wait for health"
    assert depends_on["postgres"]["condition"] == "service_healthy"


@pytest.mark.parametrize(
    "dotenv",
    [{}, {"POSTGRES_USER": "owner", "POSTGRES_PASSWORD": "s3cret", "POSTGRES_DB": "cds"}],
    ids=["defaults", "set"],
)
def test_database_url_points_at_the_postgres_service(compose: dict[str, Any], dotenv: dict[str, str]) -> None:
    cds_env = {k: interpolate(v, dotenv) for k, v in environment(compose["services"]["cds"]).items()}
    pg_env = {k: interpolate(v, dotenv) for k, v in environment(compose["services"]["postgres"]).items()}
    url = make_url(cds_env["CMV_CDS_DATABASE_URL"])
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
    image, _, tag = services["fhir"]["image"].partition(":")
    assert image == "hapiproject/hapi"
    assert re.fullmatch(r"v\d+\.\d+\.\d+(-\d+)?", tag), f"pin a released tag, not {tag!r}"
    for name in ("migrate", "cds", "postgres"):
        assert "profiles" not in services[name], name
    # A service that is not started by default must not be a dependency of one that is.
    for name in ("migrate", "cds", "postgres"):
        assert "fhir" not in (services[name].get("depends_on") or {}), name


def test_fhir_server_publishes_8090_on_loopback(compose: dict[str, Any]) -> None:
    ports = [str(port) for port in compose["services"]["fhir"]["ports"]]
    assert ports == ["127.0.0.1:8090:8080"]
    cds_ports = {interpolate(str(port)).split(":")[1] for port in compose["services"]["cds"]["ports"]}
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
# service.preview.EXAMPLES_DIR), pyproject.toml (the editable install) and the builder's compile step.
IMAGE_SOURCES = {"pyproject.toml", "service", "cards", "fhir_profiles", "examples", "scripts/compile_hot_path.py"}


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


def test_dockerfile_ships_the_compiled_hot_path() -> None:
    """The builder compiles with mypyc (scripts/compile_hot_path.py); the runtime stage takes the packages from it, with
    their extensions and manifests, and no compiler."""
    instructions = dockerfile_instructions()
    builder = instructions[: len(instructions) - len(final_stage())]
    builder_runs = " ".join(args for instruction, args in builder if instruction == "RUN")
    assert "python scripts/compile_hot_path.py" in builder_runs
    copies = [args for instruction, args in final_stage() if instruction == "COPY"]
    assert "--from=builder /app/cards/ cards/" in copies
    assert "--from=builder /app/service/ service/" in copies
    assert not any("gcc" in args for instruction, args in final_stage() if instruction == "RUN")


def test_ci_compiles_with_the_mypy_the_image_compiles_with() -> None:
    """The test command's compiled run and the image's builder use one mypy (mypyc) release: what CI tests is what
    ships."""
    args = [args for instruction, args in dockerfile_instructions() if instruction == "ARG"]
    image = next(a.split("=", 1)[1] for a in args if a.startswith("MYPY_VERSION="))
    test_extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    assert f"mypy=={image}" in test_extra
