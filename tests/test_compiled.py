"""The compiled form (scripts/compile_hot_path.py): which modules it covers, and the refusal of a stale build.

The compiled form itself is tested by the test command's second run, which compiles in place and runs the whole
suite on it (scripts/test.sh sets TEST_EXPECT_COMPILED=1 there; the last test below then checks that the compiled
code is what ran).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

import cards
import service
from cards.compiled import MANIFEST_NAME, StaleCompiledModules, check_package, source_digest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import compile_hot_path as compile_script  # noqa: E402


def _package(tmp_path: Path) -> Path:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text('"""A package."""\n')
    (package / "rules.py").write_text("LIMIT = 5\n")
    return package


def _write_manifest(package: Path, names: list[str]) -> None:
    manifest = {name: source_digest(package / name) for name in names}
    (package / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_an_interpreted_package_passes_with_no_compiled_modules(tmp_path: Path) -> None:
    assert check_package(_package(tmp_path)) == 0


def test_extensions_without_a_manifest_are_refused(tmp_path: Path) -> None:
    package = _package(tmp_path)
    (package / f"rules{EXTENSION_SUFFIXES[0]}").write_bytes(b"\x7fELF")
    with pytest.raises(StaleCompiledModules, match=r"without _compiled\.json \(rules\..*compile_hot_path\.py --clean"):
        check_package(package)


def test_a_current_build_counts_its_modules(tmp_path: Path) -> None:
    package = _package(tmp_path)
    _write_manifest(package, ["rules.py"])
    assert check_package(package) == 1


@pytest.mark.parametrize("edit", ["change", "delete"])
def test_a_source_changed_after_compiling_is_refused(tmp_path: Path, edit: str) -> None:
    package = _package(tmp_path)
    _write_manifest(package, ["rules.py"])
    if edit == "change":
        (package / "rules.py").write_text("LIMIT = 6\n")
    else:
        (package / "rules.py").unlink()
    with pytest.raises(StaleCompiledModules, match=r"pkg/: rules\.py changed since .*scripts/compile_hot_path\.py"):
        check_package(package)


def test_a_stale_build_stops_the_package_import(tmp_path: Path) -> None:
    """The package's own __init__ runs the check: a copy of cards/ with an edited source after its manifest cannot
    be imported, so neither the service nor the tests start on code other than the source."""
    tree = tmp_path / "tree"
    shutil.copytree(REPO / "cards", tree / "cards", ignore=shutil.ignore_patterns("__pycache__", "*.so", "_compiled*"))
    _write_manifest(tree / "cards", ["units.py"])
    (tree / "cards" / "units.py").write_text((tree / "cards" / "units.py").read_text() + "\n# edited\n")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-c", "import cards"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "StaleCompiledModules: cards/: units.py changed since the package was compiled" in done.stderr


def test_the_table_compiles_every_clinical_module_and_the_hook_path() -> None:
    clinical = {str(p.relative_to(REPO / "cards")) for p in compile_script.sources("cards")}
    every = {str(p.relative_to(REPO / "cards")) for p in (REPO / "cards").rglob("*.py")}
    assert clinical == every - {"__init__.py", "rules/__init__.py", "compiled.py"}
    hook_path = {p.name for p in compile_script.sources("service")}
    assert {
        "hooks.py",
        "draft_orders.py",
        "validation.py",
        "prefetch.py",
        "bundles.py",
        "medication_refs.py",
    } <= hook_path
    # Left interpreted on purpose (scripts/compile_hot_path.py says why): Flask's app, the error classes, and the
    # modules whose functions the tests replace.
    assert hook_path.isdisjoint({"__init__.py", "app.py", "errors.py", "audit_log.py", "store.py", "fhir_client.py"})


def test_clean_removes_only_compiled_files(tmp_path: Path) -> None:
    for name in compile_script.COMPILED:
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "module.py").write_text("X = 1\n")
        (tmp_path / name / f"module{EXTENSION_SUFFIXES[0]}").write_bytes(b"")
        (tmp_path / name / "sub" / f"_native__mypyc{EXTENSION_SUFFIXES[0]}").write_bytes(b"")
        (tmp_path / name / MANIFEST_NAME).write_text("{}")
    removed = compile_script.clean(tmp_path)
    assert len(removed) == 3 * len(compile_script.COMPILED)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["module.py"] * len(compile_script.COMPILED)


@pytest.mark.skipif(os.environ.get("TEST_EXPECT_COMPILED") != "1", reason="the test command's compiled run only")
def test_the_compiled_run_runs_compiled_code() -> None:
    assert len(compile_script.sources("cards")) == cards.COMPILED_MODULES
    assert len(compile_script.sources("service")) == service.COMPILED_MODULES
    for package in ("cards", "service"):
        for path in compile_script.sources(package):
            name = ".".join((package, *path.relative_to(REPO / package).with_suffix("").parts))
            assert str(importlib.import_module(name).__file__).endswith(tuple(EXTENSION_SUFFIXES)), name
