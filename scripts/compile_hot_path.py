"""Compile the request's hot path with mypyc: the clinical package and the hook-call modules of the service.

    python scripts/compile_hot_path.py           # build the C extensions in place, beside their sources
    python scripts/compile_hot_path.py --clean   # remove them (and the manifests)

The modules stay plain, mypy --strict Python, and their sources stay the truth: the interpreter imports an
extension module in preference to the .py file beside it, so each package gets a manifest (``_compiled.json``)
with the SHA-256 of every source compiled, and ``cards.compiled`` refuses the import (so the service, or the tests,
do not start) when a source has changed since: run this again, or ``--clean``. The container image ships this form,
``python -m bench`` measures it, and the test command's second run tests it (bench/README.md, "Round 6").

Needs mypy (the test extra; its mypyc compiler) and a C compiler. The modules left out of the table are left out
for a reason given beside it; mypyc enforces the annotations at run time, so a compiled module whose annotation
says ``str`` and is handed an ``int`` raises TypeError: the compiled test run is also a check of the annotations.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def _load_check_module() -> ModuleType:
    """cards/compiled.py by its path: importing the ``cards`` package would run its check, which refuses a stale
    build, the very state this script repairs."""
    spec = importlib.util.spec_from_file_location("cmv_cds_compiled_check", ROOT / "cards" / "compiled.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {ROOT / 'cards' / 'compiled.py'}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_check = _load_check_module()
MANIFEST_NAME: str = _check.MANIFEST_NAME
extension_files: Callable[[Path], list[Path]] = _check.extension_files
source_digest: Callable[[Path], str] = _check.source_digest

# The group library of each package, ``<package>/_native__mypyc.*.so``: one C extension with the package's compiled
# code (the per-module extensions beside the sources are small shims into it).
GROUP_NAME = "_native"

# package → its modules compiled (paths relative to the package). Left interpreted in service/: app.py and the
# blueprints (Flask's decorators and closures, and what runs once per request there is Flask's own code),
# errors.py (mypyc compiles exception classes into native classes: werkzeug's HTTPException attributes are lost),
# logs.py (a compiled caller has no Python frame, so a log record would name the wrong caller's file and line),
# the once-per-process modules (config, cli, registry, openapi, gunicorn hooks), and those the tests replace
# functions of (audit_log, store, fhir_client: a compiled module calls its own functions directly, so a
# monkeypatched one would be silently bypassed).
COMPILED: dict[str, tuple[str, ...]] = {
    "cards": ("**/*.py",),
    "service": (
        "hooks.py",
        "draft_orders.py",
        "draft_schema.py",
        "metrics.py",
        "validation.py",
        "prefetch.py",
        "bundles.py",
        "medication_refs.py",
    ),
}


# Never compiled: the package inits (see ``sources``) and the build check they run (cards/compiled.py).
_INTERPRETED = frozenset({"__init__.py", "compiled.py"})


def sources(package: str, root: Path = ROOT) -> list[Path]:
    """The compiled sources of ``package``, sorted.

    Package ``__init__`` files stay interpreted: they run the build check before anything compiled is imported,
    and the package's group library lives inside the package, which a compiled package could not import while
    its own extension is being initialised. (So a compiled module's ``__file__`` is not beside its source: the
    modules find their data files from ``cards.PACKAGE_DIR`` and ``service.PACKAGE_DIR``.)
    """
    found: set[Path] = set()
    for pattern in COMPILED[package]:
        found.update(p for p in (root / package).glob(pattern) if p.is_file() and p.name not in _INTERPRETED)
    return sorted(found)


def clean(root: Path = ROOT) -> list[Path]:
    """Remove every compiled artefact of the table's packages; return what was removed."""
    removed: list[Path] = []
    for package in COMPILED:
        package_dir = root / package
        for path in [*extension_files(package_dir), package_dir / MANIFEST_NAME]:
            if path.exists():
                path.unlink()
                removed.append(path)
    return removed


def compile_in_place(root: Path = ROOT, opt_level: str = "3") -> dict[str, dict[str, str]]:
    """Compile the table's modules under ``root`` in place and write each package's manifest."""
    # Imported here: the rest of this module (the table, the manifests) is needed where mypyc is not installed.
    from mypyc.build import mypycify
    from setuptools import Distribution

    clean(root)
    previous = Path.cwd()
    os.chdir(root)  # mypyc names modules by their path relative to the working directory
    try:
        groups: list[tuple[list[str], str | None]] = [
            ([str(p.relative_to(root)) for p in sources(pkg, root)], f"{pkg}.{GROUP_NAME}") for pkg in COMPILED
        ]
        with tempfile.TemporaryDirectory(prefix="cmv-cds-mypyc-") as build_dir:
            extensions = mypycify(
                [path for paths, _ in groups for path in paths],
                opt_level=opt_level,
                separate=groups,
                target_dir=build_dir,
                verbose=False,
            )
            dist = Distribution({"name": "cmv-cds-compiled", "ext_modules": extensions})
            dist.script_args = [
                *("-q", "build_ext", "--inplace"),
                *("--build-temp", str(Path(build_dir) / "temp"), "--build-lib", str(Path(build_dir) / "lib")),
            ]
            dist.parse_command_line()
            dist.run_commands()
    finally:
        os.chdir(previous)

    manifests: dict[str, dict[str, str]] = {}
    for package in COMPILED:
        manifest = {str(p.relative_to(root / package)): source_digest(p) for p in sources(package, root)}
        (root / package / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        manifests[package] = manifest
    return manifests


def main(argv: list[str] | None = None) -> int:
    """Command line: compile in place (default) or ``--clean``."""
    parser = argparse.ArgumentParser(prog="scripts/compile_hot_path.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clean", action="store_true", help="remove the compiled extensions and manifests")
    parser.add_argument("--root", type=Path, default=ROOT, help="the tree to compile (default: this repository)")
    parser.add_argument("--opt-level", default="3", choices=["0", "1", "2", "3"], help="the C compiler's -O")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if args.clean:
        removed = clean(root)
        print(f"removed {len(removed)} compiled file(s) under {root}")
        return 0
    manifests = compile_in_place(root, args.opt_level)
    count = sum(len(m) for m in manifests.values())
    print(f"compiled {count} modules under {root}: " + ", ".join(f"{p} ({len(m)})" for p, m in manifests.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
