"""Clinical reasoning for CMV antiviral orders: facts, dosing tables, rules and cards (no HTTP)."""

from pathlib import Path
from typing import Final

from cards.compiled import check_package

# The package's directory. A compiled module's ``__file__`` is not beside its source
# (scripts/compile_hot_path.py), so the modules locate their data from here.
PACKAGE_DIR: Final = Path(__file__).resolve().parent
# How many of the package's modules run compiled (mypyc); 0 when interpreted. Refuses a stale build.
COMPILED_MODULES: Final = check_package(PACKAGE_DIR)
