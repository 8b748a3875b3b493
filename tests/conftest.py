"""Test-session setup: tests import the package from the checkout and the helpers from tests/helpers/."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "tests" / "helpers")):
    if p not in sys.path:
        sys.path.insert(0, p)
