#!/usr/bin/env python3
"""Router comparison without installing the ``moe-dist`` script: same as ``moe-dist compare``.

python tools/compare_routers.py configs/compare.yaml --variants switch,simbal,lpr --parallel 2
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_dist.cli import main  # noqa: E402 - after making the checkout importable

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
