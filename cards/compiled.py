"""Whether a package runs compiled (mypyc, ``scripts/compile_hot_path.py``), and a refusal when its build is stale.

Python imports a C extension in preference to the .py file beside it, so a compiled module whose source was
edited afterwards would silently run the old code. Each compiled package carries a manifest with the SHA-256 of
every source compiled; ``check_package`` (run by the package's ``__init__``, which stays interpreted) refuses the
import when an extension has no manifest or a source no longer matches it. This module is never compiled.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Final

MANIFEST_NAME: Final = "_compiled.json"
_EXTENSION_SUFFIXES: Final = frozenset({".so", ".pyd"})


class StaleCompiledModules(ImportError):
    """A package's compiled extensions do not match its sources."""


def source_digest(path: Path) -> str:
    """The SHA-256 of a source file, as the manifest records it."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def extension_files(package_dir: Path) -> list[Path]:
    """The C extension modules under a package directory (any Python's suffix), sorted."""
    return sorted(p for p in package_dir.rglob("*") if p.suffix in _EXTENSION_SUFFIXES and p.is_file())


def read_manifest(package_dir: Path) -> dict[str, str] | None:
    """The package's manifest (source path relative to the package → SHA-256), or None if it is interpreted."""
    path = package_dir / MANIFEST_NAME
    if not path.is_file():
        return None
    manifest: dict[str, str] = json.loads(path.read_text(encoding="utf-8"))
    return manifest


def check_package(package_dir: Path) -> int:
    """Return how many of the package's modules are compiled (0: interpreted); raise ``StaleCompiledModules``,
    naming the files and the remedy, when its extensions and sources disagree."""
    manifest = read_manifest(package_dir)
    remedy = (
        "rebuild with `python scripts/compile_hot_path.py`, or remove the compiled files with "
        "`python scripts/compile_hot_path.py --clean` to run the sources"
    )
    if manifest is None:
        strays = extension_files(package_dir)
        if strays:
            raise StaleCompiledModules(
                f"{package_dir.name}/ holds compiled extensions without {MANIFEST_NAME} "
                f"({', '.join(p.name for p in strays[:3])}{', ...' if len(strays) > 3 else ''}): {remedy}"
            )
        return 0
    changed = [
        name
        for name, digest in sorted(manifest.items())
        if not (package_dir / name).is_file() or source_digest(package_dir / name) != digest
    ]
    if changed:
        raise StaleCompiledModules(
            f"{package_dir.name}/: {', '.join(changed)} changed since the package was compiled, and the compiled "
            f"code would run instead of the source: {remedy}"
        )
    return len(manifest)
