"""The README stays true: its two set-up commands, the CI command, and every setting documented."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from service.config import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_opens_with_the_two_commands() -> None:
    block = re.search(r"```bash\n(.*?)```", README, re.DOTALL)
    assert block is not None
    assert README.index("```bash") < README.index("\n## ")
    commands = block.group(1).strip().splitlines()
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
    import json

    from service.hooks import validate_request
    from service.registry import SERVICES

    for path in sorted((ROOT / "examples").glob("order-select-*.json")):
        validate_request(SERVICES["cmv-antiviral-order-select"], json.loads(path.read_text(encoding="utf-8")))


def test_epic_prefetch_configuration_matches_the_templates() -> None:
    """Epic's analysts type the prefetch in by hand from the README (Epic does not read discovery): every key
    and query must be there exactly as the service declares it."""
    from service.registry import prefetch_templates

    section = README[README.index("### Epic") : README.index("### The CDS Hooks sandbox")]
    block = re.search(r"```text\n(.*?)```", section, re.DOTALL)
    assert block is not None
    lines = [line.split(None, 1) for line in block.group(1).strip().splitlines()]
    assert [(key, query.strip()) for key, query in lines] == [(t.key, t.query) for t in prefetch_templates()]
